"""The delivered model: finalized, verified N:M, written as a Hugging Face directory.

`export_state` is what a run does at its end (rank 0, from the gathered state) and what
`sparsedist export CHECKPOINT OUT_DIR` does from a saved checkpoint. The directory holds
safetensors weights, the config and the tokenizer; `AutoModelForCausalLM.from_pretrained`
loads it. Method state never reaches it: masks are dropped, CAST scales and S-STE's β must
have been folded (value 1) by `finalize`, and SLoRB branches, which a transformers model
cannot express, are written beside the weights to `slorb.safetensors`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerFast

from sparsedist.checkpoint.dcp import TRAINER_FILE
from sparsedist.checkpoint.manifest import verify_manifest
from sparsedist.checkpoint.pieces import is_piece_checkpoint, load_module
from sparsedist.config import Recipe
from sparsedist.config.load import validate_recipe
from sparsedist.config.schema import ParallelConfig
from sparsedist.data import load_tokenizer
from sparsedist.models import export_pretrained
from sparsedist.parallel import ParallelBackend, init_runtime, shutdown
from sparsedist.train.student import Student, build_student

FOLDED = (".scale", ".beta")
"""Method parameters `finalize` folds into the weights, leaving ones."""


class ExportError(ValueError):
    """The model is not what the run claims to deliver."""


def verify_nm(state: dict[str, torch.Tensor], layers: list[str], n: int, m: int) -> None:
    """Every listed weight has at most n non-zeros in every group of m inputs."""
    for name in layers:
        weight = state[f"{name}.weight"]
        nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
        if (nonzero > n).any():
            bad = int((nonzero > n).sum())
            raise ExportError(f"{name}: {bad} groups of {m} hold more than {n} non-zeros")


def export_state(state: dict[str, torch.Tensor], recipe: Recipe, student: Student,
                 tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """Write a finalized full state dict as a Hugging Face directory, atomically."""
    layers = list(student.method.layers)
    if student.method.delivers_sparse:
        verify_nm(state, layers, recipe.sparsity.n, recipe.sparsity.m)
    for key, value in state.items():
        if key.endswith(FOLDED) and not torch.all(value == 1):
            raise ExportError(f"{key}: not folded into the weight (finalize the model first)")
    branches = {k: v.contiguous() for k, v in state.items() if ".branch." in k}
    weights = {k: v for k, v in state.items()
               if not k.endswith((".mask", *FOLDED)) and ".branch." not in k}
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    export_pretrained(weights, recipe.model, student.config, staging)
    tokenizer.save_pretrained(staging)
    if branches:
        save_file(branches, staging / "slorb.safetensors")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def export_checkpoint(checkpoint: Path, out: Path) -> None:
    """Load a training checkpoint in one process, finalize, verify and export it."""
    verify_manifest(checkpoint)
    trainer_state = json.loads((checkpoint / TRAINER_FILE).read_text())
    recipe = validate_recipe(trainer_state["recipe"])
    runtime = init_runtime()
    try:
        backend = ParallelBackend(ParallelConfig(backend="none"), runtime)
        tokenizer = load_tokenizer(recipe.data.dir / "tokenizer")
        student = build_student(recipe, backend, tokenizer, train=False)
        if is_piece_checkpoint(checkpoint):  # written by the DeepSpeed backend
            load_module(checkpoint, student.model)
        else:
            backend.load_state(checkpoint, student.model, None)
        student.method.finalize()
        export_state(backend.full_state_dict(student.model), recipe, student, tokenizer, out)
    finally:
        shutdown()
