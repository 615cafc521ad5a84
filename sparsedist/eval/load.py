"""Any model directory sparsedist delivers, loaded for evaluation: an exported directory (dense
with zeros, or quantized) or a compressed 2:4 directory.

A training checkpoint's step folder is refused here: eval does not depend on export, so the
caller exports it first (`sparsedist.export.exported`, which `sparsedist eval` uses)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from sparsedist.checkpoint.checkpointer import TRAINER_FILE
from sparsedist.data import load_tokenizer
from sparsedist.errors import EvalError
from sparsedist.eval.compress import is_compressed, load_compressed


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a training checkpoint's step folder."""
    return (Path(path) / TRAINER_FILE).is_file()


def check_model_dir(path: Path) -> Path:
    """`path` if it is a model directory (config.json); EvalError for a checkpoint or anything else."""
    path = Path(path)
    if is_checkpoint(path):
        raise EvalError(f"{path} is a training checkpoint: export it first (`sparsedist export`, or "
                        "`sparsedist.export.exported`); `sparsedist eval` does this itself")
    if not (path / "config.json").is_file():
        raise EvalError(f"{path}: neither a model directory (config.json) nor a checkpoint ({TRAINER_FILE})")
    return path


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """The fp32 model of the model directory `path` in eval mode on `device`, and its tokenizer."""
    path = check_model_dir(path)
    if is_compressed(path):
        model = load_compressed(path)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.to(device).eval(), load_tokenizer(path)
