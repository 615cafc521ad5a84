"""`sparsedist plan`: exact parameter counts from the meta model, the memory model's scaling, refusal with advice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from sparsedist.config import RecipeError, load_recipe
from sparsedist.plan import GIB, Cluster, make_plan
from sparsedist.preflight import check_recipe

TINY = REPO / "recipes" / "tiny" / "cast.yaml"
SCRATCH = ["model.pretrained=null", "distill.weight=0"]
LLAMA13B = [
    "model.pretrained=null", "distill.weight=0.3333", "distill.teacher.path=models/teacher",
    "model.config={hidden_size: 5120, intermediate_size: 13824, num_hidden_layers: 40, num_attention_heads: 40, "
    "num_key_value_heads: 40, max_position_embeddings: 4096}", "data.vocab_size=32000", "data.seq_len=4096",
    "train.global_batch=256", "train.micro_batch=4", "train.steps=7500", "parallel.nproc_per_node=8",
    "parallel.mixed_precision=bf16",
]


def plan(overrides, nodes=1, gpus=2, gib=80.0):
    return make_plan(load_recipe(TINY, overrides), Cluster(nodes, gpus, gib * GIB))


def test_counts_are_the_meta_models_and_the_total_is_the_sum():
    p = plan(SCRATCH)
    summary = check_recipe(load_recipe(TINY, SCRATCH))
    assert p.sizes.params == summary["params"] and p.sizes.sparse_weights == summary["sparse_params"]
    assert p.sizes.params - p.sizes.dense_params == 2 * sum(  # CAST's scales: out × 2 per sparse layer
        rows for rows in (128, 128, 128, 128, 384, 384, 128) ) * 4
    assert p.total == pytest.approx(sum(p.memory.values())) and p.fits
    assert p.tokens_per_step == 16 * 128 and p.flops > 6 * p.sizes.params * 16 * 128 * 200


def test_sharded_state_halves_with_twice_the_gpus_and_stage3_shards_weights():
    recipe = load_recipe(TINY, [*LLAMA13B, "parallel.backend=deepspeed", "parallel.zero_stage=1"])
    eight, sixteen = (make_plan(recipe, Cluster(n, 8, 80 * GIB)) for n in (1, 2))
    assert sixteen.memory["optimizer state"] == pytest.approx(eight.memory["optimizer state"] / 2)
    assert sixteen.memory["gradients"] == eight.memory["gradients"]  # stage 1: full gradients
    stage3 = make_plan(load_recipe(TINY, [*LLAMA13B, "parallel.backend=deepspeed"]), Cluster(1, 8, 80 * GIB))
    assert stage3.memory["weights"] < eight.memory["weights"] / 2
    offload = make_plan(load_recipe(TINY, [*LLAMA13B, "parallel.backend=deepspeed", "parallel.offload_optimizer=true"]),
                        Cluster(1, 8, 80 * GIB))
    assert offload.memory["optimizer state"] == 0


def test_a_plan_that_does_not_fit_is_refused_with_changes_that_would_fit():
    done = subprocess.run([sys.executable, "-m", "sparsedist", "plan", str(TINY), *LLAMA13B, "--nodes", "1",
                           "--gpus-per-node", "8"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 3, done.stderr
    assert "does not fit" in done.stdout
    assert "parallel.activation_checkpointing=true" in done.stdout and "(fits)" in done.stdout
    checkpointed = plan([*LLAMA13B, "parallel.activation_checkpointing=true"], gpus=8)
    assert checkpointed.fits and checkpointed.memory["activations"] < plan(LLAMA13B, gpus=8).memory["activations"] / 2


def test_nominal_size_and_batch_geometry_are_checked():
    with pytest.raises(RecipeError, match=r"model.nominal_params: the model has 3.0M parameters, not 10.0M"):
        plan([*SCRATCH, "model.nominal_params=10e6"])
    assert plan([*SCRATCH, "model.nominal_params=3.0e6"]).fits
    with pytest.raises(RecipeError, match="train.global_batch: 16 is not divisible by 4 GPUs × train.micro_batch 8"):
        plan(SCRATCH, nodes=2, gpus=2)


def test_plan_before_the_weights_exist(tmp_path):
    """The 7B recipe states LLaMA-2-7B's published sizes; plan uses them while models/llama-2-7b is absent."""
    done = subprocess.run([sys.executable, "-m", "sparsedist", "plan", str(REPO / "recipes/llama/cast-llama2-7b.yaml"),
                           "--nodes", "8", "--gpus-per-node", "8"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("model: 6,741.1M trainable parameters (6,738.4M dense")
    assert lines[-1].startswith("deferred until models/llama-2-7b ")
    assert "the weights' config.json against model.config" in lines[-1]


def test_kept_forms_of_the_weight_are_a_step_long_where_weights_are_whole_and_one_layer_where_gathered():
    kernel = ["sparsity={method: sparse_pretrain, kernel: semi_structured, kernel_min_features: 0}",
              "parallel.mixed_precision=bf16", "distill.weight=0", "model.pretrained=null"]
    ffn = 128 * 384  # the tiny model's FFN weights: 2 inputs of 128 to 384 and back, transposable: W̃ and W̃ᵀ
    whole = plan([*kernel, "parallel.backend=deepspeed", "parallel.zero_stage=1"])
    assert whole.memory["kept forms of W̃"] == pytest.approx(2 * 9 / 16 * 2 * 3 * ffn * whole.sizes.layers)
    gathered = plan([*kernel, "parallel.backend=fsdp2"])
    assert gathered.memory["kept forms of W̃"] == pytest.approx(2 * 9 / 16 * 2 * ffn)
    assert "kept forms of W̃" not in plan(SCRATCH).memory
