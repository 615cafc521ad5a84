"""The student a run builds: one-shot pruning as the starting point of retraining."""

from __future__ import annotations

import torch

from conftest import MICRO
from sparsedist.config import load_recipe
from sparsedist.config.schema import ParallelConfig
from sparsedist.data import load_tokenizer
from sparsedist.models import model_config
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import nm_mask, unpack_mask
from sparsedist.student import build_student

BACKEND = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))


def student(corpus, *overrides):
    recipe = load_recipe(MICRO, [f"data.dir={corpus}", *overrides])
    tokenizer = load_tokenizer(corpus / "tokenizer")
    config = model_config(recipe.model, len(tokenizer), recipe.data.seq_len, tokenizer.eos_token_id)
    return build_student(recipe, BACKEND, config)


def test_oneshot_start_prunes_the_weights_before_the_masks_are_taken(corpus):
    dense = student(corpus, "sparsity={method: ste}")
    pruned = student(corpus, "sparsity={method: ste, oneshot: sparsegpt, calibration_sequences: 16}")
    for name, layer in pruned.method.layers.items():
        mask = unpack_mask(layer.mask, layer.in_features)
        assert torch.equal(mask, layer.weight != 0), name  # the masks are the one-shot masks
        original = dense.method.layers[name].weight
        assert not torch.equal(layer.weight[mask], original[mask]), "SparseGPT updates the kept weights"
    changed = sum(not torch.equal(unpack_mask(layer.mask, layer.in_features), nm_mask(dense.method.layers[n].weight))
                  for n, layer in pruned.method.layers.items())
    assert changed > 0, "SparseGPT's masks are not all the magnitude masks"


def test_activation_checkpointing_recomputes_blocks_with_the_same_gradients(corpus):
    plain = student(corpus, "sparsity={method: srste}")
    recomputed = student(corpus, "sparsity={method: srste}", "parallel.activation_checkpointing=true")
    assert recomputed.model.is_gradient_checkpointing and not plain.model.is_gradient_checkpointing
    tokens = torch.randint(0, 200, (2, 32))
    for built in (plain, recomputed):
        built.model.train()
        built.model(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
    for (name, a), b in zip(plain.model.named_parameters(), recomputed.model.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
