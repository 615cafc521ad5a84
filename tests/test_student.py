"""The student a run builds: one-shot pruning as the starting point of retraining."""

from __future__ import annotations

import torch

from conftest import MICRO
from sparsedist.config import load_recipe
from sparsedist.config.schema import ParallelConfig
from sparsedist.data import load_tokenizer
from sparsedist.parallel.backend import ParallelBackend
from sparsedist.parallel.runtime import Runtime
from sparsedist.sparsity import nm_mask, unpack_mask
from sparsedist.train.student import build_student

BACKEND = ParallelBackend(ParallelConfig(backend="none"), Runtime(0, 1, 0, torch.device("cpu")))


def student(corpus, *overrides):
    recipe = load_recipe(MICRO, [f"data.dir={corpus}", *overrides])
    return build_student(recipe, BACKEND, load_tokenizer(corpus / "tokenizer"))


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
