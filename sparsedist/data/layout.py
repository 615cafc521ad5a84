"""A prepared directory's files and manifest format, the checks on a directory before a prepare writes it, and the
lock that lets one process at a time prepare or merge into it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sparsedist.checkpoint.publish import recover

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DOCUMENTS = "documents.jsonl.gz"
FORMAT_VERSION = 2
SPLITS = ("train", "valid")


def is_prepared(out_dir: Path, request: Mapping[str, Any]) -> bool:
    """Whether `out_dir` holds a complete preparation of `request` (after finishing a publish a crash interrupted)."""
    recover(out_dir)
    manifest = out_dir / MANIFEST
    if not manifest.is_file():
        return False
    content = json.loads(manifest.read_text())
    return content.get("complete") is True and content.get("request") == request


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a folder that is neither empty nor a prepared dataset."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(f"{out_dir} exists and is not a prepared dataset; refusing to replace it")


@contextmanager
def exclusive(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir`'s lock (`.<name>.lock` beside it) while preparing or merging into it: a second process (two
    runs naming one `data.dir`) waits, then finds it prepared, instead of clearing the first one's staging folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir.with_name(f".{out_dir.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process preparing %s", out_dir)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()
