"""One run, any sharding: every method gives the same masks and losses on every backend.

Real multi-process runs over gloo of tests/workers/backend_agreement.py: one process,
FSDP2 at world 2 and 3, DeepSpeed ZeRO-1/2/3 at world 2, ZeRO-3 at world 3 (and ZeRO-2
with the optimizer offloaded), the same global batch of 12.
Weight row counts (80, 32) do not divide by 3, and ZeRO's flat pieces cut rows and 2:4
groups (ZeRO-3 at world 3: partitions of 854 of the 2560 weights), so a mask decided on a
piece without its neighbours' values, a decay added before the reduction over ranks, or
a moment misaligned with its mask would show.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import MICRO, checkpoint_model, metric_history, micro_overrides, run

LAYOUTS = {  # name: (world size, micro-batch, overrides)
    "fsdp2-2": (2, 2, ["parallel.backend=fsdp2"]),
    "fsdp2-3": (3, 4, ["parallel.backend=fsdp2"]),
    **{f"zero{stage}-2": (2, 2, ["parallel.backend=deepspeed", f"parallel.zero_stage={stage}"]) for stage in (1, 2, 3)},
    "zero3-3": (3, 4, ["parallel.backend=deepspeed", "parallel.zero_stage=3"]),
    "zero2-offload-2": (2, 2, ["parallel.backend=deepspeed", "parallel.zero_stage=2",
                               "parallel.offload_optimizer=true"]),
}


def agreement_report(corpus, tmp_path, name: str, world: int, micro: int, extra: list[str]) -> dict:
    out = tmp_path / f"{name}.json"
    overrides = [f"data.dir={corpus}", "tracking.enabled=false", "checkpoint.export=false", "eval.interval=1000",
                 f"train.micro_batch={micro}", f"parallel.nproc_per_node={world}", *extra]
    if world == 1:
        run(tmp_path, "tests.workers.backend_agreement", str(out), str(MICRO), *overrides)
    else:
        run(tmp_path, "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "tests.workers.backend_agreement", str(out), str(MICRO), *overrides)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    return agreement_report(corpus, tmp_path_factory.mktemp("single"), "single", 1, 4, [])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_method_agrees_with_one_process(corpus, tmp_path, single, layout):
    world, micro, extra = LAYOUTS[layout]
    report = agreement_report(corpus, tmp_path, layout, world, micro, extra)
    assert report.keys() == single.keys()
    for method, reference in single.items():
        assert len(reference["masks"]) > 0
        assert report[method]["masks"] == reference["masks"], f"{method}: masks differ under {layout}"
        # fp32, other reduction orders: 1e-5 relative (measured: at most about 1e-7). The decays of the
        # worker shift the loss by about 5e-4 relative within 10 steps, far outside this tolerance.
        assert report[method]["losses"] == pytest.approx(reference["losses"], rel=1e-5), method


FSDP2 = ["parallel.backend=fsdp2"]
ZERO = ["parallel.backend=deepspeed"]


@pytest.mark.parametrize("writer, reader", [
    ((2, FSDP2), (3, FSDP2)),
    ((3, [*ZERO, "parallel.zero_stage=3"]), (2, [*ZERO, "parallel.zero_stage=2"])),
    ((2, [*ZERO, "parallel.zero_stage=2"]), (3, [*ZERO, "parallel.zero_stage=3"])),
], ids=["fsdp2", "zero3-to-zero2", "zero2-to-zero3"])
def test_a_checkpoint_resumes_at_another_world_size(corpus, tmp_path, writer, reader):
    """CAST (its moments are aligned with the masks) written at one world size, resumed at another
    (and, under DeepSpeed, another ZeRO stage; ZeRO-3 at world 3 cuts 2:4 groups and packed mask
    bytes): same masks, same weights as the run that never stopped."""
    common = ["tracking.enabled=false", "checkpoint.export=false", "eval.interval=1000", "train.steps=6",
              "checkpoint.interval=3", "sparsity={method: cast, decay: 0.01, refresh_interval: 2}"]
    runs = {}
    for name, layout, extra in [("straight", writer, []), ("resumed", reader,
                                 [f"checkpoint.resume={tmp_path / 'straight' / 'checkpoints' / 'step_00000003'}"])]:
        world, backend = layout
        overrides = micro_overrides(corpus, tmp_path / name, *common, *backend, *extra,
                                    f"parallel.nproc_per_node={world}", f"train.micro_batch={12 // world // 2}")
        run(tmp_path, "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "sparsedist", "train", str(MICRO), *overrides)
        runs[name] = checkpoint_model(tmp_path / name / "checkpoints" / "step_00000006")
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight.keys() == resumed.keys()
    masks = [k for k in straight if k.endswith(".mask")]
    assert len(masks) == 14
    for key, value in straight.items():
        if key.endswith(".mask"):
            assert torch.equal(resumed[key], value), key
        else:
            # Steps 4-6 ran at another world size: reduction order differs by ~1e-7, which Adam turns
            # into up to ~2e-5 on embedding entries whose gradient nearly cancels. Lost or misplaced
            # moments would move every weight by about lr = 3e-3.
            torch.testing.assert_close(resumed[key], value, rtol=1e-5, atol=1e-4, msg=key)


def test_deepspeed_launcher_runs_a_bf16_zero3_recipe(corpus, tmp_path):
    out = tmp_path / "run"
    overrides = micro_overrides(corpus, out, "parallel.backend=deepspeed", "parallel.mixed_precision=bf16",
                                "train.micro_batch=2")
    run(tmp_path, "sparsedist", "launch", str(MICRO), "--nproc", "2", "--launcher", "deepspeed", *overrides)
    loss = metric_history(out, "loss")
    assert sorted(loss) == [1, 2, 3, 4, 5, 6] and loss[6] < loss[1]
    assert (out / "model" / "model.safetensors").is_file()  # the export verified every weight is 2:4
    # `sparsedist export` of the last DeepSpeed checkpoint, in one process, gives the same model
    run(tmp_path, "sparsedist", "export", str(out / "checkpoints" / "step_00000006"), str(tmp_path / "exported"))
    ours = load_file(tmp_path / "exported" / "model.safetensors")
    theirs = load_file(out / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_deepspeed_launcher_refuses_another_backend(corpus, tmp_path):
    done = subprocess.run([sys.executable, "-m", "sparsedist", "launch", str(MICRO), "--nproc", "2",
                           "--launcher", "deepspeed", "parallel.backend=fsdp2", "train.micro_batch=2"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "sparsedist launch: --launcher deepspeed needs parallel.backend deepspeed, not fsdp2"]


@pytest.fixture(scope="module")
def dense_start(corpus, tmp_path_factory):
    """A dense micro model exported by a 1-process run: the start and the self-teacher of distillation."""
    out = tmp_path_factory.mktemp("dense")
    run(out, "sparsedist", "train", str(MICRO), *micro_overrides(corpus, out, "sparsity={method: dense}",
                                                                   "tracking.enabled=false"))
    return out / "model"


PLACEMENTS = {
    "sharded-fsdp2": ["parallel.backend=fsdp2"],
    "offload-fsdp2": ["parallel.backend=fsdp2", "distill.teacher.placement=offload"],
    # k = the whole vocabulary (8192): the cached distribution is the teacher's, so the KL is exact
    "precomputed-fsdp2": ["parallel.backend=fsdp2", "distill.teacher.placement=precomputed",
                          "distill.teacher.top_k=8192"],
    "sharded-zero3": ["parallel.backend=deepspeed"],
}


def test_every_teacher_placement_gives_the_same_distillation_loss(corpus, tmp_path, dense_start):
    """The KD term of 3 steps of SR-STE at world 2, with the teacher in each placement."""
    kd = {}
    for name, extra in PLACEMENTS.items():
        out = tmp_path / name
        overrides = micro_overrides(corpus, out, f"model.pretrained={dense_start}", "distill.weight=0.5",
                                    "distill.temperature=2.0", "train.steps=3", "train.micro_batch=2",
                                    "parallel.nproc_per_node=2", "checkpoint.export=false", *extra)
        run(tmp_path, "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "sparsedist", "train", str(MICRO), *overrides)
        kd[name] = metric_history(out, "kd")
    reference = kd.pop("sharded-fsdp2")
    assert sorted(reference) == [1, 2, 3] and all(v > 0 for v in reference.values())
    for name, history in kd.items():
        assert history.keys() == reference.keys(), name
        # KD is ~3e-4 here (the student starts as the teacher's 2:4 prune). After step 1 a student
        # under ZeRO-3 differs by reduction order (~1e-7 relative), which moves KD by ~5e-8; a
        # teacher placed wrongly moves it by its own size.
        for step, value in reference.items():
            assert history[step] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, step)
    cache = tmp_path / "precomputed-fsdp2" / "teacher_topk"
    assert len(list(cache.glob("step_*.rank*.pt"))) == 3 * 2 and (cache / "complete.json").is_file()


def test_deepspeed_config_comes_from_the_recipe_with_the_user_json_merged_over_it(tmp_path):
    from sparsedist.config import load_recipe
    from sparsedist.parallel.zero import deepspeed_config

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 100},
                                "steps_per_print": 5}))
    recipe = load_recipe(MICRO, ["parallel.backend=deepspeed", "parallel.nproc_per_node=2", "train.micro_batch=2",
                                 "parallel.mixed_precision=bf16", f"parallel.deepspeed_config={user}"])
    config = deepspeed_config(recipe)
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 100}
    assert config["steps_per_print"] == 5 and config["bf16"] == {"enabled": True}
    assert (config["train_batch_size"], config["train_micro_batch_size_per_gpu"],
            config["gradient_accumulation_steps"]) == (12, 2, 3)
    assert config["gradient_clipping"] == recipe.optim.grad_clip
