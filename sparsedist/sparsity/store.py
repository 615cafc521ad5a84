"""The mask store: every N:M mask of a model, stored like its weight, decided on whole groups.

A mask is a frozen uint8 parameter of its `SparseLinear`, one bit per weight, packed in
rows of `mask_row` elements of the flattened weight. The store picks the row from the
backend's layout: the weight's own rows where the backend stores whole rows (one process,
FSDP2, ZeRO-1/2), so FSDP2 shards the mask with the same `Shard(0)` rows as the weight and
gathers it in the same collective; one row per partition where the backend cuts parameters
flat (ZeRO-3), so each rank's partition of the mask holds exactly the bits of its partition
of the weight. No rank holds a full mask where the weight is not whole.

The store owns everything done with those bits: which bits a rank holds and the mask of any
range of a piece (`mask_range`), refresh (`refresh`: whole N:M groups decided on the rank's
own piece completed by its neighbours' edge values, or, for 4×4 blocks and replicated masks,
on the gathered weight alike on every rank; flips and sparsity reduced over all ranks), the
alignment of masks with the optimizer's flat tensors (`align`, once; `update_mask`), global
statistics, and the masks' state for checkpoints in a layout-free form. It calls the backend
only for layout primitives and collectives.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sparsedist.parallel.backend import ParallelBackend, Piece
from sparsedist.sparsity.layer import SparseLinear
from sparsedist.sparsity.masks import count_ones, pack_mask, pack_rows, packed_width, unpack_rows

Decide = Callable[[torch.Tensor], torch.Tensor]
"""Bool mask of a weight: of whole groups viewed [groups, m], or of whole rows [rows, in]."""


NEAR_ZERO = 0.01
"""`pruned_near_zero` counts pruned weights within this fraction of their layer's kept RMS."""


