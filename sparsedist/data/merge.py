"""Merging prepared parts: their slot files appended in slot order into one directory's train/valid splits.

`merge_parts` appends each part's per-(split, slot) IndexedDataset with megatron-core's
`IndexedDatasetBuilder.add_index` (the token data is copied once), so a merge of every shard is
byte for byte a one-process prepare of the same request (sparsedist.data.prepare). A tiny corpus
whose split would be empty takes the other split's edge document (`_move`).
"""

from __future__ import annotations

import gc
import gzip
import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from sparsedist.checkpoint.publish import sha256_file, staged
from sparsedist.data.layout import DOCUMENTS, FORMAT_VERSION, MANIFEST, SPLITS, check_replaceable, exclusive
from sparsedist.errors import DataError

logger = logging.getLogger(__name__)


def merge_prepared(parts: Sequence[Path], out_dir: Path) -> Path:
    """Merge the parts of every shard of one request into `out_dir` (as one prepare of it would have written)."""
    out_dir = Path(out_dir)
    with exclusive(out_dir):
        check_replaceable(out_dir)
        with staged(out_dir) as staging:
            shutil.copytree(Path(parts[0]) / "tokenizer", staging / "tokenizer")
            merge_parts([Path(p) for p in parts], staging)
    logger.info("merged %d parts into %s", len(parts), out_dir)
    return out_dir


def merge_parts(parts: Sequence[Path], directory: Path) -> dict[str, Any]:
    """Append the parts' slot files, in slot order, into `directory/<split>.bin/.idx`; write the side file
    of documents and `manifest.json` (last). `directory/tokenizer` must be the parts' tokenizer."""
    manifests = _check_parts(parts, directory)
    parts = [part for _, part in sorted(zip([m["request"]["shard"][0] for m in manifests], parts, strict=True))]
    manifests = sorted(manifests, key=lambda m: m["request"]["shard"][0])
    counts = {split: sum(sum(m["splits"][split]["documents"]) for m in manifests) for split in SPLITS}
    if sum(counts.values()) < 2:
        raise DataError(f"{parts[0]}: need at least 2 documents to split into train and valid, "
                        f"got {sum(counts.values())}")
    move = _move(parts, manifests, counts)
    dtype = np.dtype(manifests[0]["dtype"]).type
    gc.freeze()  # add_index runs gc.collect(): over the objects made since, not the whole heap of imports
    try:
        splits = {split: _merge_split(split, parts, manifests, move, directory, dtype) for split in SPLITS}
    finally:
        gc.unfreeze()
    _merge_names(parts, manifests, move, directory / DOCUMENTS)
    first = manifests[0]
    manifest = {
        "format": FORMAT_VERSION,
        **{k: v for k, v in first.items() if k not in ("format", "kind", "slots", "splits", "malformed", "complete")},
        "request": {k: v for k, v in first["request"].items() if k != "shard"},
        "shards": [{"shard": m["request"]["shard"], "documents": {s: sum(m["splits"][s]["documents"]) for s in SPLITS}}
                   for m in manifests],
        "splits": splits,
        "documents": DOCUMENTS,
        "malformed": first["malformed"],  # every shard reads (and reports) every line of the source
        "complete": True,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


@dataclass(frozen=True)
class _Move:
    """The document a tiny corpus moves out of `split` (the slot file at `prefix`, its `index`-th)."""

    split: str
    prefix: Path
    index: int


def _check_parts(parts: Sequence[Path], directory: Path) -> list[dict[str, Any]]:
    """The parts' manifests: complete parts of one request and tokenizer, every shard exactly once."""
    manifests = []
    for part in parts:
        path = part / MANIFEST
        manifest = json.loads(path.read_text()) if path.is_file() else {}
        if manifest.get("kind") != "part" or manifest.get("complete") is not True:
            raise DataError(f"{part}: not a complete part (prepare it with `sparsedist data prepare ... --shard I "
                            "--num-shards K`)")
        manifests.append(manifest)
    first = {k: v for k, v in manifests[0]["request"].items() if k != "shard"}
    for part, manifest in zip(parts, manifests, strict=True):
        if {k: v for k, v in manifest["request"].items() if k != "shard"} != first:
            raise DataError(f"{part}: prepared for another request than {parts[0]} ({manifest['request']})")
    tokenizer = sha256_file(directory / "tokenizer" / "tokenizer.json")
    for part, manifest in zip(parts, manifests, strict=True):
        if manifest["tokenizer"]["sha256"] != tokenizer:
            raise DataError(f"{part}: tokenized with another tokenizer than {parts[0]}")
    count = manifests[0]["request"]["shard"][1]
    shards = sorted(m["request"]["shard"][0] for m in manifests)
    if shards != list(range(count)) or any(m["request"]["shard"][1] != count for m in manifests):
        missing = sorted(set(range(count)) - set(shards))
        raise DataError(f"the parts hold shards {shards} of {count}: every shard once is needed (missing {missing})")
    return manifests


def _move(parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]], counts: Mapping[str, int]) -> _Move | None:
    """The edge document of the other split when one split would be empty, else None."""
    empty = next((split for split in SPLITS if counts[split] == 0), None)
    if empty is None:
        return None
    source = "train" if empty == "valid" else "valid"
    edges = [(m["splits"][source]["edge"], part) for m, part in zip(manifests, parts, strict=True)
             if m["splits"][source]["edge"] is not None]
    (fraction, slot, index), part = (min if source == "train" else max)(edges, key=lambda e: e[0][0])
    logger.info("the %s split would be empty: it takes one %s document", empty, source)
    return _Move(source, part / f"{source}-{slot:02d}", index)


