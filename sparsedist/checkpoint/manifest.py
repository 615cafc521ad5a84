"""A checkpoint's manifest: the size and SHA-256 of every file, written at save, verified at load.

The files are split between the ranks (file i to rank i mod world), each rank hashes its
share, and rank 0 writes `manifest.json` from what all gathered; verification splits the
work the same way and every rank raises the same error, so no rank enters a collective load
alone. Sizes are checked by every rank (cheap), hashes by the file's rank.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 * 2**20


from sparsedist.errors import CheckpointError  # noqa: E402, F401


def _files(path: Path, skip: tuple[str, ...]) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file() and f.name not in skip)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _gathered(mine: dict) -> dict:
    if not dist.is_initialized():
        return mine
    parts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, mine)
    return {key: value for part in parts for key, value in part.items()}


def write_manifest(path: Path, skip: tuple[str, ...] = ()) -> None:
    """Hash every file under `path` (all ranks take part) and write the manifest from rank 0."""
    rank, world = _rank_world()
    names = _files(path, (MANIFEST_FILE, *skip))
    mine = {name: {"bytes": (path / name).stat().st_size, "sha256": _sha256(path / name)}
            for name in names[rank::world]}
    entries = _gathered(mine)
    if rank == 0:
        with open(path / MANIFEST_FILE, "w") as f:
            json.dump({"files": dict(sorted(entries.items()))}, f, indent=1)


def verify_manifest(path: Path) -> None:
    """Raise CheckpointError (on every rank) unless every file of the manifest is there, whole and unchanged."""
    rank, world = _rank_world()
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: no readable {MANIFEST_FILE} ({err})") from None
    problems = {}
    for index, (name, entry) in enumerate(files.items()):
        file = path / name
        if not file.is_file():
            problems[name] = "is missing"
        elif file.stat().st_size != entry["bytes"]:
            problems[name] = f"has {file.stat().st_size} bytes, the manifest {entry['bytes']}"
        elif index % world == rank and _sha256(file) != entry["sha256"]:
            problems[name] = "does not match its SHA-256"
    problems = _gathered(problems)
    if problems:
        name = sorted(problems)[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise CheckpointError(f"checkpoint {path} is corrupt: {name} {problems[name]}{more}; "
                              "resume from an older step with checkpoint.resume=<its folder>")