class MaskStore:
    """The masks of one model's sparse layers (`layers`, by full name)."""

    def __init__(self, backend: ParallelBackend, m: int):
        self.backend = backend
        self.m = m
        self.layers: dict[str, SparseLinear] = {}
        self._flips: torch.Tensor | None = None
        """[flips, elements] of the latest `refresh`, summed over ranks on the device (float64), unread."""
        self._aligned: dict[int, list[tuple[int, SparseLinear, int, int]]] | None = None

    # --- storage ---------------------------------------------------------------------------

    def mask_row(self, linear: nn.Linear) -> int:
        """Elements per packed row of a layer's mask: its weight rows, or one partition of the weight."""
        return self.backend.partition_size(linear.weight.numel()) or linear.in_features

    def add(self, name: str, layer: SparseLinear) -> None:
        self.layers[name] = layer

    def held(self, layer: SparseLinear) -> tuple[torch.Tensor, int]:
        """The packed mask rows this rank stores for `layer`, and the flat index of their first element."""
        rows, first = self.backend.stored_rows(layer.mask)
        return rows, first * layer.mask_row

    def mask_range(self, layer: SparseLinear, lo: int, hi: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """Flat mask (bool, or 0/1 in `dtype`) of the weight's flattened elements [lo, hi), from the bits this
        rank holds (no collective)."""
        bits, origin = self.held(layer)
        mask = unpack_rows(bits, layer.mask_row, lo - origin, hi - origin, dtype)
        if lo < origin or mask.numel() != hi - lo:
            raise RuntimeError(f"the mask bits held here cover {mask.numel()} of the {hi - lo} weights [{lo}, {hi}) "
                               "of a piece: misaligned sharding")
        return mask

    @torch.no_grad()
    def set_piece(self, layer: SparseLinear, piece: Piece, mask: torch.Tensor) -> torch.Tensor:
        """Store the flat bool mask of `piece` in the bits this rank holds (no collective); returns how many
        bits changed (a 0-d tensor, counted on the packed bits: no synchronisation)."""
        bits, origin = self.held(layer)
        if origin != piece.start:
            raise RuntimeError(f"mask bits from element {origin} cannot store a piece from {piece.start}")
        new = pack_rows(mask, bits.shape[0], layer.mask_row)
        flips = count_ones(bits ^ new)
        bits.copy_(new)
        return flips

    def full(self, layer: SparseLinear) -> torch.Tensor:
        """The [out, in] bool mask on every rank (a collective on sharded backends)."""
        return layer.dense_mask(self.backend.full_tensor(layer.mask))

    def set_full(self, layer: SparseLinear, mask: torch.Tensor) -> None:
        """Store this rank's share of a full [out, in] bool mask (all ranks call)."""
        rows = -(-mask.numel() // layer.mask_row)
        self.backend.set_full(layer.mask, pack_rows(mask, rows, layer.mask_row))

    # --- decisions -------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self, decide: Decide, group_local: bool) -> None:
        """Recompute every mask with `decide` and record the global flip rate (all ranks call). Decisions of
        whole N:M groups (`group_local`) run on this rank's pieces where each rank stores its own pieces;
        others (4×4 blocks, replicated masks) on the gathered weight, alike on every rank."""
        flips = torch.zeros((), dtype=torch.float64, device=self.backend.runtime.device)
        elements = 0
        layers = list(self.layers.values())
        if group_local and self.backend.stores_own_pieces:
            m = self.m
            grouped = self.backend.whole_groups([layer.weight for layer in layers], m)
            for layer, (piece, groups) in zip(layers, grouped, strict=True):
                lead = piece.start % m
                new = decide(groups.view(-1, m)).view(-1)[lead: lead + piece.weight.numel()]
                flips += self.set_piece(layer, piece, new)
                elements += new.numel()
        else:
            for layer in layers:
                old = self.full(layer)
                new = decide(self.backend.full_tensor(layer.weight))
                if self.backend.runtime.is_main:  # the same full tensors on every rank: count once
                    flips += (old != new).sum()
                    elements += new.numel()
                self.set_full(layer, new)
        counts = torch.stack([flips, torch.full_like(flips, elements)])  # a fill: no host-to-device copy
        self._flips = self.backend.sum_over_ranks(counts)  # read only by `flip_rate` (logging steps)

    @property
    def flip_rate(self) -> float | None:
        """Global share of mask bits the latest `refresh` changed (None before the first one after `start`);
        reading it reads the counts back to the host."""
        if self._flips is None:
            return None
        flips, elements = self._flips.tolist()
        return flips / elements if elements else 0.0

    def forget_flips(self) -> None:
        """No refresh has happened yet (`flip_rate` None): the first masks are not flips."""
        self._flips = None

    # --- the optimizer's view --------------------------------------------------------------

    def align(self) -> None:
        """Record, once the optimizer is prepared, which sparse weight pieces each optimizer tensor holds and
        where, and check that this rank's mask bits cover its pieces. Every tensor gets an entry (possibly
        empty): one without is an error in `update_mask`, never a dense update."""
        layers = {id(layer.weight): layer for layer in self.layers.values()}
        self._aligned = {}
        for tensor, members in self.backend.optimizer_layout():
            entries = []
            for param, offset in members:
                if id(param) in layers:
                    piece = self.backend.piece(param)
                    entries.append((offset, layers[id(param)], piece.start, piece.weight.numel()))
            self._aligned[id(tensor)] = entries
        if self.backend.stores_own_pieces:
            for name, layer in self.layers.items():
                piece = self.backend.piece(layer.weight)
                bits, origin = self.held(layer)
                whole = bits.shape[-1] == packed_width(layer.mask_row) and bits.shape[0] * layer.mask_row >= len(piece)
                if len(piece) and (origin != piece.start or not whole):
                    raise RuntimeError(f"{name}: this rank holds mask bits from element {origin} but weight elements "
                                       f"[{piece.start}, {piece.stop}): misaligned sharding (is DeepSpeed's "
                                       "stage3_param_persistence_threshold overridden?)")

    def update_mask(self, tensor: torch.Tensor, part: slice, dtype: torch.dtype = torch.bool) -> torch.Tensor | None:
        """The mask (bool, or 0/1 in `dtype`) of elements `part` of an optimizer tensor's local flat values
        (None: no sparse weight there). Unpacked per call into a fresh tensor the caller may overwrite, so it
        costs no more than `part`; elements of no sparse weight count as kept."""
        try:
            members = self._aligned[id(tensor)]
        except (KeyError, TypeError):
            raise RuntimeError("an optimizer tensor has no mask aligned with it: the store was not aligned with "
                               "the prepared optimizer, or the optimizer holds a tensor the backend did not "
                               "report") from None
        lo, hi = part.start, min(part.stop, self.backend.local(tensor).numel())
        mask = None
        for offset, layer, start, held in members:
            first, last = max(lo, offset), min(hi, offset + held)
            where = (start + first - offset, start + last - offset)  # in the weight's flattened elements
            if (first, last) == (lo, hi):  # one piece covers the whole part
                return self.mask_range(layer, *where, dtype)
            if first < last:
                if mask is None:
                    mask = torch.ones(hi - lo, dtype=dtype, device=tensor.device)
                mask[first - lo: last - lo] = self.mask_range(layer, *where, dtype)
        return mask

    # --- statistics and state --------------------------------------------------------------

    def local_pieces(self) -> list[tuple[SparseLinear, Piece, torch.Tensor]]:
        """(layer, this rank's weight piece, its flat bool mask) for every layer (no collective)."""
        out = []
        for layer in self.layers.values():
            piece = self.backend.piece(layer.weight)
            out.append((layer, piece, self.mask_range(layer, piece.start, piece.stop)))
        return out

    @torch.no_grad()
    def statistics(self) -> dict[str, float]:
        """Global statistics (all ranks call): masks' sparsity, flip rate of the latest refresh, the share of
        weight norm² still on pruned positions (how far the dense weights are from their 2:4 prune), and the
        share of pruned weights already near zero: |w| ≤ NEAR_ZERO × the root mean square of their layer's
        kept weights (two collectives, one read-back)."""
        if not self.layers:
            return {}
        pieces = self.local_pieces()
        device = self.backend.runtime.device
        sums = torch.zeros(4 + 2 * len(pieces), dtype=torch.float64, device=device)  # kept, total, pruned², all²
        for i, (_, piece, mask) in enumerate(pieces):  # then each layer's kept² and kept count
            sq = piece.weight.double().square()
            sums[:4] += torch.stack([mask.sum().double(), torch.full_like(sums[0], mask.numel()), sq[~mask].sum(),
                                     sq.sum()])
            sums[4 + 2 * i : 6 + 2 * i] += torch.stack([sq[mask].sum(), mask.sum().double()])
        sums = self.backend.sum_over_ranks(sums)
        kept_sq, kept = sums[4:].view(-1, 2).unbind(1)
        limits = NEAR_ZERO ** 2 * kept_sq / kept.clamp(min=1)
        near = torch.zeros(1, dtype=torch.float64, device=device)
        for i, (_, piece, mask) in enumerate(pieces):
            near += (piece.weight.double().square()[~mask] <= limits[i]).sum()
        near = self.backend.sum_over_ranks(near)
        kept, total, pruned_sq, all_sq, near = torch.cat([sums[:4], near]).tolist()  # the one read-back
        out = {"sparsity": 1.0 - kept / total, "pruned_weight_share": pruned_sq / all_sq if all_sq else 0.0,
               "pruned_near_zero": near / (total - kept) if total > kept else 1.0}
        if self.flip_rate is not None:
            out["flip_rate"] = self.flip_rate
        return out

    def state_names(self) -> set[str]:
        """The model state names of the masks."""
        return {f"{name}.mask" for name in self.layers}

    def state_pieces(self) -> dict[str, tuple[int, torch.Tensor]]:
        """Each mask as the flat bool mask of this rank's weight piece, with its offset: a layout-free form any
        world size and backend reads back (no collective)."""
        out = {}
        for name, layer in self.layers.items():
            piece = self.backend.piece(layer.weight)
            out[f"{name}.mask"] = (piece.start, self.mask_range(layer, piece.start, piece.stop))
        return out

    def load_state(self, full: Callable[[str, int], torch.Tensor]) -> None:
        """Set every mask from the full flat bool masks a checkpoint holds (all ranks call)."""
        for name, layer in self.layers.items():
            flat = full(f"{name}.mask", layer.out_features * layer.in_features)
            self.set_full(layer, flat.view(layer.out_features, -1))

    def weight_rows(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A full state dict with every mask packed in weight rows (the layout of one process), whatever the
        backend's layout: what exports and comparisons across backends read."""
        for name, layer in self.layers.items():
            key = f"{name}.mask"
            if key in state and layer.mask_row != layer.in_features:
                state[key] = pack_mask(layer.dense_mask(state[key]))
        return state
