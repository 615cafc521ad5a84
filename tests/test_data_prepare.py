"""Streaming data preparation: compressed sources, malformed lines, shards and merges, workers, atomic publish."""

from __future__ import annotations

import gzip
import json
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import sparsedist.data.corpus as corpus_module
from conftest import MICRO, child_env
from sparsedist.cli import main
from sparsedist.config import load_recipe
from sparsedist.config.schema import DataConfig, DataPart
from sparsedist.data import EOS_TOKEN, check_prepare_size, merge_prepared, prepare_dataset, prepare_text_source
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


# --- preparation -----------------------------------------------------------------------------------

PREPARE = {"vocab_size": 300, "valid_fraction": 0.1, "seed": 3}
FILES = ("train.bin", "train.idx", "valid.bin", "valid.idx", "documents.jsonl.gz")


@pytest.fixture(scope="module")
def corpus(sources: Path) -> Path:
    """`sources` and 300 more documents over a .jsonl.gz, a .json.zst and a .jsonl (with one malformed line)."""
    rng = random.Random(1)
    _write(sources / "big" / "x.jsonl.gz", _jsonl(rng, 120))
    _write(sources / "big" / "y.json.zst", _jsonl(rng, 100, {50: b"not json"}))
    _write(sources / "big" / "z.jsonl", _jsonl(rng, 80))
    return sources


def _source(corpus: Path) -> str:
    return str(corpus / "*" / "*.j*")


def _prepare(corpus: Path, out: Path, tokenizer: Path | None, **options) -> Path:
    return prepare_text_source(_source(corpus), out, tokenizer, **PREPARE, skip_malformed=True, **options)


def _cli(*args: str) -> None:
    assert main(["data", *args]) == 0


def _same_files(a: Path, b: Path) -> None:
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_shards_and_workers_give_the_same_files_as_one_process(corpus: Path, tmp_path: Path) -> None:
    trained = _prepare(corpus, tmp_path / "trained", None, workers=1)
    tokenizer = trained / "tokenizer"
    one = _prepare(corpus, tmp_path / "one", tokenizer, workers=2)
    _same_files(trained, one)
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["malformed"]["count"] == 5 and manifest["format"] == 2
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "valid")) == 40 + 30 + 25 + 300 - 5
    assert manifest["splits"]["valid"]["documents"] > 10

    options = ["--tokenizer", str(tokenizer), "--vocab-size", "300", "--valid-fraction", "0.1", "--seed", "3",
               "--skip-malformed", "--num-shards", "2"]
    for shard, workers in ((0, "1"), (1, "2")):
        _cli("prepare", _source(corpus), "--out", str(tmp_path / f"part{shard}"), "--shard", str(shard),
             "--workers", workers, *options)
    with pytest.raises(DataError, match=r"missing \[1\]"):
        merge_prepared([tmp_path / "part0"], tmp_path / "merged")
    _cli("merge", str(tmp_path / "part1"), str(tmp_path / "part0"), "--out", str(tmp_path / "merged"))
    _same_files(one, tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "manifest.json").read_text())
    assert merged["request"] == manifest["request"] and merged["splits"] == manifest["splits"]
    assert [s["shard"] for s in merged["shards"]] == [[0, 2], [1, 2]] and merged["malformed"]["count"] == 5
    before = (tmp_path / "merged" / "manifest.json").stat().st_mtime_ns
    _prepare(corpus, tmp_path / "merged", tokenizer)  # the merged parts are that request, prepared
    assert (tmp_path / "merged" / "manifest.json").stat().st_mtime_ns == before


def test_a_malformed_line_publishes_nothing(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"part-0\.jsonl\.gz:4: not JSON"):
        prepare_text_source(_source(corpus), tmp_path / "out", None, **PREPARE)
    assert not (tmp_path / "out").exists()
    assert main(["data", "prepare", str(corpus / "a"), "--out", str(tmp_path / "out"), "--shard", "0",
                 "--num-shards", "2"]) == 1
    assert not (tmp_path / "out").exists()


UNDER_A_HANDLER = """
import signal, sys
from pathlib import Path
signal.signal(signal.SIGTERM, lambda *_: None)  # as a trainer's preemption handler does (sparsedist.train.preemption)
from sparsedist.data import prepare_text_source
from sparsedist.errors import DataError
source, out, tokenizer = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
for i in range(4):
    prepare_text_source(source, out / f"ok{i}", tokenizer, 300, 0.1, 3, workers=2, skip_malformed=True)
    try:
        prepare_text_source(source, out / f"refused{i}", tokenizer, 300, 0.1, 3, workers=2)
    except DataError:
        continue
    raise SystemExit("not refused")
"""


def _python(*args: str, **options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **options)


