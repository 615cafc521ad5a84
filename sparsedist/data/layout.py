"""A prepared directory's files and manifest format, and the checks on a directory before a prepare writes it."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sparsedist.checkpoint.publish import recover

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
