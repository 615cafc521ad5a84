"""2:4 weights in compressed-tensors' `sparse-24-bitmask` layout, and back to dense.

A compressed 2:4 weight `W` [rows, cols] of layer `L` is stored as three tensors, as the
`compressed-tensors` library (up to 0.14, which dropped the format) writes them for vLLM:

    L.compressed  [rows, cols/2], W's dtype: the kept values of each row, in column order
    L.bitmask     [rows, ceil(cols/8)] uint8: the kept positions, column 8k+j in bit j of byte k
                  (numpy `packbits(..., bitorder="little")`)
    L.shape       [2, 1] int64: (rows, cols)

Every group of 4 keeps exactly 2 positions: its non-zeros, completed with its first zeros
(compressed-tensors keeps the two largest |w|; both rules give the same dense weight).
Kept zeros are stored as +0.0, so decompression is bit-exact up to the sign of zero.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from sparsedist.errors import EvalError
from sparsedist.models import FAMILIES, Family
from sparsedist.sparsity.masks import nm_violations, pack_mask, unpack_mask

FORMAT = "sparse-24-bitmask"
PARTS = ("compressed", "bitmask", "shape")
WEIGHTS = "model.safetensors"
COMPRESSED_DIR = "compressed"
"""Where `sparsedist export --compressed` writes the compressed model inside the export directory."""


def is_24(weight: torch.Tensor) -> bool:
    """Whether a 2-D weight has at most 2 non-zeros in every group of 4 consecutive inputs."""
    return weight.dim() == 2 and weight.shape[1] % 4 == 0 and nm_violations(weight, 2, 4) == 0


def keep_mask(weight: torch.Tensor) -> torch.Tensor:
    """Exactly 2 kept positions per group of 4: the non-zeros, then the first zeros."""
    rows, cols = weight.shape
    nonzero = (weight != 0).reshape(rows, cols // 4, 4).to(torch.int8)
    kept = torch.sort(nonzero, dim=-1, descending=True, stable=True).indices[..., :2]
    return torch.zeros_like(nonzero, dtype=torch.bool).scatter_(-1, kept, True).reshape(rows, cols)


def compress24(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """`compressed`, `bitmask` and `shape` of a 2:4 weight (any dtype, int8 codes included)."""
    if not is_24(weight):
        raise EvalError(f"a weight of shape {tuple(weight.shape)} is not 2:4 sparse")
    rows, cols = weight.shape
    mask = keep_mask(weight)
    values = weight[mask].reshape(rows, cols // 2)
    values = torch.where(values == 0, torch.zeros_like(values), values)
    return {"compressed": values, "bitmask": pack_mask(mask), "shape": torch.tensor([[rows], [cols]])}


def decompress24(compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    """The dense weight of `compress24`'s three tensors."""
    rows, cols = (int(v) for v in shape.flatten())
    mask = unpack_mask(bitmask, cols)
    if mask.shape != (rows, cols) or not (mask.sum(1) == cols // 2).all():
        raise EvalError(f"a bitmask of shape {tuple(bitmask.shape)} does not keep half of a {rows}x{cols} weight")
    dense = torch.zeros(rows, cols, dtype=compressed.dtype)
    dense[mask] = compressed.flatten()
    return dense


def family_of(config: dict) -> Family:
    """The sparsedist family of a Hugging Face config."""
    family = FAMILIES.get(config.get("model_type", ""))
    if family is None:
        raise EvalError(f"model type {config.get('model_type')!r} is not one of {', '.join(FAMILIES)}")
    return family


def block_linears(names: list[str], family: Family) -> list[str]:
    """The layer names of the blocks' linears (attention and FFN) among state-dict keys."""
    linears = "|".join(map(re.escape, family.linears("all")))
    pattern = re.compile(rf"^{re.escape(family.blocks_path)}\.\d+\.({linears})\.weight$")
    return [name.removesuffix(".weight") for name in names if pattern.match(name)]


def read_config(model_dir: Path) -> dict:
    """A model directory's config.json as a dict."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise EvalError(f"{model_dir}: no config.json (not a model directory)")
    return json.loads(path.read_text())


def read_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's safetensors weights (one file or a sharded index)."""
    model_dir = Path(model_dir)
    index = model_dir / f"{WEIGHTS}.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [WEIGHTS]
    state = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise EvalError(f"{model_dir}: {name} is missing")
        with safe_open(model_dir / name, framework="pt") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    return state


def is_compressed(model_dir: Path) -> bool:
    """Whether a model directory holds `sparse-24-bitmask` weights."""
    config = read_config(model_dir).get("quantization_config") or {}
    return (config.get("sparsity_config") or {}).get("format") == FORMAT


def compress_dir(model_dir: Path, out: Path) -> dict[str, int]:
    """Write `model_dir` (a dense-with-zeros export) to `out` with its 2:4 block linears compressed.

    Returns the stored bytes of each compressed layer. Refuses GPT-2, whose Conv1D weights are
    stored [in, out] (a 2:4 group runs down a column there).
    """
    config = read_config(model_dir)
    family = family_of(config)
    if family.conv1d:
        raise EvalError(f"{family.name}: Conv1D weights are stored [in, out]; sparse-24-bitmask needs [out, in]")
    state = read_state(model_dir)
    linears = block_linears(list(state), family)
    targets = [layer for layer in linears if is_24(state[f"{layer}.weight"])]
    if not targets:
        raise EvalError(f"{model_dir}: no 2:4 weights to compress")
    stored, sizes = {}, {}
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if layer in targets and key.endswith(".weight"):
            parts = compress24(value)
            stored.update({f"{layer}.{part}": tensor for part, tensor in parts.items()})
            sizes[layer] = sum(t.nbytes for t in parts.values())
        else:
            stored[key] = value.contiguous()
    zeros = sum(int((v == 0).sum()) for v in state.values() if v.is_floating_point())
    total = sum(v.numel() for v in state.values() if v.is_floating_point())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": FORMAT,
            "sparsity_structure": "2:4",
            "targets": targets,
            "ignore": [layer for layer in [*linears, "lm_head"] if layer not in targets],
            "global_sparsity": zeros / total,
        },
    }
    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in Path(model_dir).iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in ("config.json",
                                                                                  f"{WEIGHTS}.index.json"):
            shutil.copy2(path, out / path.name)
    save_file(stored, out / WEIGHTS, metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return sizes


def decompressed_state(model_dir: Path) -> dict[str, torch.Tensor]:
    """The dense state dict of a compressed directory."""
    stored = read_state(model_dir)
    layers = {key.rsplit(".", 1)[0] for key in stored if key.endswith(".bitmask")}
    state = {key: value for key, value in stored.items() if key.rsplit(".", 1)[0] not in layers}
    for layer in sorted(layers):
        state[f"{layer}.weight"] = decompress24(*(stored[f"{layer}.{part}"] for part in PARTS))
    return state


def load_compressed(model_dir: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Rebuild the dense model of a compressed directory (no compressed-tensors needed)."""
    if not is_compressed(model_dir):
        raise EvalError(f"{model_dir}: not a {FORMAT} model directory")
    config = AutoConfig.from_pretrained(model_dir)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(decompressed_state(model_dir), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise EvalError(f"{model_dir}: weights do not match the config (missing {sorted(set(missing) - tied)}, "
                        f"unexpected {sorted(unexpected)})")
    model.tie_weights()
    return model.eval()
