"""Recipes: inheritance, overrides, and refusal of invalid input with a one-line message naming the key."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedist.config import RecipeError, load_recipe
from sparsedist.preflight import check_recipe

REPO = Path(__file__).resolve().parent.parent
MICRO = REPO / "tests" / "recipes" / "micro.yaml"
INPUT_KEYS = ("model.pretrained", "data.tokenizer", "data.source", "distill.teacher.path")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_shipped_recipe_validates_or_names_its_missing_input():
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        if "base" in path.stem:
            continue
        try:
            check_recipe(load_recipe(path))
        except RecipeError as err:  # recipes whose model, tokenizer or data the user downloads first
            assert str(err).startswith(INPUT_KEYS), (path, err)


def test_inheritance_merges_sections_key_by_key(tmp_path):
    base = write(tmp_path, "base.yaml", MICRO.read_text())
    child = write(tmp_path, "child.yaml", "base: base.yaml\nname: child\ntrain:\n  steps: 9\n")
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert recipe.train.steps == 9
    assert recipe.train.global_batch == 12  # inherited from the base
    assert recipe.model.config["intermediate_size"] == 80
    assert base.exists()


def test_overrides_parse_values_as_yaml():
    recipe = load_recipe(MICRO, ["train.steps=50", "optim.lr=1e-4", "sparsity.targets=all_linear",
                                 "model.config.num_hidden_layers=3", "checkpoint.resume=never"])
    assert recipe.train.steps == 50
    assert recipe.optim.lr == pytest.approx(1e-4)
    assert recipe.sparsity.targets == "all_linear"
    assert recipe.model.config["num_hidden_layers"] == 3


def test_scientific_notation_in_yaml_is_a_float(tmp_path):
    path = write(tmp_path, "r.yaml", MICRO.read_text().replace("lr: 3.0e-3", "lr: 3e-3"))
    assert load_recipe(path).optim.lr == pytest.approx(3e-3)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.stepz=5"], "unknown key train.stepz"),
        (["nosection.x=1"], "unknown key nosection"),
        (["train.steps.deep=1"], "train.steps has no sub-keys"),
        (["train.steps=abc"], "train.steps: Input should be a valid integer"),
        (["train.steps=0"], "train.steps: Input should be greater than 0"),
        (["train.steps=2.5"], "train.steps: Input should be a valid integer"),
        (["sparsity.n=4"], "sparsity.n: 4 must be smaller than sparsity.m (4)"),
        (["sparsity.method=magic"], "sparsity.method: 'magic' is not one of dense, ste, srste, sparse_pretrain"),
        (["sparsity.mvue=true"], "sparsity.mvue: not a key of method 'srste'"),
        (["sparsity.method=sste"], "sparsity.refresh_interval: not a key of method 'sste'"),
        (["sparsity={method: sste, n: 1}"], "sparsity.n: sste is defined for 2:4 (n=2, m=4), not 1:4"),
        (["sparsity={method: cast, decay: -1}"], "sparsity.decay: Input should be greater than or equal to 0"),
        (["train.global_batch=10"], "train.global_batch: 10 is not divisible by world size 1 × train.micro_batch 4"),
        (["parallel.backend=fsdp2", "parallel.nproc_per_node=2", "train.global_batch=12", "train.micro_batch=4"],
         "train.global_batch: 12 is not divisible by world size 2 × train.micro_batch 4"),
        (["parallel.nproc_per_node=2"], "parallel.backend: 'none' runs one process"),
        (["schedule.warmup_steps=99"], "schedule.warmup_steps: 99 exceeds train.steps (6)"),
        (["sparsity.method=ste", "sparsity.decay=0.1"], "sparsity.decay: not a key of method 'ste'"),
        (["distill.weight=0.5"], "distill.teacher.path: 'self' needs model.pretrained"),
        (["sparsity={method: cast, kernel: semi_structured}"], "sparsity.kernel: not a key of method 'cast'"),
        (["sparsity={method: ste, n: 2, m: 8, kernel: semi_structured}"],
         "sparsity.kernel: semi_structured needs the 2:4 pattern, not 2:8"),
        (["sparsity.kernel=sparse"], "sparsity.kernel: Input should be 'masked_dense' or 'semi_structured'"),
        (["sparsity={method: dense}", "precision.fp8=true"], "precision.fp8: applies to the sparse FFN layers"),
        (["train.steps"], "expected KEY=VALUE"),
        (["parallel.deepspeed_config=ds.json"],
         "parallel.deepspeed_config: only used with parallel.backend 'deepspeed'"),
        (["parallel.backend=deepspeed", f"parallel.deepspeed_config={MICRO}"],
         f"parallel.deepspeed_config: {MICRO} is not JSON (Expecting value"),
    ],
)
def test_invalid_values_are_refused_naming_the_key(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(MICRO, overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_keys_are_refused_at_every_level(tmp_path):
    text = MICRO.read_text()
    cases = {
        "top": ("name: micro\n", "name: micro\ncolour: red\n", "colour: unknown key"),
        "section": ("  steps: 6\n", "  steps: 6\n  epochs: 2\n", "train.epochs: unknown key"),
        "model config": ("    num_hidden_layers: 2\n", "    num_hidden_layers: 2\n    n_wings: 2\n",
                         "model.config.n_wings: not a LlamaConfig setting"),
    }
    for case, (old, new, message) in cases.items():
        path = write(tmp_path, f"{case}.yaml", text.replace(old, new, 1))
        with pytest.raises(RecipeError) as info:
            check_recipe(load_recipe(path))
        assert message in str(info.value), case


def test_model_checks_before_any_weight_exists():
    with pytest.raises(RecipeError, match="data.seq_len: 128 exceeds the model's max_position_embeddings"):
        check_recipe(load_recipe(MICRO, ["data.seq_len=128"]))
    with pytest.raises(RecipeError, match=r"sparsity.m: model.layers.0.mlp.gate_proj has 32 inputs, not a multiple"):
        check_recipe(load_recipe(MICRO, ["sparsity.n=2", "sparsity.m=6"]))
    with pytest.raises(RecipeError, match=r"sparsity.scale_segments: 32 inputs do not split into 3 segments"):
        check_recipe(load_recipe(MICRO, ["sparsity={method: cast, scale_segments: 3}"]))
    with pytest.raises(RecipeError, match=r"sparsity.slorb_k: 32 inputs are not a multiple of 64"):
        check_recipe(load_recipe(MICRO, ["sparsity={method: ast, slorb: true, slorb_k: 64}"]))
    with pytest.raises(RecipeError, match=r"model.config: .*'hidden_size' expected int, got str"):
        check_recipe(load_recipe(MICRO, ["model.config.hidden_size=abc"]))
    with pytest.raises(RecipeError, match=r"model.config: .*RoPE requires an even rotary dimension"):
        check_recipe(load_recipe(MICRO, ["model.config.hidden_size=30"]))


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="inheritance cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_cli_refuses_before_starting_any_rank(tmp_path):
    """`launch` with a bad override exits 2 with one line on stderr, and no process group or output appears."""
    cmd = [sys.executable, "-m", "sparsedist", "launch", str(MICRO), "--nproc", "2", "parallel.backend=fsdp2",
           "train.global_batch=7",
           f"train.output_dir={tmp_path / 'out'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "sparsedist: recipe error: train.global_batch: 7 is not divisible by world size 2 × train.micro_batch 4"
    )
    assert not (tmp_path / "out").exists()


def test_cli_validate_prints_a_summary():
    done = subprocess.run([sys.executable, "-m", "sparsedist", "validate", str(MICRO), "train.steps=8"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: micro (")
    assert "total_tokens=3,072" in done.stdout


def test_every_schema_key_is_documented():
    """docs/recipes.md names every key of the schema as `section.key`."""
    from sparsedist.config.load import section_types
    from sparsedist.config.schema import Recipe

    docs = (REPO / "docs" / "recipes.md").read_text()
    for section, field in Recipe.model_fields.items():
        classes = section_types(field.annotation)  # one section class, or the methods' union
        assert classes or f"`{section}`" in docs, section
        for key in {key for cls in classes for key in cls.model_fields}:
            assert f"`{section}.{key}`" in docs, f"{section}.{key}"


def _unbounded(annotation, metadata, where: str) -> list[str]:
    """Numeric fields (int/float, in tuples and unions too) under `annotation` with no bound in their metadata."""
    import typing

    import annotated_types
    from pydantic import BaseModel
    from pydantic.fields import FieldInfo

    def bounded(meta) -> bool:
        return any(isinstance(m, (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le))
                   or isinstance(m, FieldInfo) and bounded(m.metadata) for m in meta)

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _unbounded(args[0], [*metadata, *args[1:]], where)
    if annotation in (int, float):
        return [] if bounded(metadata) else [where]
    if origin in (typing.Literal, dict):  # fixed choices; free-form mappings (model.config) are checked by building
        return []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [bad for key, field in annotation.model_fields.items()
                for bad in _unbounded(field.annotation, field.metadata, f"{where}.{key}".lstrip("."))]
    if origin is tuple:
        items = [(i, arg) for i, arg in enumerate(args) if arg is not Ellipsis]
        return [bad for i, arg in items for bad in _unbounded(arg, [], f"{where}[{i}]")]
    return [bad for arg in args for bad in _unbounded(arg, metadata, where)]  # unions, Optional


def test_every_numeric_key_has_a_range():
    from sparsedist.config.schema import Recipe

    assert _unbounded(float, [], "x") == ["x"]  # the walk sees an unbounded number
    assert _unbounded(tuple[float, float], [], "x") == ["x[0]", "x[1]"]
    assert _unbounded(Recipe, [], "") == []


@pytest.mark.parametrize("command", ["validate", "launch"])
def test_out_of_range_betas_are_refused_before_anything_starts(tmp_path, command):
    extra = ["--nproc", "2", "parallel.backend=fsdp2", "train.micro_batch=2"] if command == "launch" else []
    cmd = [sys.executable, "-m", "sparsedist", command, str(MICRO), *extra, "optim.betas=[1.5,0.9]",
           f"data.dir={tmp_path / 'data'}", f"train.output_dir={tmp_path / 'out'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "sparsedist: recipe error: optim.betas.0: Input should be less than 1 (got 1.5)"]
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_train_refuses_a_world_size_it_was_not_launched_with(tmp_path, monkeypatch, capsys):
    from sparsedist.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    status = main(["train", str(MICRO), "parallel.backend=fsdp2", "parallel.nproc_per_node=2", "train.micro_batch=2",
                   f"train.output_dir={tmp_path / 'out'}"])
    assert status == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "sparsedist: recipe error: parallel: the recipe expects 2 processes (nnodes × nproc_per_node) but 1 were "
        "launched; start it with `sparsedist launch`"]
    assert not (tmp_path / "out").exists()


def test_validate_before_the_weights_exist_names_the_deferred_checks(tmp_path, monkeypatch, capsys):
    from sparsedist.cli import main

    monkeypatch.chdir(tmp_path)  # models/llama-2-7b and the data are not here
    assert main(["validate", str(REPO / "recipes" / "llama" / "cast-llama2-7b.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("ok: llama2-7b-cast (") and "params=6,741,135,360" in out[0]
    assert out[1].startswith("deferred until models/llama-2-7b and ")
    assert "the weights' config.json against model.config, the tokenizer" in out[1]
    with pytest.raises(RecipeError, match="model.pretrained: models/llama-2-7b holds no config.json"):
        check_recipe(load_recipe(REPO / "recipes" / "llama" / "cast-llama2-7b.yaml"))  # train and launch need it


def test_a_pretrained_config_that_disagrees_with_the_recipe_is_refused(tmp_path):
    from transformers import LlamaConfig

    sizes = load_recipe(MICRO).model.config
    LlamaConfig(**{**sizes, "hidden_size": 64, "vocab_size": 8192}).save_pretrained(tmp_path)
    message = f"model.config.hidden_size: 32, but {tmp_path}/config.json has 64"
    with pytest.raises(RecipeError, match=re.escape(message)):
        check_recipe(load_recipe(MICRO, [f"model.pretrained={tmp_path}"]))
    LlamaConfig(**{**sizes, "vocab_size": 8192}).save_pretrained(tmp_path)
    assert check_recipe(load_recipe(MICRO, [f"model.pretrained={tmp_path}"]))["params"] > 0


def test_every_error_is_one_class_of_sparsedist_errors():
    import ast
    from pathlib import Path

    from sparsedist import errors
    from sparsedist.errors import ExportError, ModelConfigError

    root = Path(errors.__file__).parent
    for file in root.rglob("*.py"):  # no public error class is defined outside errors.py
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                    getattr(b, "id", "").endswith(("Error", "Exception")) for b in node.bases):
                assert file.name == "errors.py", f"{file}: {node.name}"
    for name in ("CheckpointError", "EvalError", "ExportError", "ModelConfigError", "NonFiniteError", "ScalingError",
                 "RecipeError", "SlurmError"):
        assert issubclass(getattr(errors, name), errors.SparsedistError)
    assert (RecipeError.exit_code, ModelConfigError.exit_code, ExportError.exit_code) == (2, 2, 1)
