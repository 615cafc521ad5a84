"""Run under torchrun (or alone): every method for 10 steps on one backend; report losses and masks.

Writes JSON to argv[1]: per method, the 10 global training losses and the digest of every
gathered mask after the last step. The remaining arguments are the micro recipe and
overrides shared by all methods (backend, world size, corpus...).
"""

from __future__ import annotations

import json
import sys

from sparsedist.config import load_recipe
from sparsedist.parallel import init_runtime, shutdown
from sparsedist.sparsity import mask_digest
from sparsedist.train.trainer import Trainer

STEPS = 10
METHODS = {  # decays far above the papers' so that a term added twice, or on the wrong elements, shows
    "ste": "{method: ste, refresh_interval: 1}",
    "srste": "{method: srste, decay: 0.05, refresh_interval: 1}",
    "sparse_pretrain": "{method: sparse_pretrain, decay: 0.05, refresh_interval: 3, dense_finetune_fraction: 0.2}",
    "sste": "{method: sste}",
    "ast": "{method: ast, decay: 0.05, decay_warmup: 4, refresh_interval: 3, slorb: true}",
    "cast": "{method: cast, decay: 0.01, refresh_interval: 3}",
}


def main() -> None:
    out, recipe_path, *overrides = sys.argv[1:]
    runtime = init_runtime()
    report = {}
    for method, sparsity in METHODS.items():
        recipe = load_recipe(recipe_path, [*overrides, f"sparsity={sparsity}", f"train.steps={STEPS}",
                                           f"train.output_dir={out}.{method}"])
        trainer = Trainer(recipe, runtime)
        losses = [trainer._global_loss(trainer.train_step(step))["loss"] for step in range(STEPS)]
        state = trainer.student.full_state()
        report[method] = {"losses": losses,
                          "masks": {name: mask_digest(state[f"{name}.mask"]) for name in trainer.method.layers}
                          if runtime.is_main else {}}
    if runtime.is_main:
        with open(out, "w") as f:
            json.dump(report, f)
    shutdown()


if __name__ == "__main__":
    main()
