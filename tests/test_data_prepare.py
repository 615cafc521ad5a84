"""Streaming data preparation: compressed sources, malformed lines, shards and merges, workers, atomic publish."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import zstandard

from sparsedist.data.sources import Documents, expand, source_bytes
from sparsedist.errors import DataError

WORDS = "the king queen ghost sea storm love night day sword crown grave island spirit tempest verse".split()


def _text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + ".\n"


def _jsonl(rng: random.Random, count: int, bad: dict[int, bytes] | None = None) -> bytes:
    """`count` JSON lines of {"text", "id"}; line i (0-based) replaced by bad[i]."""
    lines = [json.dumps({"id": i, "text": _text(rng, rng.randint(20, 80))}).encode() for i in range(count)]
    for i, line in (bad or {}).items():
        lines[i] = line
    return b"\n".join(lines) + b"\n"


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


BAD = {3: b'{"text": "unterminated', 7: b'{"body": "no text field"}', 9: b'{"text": "caf\xe9 in latin-1"}'}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of a .jsonl.gz and a .json.zst with malformed lines, a clean .jsonl, a .txt and a stray file."""
    root = tmp_path_factory.mktemp("sources")
    rng = random.Random(0)
    _write(root / "a" / "part-0.jsonl.gz", _jsonl(rng, 40, BAD))
    _write(root / "a" / "part-1.json.zst", _jsonl(rng, 30, {0: b"[1, 2]"}))
    _write(root / "b" / "clean.jsonl", _jsonl(rng, 25))
    _write(root / "b" / "notes.txt", _text(rng, 300).replace("\n", "\r\n").encode())
    (root / "b" / "README.md").write_text("not data")
    return root


def test_malformed_lines_are_refused_with_their_file_and_line(sources: Path) -> None:
    with pytest.raises(DataError, match=r"part-0\.jsonl\.gz:4: not JSON .*--skip-malformed"):
        list(Documents(str(sources / "a")))


def test_malformed_lines_are_skipped_and_counted_under_the_option(sources: Path) -> None:
    documents = Documents(str(sources / "a"), skip_malformed=True)
    read = list(documents)
    assert len(read) == 40 + 30 - 4
    assert documents.malformed.count == 4
    gz, zst = sources / "a" / "part-0.jsonl.gz", sources / "a" / "part-1.json.zst"
    assert documents.malformed.first == [f"{gz}:4: not JSON (Unterminated string starting at)",
                                         f"{gz}:8: no string field 'text'", f"{gz}:10: bytes that are not UTF-8",
                                         f"{zst}:1: no string field 'text'"]
    assert read[0].name == f"{gz}:1" and read[-1].name == f"{zst}:30"
    assert documents.bytes_read == source_bytes(str(sources / "a")) == gz.stat().st_size + zst.stat().st_size


def test_text_and_json_files_are_read_in_order(sources: Path) -> None:
    documents = list(Documents(str(sources / "b")))
    assert [d.name for d in documents][-2:] == [f"{sources / 'b' / 'clean.jsonl'}:25", str(sources / "b" / "notes.txt")]
    assert "\r" not in documents[-1].text and len(documents) == 26
    assert [p.name for p in expand(str(sources / "**" / "*.j*"))] == ["part-0.jsonl.gz", "part-1.json.zst",
                                                                      "clean.jsonl"]
    with pytest.raises(DataError, match=r"unsupported files \['README.md'\]"):
        expand(str(sources / "b" / "*"))
    with pytest.raises(DataError, match="no .txt, .jsonl"):
        expand(str(sources / "nothing*.jsonl"))
