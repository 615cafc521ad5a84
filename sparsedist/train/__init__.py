"""Training: the loop, its optimizer and schedule, losses and evaluation."""

from sparsedist.config import Recipe
from sparsedist.parallel import init_runtime, shutdown
from sparsedist.train.trainer import Trainer


def run_training(recipe: Recipe) -> dict[str, float]:
    """Run a recipe on this rank (alone, or as one rank under torchrun); returns the final metrics."""
    runtime = init_runtime()
    try:
        return Trainer(recipe, runtime).fit()
    finally:
        shutdown()


__all__ = ["Trainer", "run_training"]
