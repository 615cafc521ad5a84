"""The delivered model: finalized, verified N:M, written as a Hugging Face directory.

`export_state` is what a run does at its end (rank 0, from the gathered state) and what
`sparsedist export CHECKPOINT OUT_DIR` does from a saved checkpoint. The directory holds
safetensors weights, the config and the tokenizer; `AutoModelForCausalLM.from_pretrained`
loads it. Method state never reaches it: masks are dropped, CAST scales and S-STE's β must
have been folded (value 1) by `finalize`, and SLoRB branches, which a transformers model
cannot express, are written beside the weights to `slorb.safetensors`.

`ExportOptions` add (docs/eval.md): weight-only quantization of the blocks' linears (the
directory's weights become the quantized values; `quantized.safetensors` holds the codes),
a compressed-tensors `sparse-24-bitmask` copy of the model in `compressed/`, and with either
a per-layer report of sparsity and bytes, `compression.json`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from sparsedist.checkpoint.checkpointer import TRAINER_FILE, load_state
from sparsedist.checkpoint.manifest import verify_manifest
from sparsedist.checkpoint.publish import staged
from sparsedist.config import Recipe
from sparsedist.config.load import validate_recipe
from sparsedist.config.schema import ParallelConfig
from sparsedist.data import load_tokenizer
from sparsedist.errors import ExportError
from sparsedist.models import FAMILIES, Family, export_pretrained, model_config
from sparsedist.parallel import ParallelBackend, init_runtime, shutdown
from sparsedist.sparsity.masks import nm_violations
from sparsedist.student import Student, build_student

FOLDED = (".scale", ".beta")
"""Method parameters `finalize` folds into the weights, leaving ones."""




@dataclass(frozen=True)
class ExportOptions:
    """What an export writes besides the dense-with-zeros weights."""

    compressed: bool = False
    """Also write `compressed/`: the 2:4 linears in compressed-tensors' sparse-24-bitmask layout."""
    quantize: str | None = None
    """`int8` (per output channel) or `int4` (per group): weight-only round-to-nearest, symmetric."""
    group_size: int = 128
    """int4: inputs per group."""


def verify_nm(state: dict[str, torch.Tensor], layers: list[str], n: int, m: int) -> None:
    """Every listed weight has at most n non-zeros in every group of m inputs."""
    for name in layers:
        bad = nm_violations(state[f"{name}.weight"], n, m)
        if bad:
            raise ExportError(f"{name}: {bad} groups of {m} hold more than {n} non-zeros")


def export_state(state: dict[str, torch.Tensor], recipe: Recipe, student: Student,
                 tokenizer: PreTrainedTokenizerFast, out: Path, options: ExportOptions | None = None) -> dict | None:
    """Write a finalized full state dict as a Hugging Face directory, atomically.

    Returns the report of `compression.json` when `options` ask for compression or quantization.
    """
    layers = list(student.method.layers)
    options = options or ExportOptions()
    family = FAMILIES[recipe.model.family]
    if options.compressed and (family.conv1d or not student.method.delivers_sparse):
        why = "Conv1D weights are stored [in, out]" if family.conv1d else "it delivers a dense model"
        raise ExportError(f"--compressed: {recipe.sparsity.method} on {family.name} has no 2:4 weights to compress "
                          f"({why})")
    if student.method.delivers_sparse:
        verify_nm(state, layers, recipe.sparsity.n, recipe.sparsity.m)
    for key, value in state.items():
        if key.endswith(FOLDED) and not torch.all(value == 1):
            raise ExportError(f"{key}: not folded into the weight (finalize the model first)")
    branches = {k: v.contiguous() for k, v in state.items() if ".branch." in k}
    weights = {k: v for k, v in state.items()
               if not k.endswith((".mask", *FOLDED)) and ".branch." not in k}
    quantized = None
    if options.quantize:
        from sparsedist.eval.quantize import BITS, quantize_state

        quantized = quantize_state(weights, family, BITS[options.quantize], options.group_size)
        weights = {**weights, **{f"{layer}.weight": q.dequantize().to(weights[f"{layer}.weight"].dtype)
                                 for layer, q in quantized.items()}}
    with staged(out) as staging:
        export_pretrained(weights, recipe.model, student.config, staging)
        tokenizer.save_pretrained(staging)
        if branches:
            save_file(branches, staging / "slorb.safetensors")
        extras = quantized or options.compressed
        report = _export_extras(weights, family, quantized, options, staging) if extras else None
    return report


def _export_extras(weights: dict[str, torch.Tensor], family: Family, quantized: dict | None, options: ExportOptions,
                   staging: Path) -> dict:
    """`quantized.safetensors`, `compressed/` and the report `compression.json`, in the staging directory."""
    from sparsedist.eval.compress import COMPRESSED_DIR, compress_dir
    from sparsedist.eval.quantize import BITS, QUANTIZED, save_quantized
    from sparsedist.eval.report import footprint, write_footprint

    quantized_sizes = compressed_sizes = None
    if quantized:
        quantized_sizes = save_quantized(staging / QUANTIZED, quantized, BITS[options.quantize], options.group_size)
    if options.compressed:
        compressed_sizes = compress_dir(staging, staging / COMPRESSED_DIR)
    report = footprint(weights, family, compressed_sizes, quantized_sizes, staging)
    write_footprint(report, staging)
    return report


def export_checkpoint(checkpoint: Path, out: Path, options: ExportOptions | None = None) -> dict | None:
    """Load a training checkpoint in one process, finalize, verify and export it (see `export_state`)."""
    verify_manifest(checkpoint)
    trainer_state = json.loads((checkpoint / TRAINER_FILE).read_text())
    recipe = validate_recipe(trainer_state["recipe"])
    runtime = init_runtime()
    try:
        backend = ParallelBackend(ParallelConfig(backend="none"), runtime)
        tokenizer = load_tokenizer(recipe.data.tokenizer_dir)
        config = model_config(recipe.model, len(tokenizer), recipe.data.seq_len, tokenizer.eos_token_id)
        student = build_student(recipe, backend, config, train=False)
        load_state(checkpoint, backend, student.method.store, student.model, None)
        student.method.finalize()
        return export_state(student.full_state(), recipe, student, tokenizer, out, options)
    finally:
        shutdown()


@contextmanager
def exported(path: Path, options: ExportOptions | None = None) -> Iterator[Path]:
    """A model directory for `path`: `path` itself, or a checkpoint's step folder exported exactly as
    `sparsedist export` does into a temporary directory, removed on exit."""
    path = Path(path)
    if not (path / TRAINER_FILE).is_file():
        yield path
        return
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(path, Path(tmp) / "model", options)
        yield Path(tmp) / "model"
