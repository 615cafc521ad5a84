"""The documents of a data source, read lazily in a fixed order.

A source is `hf:NAME[:CONFIG]` (the hub dataset's `train` split, streamed) or a path, folder
(searched recursively) or glob of files, in sorted order: `.txt` (one file = one document) or
JSON lines (`.jsonl`, `.json`; plain, `.gz` or `.zst`; one line = one document, its string field
`text`, other fields ignored). A document is named `FILE`, `FILE:LINE` (1-based) or `hf:NAME#ROW`;
its line endings become `\\n`; blank lines and blank documents are dropped.

A malformed line (not JSON, no string `text`, bytes that are not UTF-8) raises `DataError`
naming `FILE:LINE`; with `skip_malformed` it is counted in `Documents.malformed` and skipped.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from sparsedist.errors import DataError

logger = logging.getLogger(__name__)

JSON_SUFFIXES = tuple(f"{kind}{packing}" for kind in (".jsonl", ".json") for packing in ("", ".gz", ".zst"))
SUFFIXES = (".txt", *JSON_SUFFIXES)
SHOWN_MALFORMED = 10
"""How many skipped lines `Malformed` names."""


@dataclass(frozen=True)
class Document:
    """One document: a name that says where it came from, and its text."""

    name: str
    text: str


@dataclass
class Malformed:
    """The malformed lines skipped: how many, and where the first `SHOWN_MALFORMED` were."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, problem: str) -> None:
        if self.count < SHOWN_MALFORMED:
            self.first.append(problem)
        self.count += 1


def normalise_text(text: str) -> str:
    """Line endings → `\\n`; nothing else changes."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def expand(pattern: str) -> list[Path]:
    """The files a path, folder (searched recursively, supported files only) or glob names, sorted."""
    path = Path(pattern)
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.name.endswith(SUFFIXES)]
    else:
        files = [Path(p) for p in glob.glob(pattern, recursive=True)]
    files = sorted(p for p in files if p.is_file())
    if not files:
        raise DataError(f"no {', '.join(SUFFIXES)} files match {pattern!r}")
    unsupported = sorted({p.name for p in files if not p.name.endswith(SUFFIXES)})
    if unsupported:
        raise DataError(f"{pattern}: unsupported files {unsupported[:3]}; sparsedist reads {', '.join(SUFFIXES)}")
    return files


def source_bytes(source: str) -> int | None:
    """The on-disk size of a local source's files (compressed files count as stored); None for `hf:`."""
    if source.startswith("hf:"):
        return None
    return sum(path.stat().st_size for path in expand(source))


@dataclass(frozen=True)
class Record:
    """One document as stored, before parsing: where it is, and its bytes (a JSON line, a `.txt` file) or text."""

    where: str
    kind: str
    """`json` (a JSON line), `file` (a .txt file's bytes) or `text` (a hub row's `text`, whatever it holds)."""
    raw: Any

    def __len__(self) -> int:
        return len(self.raw) if isinstance(self.raw, (bytes, str)) else 0


def parse(record: Record) -> Document | str | None:
    """The record's document, None when it is blank, or the problem (`WHERE: ...`) when it is malformed."""
    if record.kind == "file":
        try:
            return _document(record.where, record.raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = record.raw[: err.start].count(b"\n") + 1
            return f"{record.where}:{line}: bytes that are not UTF-8"
    if record.kind == "json":
        line = record.raw.strip()
        if not line:
            return None
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            return f"{record.where}: bytes that are not UTF-8"
        except json.JSONDecodeError as err:
            return f"{record.where}: not JSON ({err.msg})"
        text = row.get("text") if isinstance(row, dict) else None
    else:
        text = record.raw
    if not isinstance(text, str):
        return f"{record.where}: no string field 'text'"
    return _document(record.where, text)


class Documents:
    """The documents of `source`, read lazily; iterating again reads them again.

    `records` yields them unparsed (the prepare parses them in its workers and hands the problems
    back to `refuse`); iterating parses them here. `bytes_read` follows the on-disk bytes consumed
    so far (for a progress bar against `total_bytes`); `malformed` counts the lines skipped under
    `skip_malformed`.
    """

    def __init__(self, source: str, skip_malformed: bool = False):
        self.source = source
        self.skip_malformed = skip_malformed
        self.malformed = Malformed()
        self.bytes_read = 0

    @property
    def total_bytes(self) -> int | None:
        return source_bytes(self.source)

    def __iter__(self) -> Iterator[Document]:
        for record in self.records():
            document = parse(record)
            if isinstance(document, str):
                self.refuse(document)
            elif document is not None:
                yield document

    def refuse(self, problem: str) -> None:
        """Raise DataError naming a malformed line; count it instead under `skip_malformed`."""
        if not self.skip_malformed:
            raise DataError(f"{problem} (prepare with --skip-malformed to skip such lines)")
        self.malformed.add(problem)

    def records(self) -> Iterator[Record]:
        self.malformed, self.bytes_read = Malformed(), 0
        if self.source.startswith("hf:"):
            import datasets

            name, _, config = self.source.removeprefix("hf:").partition(":")
            for i, row in enumerate(datasets.load_dataset(name, config or None, split="train", streaming=True)):
                yield Record(f"{self.source}#{i}", "text", row.get("text"))
            return
        for path in expand(self.source):
            done = self.bytes_read
            with open(path, "rb") as raw:
                if path.suffix == ".txt":
                    yield Record(str(path), "file", raw.read())
                else:
                    number = 0
                    try:
                        for number, line in enumerate(_lines(path, raw), start=1):
                            self.bytes_read = done + raw.tell()
                            yield Record(f"{path}:{number}", "json", line)
                    except (OSError, EOFError, zstandard.ZstdError) as err:
                        raise DataError(f"{path}: cannot be decompressed after line {number} ({err})") from None
            self.bytes_read = done + path.stat().st_size


def _lines(path: Path, raw: BinaryIO) -> Iterator[bytes]:
    """The lines of a JSON-lines file, decompressed as its name says."""
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.name.endswith(".zst"):
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _document(name: str, text: str) -> Document | None:
    text = normalise_text(text)
    return Document(name, text) if text.strip() else None
