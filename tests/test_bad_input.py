"""Bad input: every malformed recipe or command line exits non-zero with one line naming the key or
value, before any process group starts and without writing anything; a fuzz of the recipe loader."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import MICRO
from sparsedist import cli
from sparsedist.config import RecipeError, load_recipe

V = ["validate", str(MICRO)]
T = ["train", str(MICRO)]  # validate defers inputs not downloaded yet (test_config); train and launch do not
L = ["launch", str(MICRO)]
CASES = [  # (command line, what its one-line error must say)
    ([*V, "train.stepz=5"], "unknown key train.stepz"),
    ([*V, "nosection.x=1"], "unknown key nosection"),
    ([*V, "train.steps=abc"], "train.steps: Input should be a valid integer"),
    ([*V, "train.steps=-5"], "train.steps: Input should be greater than 0"),
    ([*V, "train.global_batch=2.5"], "train.global_batch: Input should be a valid integer"),
    ([*V, "train.micro_batch=0"], "train.micro_batch: Input should be greater than 0"),
    ([*V, "optim.lr=-1"], "optim.lr: Input should be greater than 0"),
    ([*V, "optim.lr=fast"], "optim.lr: Input should be a valid number"),
    ([*V, "optim.betas=[0.9]"], "optim.betas.1: missing"),
    ([*V, "optim.weight_decay=-0.1"], "optim.weight_decay: Input should be greater than or equal to 0"),
    ([*V, "sparsity.n=4"], "sparsity.n: 4 must be smaller than sparsity.m (4)"),
    ([*V, "sparsity={method: ste, n: 5, m: 4}"], "sparsity.n: 5 must be smaller than sparsity.m (4)"),
    ([*V, "sparsity={method: ste, m: 3}"], "sparsity.m: model.layers.0.mlp.gate_proj has 32 inputs, not a multiple"),
    ([*V, "sparsity.m=0"], "sparsity.m: Input should be greater than 0"),
    ([*V, "sparsity.method=magic"], "sparsity.method: 'magic' is not one of dense"),
    ([*V, "sparsity={method: sste, n: 1}"], "sparsity.n: sste is defined for 2:4"),
    ([*V, "sparsity={method: srste, decay: -1}"], "sparsity.decay: Input should be greater than or equal to 0"),
    ([*V, "sparsity={method: cast, decay: -1e-7}"], "sparsity.decay: Input should be greater than or equal to 0"),
    ([*V, "sparsity={method: cast, decay: automatic}"], "sparsity.decay: Input should be 'auto'"),
    ([*V, "sparsity={method: ast, decay_warmup: -3}"], "sparsity.decay_warmup: Input should be greater than or equal"),
    ([*V, "sparsity={method: ast, decay_warmup: 2.5}"], "sparsity.decay_warmup: 2.5 is neither a share"),
    ([*V, "sparsity={method: cast, scale_segments: 3}"], "sparsity.scale_segments: 32 inputs do not split into 3"),
    ([*V, "sparsity={method: ast, slorb: true, slorb_k: 7}"], "sparsity.slorb_k: 32 inputs are not a multiple of 7"),
    ([*V, "sparsity={method: cast, kernel: semi_structured}"], "sparsity.kernel: not a key of method 'cast'"),
    ([*V, "sparsity={method: srste, kernel: semi_structured}", "parallel.mixed_precision=fp32"],
     "sparsity.kernel: semi_structured multiplies bf16 operands"),
    ([*V, "sparsity={method: dense}", "precision.fp8=true"], "precision.fp8: applies to the sparse FFN layers"),
    ([*V, "parallel.backend=horovod"], "parallel.backend: Input should be 'fsdp2', 'deepspeed' or 'none'"),
    ([*V, "parallel.zero_stage=4"], "parallel.zero_stage: Input should be 1, 2 or 3"),
    ([*V, "train.global_batch=10"], "train.global_batch: 10 is not divisible by world size 1 × train.micro_batch 4"),
    ([*V, "parallel.backend=fsdp2", "parallel.nproc_per_node=5"], "train.global_batch: 12 is not divisible by world"),
    ([*V, "parallel.backend=fsdp2", "parallel.nproc_per_node=2", "eval.sequences=13", "train.global_batch=16"],
     "eval.sequences: 13 is not divisible by world size 2"),
    ([*V, "parallel.backend=deepspeed", "parallel.deepspeed_config=/nonexistent/ds.json"],
     "parallel.deepspeed_config: /nonexistent/ds.json is not a file"),
    ([*V, "distill.weight=1.5"], "distill.weight: Input should be less than or equal to 1"),
    ([*V, "distill.temperature=0"], "distill.temperature: Input should be greater than 0"),
    ([*V, "distill.weight=0.5"], "distill.teacher.path: 'self' needs model.pretrained"),
    ([*T, "distill={weight: 0.5, teacher: {path: /nonexistent/teacher}}"],
     "distill.teacher.path: /nonexistent/teacher holds no config.json"),
    ([*V, "distill={weight: 0.5, teacher: {path: TEACHER}}"], "has vocabulary 999, the student 8192"),
    ([*L, "model.pretrained=/nonexistent/model"], "model.pretrained: /nonexistent/model holds no config.json"),
    ([*V, "model.family=bert"], "model.family: Input should be 'llama', 'opt' or 'gpt2'"),
    ([*V, "model.config.hidden_sizee=3"], "model.config.hidden_sizee: not a LlamaConfig setting"),
    ([*V, "data.seq_len=1000"], "data.seq_len: 1000 exceeds the model's max_position_embeddings (64)"),
    ([*V, "data.vocab_size=-1"], "data.vocab_size: Input should be greater than 0"),
    ([*T, "data.source=/nonexistent/*.txt"],
     "data.source: no .txt, .jsonl, .jsonl.gz, .jsonl.zst, .json, .json.gz, .json.zst files match "
     "'/nonexistent/*.txt'"),
    ([*L, "data.tokenizer=/nonexistent/tok"], "data.tokenizer: /nonexistent/tok holds no tokenizer.json"),
    ([*V, "checkpoint.resume=/nonexistent/step_00000001"], "checkpoint.resume: /nonexistent/step_00000001 is not"),
    ([*V, "checkpoint.keep=0"], "checkpoint.keep: Input should be greater than 0"),
    ([*V, "schedule.warmup_steps=99"], "schedule.warmup_steps: 99 exceeds train.steps (6)"),
    ([*V, "schedule.kind=linear"], "schedule.kind: Input should be 'cosine' or 'constant'"),
    ([*V, "tracking.enabled=maybe"], "tracking.enabled: Input should be a valid boolean"),
    ([*V, "train.steps"], "override 'train.steps': expected KEY=VALUE"),
    (["validate", "/nonexistent/recipe.yaml"], "recipe not found: /nonexistent/recipe.yaml"),
    (["validate", "BROKEN_YAML"], "not valid YAML"),
    (["validate", "LIST_YAML"], "a recipe is a mapping of sections"),
    (["train", str(MICRO), "optim.weight_decay=-0.1"], "optim.weight_decay: Input should be greater than or equal"),
    (["launch", str(MICRO), "--nproc", "0"], "argument --nproc: must be at least 1, not 0"),
    (["launch", str(MICRO), "--nproc", "x"], "argument --nproc: invalid positive integer value: 'x'"),
    (["launch", str(MICRO), "--launcher", "deepspeed"], "--launcher deepspeed needs parallel.backend deepspeed"),
    (["launch", str(MICRO), "--launcher", "mpirun"], "argument --launcher: invalid choice: 'mpirun'"),
    (["plan", str(MICRO), "--nodes", "0", "--gpus-per-node", "8"], "argument --nodes: must be at least 1, not 0"),
    (["plan", str(MICRO), "--nodes", "1", "--gpus-per-node", "2"], "parallel.backend: 'none' runs one process"),
    (["export", "/nonexistent/step", "OUT"], "/nonexistent/step: no readable manifest.json"),
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Files some cases point at: a teacher of another vocabulary, broken YAML, a list instead of a recipe."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "teacher").mkdir()
    (root / "teacher" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 999}))
    (root / "broken.yaml").write_text("name: x\nmodel: [1, 2\n")
    (root / "list.yaml").write_text("- 1\n- 2\n")
    return {"TEACHER": str(root / "teacher"), "BROKEN_YAML": str(root / "broken.yaml"),
            "LIST_YAML": str(root / "list.yaml"), "OUT": str(root / "never-written")}


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, err.getvalue()


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize(("argv", "message"), CASES, ids=[" ".join(a[2:] or a[:2])[:60] for a, _ in CASES])
def test_bad_input_fails_in_one_line_before_any_rank_and_writes_nothing(argv, message, inputs, tmp_path, monkeypatch):
    argv = [inputs.get(arg, arg).replace("TEACHER", inputs["TEACHER"]) for arg in argv]
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv)
    assert code not in (0, None), err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not dist.is_initialized()
    assert os.listdir(tmp_path) == [] and not Path(inputs["OUT"]).exists()


SECTIONS = ["model", "data", "sparsity", "distill", "parallel", "precision", "optim", "schedule", "train",
            "checkpoint", "tracking", "eval", "bogus"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["fsdp2", "deepspeed", "cast", "srste", "llama", "self"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(["steps", "global_batch", "method", "n", "m", "backend", "lr", "fp8", "weight",
                                  "seq_len", "family", "config", "resume", "nproc_per_node", "decay"]),
                 st.text(max_size=8))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(keys, values, max_size=3), max_size=4))
@example({"model": {"\n": None}}).via("a key holding a newline, once found by this test")
@example({"sparsity": {"": 1}}).via("an empty key")
def test_the_recipe_loader_refuses_any_damage_with_one_line(tmp_path, damage):
    """Random sections merged over the micro recipe either load or raise RecipeError in one line."""
    base = yaml.safe_load(Path(MICRO).read_text())
    for section, keys_ in damage.items():
        base[section] = {**base[section], **keys_} if isinstance(base.get(section), dict) else keys_
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(base, allow_unicode=True))
    try:
        load_recipe(path)
    except RecipeError as err:
        assert "\n" not in str(err) and str(err)
