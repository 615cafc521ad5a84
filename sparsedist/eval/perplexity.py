"""Perplexity with the protocol of the pruning papers (SparseGPT, Wanda, ...).

The evaluation text is one token stream: a prepared split's documents concatenated in order
(each ends with EOS, as the split stores them), or a raw text file (e.g. WikiText-2's
wiki.test.raw) tokenized whole with the model's tokenizer. The stream is cut into consecutive,
non-overlapping windows of `seq_len` tokens; **the last partial window is dropped**. Each window
is one forward pass from an empty context and scores its `seq_len - 1` next-token predictions
(its first token is not predicted). The loss is the mean token NLL over all windows, and the
perplexity its exponential.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from sparsedist.data import load_tokenizer
from sparsedist.errors import EvalError
from sparsedist.models import FAMILIES


@dataclass(frozen=True)
class Perplexity:
    """Mean token NLL over the windows, its exponential, and what was scored."""

    loss: float
    ppl: float
    windows: int
    seq_len: int
    tokens: int
    """Predicted tokens: windows × (seq_len − 1)."""

    def as_dict(self) -> dict:
        return asdict(self)


def split_stream(data_dir: Path, split: str = "valid") -> torch.Tensor:
    """The token stream of a prepared split: its documents (each ending with EOS) in order."""
    prefix = Path(data_dir) / split
    if not Path(f"{prefix}.idx").is_file():
        raise EvalError(f"{data_dir}: no prepared {split!r} split ({prefix}.bin/.idx)")
    dataset = IndexedDataset(str(prefix))
    return torch.from_numpy(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))


def text_stream(path: Path, tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """The token stream of a raw text file, tokenized whole (with the tokenizer's own special tokens)."""
    if not Path(path).is_file():
        raise EvalError(f"{path}: no such text file")
    return torch.tensor(tokenizer(Path(path).read_text(encoding="utf-8"), verbose=False).input_ids)


def check_tokenizer(tokenizer: PreTrainedTokenizerFast, data_dir: Path) -> None:
    """Refuse a prepared split tokenized with another vocabulary than the model's."""
    if not (Path(data_dir) / "tokenizer").is_dir():
        raise EvalError(f"{data_dir}: not a prepared dataset (no tokenizer/); run `sparsedist data prepare` or "
                        "pass --text")
    if load_tokenizer(Path(data_dir) / "tokenizer").get_vocab() != tokenizer.get_vocab():
        raise EvalError(f"{data_dir}: its tokenizer differs from the model's; pass --text with a raw text file")


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n, seq_len] consecutive windows of the stream, the last partial window dropped."""
    count = stream.numel() // seq_len
    if count == 0:
        raise EvalError(f"{stream.numel()} tokens do not fill one window of {seq_len}")
    return stream[: count * seq_len].reshape(count, seq_len)


def model_seq_len(model: PreTrainedModel) -> int:
    """The longest sequence the model takes (its family's context key)."""
    family = FAMILIES.get(model.config.model_type)
    if family is None:
        raise EvalError(f"model type {model.config.model_type!r}: pass --seq-len")
    return int(getattr(model.config, family.context_key))


@torch.no_grad()
def perplexity(model: PreTrainedModel, stream: torch.Tensor, seq_len: int, batch: int = 4) -> Perplexity:
    """The papers' perplexity of `model` on a token stream (see the module docstring)."""
    if seq_len < 2:
        raise EvalError(f"seq_len must be at least 2, got {seq_len}")
    if int(stream.max()) >= model.config.vocab_size:
        raise EvalError(f"token id {int(stream.max())} is outside the model's vocabulary ({model.config.vocab_size})")
    device = next(model.parameters()).device
    rows = windows(stream, seq_len)
    nll = 0.0
    for chunk in rows.split(batch):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        nll += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"))
    tokens = rows.shape[0] * (seq_len - 1)
    loss = nll / tokens
    return Perplexity(loss, math.exp(loss), rows.shape[0], seq_len, tokens)
