"""Export: a checkpoint becomes a verified N:M Hugging Face directory with the run's perplexity."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import metric_history, run, train
from sparsedist.config.schema import ParallelConfig
from sparsedist.data import eval_batches
from sparsedist.errors import ExportError
from sparsedist.export import verify_nm
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.train.evaluate import evaluate


@pytest.mark.parametrize("method", ["srste", "cast"])
def test_exported_checkpoint_is_nm_and_keeps_the_runs_perplexity(corpus, tmp_path, method):
    out = tmp_path / "run"
    train(tmp_path, corpus, out, f"sparsity={{method: {method}}}", "train.steps=4", "checkpoint.interval=4")
    exported = tmp_path / "exported"
    run(tmp_path, "sparsedist", "export", str(out / "checkpoints" / "step_00000004"), str(exported))

    model = AutoModelForCausalLM.from_pretrained(exported)
    linears = [m for n, m in model.named_modules() if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
               and (method == "cast" or ".mlp." in n)]
    assert len(linears) == (14 if method == "cast" else 6)
    for linear in linears:
        assert ((linear.weight != 0).reshape(linear.weight.shape[0], -1, 4).sum(-1) <= 2).all()
    backend = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))
    batches = eval_batches(corpus / "valid", 32, 2, 0, 1, 12)
    ppl = evaluate(model, batches, backend)["val_ppl"]
    assert ppl == pytest.approx(metric_history(out, "final_val_ppl")[4], rel=1e-5)
    # the run's own export at its end is the same model
    own = AutoModelForCausalLM.from_pretrained(out / "model")
    for (name, a), b in zip(model.state_dict().items(), own.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_verify_nm_refuses_a_weight_that_is_not_nm():
    weight = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0]])
    with pytest.raises(ExportError, match="layer: 1 groups of 4 hold more than 2 non-zeros"):
        verify_nm({"layer.weight": weight}, ["layer"], 2, 4)
    verify_nm({"layer.weight": weight[:1]}, ["layer"], 2, 4)
