"""Data: the embedded corpus and other text sources → tokenizer + indexed splits → sharded batches."""

from sparsedist.data.corpus import (
    OFFLINE_PREPARE_BYTES,
    VALIDATION_WORKS,
    check_prepare_size,
    check_source,
    missing_sources,
    prepare_dataset,
    prepare_embedded,
)
from sparsedist.data.loader import BLOCK, Blend, TokenBatches, TokenWindows, eval_batches
from sparsedist.data.merge import merge_prepared
from sparsedist.data.prepare import prepare_text_source
from sparsedist.data.sources import Document
from sparsedist.data.tokenizer import EOS_TOKEN, load_tokenizer, train_tokenizer

__all__ = [
    "BLOCK",
    "EOS_TOKEN",
    "OFFLINE_PREPARE_BYTES",
    "VALIDATION_WORKS",
    "Document",
    "Blend",
    "TokenBatches",
    "TokenWindows",
    "eval_batches",
    "load_tokenizer",
    "merge_prepared",
    "check_prepare_size",
    "check_source",
    "missing_sources",
    "prepare_dataset",
    "prepare_embedded",
    "prepare_text_source",
    "train_tokenizer",
]
