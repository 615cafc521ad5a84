"""Weight-only round-to-nearest quantization: symmetric int8 per output channel, int4 per group.

For a group g of consecutive inputs of one row (int8: the whole row; int4: `group_size`
inputs, the last group of a row possibly shorter):

    s_g = fp16(max(max|w_g| / qmax, 2^-14))     qmax = 127 (int8) or 7 (int4)
    q   = clamp(round(w · (1/s_g)), -qmax, qmax)  (round half to even, in fp32)
    w'  = q · s_g                                 (exact in fp32: 8 bits × 11 bits)

so |w − w'| ≤ s_g/2 (up to fp32 rounding of w·(1/s_g)) and zeros stay zeros, which keeps
2:4 weights 2:4. The floor 2^-14 (fp16's smallest normal) keeps every scale a normal fp16
number. The reference below is the path on CPU; on CUDA, with torchao installed and the
groups dividing the row, torchao's affine primitives compute the same codes and scales.

`quantized.safetensors` (sparsedist's own layout, not a compressed-tensors format) holds for
each quantized layer L: `L.scales` [rows, groups] fp16, `L.shape` [2, 1] int64, and the codes:
`L.codes` [rows, cols] int8 (int4: two codes a byte, even column in the low nibble, as 4-bit
two's complement), or, for a 2:4 weight, its 2:4-compressed codes `L.codes_compressed`
(packed the same way) with `L.codes_bitmask`, laid out as in `sparsedist.eval.compress`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsedist.errors import EvalError
from sparsedist.eval.compress import block_linears, compress24, decompress24, is_24
from sparsedist.models import Family

BITS = {"int8": 8, "int4": 4}
SCALE_DTYPE = torch.float16
MIN_SCALE = torch.finfo(SCALE_DTYPE).smallest_normal
QUANTIZED = "quantized.safetensors"


def qmax(bits: int) -> int:
    """The largest code of a symmetric `bits`-bit quantizer (the range is [-qmax, qmax])."""
    return 2 ** (bits - 1) - 1


@dataclass
class QuantizedWeight:
    """Integer codes [rows, cols] and their fp16 scales [rows, groups] of `group` inputs each."""

    codes: torch.Tensor
    scales: torch.Tensor
    group: int

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight the codes stand for (exact: codes × fp16 scales fit fp32)."""
        scales = self.scales.float().repeat_interleave(self.group, dim=1)[:, : self.codes.shape[1]]
        return self.codes.float() * scales


def quantize_weight(weight: torch.Tensor, bits: int, group_size: int = 128,
                    torchao: bool | None = None) -> QuantizedWeight:
    """Quantize a [out, in] weight; `torchao` None picks torchao on CUDA where it applies."""
    cols = weight.shape[1]
    group = cols if bits == 8 else min(group_size, cols)
    if torchao is None:
        torchao = weight.is_cuda and cols % group == 0 and _has_torchao()
    weight = weight.float()
    return _torchao(weight, bits, group) if torchao else _reference(weight, bits, group)


