"""Run under torchrun (or alone): build a recipe's run, take two steps, and report its gathered masks.

Writes JSON to argv[1]: the digest of every initial mask, and whether after each step
every gathered mask equals the mask a single process computes from the gathered weight.
"""

from __future__ import annotations

import json
import sys

import torch

from sparsedist.config import load_recipe
from sparsedist.parallel import init_runtime, shutdown
from sparsedist.sparsity import mask_digest, nm_mask, pack_mask
from sparsedist.train.trainer import Trainer


def gathered_masks(trainer: Trainer) -> tuple[dict[str, str], bool]:
    state = trainer.student.full_state()
    if not trainer.runtime.is_main:
        return {}, True
    digests, consistent = {}, True
    for name in trainer.method.layers:
        bits, weight = state[f"{name}.mask"], state[f"{name}.weight"]
        digests[name] = mask_digest(bits)
        n, m = trainer.recipe.sparsity.n, trainer.recipe.sparsity.m
        consistent &= torch.equal(bits, pack_mask(nm_mask(weight, n, m)))
    return digests, consistent


def main() -> None:
    out, recipe_path, *overrides = sys.argv[1:]
    runtime = init_runtime()
    trainer = Trainer(load_recipe(recipe_path, overrides), runtime)
    initial, consistent = gathered_masks(trainer)
    checks = [consistent]
    for step in range(2):
        trainer.train_step(step)
        checks.append(gathered_masks(trainer)[1])
    if runtime.is_main:
        with open(out, "w") as f:
            json.dump({"initial": initial, "consistent": checks}, f)
    shutdown()


if __name__ == "__main__":
    main()