def _merge_split(split: str, parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]], move: _Move | None,
                 directory: Path, dtype: type) -> dict[str, Any]:
    """`directory/<split>.bin/.idx` from the parts' slot files in order; the split's summary."""
    builder = IndexedDatasetBuilder(str(directory / f"{split}.bin"), dtype=dtype)
    for part, manifest in zip(parts, manifests, strict=True):
        for slot, count in zip(range(*manifest["slots"]), manifest["splits"][split]["documents"], strict=True):
            prefix = part / f"{split}-{slot:02d}"
            if move is not None and (move.split, move.prefix) == (split, prefix):
                _append_except(builder, prefix, move.index)
            elif count:
                builder.add_index(str(prefix))
    if move is not None and move.split != split:
        moved = IndexedDataset(str(move.prefix))  # alive while its memory-mapped document is read
        builder.add_item(torch.from_numpy(moved[move.index].astype(np.int64)))
        builder.end_document()
    builder.finalize(str(directory / f"{split}.idx"))
    dataset = IndexedDataset(str(directory / split))
    summary = {"documents": len(dataset), "tokens": int(dataset.sequence_lengths.sum()),
               "sha256": {suffix: sha256_file(directory / f"{split}.{suffix}") for suffix in ("bin", "idx")}}
    logger.info("%s: %d documents, %d tokens", split, summary["documents"], summary["tokens"])
    return summary


def _append_except(builder: IndexedDatasetBuilder, prefix: Path, skipped: int) -> None:
    dataset = IndexedDataset(str(prefix))
    for i in range(len(dataset)):
        if i != skipped:
            builder.add_item(torch.from_numpy(dataset[i].astype(np.int64)))
            builder.end_document()


def _merge_names(parts: Sequence[Path], manifests: Sequence[Mapping[str, Any]], move: _Move | None,
                 out: Path) -> None:
    """The parts' per-slot gzips concatenated in slot order (a valid gzip); the moved document's split changed."""
    with open(out, "wb") as f:
        for part, manifest in zip(parts, manifests, strict=True):
            for slot in range(*manifest["slots"]):
                path = part / f"documents-{slot:02d}.jsonl.gz"
                if move is not None and move.prefix == part / f"{move.split}-{slot:02d}":
                    f.write(gzip.compress(_moved(gzip.decompress(path.read_bytes()), move), mtime=0))
                else:
                    with open(path, "rb") as names:
                        shutil.copyfileobj(names, f)


def _moved(names: bytes, move: _Move) -> bytes:
    lines, seen = [], 0
    target = "valid" if move.split == "train" else "train"
    for line in names.splitlines(keepends=True):
        row = json.loads(line)
        if row["split"] == move.split:
            if seen == move.index:
                row["split"] = target
                line = (json.dumps(row, ensure_ascii=False) + "\n").encode()
            seen += 1
        lines.append(line)
    return b"".join(lines)