def _reference(weight: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    rows, cols = weight.shape
    grouped = nn.functional.pad(weight, (0, -cols % group)).reshape(rows, -1, group)
    scales = (grouped.abs().amax(-1) / qmax(bits)).clamp(min=MIN_SCALE).to(SCALE_DTYPE)
    inverse = 1.0 / scales.float().unsqueeze(-1)
    codes = torch.clamp(torch.round(grouped * inverse), -qmax(bits), qmax(bits)).to(torch.int8)
    return QuantizedWeight(codes.reshape(rows, -1)[:, :cols].contiguous(), scales, group)


def _has_torchao() -> bool:
    try:
        import torchao.quantization.quant_primitives  # noqa: F401
    except ImportError:
        return False
    return True


def _torchao(weight: torch.Tensor, bits: int, group: int) -> QuantizedWeight:
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, quantize_affine

    if weight.shape[1] % group:
        raise EvalError(f"torchao needs groups of {group} to divide the {weight.shape[1]} inputs of a row")
    block, limit = (1, group), qmax(bits)
    scales, zeros = choose_qparams_affine(weight, MappingType.SYMMETRIC, block, torch.int8, -limit, limit,
                                      eps=MIN_SCALE, scale_dtype=SCALE_DTYPE)
    scales = scales.reshape(weight.shape[0], -1)
    codes = quantize_affine(weight, block, scales.float(), zeros, torch.int8, -limit, limit)
    return QuantizedWeight(codes, scales, group)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes in [-8, 7] → [rows, ceil(cols/2)] uint8, even column in the low nibble."""
    nibbles = nn.functional.pad(codes, (0, codes.shape[1] % 2)).to(torch.uint8) & 0xF
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_int4`."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :cols]
    return nibbles.to(torch.int8) - 16 * (nibbles > 7).to(torch.int8)


def quantize_state(state: dict[str, torch.Tensor], family: Family, bits: int,
                   group_size: int) -> dict[str, QuantizedWeight]:
    """Quantize the blocks' linear weights of a [out, in] state dict, by layer name."""
    return {layer: quantize_weight(state[f"{layer}.weight"], bits, group_size)
            for layer in block_linears(list(state), family)}


def save_quantized(path: Path, quantized: dict[str, QuantizedWeight], bits: int, group_size: int) -> dict[str, int]:
    """Write `quantized.safetensors`; returns the stored bytes of each layer."""
    tensors, sizes = {}, {}
    pack = pack_int4 if bits == 4 else (lambda codes: codes)
    for layer, q in quantized.items():
        parts = {"scales": q.scales, "shape": torch.tensor([[q.codes.shape[0]], [q.codes.shape[1]]])}
        if is_24(q.codes):
            compressed = compress24(q.codes)
            parts.update(codes_compressed=pack(compressed["compressed"]), codes_bitmask=compressed["bitmask"])
        else:
            parts["codes"] = pack(q.codes)
        tensors.update({f"{layer}.{name}": t.contiguous() for name, t in parts.items()})
        sizes[layer] = sum(t.nbytes for t in parts.values())
    save_file(tensors, path, metadata={"bits": str(bits), "group_size": str(group_size)})
    return sizes


def load_quantized(path: Path) -> dict[str, QuantizedWeight]:
    """Read `quantized.safetensors` back, by layer name."""
    with safe_open(path, framework="pt") as f:
        bits, group_size = (int(f.metadata()[key]) for key in ("bits", "group_size"))
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    quantized = {}
    for layer in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        rows, cols = (int(v) for v in tensors[f"{layer}.shape"].flatten())
        scales = tensors[f"{layer}.scales"]
        if f"{layer}.codes" in tensors:
            codes = tensors[f"{layer}.codes"]
            codes = unpack_int4(codes, cols) if bits == 4 else codes
        else:
            kept = tensors[f"{layer}.codes_compressed"]
            kept = unpack_int4(kept, cols // 2) if bits == 4 else kept
            codes = decompress24(kept, tensors[f"{layer}.codes_bitmask"], tensors[f"{layer}.shape"])
        quantized[layer] = QuantizedWeight(codes, scales, cols if bits == 8 else min(group_size, cols))
    return quantized


@torch.no_grad()
def quantize_model_(model: nn.Module, family: Family, bits: int, group_size: int = 128) -> None:
    """Replace the blocks' linear weights of a loaded model by their quantized values, in place."""
    for layer in block_linears([f"{name}.weight" for name, _ in model.named_modules()], family):
        module = model.get_submodule(layer)
        if not isinstance(module, nn.Linear):
            raise EvalError(f"{layer}: a {type(module).__name__}, not an nn.Linear ([out, in] weight)")
        module.weight.copy_(quantize_weight(module.weight, bits, group_size).dequantize())
