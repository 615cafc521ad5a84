"""Real multi-process runs over gloo: sharded runs agree with one process, and resume equals uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import MICRO, child_env, metric_history, micro_overrides, run, train


def test_fsdp2_losses_equal_the_single_process_run(corpus, tmp_path):
    """Same global batch of 12: 1 process × 3 micro-batches of 4 vs 2 FSDP2 ranks × 3 micro-batches of 2.

    A large SR-STE decay makes the test sensitive to where the decay is added: added before the
    reduction over ranks it would count twice on 2 ranks.
    """
    train(tmp_path, corpus, tmp_path / "one", "train.micro_batch=4", "sparsity.decay=0.05")
    train(tmp_path, corpus, tmp_path / "two", "train.micro_batch=2", "sparsity.decay=0.05", nproc=2)
    one, two = metric_history(tmp_path / "one", "loss"), metric_history(tmp_path / "two", "loss")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
    for step in one:
        # fp32, different reduction order: agreement to 1e-5 relative (measured: about 1e-7)
        assert two[step] == pytest.approx(one[step], rel=1e-5), step
    for key in ("val_loss", "final_val_loss", "flip_rate"):
        a, b = metric_history(tmp_path / "one", key), metric_history(tmp_path / "two", key)
        assert a.keys() == b.keys() and all(b[s] == pytest.approx(a[s], rel=1e-4, abs=1e-6) for s in a), key


@pytest.mark.parametrize("targets", ["ffn", "all_linear"])
def test_masks_are_bit_identical_across_world_sizes(corpus, tmp_path, targets):
    """Rows 80 and 32 split unevenly over 3 ranks (27/27/26, 11/11/10); masks must not notice."""
    reports = {}
    for world, micro in [(1, 4), (2, 2), (3, 4)]:
        out = tmp_path / f"w{world}.json"
        overrides = micro_overrides(corpus, tmp_path / f"run{world}", f"train.micro_batch={micro}",
                                    f"sparsity.targets={targets}", "sparsity.refresh_interval=1",
                                    "tracking.enabled=false")
        if world == 1:
            run(tmp_path, "tests.workers.mask_consistency", str(out), str(MICRO), *overrides)
        else:
            run(tmp_path, "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                "-m", "tests.workers.mask_consistency", str(out), str(MICRO), *overrides,
                "parallel.backend=fsdp2", f"parallel.nproc_per_node={world}")
        reports[world] = json.loads(out.read_text())
    assert len(reports[1]["initial"]) == (6 if targets == "ffn" else 14)
    assert reports[1]["initial"] == reports[2]["initial"] == reports[3]["initial"]
    for world, report in reports.items():
        assert report["consistent"] == [True, True, True], world


def _complete_checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


def test_killed_run_resumes_and_matches_the_uninterrupted_run(corpus, tmp_path):
    steps = ["train.steps=40", "checkpoint.interval=4", "eval.interval=100", "train.micro_batch=2"]
    train(tmp_path, corpus, tmp_path / "straight", *steps, nproc=2)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "sparsedist", "launch", str(MICRO), "--nproc", "2", "parallel.backend=fsdp2",
           *micro_overrides(corpus, out, *steps)]
    env = child_env()
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not _complete_checkpoints(out) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = _complete_checkpoints(out)
    assert interrupted_at and interrupted_at[-1] != "step_00000040", "the run finished before it could be killed"
    assert not (out / "model").exists()

    train(tmp_path, corpus, out, *steps, nproc=2)  # checkpoint.resume=auto
    straight, resumed = metric_history(tmp_path / "straight", "loss"), metric_history(out, "loss")
    assert resumed.keys() == straight.keys() == set(range(1, 41))
    for step in range(int(interrupted_at[-1].removeprefix("step_")) + 1, 41):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=0), step
    straight_final = metric_history(tmp_path / "straight", "final_val_loss")
    assert metric_history(out, "final_val_loss") == pytest.approx(straight_final)


def test_mlflow_run_contents(corpus, tmp_path):
    out = tmp_path / "run"
    train(tmp_path, corpus, out, "train.micro_batch=2", "parallel.mixed_precision=bf16", "tracking.peak_tflops=0.001",
          nproc=2)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, "one run for the job, not one per rank"
    data = runs[0].data
    assert data.params["train.steps"] == "6" and data.params["sparsity.method"] == "srste"
    assert data.params["parallel.nproc_per_node"] == "2"
    for key in ("loss", "lr", "tokens", "tokens_per_s", "grad_norm", "flip_rate", "sparsity",
                "val_loss", "val_ppl", "final_val_loss", "final_val_ppl"):
        assert key in data.metrics, key
    assert data.metrics["sparsity"] == pytest.approx(0.5)
    assert data.metrics["tokens"] == 6 * 12 * 32
    tags = data.tags
    assert tags["method"] == "srste" and tags["model_family"] == "llama" and tags["world_size"] == "2"
    assert int(tags["sparse_params"]) == 2 * 3 * 80 * 32 and int(tags["params"]) > int(tags["sparse_params"])
    assert tags["sparsity_pattern"] == "2:4" and len(tags["git_revision"]) >= 7 and tags["recipe_hash"]
    assert int(tags["tokens"]) == 6 * 12 * 32
    flops_per_token = 6 * int(tags["params"]) + 12 * 2 * 32 * 32  # 6N, plus attention: 12 · layers · d · seq
    assert int(tags["flops"]) == flops_per_token * 6 * 12 * 32
    assert data.metrics["mfu"] == pytest.approx(flops_per_token * data.metrics["tokens_per_s"] / (2 * 1e9), rel=1e-6)
    history = metric_history(out, "val_ppl")
    assert sorted(history) == [0, 3]

    # The delivered model: a Hugging Face directory with its tokenizer, hard-pruned to 2:4.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert len(AutoTokenizer.from_pretrained(out / "model")) == model.config.vocab_size
    for block in model.model.layers:
        for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            nonzero = (linear.weight != 0).reshape(linear.weight.shape[0], -1, 4).sum(-1)
            assert (nonzero <= 2).all()


def test_distillation_from_the_dense_start(corpus, tmp_path):
    """Dense run → its export is both the student's start and the frozen teacher (`distill.teacher: self`).

    The KD term logged at step 1 is recomputed here in one process: the frozen dense teacher
    against the one-shot 2:4 student on global batch 0.
    """
    train(tmp_path, corpus, tmp_path / "dense", "sparsity={method: dense}")
    start = tmp_path / "dense" / "model"
    out = tmp_path / "kd"
    train(tmp_path, corpus, out, f"model.pretrained={start}", "distill.weight=0.5", "distill.temperature=2.0",
          "train.micro_batch=2", nproc=2)
    kd, ce, loss = (metric_history(out, k) for k in ("kd", "ce", "loss"))
    assert kd.keys() == ce.keys() == set(range(1, 7))
    for step in kd:
        assert kd[step] > 0
        assert loss[step] == pytest.approx(0.5 * kd[step] + 0.5 * ce[step], rel=1e-5)

    import torch
    from transformers import AutoModelForCausalLM

    from sparsedist.data import TokenBatches
    from sparsedist.sparsity import nm_mask
    from sparsedist.train.losses import distill_kl

    teacher = AutoModelForCausalLM.from_pretrained(start).eval()
    student = AutoModelForCausalLM.from_pretrained(start).eval()
    with torch.no_grad():
        for block in student.model.layers:
            for linear in (block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
                linear.weight.mul_(nm_mask(linear.weight))
        (inputs, _), = TokenBatches(corpus / "train", 32, 12, 12, 0, 1, seed=0).micro_batches(0)
        expected = distill_kl(student(inputs).logits, teacher(inputs).logits, 2.0)
    assert kd[1] == pytest.approx(float(expected), rel=1e-4)
