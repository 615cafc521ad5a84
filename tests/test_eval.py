"""Evaluation of delivered models: the papers' perplexity, lm-eval tasks, compressed and quantized exports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO, run, train
from sparsedist.cli import main
from sparsedist.data import load_tokenizer, prepare_text_source
from sparsedist.errors import EvalError
from sparsedist.eval.compress import compress_dir
from sparsedist.eval.load import load_model
from sparsedist.eval.perplexity import perplexity, split_stream
from sparsedist.eval.quantize import load_quantized, quantize_model_
from sparsedist.eval.tasks import result_rows, run_tasks
from sparsedist.export import exported
from sparsedist.models import FAMILIES

TASKS = REPO / "tests" / "data" / "lm_eval_task"


@pytest.fixture(scope="module")
def delivered(corpus, tmp_path_factory) -> dict[str, Path]:
    """A 4-step SR-STE micro run (its own export: `dense`), its checkpoint exported again with
    `--compressed --quantize int4` (`int4`, `int4_compressed`), `dense` compressed in process
    (`compressed`), and a small prepared dataset with the corpus' tokenizer (`data`)."""
    tmp = tmp_path_factory.mktemp("eval")
    train(tmp, corpus, tmp / "run", "sparsity={method: srste}", "train.steps=4", "checkpoint.interval=4")
    checkpoint = tmp / "run" / "checkpoints" / "step_00000004"
    run(tmp, "sparsedist", "export", str(checkpoint), str(tmp / "int4"), "--compressed", "--quantize", "int4",
        "--group-size", "16")
    compress_dir(tmp / "run" / "model", tmp / "compressed")
    text = load_tokenizer(corpus / "tokenizer").decode(split_stream(corpus)[:6000].tolist())
    for i in range(2):
        (tmp / "text").mkdir(exist_ok=True)
        (tmp / "text" / f"part{i}.txt").write_text(text[i * len(text) // 2: (i + 1) * len(text) // 2])
    prepare_text_source(str(tmp / "text"), tmp / "data", corpus / "tokenizer", 8192, 0.5, seed=0)
    return {"checkpoint": checkpoint, "dense": tmp / "run" / "model", "compressed": tmp / "compressed",
            "int4": tmp / "int4", "int4_compressed": tmp / "int4" / "compressed", "data": tmp / "data"}


def test_perplexity_equals_a_loop_over_windows(delivered, corpus):
    model = AutoModelForCausalLM.from_pretrained(delivered["dense"]).eval()
    stream = split_stream(corpus)[: 10 * 32 + 7]  # 10 windows of 32 and a partial one, dropped
    result = perplexity(model, stream, seq_len=32, batch=3)
    nll = count = 0
    with torch.no_grad():
        for start in range(0, stream.numel() - 31, 32):
            window = stream[start: start + 32]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), -1)
            for t in range(31):
                nll -= float(logp[t, window[t + 1]])
                count += 1
    assert (result.windows, result.tokens, count) == (10, 310, 310)
    assert result.loss == pytest.approx(nll / count, rel=1e-5)
    assert result.ppl == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)


