"""Any model sparsedist delivers, loaded for evaluation: an exported directory (dense with
zeros, or quantized), a compressed 2:4 directory, or a training checkpoint's step folder."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from sparsedist.checkpoint import TRAINER_FILE
from sparsedist.data import load_tokenizer
from sparsedist.eval.compress import is_compressed, load_compressed
from sparsedist.eval.errors import EvalError


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a training checkpoint's step folder."""
    return (Path(path) / TRAINER_FILE).is_file()


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The fp32 model of `path` in eval mode on `device`, and its tokenizer.

    A checkpoint is finalized and exported (to a temporary directory) exactly as
    `sparsedist export` does, so it is evaluated as the model it would deliver.
    """
    path = Path(path)
    if is_checkpoint(path):
        from sparsedist.export import export_checkpoint

        with tempfile.TemporaryDirectory() as tmp:
            export_checkpoint(path, Path(tmp) / "model")
            return load_model(Path(tmp) / "model", device)
    if not (path / "config.json").is_file():
        raise EvalError(f"{path}: neither a model directory (config.json) nor a checkpoint ({TRAINER_FILE})")
    if is_compressed(path):
        model = load_compressed(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval(), load_tokenizer(path)
