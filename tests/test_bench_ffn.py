"""bench/ffn.py on the CPU at a tiny shape: every variant passes its check against fp32 dense, an injected
failure is reported and the others still run, nothing is written without --out, and --step runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
TINY = ["--shapes", "tiny", "--tokens", "32", "--repeats", "1"]


@pytest.fixture(scope="module")
def ffn():
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()  # the bench runs on one thread
    import ffn

    yield ffn
    torch.set_num_threads(threads)
    sys.path.remove(str(BENCH))


def rows(text: str) -> dict[str, str]:
    """The FFN table's rows by variant."""
    return {line.split(" | ")[4]: line for line in text.splitlines() if line.startswith("| tiny |")}


def test_every_variant_passes_and_nothing_is_written(ffn, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert ffn.main(TINY) == 0
    found = rows(capsys.readouterr().out)
    assert list(found) == list(ffn.VARIANTS)
    assert all(line.endswith("| ok |") for line in found.values())
    assert list(tmp_path.iterdir()) == []


def test_injected_failure_is_reported_and_the_run_goes_on(ffn, capsys, tmp_path):
    out = tmp_path / "bench.md"
    assert ffn.main([*TINY, "--inject-failure", "2:4 transposable", "--out", str(out)]) == 1
    found = rows(capsys.readouterr().out)
    assert list(found) == list(ffn.VARIANTS)
    assert "FAILED: raised RuntimeError: injected failure" in found["2:4 transposable"]
    assert all(line.endswith("| ok |") for name, line in found.items() if name != "2:4 transposable")
    assert "## One FFN" in out.read_text() and "FAILED" in out.read_text()


def test_step_runs_on_the_cpu(ffn, capsys):
    assert ffn.main(["--shapes", "tiny", "--tokens", "16", "--repeats", "1", "--step", "--step-count", "1"]) == 0
    assert "| tiny (d=128, ffn=384, 4 layers) | 8 × 128 |" in capsys.readouterr().out