def cli_ppl(model: Path, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{model.parent.name}-{model.name}.json"
    assert main(["eval", "ppl", str(model), "--seq-len", "32", "--output", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_every_form_of_the_model_gives_its_perplexity(delivered, tmp_path, capsys):
    data = ["--data-dir", str(delivered["data"])]
    dense = cli_ppl(delivered["dense"], tmp_path, *data)
    assert dense["windows"] > 10 and dense["tokens"] == dense["windows"] * 31
    # the compressed directory and the checkpoint are the same model: the same numbers, exactly
    assert cli_ppl(delivered["compressed"], tmp_path, *data)["loss"] == dense["loss"]
    assert cli_ppl(delivered["checkpoint"], tmp_path, *data)["loss"] == pytest.approx(dense["loss"], rel=1e-6)
    int4 = cli_ppl(delivered["int4"], tmp_path, *data)
    assert cli_ppl(delivered["int4_compressed"], tmp_path, *data)["loss"] == int4["loss"]
    # int4 (groups of 16) stays within 2% of the unquantized perplexity on this barely trained model
    assert int4["ppl"] == pytest.approx(dense["ppl"], rel=0.02) and int4["ppl"] != dense["ppl"]
    text = delivered["data"].parent / "text" / "part0.txt"
    assert cli_ppl(delivered["dense"], tmp_path, "--text", str(text))["windows"] > 0
    assert "windows of 32 tokens" in capsys.readouterr().out


def test_ppl_refuses_data_of_another_tokenizer(delivered, tmp_path, capsys):
    other = tmp_path / "other"
    prepare_text_source(str(delivered["data"].parent / "text"), other, None, 300, 0.5, seed=0)
    assert main(["eval", "ppl", str(delivered["dense"]), "--data-dir", str(other)]) == 1
    assert "tokenizer differs from the model's" in capsys.readouterr().err


def test_int8_quantized_model_keeps_zeros_and_perplexity(delivered, corpus):
    model = AutoModelForCausalLM.from_pretrained(delivered["dense"]).eval()
    stream = split_stream(delivered["data"])
    before = perplexity(model, stream, 32)
    zeros = {n: p == 0 for n, p in model.named_parameters() if ".mlp." in n}
    quantize_model_(model, FAMILIES["llama"], 8)
    after = perplexity(model, stream, 32)
    assert all(((p == 0) >= zeros[n]).all() for n, p in model.named_parameters() if n in zeros)
    assert after.ppl == pytest.approx(before.ppl, rel=0.005) and after.ppl != before.ppl


def test_export_reports_layers_and_bytes(delivered):
    report = json.loads((delivered["int4"] / "compression.json").read_text())
    layers = {row["layer"]: row for row in report["layers"]}
    assert len(layers) == 14
    ffn = layers["model.layers.0.mlp.up_proj"]
    assert ffn["pattern"] == "2:4" and ffn["sparsity"] >= 0.5 and ffn["shape"] == [80, 32]
    assert ffn["compressed_bytes"] == 80 * 16 * 4 + 80 * 4 + 16  # values, bitmask, shape
    assert ffn["quantized_bytes"] == 80 * 8 + 80 * 4 + 80 * 2 * 2 + 16  # int4 kept codes, bitmask, scales, shape
    attention = layers["model.layers.0.self_attn.q_proj"]
    assert attention["pattern"] == "dense" and attention["compressed_bytes"] == attention["dense_bytes"]
    total = report["total"]
    assert 0 < total["compressed_saved_fraction"] < total["quantized_saved_fraction"] < 1
    assert set(report["files"]) == {"model.safetensors", "quantized.safetensors", "compressed/model.safetensors"}
    # the directory's weights are exactly the stored codes times their scales
    weights = load_file(delivered["int4"] / "model.safetensors")
    for layer, q in load_quantized(delivered["int4"] / "quantized.safetensors").items():
        assert torch.equal(weights[f"{layer}.weight"], q.dequantize()), layer


def test_lm_eval_runs_a_local_task_on_dense_and_compressed_models(delivered, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "tasks.json"
    assert main(["eval", "tasks", str(delivered["dense"]), "--tasks", "sparsedist_easy", "--include-path",
                 str(TASKS), "--limit", "8", "--device", "cpu", "--output", str(out)]) == 0
    assert "sparsedist_easy  acc  " in capsys.readouterr().out
    dense = json.loads(out.read_text())["results"]["sparsedist_easy"]["acc,none"]
    assert 0.75 <= dense <= 1.0  # chance is 0.5: the wrong choices are strings of rare letters
    compressed = run_tasks(delivered["compressed"], ["sparsedist_easy"], TASKS, limit=8)
    assert ("sparsedist_easy", "acc", dense) in [row[:3] for row in result_rows(compressed)]


def test_eval_loads_model_directories_and_a_checkpoint_is_exported_first(delivered):
    with pytest.raises(EvalError, match="is a training checkpoint: export it first"):
        load_model(delivered["checkpoint"])
    with exported(delivered["dense"]) as path:
        assert path == delivered["dense"]
