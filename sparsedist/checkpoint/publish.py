"""Stage a folder, then publish it: how every directory that must appear whole is written
(prepared datasets, checkpoints, exports, the teacher's top-k cache); and a file's SHA-256.

A writer fills the staging folder `.<name>.partial` beside `final`, then `publish` moves it in:

    1. rename `final` -> `.<name>.old`        (only when `final` exists)
    2. rename `.<name>.partial` -> `final`
    3. delete `.<name>.old`

(A directory cannot be renamed over a non-empty one, hence the detour.) A crash at any point
leaves a complete folder findable: the old one at `final` before 1, at `.<name>.old` between 1
and 2; the new one at `final` after 2. `recover(final)`, which `prepare` and `publish` run
first, moves an `.old` without a `final` back and deletes one beside a `final`. A staging
folder is never trusted: `prepare` clears it (but for the entries named in `keep`).

Several ranks: rank 0 calls `prepare`, a barrier, every rank writes into `staging_dir(final)`,
a barrier, rank 0 calls `publish`. One process: `with staged(final) as staging: ...`.
This module imports nothing from sparsedist, so any package may use it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

_CHUNK = 16 * 2**20


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def staging_dir(final: Path) -> Path:
    """Where `final` is staged: `.<name>.partial` beside it (hidden from globs like `step_*`)."""
    return final.with_name(f".{final.name}.partial")


def _old_dir(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover(final: Path) -> None:
    """Finish a publish that a crash interrupted: restore `.<name>.old` if `final` is missing, else delete it."""
    old = _old_dir(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, final)


def prepare(final: Path, keep: Iterable[str] = ()) -> Path:
    """An empty staging folder for `final` (stale entries removed, but those named in `keep`); `final` untouched."""
    final = Path(final)
    recover(final)
    staging, keep = staging_dir(final), set(keep)
    if staging.is_dir():
        for child in staging.iterdir():
            if child.name in keep:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    staging.mkdir(parents=True, exist_ok=True)
    return staging


def publish(final: Path) -> Path:
    """Move the finished staging folder to `final`, replacing what is there (steps 1-3 above)."""
    final = Path(final)
    staging, old = staging_dir(final), _old_dir(final)
    if not staging.is_dir():
        raise FileNotFoundError(f"{staging}: nothing staged to publish as {final}")
    recover(final)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def staged(final: Path, keep: Iterable[str] = ()) -> Iterator[Path]:
    """`prepare`, yield the staging folder, `publish` on success. On an exception `final` is left
    as it was, and so is the staging folder (a retry clears it, but for `keep`)."""
    staging = prepare(final, keep)
    yield staging
    publish(final)