def test_a_prepare_under_a_sigterm_handler_finishes_and_fails_cleanly(corpus: Path, tmp_path: Path) -> None:
    """`train` prepares a missing corpus with its preemption handler installed: the pool's forked workers
    inherited it, swallowed the SIGTERM of `Pool.terminate`, and the prepare hung (one time in two)."""
    tokenizer = _prepare(corpus, tmp_path / "tok", None, workers=1) / "tokenizer"
    done = _python("-c", UNDER_A_HANDLER, _source(corpus), str(tmp_path), str(tokenizer))
    output = done.communicate(timeout=240)[0]
    assert done.returncode == 0, output[-3000:]
    assert all((tmp_path / f"ok{i}" / "manifest.json").is_file() and not (tmp_path / f"refused{i}").exists()
               for i in range(4))


def test_two_processes_preparing_one_directory_prepare_it_once(corpus: Path, tmp_path: Path) -> None:
    """Two runs naming one `data.dir`: the second waits for the first's lock, then finds it prepared."""
    args = ["-m", "sparsedist", "data", "prepare", _source(corpus), "--out", str(tmp_path / "out"), "--vocab-size",
            "300", "--valid-fraction", "0.1", "--seed", "3", "--skip-malformed", "--workers", "1"]
    runs = [_python(*args, cwd=tmp_path) for _ in range(2)]
    logs = [run.communicate(timeout=240)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs
    assert sum("tokenized" in log for log in logs) == 1, logs
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["complete"] is True


def test_a_tiny_corpus_keeps_a_document_in_each_split(tmp_path: Path) -> None:
    rng = random.Random(2)
    _write(tmp_path / "tiny.jsonl", _jsonl(rng, 3))
    one = prepare_text_source(str(tmp_path / "tiny.jsonl"), tmp_path / "one", None, 300, 0.001, seed=0)
    splits = json.loads((one / "manifest.json").read_text())["splits"]
    assert (splits["train"]["documents"], splits["valid"]["documents"]) == (2, 1)
    rows = [json.loads(line) for line in gzip.decompress((one / "documents.jsonl.gz").read_bytes()).splitlines()]
    assert sorted(row["split"] for row in rows) == ["train", "train", "valid"]
    for shard in (0, 1):
        prepare_text_source(str(tmp_path / "tiny.jsonl"), tmp_path / f"p{shard}", one / "tokenizer", 300, 0.001, 0,
                            shard=(shard, 2))
    _same_files(prepare_text_source(str(tmp_path / "tiny.jsonl"), tmp_path / "given", one / "tokenizer", 300,
                                    0.001, 0), merge_prepared([tmp_path / "p0", tmp_path / "p1"], tmp_path / "merged"))


def test_a_vocabulary_above_65536_ids_is_stored_as_int32(corpus: Path, tmp_path: Path) -> None:
    vocab = {EOS_TOKEN: 0, **{f"filler{i}": i + 1 for i in range(70_000)}}
    vocab.update({word: 70_001 + i for i, word in enumerate(WORDS)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN).save_pretrained(tmp_path / "wide")
    out = prepare_text_source(str(corpus / "b" / "clean.jsonl"), tmp_path / "out", tmp_path / "wide", 70_017, 0.2, 0)
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "int32"
    dataset = IndexedDataset(str(out / "train"))
    assert dataset.index.dtype == np.int32 and int(dataset[0].max()) > 70_000


def test_a_blend_of_compressed_sources_is_prepared_with_one_tokenizer(corpus: Path, tmp_path: Path) -> None:
    config = DataConfig(sources=[DataPart(source=str(corpus / "big" / "x.jsonl.gz"), dir=tmp_path / "x", weight=2),
                                 DataPart(source=str(corpus / "big" / "y.json.zst"), dir=tmp_path / "y", weight=1)],
                        vocab_size=300, valid_fraction=0.2)
    with pytest.raises(DataError, match=r"y\.json\.zst:51: not JSON"):
        prepare_dataset(config, seed=0)
    assert prepare_dataset(config, seed=0, skip_malformed=True) == [tmp_path / "x", tmp_path / "y"]
    assert (tmp_path / "x" / "tokenizer" / "tokenizer.json").read_bytes() == \
        (tmp_path / "y" / "tokenizer" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("command", ["train", "launch"])
def test_train_and_launch_refuse_to_prepare_a_large_source(corpus: Path, tmp_path: Path, monkeypatch, capsys,
                                                           command: str) -> None:
    monkeypatch.setattr(corpus_module, "OFFLINE_PREPARE_BYTES", 1000)
    overrides = [f"data.source={corpus / 'b' / 'clean.jsonl'}", f"data.dir={tmp_path / 'data'}", "data.vocab_size=300",
                 f"train.output_dir={tmp_path / 'run'}"]
    assert main([command, str(MICRO), *overrides]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"sparsedist: recipe error: data.source: {corpus / 'b' / 'clean.jsonl'} holds 0.0 GiB")
    assert "\n" not in error and not (tmp_path / "run").exists()
    prepare = shlex.split(error.split("prepare it first (docs/data.md): ")[1])
    assert prepare[:3] == ["sparsedist", "data", "prepare"] and main(prepare[1:]) == 0
    check_prepare_size(load_recipe(str(MICRO), overrides).data, seed=0)  # prepared: a run may start
