"""Weighted blends of prepared datasets: shares, per-part epochs, rank layout, evaluation, preparation, a run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from conftest import train
from sparsedist.config.schema import DataConfig, DataPart
from sparsedist.data import BLOCK, Blend, TokenBatches, eval_batches, missing_sources, prepare_dataset
from sparsedist.data.loader import TokenWindows
from sparsedist.errors import RecipeError

SEQ = 4
SIZES = (50, 17, 200)
"""Samples of each part."""
WEIGHTS = (0.5, 0.2, 0.3)


def _write_part(prefix: Path, part: int, samples: int) -> None:
    """A split whose tokens are part·1000 + their position: every window tells its part and place."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    tokens = part * 1000 + np.arange(samples * SEQ + 1)
    for document in np.array_split(tokens, 5):
        builder.add_item(torch.from_numpy(document.astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[Path, float]]:
    root = tmp_path_factory.mktemp("blend")
    out = []
    for k, (size, weight) in enumerate(zip(SIZES, WEIGHTS, strict=True)):
        _write_part(root / f"part{k}", k, size)
        out.append((root / f"part{k}", weight))
    return out


def _positions(batches: TokenBatches, steps: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [batches.sample_ids(step) for step in range(steps)]
    return np.concatenate([p for p, _ in pairs]), np.concatenate([s for _, s in pairs])


def test_every_block_holds_each_parts_share(parts) -> None:
    batches = TokenBatches(parts, SEQ, 4096, 4096, 0, 1, seed=0)
    part_of, _ = _positions(batches, 3 * BLOCK // 4096)
    for blocks in (1, 2, 3):
        counts = np.bincount(part_of[: blocks * BLOCK], minlength=3)
        assert np.all(np.abs(counts - np.array(WEIGHTS) * blocks * BLOCK) < 1), counts
        assert np.array_equal(counts, batches.blend.taken(blocks * BLOCK))
    assert len(set(part_of[:64].tolist())) == 3, "the parts are interleaved within a block"


def test_each_part_cycles_through_its_own_epochs(parts) -> None:
    batches = TokenBatches(parts, SEQ, 4096, 4096, 0, 1, seed=3)
    part_of, sample_of = _positions(batches, 2 * BLOCK // 4096)
    for k, size in enumerate(SIZES):
        visits = sample_of[part_of == k]
        epochs = [visits[e * size : (e + 1) * size] for e in range(len(visits) // size)]
        assert len(epochs) > 2 and all(sorted(epoch) == list(range(size)) for epoch in epochs)
        assert not np.array_equal(epochs[0], epochs[1]), "each epoch is its own permutation"


def test_rows_come_from_their_part_and_do_not_depend_on_the_layout(parts) -> None:
    def global_rows(world: int, micro: int, step: int) -> torch.Tensor:
        return torch.cat([inputs for rank in range(world)
                          for inputs, _ in TokenBatches(parts, SEQ, 24, micro, rank, world, 5).micro_batches(step)])

    reference = TokenBatches(parts, SEQ, 24, 24, 0, 1, 5)
    for step in (0, 3):
        rows = global_rows(1, 24, step)
        part_of, sample_of = reference.sample_ids(step)
        assert torch.equal(rows // 1000, torch.from_numpy(part_of)[:, None].expand(-1, SEQ))
        assert torch.equal(rows[:, 0] % 1000, torch.from_numpy(sample_of * SEQ))
        for world, micro in ((2, 4), (4, 2), (3, 8)):
            assert torch.equal(global_rows(world, micro, step), rows)
    resumed = TokenBatches(parts, SEQ, 24, 24, 0, 1, 5).micro_batches(7)
    assert torch.equal(resumed[0][0], reference.micro_batches(7)[0][0])


def test_one_part_is_the_split_itself(parts) -> None:
    prefix = parts[0][0]
    one, blend = TokenBatches(prefix, SEQ, 8, 8, 0, 1, 2), TokenBatches([(prefix, 3.0)], SEQ, 8, 8, 0, 1, 2)
    for step in range(8):
        assert np.array_equal(one.sample_ids(step)[1], blend.sample_ids(step)[1])


def test_evaluation_takes_each_parts_share_whole_world_sizes_alike(parts) -> None:
    everything = torch.cat([x for x, _ in eval_batches(parts, SEQ, 2, 0, 1, sequences=None)])
    counts = np.bincount((everything[:, 0] // 1000).numpy(), minlength=3)
    assert np.all(counts <= SIZES) and counts[1] >= SIZES[1] - 1, "the smallest share's part is used up"
    assert np.all(np.abs(counts / counts.sum() - WEIGHTS) < 2 / counts.sum())
    for world in (1, 2, 4):
        gathered = torch.cat([x for rank in range(world) for x, _ in eval_batches(parts, SEQ, 2, rank, world, 20)])
        assert torch.equal(gathered // 1000, torch.tensor([0] * 10 + [1] * 4 + [2] * 6)[:, None].expand(-1, SEQ))
    with pytest.raises(ValueError, match="200 samples of 5 tokens; 100 requested"):
        eval_batches(parts, SEQ, 2, 0, 1, sequences=100)  # part 1 would need 20 of its 17


def test_a_part_without_a_sample_is_refused(parts, tmp_path: Path) -> None:
    builder = IndexedDatasetBuilder(f"{tmp_path / 'empty'}.bin", dtype=np.uint16)
    builder.add_item(torch.tensor([1, 2], dtype=torch.int64))
    builder.end_document()
    builder.finalize(f"{tmp_path / 'empty'}.idx")
    with pytest.raises(ValueError, match="empty: no sample of 5 tokens"):
        Blend([TokenWindows(tmp_path / "empty", SEQ)], [1.0], 0, True)


def _text_parts(root: Path) -> list[DataPart]:
    rng = random.Random(0)
    words = "the king queen ghost sea storm love night day sword crown grave".split()
    (root / "a").mkdir(parents=True)
    for i in range(6):
        (root / "a" / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(400)))
    lines = [json.dumps({"text": " ".join(rng.choice(words[:6]) for _ in range(200))}) for _ in range(8)]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    return [DataPart(source=str(root / "a" / "*.txt"), dir=root / "data-a", weight=3.0),
            DataPart(source=str(root / "b.jsonl"), dir=root / "data-b", weight=1.0)]


def test_a_blend_is_prepared_with_one_tokenizer_and_trains(tmp_path: Path) -> None:
    sources = _text_parts(tmp_path / "text")
    config = DataConfig(sources=sources, vocab_size=300, valid_fraction=0.3)
    assert prepare_dataset(config, seed=0) == [part.dir for part in sources]
    tokenizers = {(part.dir / "tokenizer" / "tokenizer.json").read_bytes() for part in sources}
    assert len(tokenizers) == 1 and config.tokenizer_dir == sources[0].dir / "tokenizer"

    blend = "[" + ", ".join(f"{{source: '{p.source}', dir: '{p.dir}', weight: {p.weight}}}" for p in sources) + "]"
    out = tmp_path / "run"
    train(tmp_path, tmp_path / "unused", out, f"data.sources={blend}", "data.vocab_size=300",
          "data.valid_fraction=0.3", "train.steps=2", "eval.interval=2", "checkpoint.interval=2",
          "checkpoint.export=false")
    assert (out / "checkpoints").is_dir()

    moved = config.model_copy(update={"sources": [sources[0].model_copy(update={"source": sources[1].source}),
                                                  sources[1]]})
    with pytest.raises(RecipeError, match=f"data.sources.1.dir: {sources[1].dir} was prepared with another"):
        prepare_dataset(moved, seed=0)  # part 0 retrained its tokenizer; part 1 still holds the old one


def test_a_missing_part_is_named_by_its_key(tmp_path: Path) -> None:
    config = DataConfig(sources=[DataPart(source=str(tmp_path / "nothing*.jsonl"), dir=tmp_path / "a", weight=1.0),
                                 DataPart(source="hf:some/dataset", dir=tmp_path / "b", weight=1.0)])
    assert [key for key, _, _ in missing_sources(config)] == ["data.sources.0.source"]
