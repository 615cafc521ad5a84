"""What "consistent masks" means across configurations, for CAST (the method most sensitive to rounding).

Within one run masks are consistent across shards, and a run repeats bit for bit on the same
configuration (tests/test_distributed.py, tests/test_rank_failure.py, and `replay twice` below).
Across configurations (one process, FSDP2, ZeRO) the reduction order differs, so weights differ by
float rounding; where CAST's (1−α)μ and αλ·sign(W) nearly cancel, AdamS's normalised step can
turn such a difference into a sizeable one, and a mask can then flip at a group whose deciding
magnitudes were nearly tied. Real gloo runs of tests/workers/run_steps.py on the micro recipe.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import MICRO, run

LR, STEPS, REPLAY = 3e-3, 24, 12  # CAST refreshes before the update of steps 3, 6, ..., 21: also of step 12
COMMON = ["tracking.enabled=false", "checkpoint.export=false", "eval.interval=1000", f"train.steps={STEPS}",
          "checkpoint.keep=10", "sparsity={method: cast, decay: 0.01, refresh_interval: 3}"]
LAYOUTS = {  # name: (world size, micro-batch, overrides); the same global batch of 12
    "one": (1, 4, []),
    "fsdp2-2": (2, 2, ["parallel.backend=fsdp2"]),
    "zero3-2": (2, 2, ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
}


def launch(tmp, corpus, name: str, jobs: dict) -> dict:
    world, micro, extra = LAYOUTS[name]
    out = tmp / f"{name}.pt"
    args = ["-m", "tests.workers.run_steps", str(out), json.dumps(jobs), str(MICRO), f"data.dir={corpus}", *COMMON,
            f"train.micro_batch={micro}", f"parallel.nproc_per_node={world}", *extra]
    if world == 1:
        run(tmp, *args[1:])
    else:
        run(tmp, "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", *args)
    return torch.load(out)


def as_pieces(dcp_path, dest, step: int):
    """A one-process DCP checkpoint rewritten as one file of flat pieces, which ZeRO reads at any world size."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from sparsedist.checkpoint.pieces import write_pieces
    from sparsedist.sparsity import unpack_mask

    dcp_to_torch_save(dcp_path, dest.parent / "reference.pt")
    saved = torch.load(dest.parent / "reference.pt")
    model, pieces = saved["model"], {}
    for name, tensor in model.items():
        if name.endswith(".mask"):
            tensor = unpack_mask(tensor, model[name[:-5] + ".weight"].shape[1])
        pieces[name] = (0, tensor.reshape(-1))
    for name, state in saved["optim"]["state"].items():
        pieces.update({f"{name}@{k}": (0, v.reshape(-1)) for k, v in state.items() if k != "step"})
    dest.mkdir()
    write_pieces(dest, 0, pieces, step)
    return dest


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """Per layout: CAST for 24 steps from scratch ("long"), and step 12 replayed from the one-process run's
    checkpoint after 12 steps, twice ("replay", "again")."""
    tmp = tmp_path_factory.mktemp("agreement")
    checkpoint = tmp / "one.pt.long" / "checkpoints" / f"step_{REPLAY:08d}"
    replay = {"steps": 1, "start": REPLAY, "resume": str(checkpoint), "overrides": ["checkpoint.interval=1000"]}
    results = {"one": launch(tmp, corpus, "one", {
        "long": {"steps": STEPS, "overrides": [f"checkpoint.interval={REPLAY}"]}, "replay": replay})}
    pieces = {**replay, "resume": str(as_pieces(checkpoint, tmp / "pieces", REPLAY))}
    for name, source in [("fsdp2-2", replay), ("zero3-2", pieces)]:
        long = {"steps": STEPS, "overrides": ["checkpoint.interval=1000"]}
        results[name] = launch(tmp, corpus, name, {"long": long, "replay": source, "again": source})
    return results


def masks_and_weights(state: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in state.items() if k.endswith(".mask")},
            {k: v for k, v in state.items() if v.is_floating_point()})


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("layout", ["fsdp2-2", "zero3-2"])
def test_one_step_from_the_same_state_gives_the_same_update(runs, layout):
    """Step 12 (a mask refresh, then AdamS's update) from the same checkpoint: the masks are decided on the
    same weights, so they are equal; the update differs only by the rounding of the gradient's reduction
    (measured: max |Δw| 1e-7 = 3e-5·lr, and once 3.5e-6 = 1.2e-3·lr under ZeRO-3 on a loaded machine: AdamS
    divides by √v, which magnifies the rounding of a slot's tiny gradient). Lost or misaligned moments, or
    another clipping norm, would move weights by up to lr. The same layout twice gives the same bits."""
    ref_masks, ref = masks_and_weights(runs["one"]["replay"]["state"])
    masks, weights = masks_and_weights(runs[layout]["replay"]["state"])
    assert masks.keys() == ref_masks.keys() and len(masks) == 14
    assert all(torch.equal(masks[k], ref_masks[k]) for k in masks)
    assert max_weight_diff(weights, ref) <= 1e-2 * LR
    again = runs[layout]["again"]["state"]
    assert all(torch.equal(again[k], v) for k, v in runs[layout]["replay"]["state"].items())



def differing_groups(ref: dict, other: dict) -> list[float]:
    """Per 2:4 group whose trained mask differs: the gap |w_(2)| − |w_(3)| of its magnitudes in `ref`."""
    from sparsedist.sparsity import unpack_mask

    gaps = []
    for key, bits in ref.items():
        if key.endswith(".mask"):
            weight = ref[key[:-5] + ".weight"]
            differ = (unpack_mask(bits, weight.shape[1]) != unpack_mask(other[key], weight.shape[1])).view(-1, 4)
            magnitudes = weight.abs().view(-1, 4)[differ.any(1)].sort(1, descending=True).values
            gaps += (magnitudes[:, 1] - magnitudes[:, 2]).tolist()
    return gaps


@pytest.mark.parametrize("layout", ["fsdp2-2", "zero3-2"])
def test_after_24_steps_cast_agrees_up_to_near_ties(runs, layout):
    """24 steps of CAST from scratch (7 refreshes). Measured against one process, both layouts: 1 of the
    5888 groups has another mask, its gap |w_(2)| − |w_(3)| in the one-process weights 3.4e-3 (1.1·lr);
    max |Δw| 0.029 (9.6·lr, an embedding row) under FSDP2-2, 0.013 under ZeRO-3-2, 4.2e-3 on sparse
    weights. A flipped mask changes the forward, and AdamS's normalised step amplifies rounding where μ
    and λ·sign(W) nearly cancel, so the runs drift apart: masks agree up to near-ties (a differing group
    has a gap of at most 2·lr, the travel of two steps; at most 0.5% of groups), weights within 20·lr."""
    ref, other = runs["one"]["long"]["state"], runs[layout]["long"]["state"]
    gaps = differing_groups(ref, other)
    assert len(gaps) <= 0.005 * 5888 and all(gap <= 2 * LR for gap in gaps), gaps
    assert max_weight_diff(masks_and_weights(other)[1], masks_and_weights(ref)[1]) <= 20 * LR
