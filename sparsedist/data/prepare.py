"""Streaming preparation: documents → megatron-core indexed splits, in memory that does not grow with the corpus.

Every document has a place (`Place`): its split and one of `SLOTS` slots. For a text source both
come from the blake2b digest of (seed, text) (`hashed_place`): the split is `valid` when the
digest's first 8 bytes, read as a fraction of 2⁶⁴, fall below `valid_fraction`; the slot is its
9th byte modulo `SLOTS`. No list of documents is ever held: where a document goes depends on it
alone, wherever the corpus lies (duplicates share a split).

A prepared split holds its documents slot after slot, each slot's in source order. A *part*
(`write_part`) holds a contiguous range of slots — all of them, or shard I of K's
`shard_slots(I, K)` — as one IndexedDataset per (split, slot) plus `documents-SS.jsonl.gz`.
The main process reads the records (sparsedist.data.sources) in chunks of `CHUNK_DOCUMENTS`
records or `CHUNK_CHARS` bytes; a pool of worker processes parses, places and tokenizes them, at
most two chunks per worker in flight; the main process writes the results back in order.
`merge_parts` (sparsedist.data.merge) appends the parts' slot files in slot order with `IndexedDatasetBuilder.add_index`
(the token data is copied once), so the result is byte for byte the same for any number of
workers and of shards.

A tiny corpus whose valid (train) split would be empty gives it its train document of the
smallest (valid document of the largest) fraction: the threshold moved just far enough. The
merged directory holds `train`/`valid` `.bin`/`.idx`, `tokenizer/`, `documents.jsonl.gz`
(every document's name, split and tokens, in the splits' order; nothing reads it to train) and
`manifest.json` (docs/data.md), written last.
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import json
import logging
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from sparsedist.checkpoint.publish import sha256_file, staged
from sparsedist.data.layout import FORMAT_VERSION, MANIFEST, SPLITS, check_replaceable, exclusive, is_prepared
from sparsedist.data.merge import merge_parts
from sparsedist.data.sources import Document, Documents, Record, expand, parse, source_bytes
from sparsedist.data.tokenizer import load_tokenizer, train_tokenizer
from sparsedist.errors import DataError

logger = logging.getLogger(__name__)

SLOTS = 64
"""Slots of the prepared order; also the most shards a corpus can be prepared in."""
CHUNK_DOCUMENTS = 4096
CHUNK_CHARS = 4 << 20
"""Bytes (or characters) of records per chunk, at most (one larger record is a chunk of its own)."""
TOKENIZER_SAMPLE_CHARS = 64 << 20
"""A tokenizer is trained on the first this many characters of the training split."""


@dataclass(frozen=True)
class Place:
    """Where a document goes: its split, its slot, and the fraction its split was decided by."""

    split: str
    slot: int
    fraction: float


def hashed_place(seed: int, valid_fraction: float, document: Document) -> Place:
    """The place of a text source's document, from the blake2b digest of (seed, text)."""
    digest = hashlib.blake2b(document.text.encode(), digest_size=9, key=str(seed).encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return Place("valid" if fraction < valid_fraction else "train", digest[8] % SLOTS, fraction)


def shard_slots(index: int, count: int) -> range:
    """The slots of shard `index` of `count`: a contiguous range, the shards in order covering all."""
    if not 1 <= count <= SLOTS or not 0 <= index < count:
        raise DataError(f"shard {index} of {count}: need 0 <= shard < num-shards <= {SLOTS}")
    return range(index * SLOTS // count, (index + 1) * SLOTS // count)


def token_dtype(vocab_size: int) -> type[np.integer]:
    """uint16 while every id fits, else int32 (megatron-core's index has no uint32; the .idx records the
    dtype and the loader reads it from there)."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def default_workers() -> int:
    return len(os.sched_getaffinity(0))


def prepare_text_source(source: str, out_dir: Path, tokenizer_path: Path | None, vocab_size: int,
                        valid_fraction: float, seed: int, workers: int | None = None, skip_malformed: bool = False,
                        shard: tuple[int, int] = (0, 1)) -> Path:
    """Prepare a local source or `hf:NAME[:CONFIG]` (sparsedist.data.sources) into `out_dir`.

    The tokenizer at `tokenizer_path` is copied, or one of `vocab_size` tokens is trained on the
    first `TOKENIZER_SAMPLE_CHARS` of the training split. `shard` (I, K) with K > 1 prepares only
    shard I's part (a given tokenizer required), for `merge_prepared`. A second call with the same
    request returns at once.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
    out_dir, (index, count) = Path(out_dir), shard
    shard_slots(index, count)
    request = text_request(source, vocab_size, valid_fraction, seed, tokenizer_path)
    part_request = {**request, "shard": [index, count]}
    with exclusive(out_dir):
        if is_prepared(out_dir, request if count == 1 else part_request):
            return out_dir
        if count > 1 and tokenizer_path is None:
            raise DataError(f"shard {index} of {count}: a shard needs a tokenizer (--tokenizer): prepare with "
                            "the model's, or train one first (docs/data.md)")
        check_replaceable(out_dir)
        place = partial(hashed_place, seed, valid_fraction)
        files = None if source.startswith("hf:") else len(expand(source))
        header = {"request": request, "source": {"name": source, "files": files, "bytes": source_bytes(source)}}
        with staged(out_dir) as staging:
            if tokenizer_path is None:
                start = time.perf_counter()
                train_tokenizer(_sample(Documents(source, skip_malformed), place), vocab_size, staging / "tokenizer")
                logger.info("tokenizer training took %.1f s", time.perf_counter() - start)
            else:
                load_tokenizer(tokenizer_path).save_pretrained(staging / "tokenizer")
            documents = Documents(source, skip_malformed)
            if count == 1:
                write_dataset(staging, documents, place, header, workers)
            else:
                write_part(staging, documents, place, shard, staging / "tokenizer", header, workers)
    logger.info("prepared %s", out_dir)
    return out_dir


def text_request(source: str, vocab_size: int, valid_fraction: float, seed: int,
                 tokenizer_path: Path | None) -> dict[str, Any]:
    """What a preparation of a text source depends on; a directory prepared for it is reused."""
    return {"source": source, "vocab_size": vocab_size, "valid_fraction": valid_fraction, "seed": seed,
            "tokenizer": None if tokenizer_path is None else str(tokenizer_path)}


def write_dataset(directory: Path, documents: Documents, place: Callable[[Document], Place],
                  header: Mapping[str, Any], workers: int | None = None) -> dict[str, Any]:
    """All of the documents as one part, merged into `directory` (which holds `tokenizer/`); returns the manifest."""
    part = directory / "part"
    write_part(part, documents, place, (0, 1), directory / "tokenizer", header, workers)
    manifest = merge_parts([part], directory)
    shutil.rmtree(part)
    return manifest


def write_part(directory: Path, documents: Documents, place: Callable[[Document], Place], shard: tuple[int, int],
               tokenizer_dir: Path, header: Mapping[str, Any], workers: int | None = None) -> dict[str, Any]:
    """Tokenize the documents of shard (I, K)'s slots into one IndexedDataset per (split, slot) of `directory`.

    The main process reads the records; the workers parse, place and tokenize them, and hand back
    the malformed ones' problems, which the main process passes to `documents.refuse` in order.

    The part's manifest (`kind: part`; its request names the shard) lists each slot's documents per
    split, the split's tokens, and its edge document (train: the smallest fraction, valid: the
    largest) as [fraction, slot, index].
    """
    slots = shard_slots(*shard)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(tokenizer_dir)
    dtype, eos, workers = token_dtype(len(tokenizer)), tokenizer.eos_token_id, workers or default_workers()
    writer = _PartWriter(directory, slots, dtype)
    progress = _Progress(documents.total_bytes)
    # fork: the workers inherit `place` (which may be a closure) and the imported modules; frozen first, the
    # heap of those modules is left out of every full collection, here and in the workers (nor copied on write)
    gc.freeze()
    pool = get_context("fork").Pool(workers, _init_worker,
                                    (str(tokenizer_dir / "tokenizer.json"), eos, dtype, place, slots))
    try:
        pending: deque = deque()
        for chunk in _chunks(documents.records()):
            pending.append((chunk, pool.apply_async(_encode, (chunk,))))
            while len(pending) > 2 * workers or (pending and pending[0][1].ready()):
                records, result = pending.popleft()
                progress.update(documents, *writer.write(documents, records, result.get()))
        while pending:
            records, result = pending.popleft()
            progress.update(documents, *writer.write(documents, records, result.get()))
        pool.close()
        pool.join()
    finally:
        pool.terminate()
        gc.unfreeze()
        progress.close()
    malformed = documents.malformed
    if malformed.count:
        logger.warning("skipped %d malformed lines, the first: %s", malformed.count, "; ".join(malformed.first))
    manifest = {
        "format": FORMAT_VERSION, "kind": "part", **header, "request": {**header["request"], "shard": list(shard)},
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer), "eos_id": eos,
                      "sha256": sha256_file(tokenizer_dir / "tokenizer.json")},
        "dtype": np.dtype(dtype).name,
        "slots": [slots.start, slots.stop],
        "splits": writer.finish(),
        "malformed": {"count": malformed.count, "first": malformed.first},
        "complete": True,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# --- writing a part --------------------------------------------------------------------------------


Tokenized = tuple[list[tuple[int, Place]], np.ndarray, np.ndarray, list[str]]
"""A chunk's (index and place of each document kept, their tokens with EOS concatenated, their lengths,
the problems of its malformed records)."""


def _sample(documents: Iterable[Document], place: Callable[[Document], Place]) -> Iterator[str]:
    """The texts of the training split's first documents, `TOKENIZER_SAMPLE_CHARS` characters in all."""
    taken = 0
    for document in documents:
        if place(document).split == "train":
            yield document.text
            taken += len(document.text)
            if taken >= TOKENIZER_SAMPLE_CHARS:
                return


def _chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    """The records in order, cut into chunks of `CHUNK_DOCUMENTS` records or `CHUNK_CHARS` bytes."""
    chunk: list[Record] = []
    size = 0
    for record in records:
        chunk.append(record)
        size += len(record)
        if len(chunk) >= CHUNK_DOCUMENTS or size >= CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer_file: str, eos: int, dtype: type, place: Callable[[Document], Place],
                 slots: range) -> None:
    """A worker's set-up: the default SIGTERM (a trainer's preemption handler, inherited through the fork, would
    keep `Pool.terminate` waiting forever), SIGINT and SIGUSR1 left to the main process, one tokenizer thread, the
    tokenizer loaded once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for sig in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _WORKER.update(tokenizer=Tokenizer.from_file(tokenizer_file), eos=eos, dtype=dtype, place=place, slots=slots)


def _encode(chunk: list[Record]) -> Tokenized:
    """Parse, place and tokenize a chunk of records (the documents of the worker's slots)."""
    kept, texts, problems = [], [], []
    for i, record in enumerate(chunk):
        document = parse(record)
        if isinstance(document, str):
            problems.append(document)
        elif document is not None:
            where = _WORKER["place"](document)
            if where.slot in _WORKER["slots"]:
                kept.append((i, where))
                texts.append(document.text)
    eos, dtype = _WORKER["eos"], _WORKER["dtype"]
    ids = [encoding.ids + [eos] for encoding in _WORKER["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)]
    tokens = np.concatenate([np.asarray(i, dtype=dtype) for i in ids]) if ids else np.empty(0, dtype)
    return kept, tokens, np.array([len(i) for i in ids], dtype=np.int64), problems


class _PartWriter:
    """The open files of a part: an IndexedDatasetBuilder per (split, slot), a gzip of names per slot."""

    def __init__(self, directory: Path, slots: range, dtype: type):
        self.slots = slots
        self.builders = {(split, slot): IndexedDatasetBuilder(str(directory / f"{split}-{slot:02d}.bin"), dtype=dtype)
                         for split in SPLITS for slot in slots}
        self.names = {slot: gzip.GzipFile(directory / f"documents-{slot:02d}.jsonl.gz", "wb", compresslevel=1, mtime=0)
                      for slot in slots}
        self.prefix = {key: directory / f"{key[0]}-{key[1]:02d}" for key in self.builders}
        self.counts = {key: 0 for key in self.builders}
        self.tokens = dict.fromkeys(SPLITS, 0)
        self.edge: dict[str, tuple[float, int, int] | None] = dict.fromkeys(SPLITS)

    def write(self, documents: Documents, chunk: list[Record], tokenized: Tokenized) -> tuple[int, int]:
        """Append a tokenized chunk (its problems refused or counted first); returns (documents, tokens) written."""
        kept, tokens, lengths, problems = tokenized
        for problem in problems:
            documents.refuse(problem)
        ends = np.cumsum(lengths)
        for (i, where), end, length in zip(kept, ends.tolist(), lengths.tolist(), strict=True):
            key = (where.split, where.slot)
            self.builders[key].add_item(torch.from_numpy(tokens[end - length : end]))
            self.builders[key].end_document()
            line = f'{{"name": {json.dumps(chunk[i].where, ensure_ascii=False)}, "split": "{where.split}", ' \
                   f'"tokens": {length}}}\n'
            self.names[where.slot].write(line.encode())
            edge = self.edge[where.split]
            if edge is None or (where.fraction < edge[0] if where.split == "train" else where.fraction > edge[0]):
                self.edge[where.split] = (where.fraction, where.slot, self.counts[key])
            self.counts[key] += 1
            self.tokens[where.split] += length
        return len(kept), int(ends[-1]) if len(ends) else 0

    def finish(self) -> dict[str, Any]:
        """Close every file; the part's per-split summary."""
        for key, builder in self.builders.items():
            builder.finalize(f"{self.prefix[key]}.idx")
        for names in self.names.values():
            names.close()
        return {split: {"documents": [self.counts[split, slot] for slot in self.slots], "tokens": self.tokens[split],
                        "edge": self.edge[split]} for split in SPLITS}


class _Progress:
    """A progress bar over the source's on-disk bytes (when known), with documents and tokens/s."""

    def __init__(self, total: int | None):
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", mininterval=1.0, disable=None)
        self.start, self.documents, self.tokens, self.done = time.perf_counter(), 0, 0, 0

    def update(self, documents: Documents, count: int, tokens: int) -> None:
        self.documents, self.tokens = self.documents + count, self.tokens + tokens
        read = documents.bytes_read
        self.bar.update(read - self.done)
        self.done = read
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.documents:,} documents, {rate / 1e6:.2f}M tokens/s", refresh=False)

    def close(self) -> None:
        self.bar.close()
        logger.info("tokenized %d documents, %d tokens in %.1f s", self.documents, self.tokens,
                    time.perf_counter() - self.start)


