"""Stage then publish: a folder appears whole or not at all, and a crash at any point leaves one findable."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from sparsedist.checkpoint import publish as pub
from sparsedist.checkpoint.publish import prepare, publish, recover, sha256_file, staged, staging_dir


class Crash(Exception):
    pass


def write(folder, text):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text(text)
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "b.txt").write_text(text * 2)


def content(folder):
    text = (folder / "a.txt").read_text()
    return text if (folder / "sub" / "b.txt").read_text() == 2 * text else "torn"


def leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))


def test_sha256_file(tmp_path):
    data = os.urandom(3 * 2**20 + 5)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_staged_publishes_and_replaces(tmp_path):
    final = tmp_path / "out"
    for text in ("old", "new"):
        with staged(final) as staging:
            assert staging == staging_dir(final) and not any(staging.iterdir())
            write(staging, text)
        assert content(final) == text and leftovers(tmp_path) == []


def test_an_exception_leaves_final_untouched_and_the_next_try_starts_clean(tmp_path):
    final = tmp_path / "out"
    with staged(final) as staging:
        write(staging, "old")
    with pytest.raises(Crash), staged(final) as staging:
        write(staging, "new")
        (staging / "stale").write_text("x")
        (staging / "cache").mkdir()
        raise Crash
    assert content(final) == "old"
    with staged(final, keep=("cache",)) as staging:
        assert sorted(p.name for p in staging.iterdir()) == ["cache"]
        write(staging, "new")
    assert content(final) == "new" and leftovers(tmp_path) == []


# (final exists before, failing call) -> what a crash leaves at (final, .out.old, staging)
CRASHES = {
    (True, 1): ("old", None, "new"),   # rename final -> .old failed
    (True, 2): (None, "old", "new"),   # rename staging -> final failed: the old folder is at .out.old
    (True, 3): ("new", "old", None),   # deleting .old failed
    (False, 1): (None, None, "new"),   # rename staging -> final failed: nothing was there before
    (False, 2): ("new", None, None),   # deleting the (absent) .old failed
}


@pytest.mark.parametrize(("existing", "crash_at"), list(CRASHES))
def test_a_crash_in_publish_leaves_a_complete_folder_and_recovers(tmp_path, monkeypatch, existing, crash_at):
    final, old = tmp_path / "out", tmp_path / ".out.old"
    if existing:
        with staged(final) as staging:
            write(staging, "old")
    write(prepare(final), "new")
    calls = []

    def crashing(real):
        def op(*args, **kwargs):
            calls.append(args)
            if len(calls) == crash_at:
                raise Crash
            return real(*args, **kwargs)
        return op

    monkeypatch.setattr(pub.os, "replace", crashing(os.replace))
    monkeypatch.setattr(pub.shutil, "rmtree", crashing(shutil.rmtree))
    with pytest.raises(Crash):
        publish(final)
    monkeypatch.undo()
    left = tuple(content(p) if p.exists() else None for p in (final, old, staging_dir(final)))
    assert left == CRASHES[existing, crash_at]
    recover(final)  # what the next prepare or publish does first
    assert not old.exists() and (content(final) if final.exists() else None) == (left[0] or left[1])
    if staging_dir(final).exists():  # a finished staging folder can still be published
        publish(final)
    assert content(final) == "new" and leftovers(tmp_path) == []
    with staged(final) as staging:
        write(staging, "newer")
    assert content(final) == "newer" and leftovers(tmp_path) == []


def test_two_halves_around_barriers(tmp_path):
    """Rank 0 prepares, all ranks write into `staging_dir`, rank 0 publishes."""
    final = tmp_path / "step_00000001"
    assert prepare(final) == staging_dir(final)
    for rank in range(3):
        (staging_dir(final) / f"rank{rank}").write_text(str(rank))
    assert sorted(p.name for p in tmp_path.glob("step_*")) == []  # staging is hidden from step globs
    publish(final)
    assert sorted(p.name for p in final.iterdir()) == ["rank0", "rank1", "rank2"]
    with pytest.raises(FileNotFoundError):
        publish(final)
