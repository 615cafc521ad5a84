"""Adam whose second moment and step use a modified first moment: AST's optimizer and CAST's AdamS.

For every parameter, with g its gradient and t its step count:

    m ← β₁m + (1−β₁)g              the stored buffer: the raw gradient EMA, never overwritten
    u = modify(param, W, m, t)      AST: m + λ(t)(1−M)⊙W;  CAST: (1−α_t)m + α_t·λ·sign(W) where M = 0
    v ← β₂v + (1−β₂)u²              from u, for every parameter (dense ones have u = m)
    W ← W(1−γ·wd) − γ·(u/(1−β₁ᵗ)) / (√(v/(1−β₂ᵗ)) + ε)

t counts the updates this optimizer has made (a step skipped for non-finite gradients is not
one; a checkpoint restores it), so the schedules of `modify` need no step from outside. It is
kept as a Python int beside the `step` state tensor (which checkpoints save), and read from that
tensor only once after it is created elsewhere or written by a load: a step reads nothing back.
Because v is built from the smoothed u rather than from g², steps are larger than
AdamW's at the same learning rate (about 2.5× on the tiny models): recipes lower lr.
All arithmetic runs on each rank's local values (rows under FSDP2, a flat partition under
ZeRO), element-wise. The state tensors are shaped like the parameters (DTensors under FSDP2)
so checkpoints reshard them like the weights.

Batching. Within a parameter group, the local flat values of the parameters that have a gradient
are cut into pieces of at most CHUNK elements (a parameter larger than CHUNK gives several), and
consecutive pieces of the same device, dtype and step count are packed into batches of at most
CHUNK elements in all. Each batch is updated by one `torch._foreach_*` call per operation (8 of
them) plus the batch form of `modify`, so the number of operations per step is about
8 × (number of batches) + what `modify` does per piece (AST and CAST: unpacking each piece's mask,
then 2 and 5 foreach calls per batch), instead of about 10 per parameter and per 2²⁰ elements as
before. Peak scratch memory: `modify` returns u in new tensors for the pieces holding sparse
weights (at most CHUNK elements) while their unpacked masks and one intermediate of the same size
live, and the denominator √(v̂)+ε takes CHUNK more, so at most about 2 × CHUNK elements of the
parameters' dtype (2 × 2²⁴ fp32 = 128 MiB; plus one piece's mask-unpacking intermediates),
whatever the size of the model or of a parameter;
these are ordinary allocations that the caching allocator reuses from batch to batch. CHUNK = 2²⁴
keeps that scratch small next to the moments (8 bytes per fp32 parameter).

Launches (bench/optimizer_ops.py; docs/benchmarks.md, "Optimizer kernel launches"). Counted as
top-level aten operations of one step at Llama-2-7B's structure, unsharded: AST 76,926 and CAST
97,470 with the former per-2²⁰-element loop (11–14 per million elements: about 0.4–0.5 s per step at
an assumed 5 µs per GPU launch), 5,134 and 6,398 now (about 26 and 32 ms at that assumption); torch's
AdamW takes 2,847 (for-loop) and 601 (foreach). Most of what remains is unpacking each piece's mask
(several operations per piece, in `MaskStore.update_mask`), not the update. On a GPU one foreach
call launches one kernel per ~100 tensors or some tens of millions of elements, so calls are close to
launches; on the CPU a foreach call runs the per-tensor kernels one after the other, and batches of
2²⁴ elements leave the caches, so the CPU wall time per step is no better than before.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

Local = Callable[[torch.Tensor], torch.Tensor]
Modify = Callable[[list[torch.Tensor], list[slice], list[torch.Tensor], list[torch.Tensor], int], list[torch.Tensor]]
"""(the parameters of a batch's pieces, each piece's slice of its parameter's flattened local values, W and m of
each piece, 0-based index t − 1 of this update) -> u of each piece: m itself, or a new tensor of its size."""
CHUNK = 1 << 24
"""Most elements in one piece of a parameter and in one batch of pieces (see the module docstring)."""
Piece = tuple[torch.Tensor, slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(parameter, slice of its flat local values, and that slice of W, g, m and v)."""


def batches(pieces: list[Piece], limit: int) -> list[list[Piece]]:
    """Consecutive pieces (each at most `limit` elements) packed into lists of at most `limit` elements in all."""
    out: list[list[Piece]] = []
    size = limit + 1
    for piece in pieces:
        n = piece[2].numel()
        if size + n > limit:
            out.append([])
            size = 0
        out[-1].append(piece)
        size += n
    return out


class MomentAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 local: Local, modify: Modify):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.local = local
        self.modify = modify
        self._counts: dict[torch.Tensor, tuple[torch.Tensor, int, int]] = {}
        """Per parameter: (its `step` state tensor, that tensor's version, its value) as last seen here."""

    @torch.no_grad()
    def init_state(self) -> None:
        """Create zero moments for every parameter without a step (checkpoint loaders call it:
        DCP would otherwise take a zero-gradient step, which `modify` must not see)."""
        for group in self.param_groups:
            for param in group["params"]:
                self._state(param)

    def _state(self, param: torch.Tensor) -> dict:
        state = self.state[param]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            self._counts[param] = (state["step"], state["step"]._version, 0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        return state

    def _count(self, param: torch.Tensor, step: torch.Tensor) -> int:
        """Updates made to `param`, as a Python int: read from its `step` tensor only where that tensor is new or
        was written elsewhere (a checkpoint load), so a step reads no tensor back (on the CPU any read counts)."""
        seen = self._counts.get(param)
        if seen is not None and seen[0] is step and seen[1] == step._version:
            return seen[2]
        return int(step.item())

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            pieces: dict[tuple[torch.device, torch.dtype, int], list[Piece]] = {}
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self._state(param)
                t = self._count(param, state["step"]) + 1
                w, g = self.local(param).view(-1), self.local(param.grad).view(-1)
                m, v = self.local(state["exp_avg"]).view(-1), self.local(state["exp_avg_sq"]).view(-1)
                into = pieces.setdefault((w.device, w.dtype, t), [])
                if w.numel() <= CHUNK:
                    into.append((param, slice(0, w.numel()), w, g, m, v))
                    continue
                for start in range(0, w.numel(), CHUNK):
                    part = slice(start, start + CHUNK)
                    into.append((param, part, w[part], g[part], m[part], v[part]))
            for (_, _, t), listed in pieces.items():
                self._steps(listed, t)
                for batch in batches(listed, CHUNK):
                    self._update(group, batch, t)
        return None

    def _steps(self, pieces: list[Piece], t: int) -> None:
        """Set the `step` tensors (which checkpoints save and load) of these pieces' parameters to t."""
        params = list({id(piece[0]): piece[0] for piece in pieces}.values())
        steps = [self.state[param]["step"] for param in params]
        torch._foreach_zero_(steps)
        torch._foreach_add_(steps, float(t))  # exact: t < 2²⁴
        for param, step in zip(params, steps, strict=True):
            self._counts[param] = (step, step._version, t)

    def _update(self, group: dict, batch: list[Piece], t: int) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        params, parts, w, g, m, v = (list(column) for column in zip(*batch, strict=True))
        torch._foreach_lerp_(m, g, 1 - beta1)
        u = self.modify(params, parts, w, m, t - 1)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, u, u, value=1 - beta2)
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(1 - beta2**t))
        torch._foreach_add_(denom, eps)
        torch._foreach_mul_(w, 1 - lr * wd)
        torch._foreach_addcdiv_(w, u, denom, value=-lr / (1 - beta1**t))
