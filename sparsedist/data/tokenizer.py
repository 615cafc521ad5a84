"""The byte-level BPE tokenizer: training it on a corpus, saving and loading it.

The tokenizer is a `tokenizers` byte-level BPE wrapped in `transformers.PreTrainedTokenizerFast`,
saved with `save_pretrained` so that `transformers.AutoTokenizer.from_pretrained(path)` loads it
offline. Its single special token, `<|endoftext|>` (id 0), serves as EOS, BOS, PAD and UNK.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens on `texts` and save it to `out_dir`.

    Deterministic: the same texts in the same order give the same vocabulary and merges.
    """
    backend = Tokenizer(models.BPE(unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = _wrap(backend)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    logger.info("trained a byte-level BPE of %d tokens into %s", len(tokenizer), out_dir)
    return tokenizer


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `train_tokenizer` (or any fast tokenizer directory), offline."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
    )
