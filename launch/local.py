"""Start the ranks of a validated recipe on this node, with torchrun or the DeepSpeed launcher."""

from __future__ import annotations

import os
import subprocess
import sys

from sparsedist.config import Recipe


def torchrun_command(recipe: Recipe, recipe_path: str, overrides: list[str]) -> list[str]:
    """`torchrun --standalone` with one process per rank, each running `sparsedist train`."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={recipe.parallel.nproc_per_node}",
        "-m", "sparsedist", "train", recipe_path, *overrides,
    ]


def deepspeed_command(recipe: Recipe, recipe_path: str, overrides: list[str]) -> list[str]:
    """The `deepspeed` launcher on this node; ranks read LOCAL_RANK from the environment."""
    return [
        sys.executable, "-m", "deepspeed.launcher.runner",
        f"--num_gpus={recipe.parallel.nproc_per_node}", "--no_local_rank", "--module",
        "sparsedist", "train", recipe_path, *overrides,
    ]


LAUNCHERS = {"torchrun": torchrun_command, "deepspeed": deepspeed_command}


def rank_environment(recipe: Recipe) -> dict[str, str]:
    """The launch environment: CPU threads split between the node's ranks unless already set."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // recipe.parallel.nproc_per_node)))
    return env


def launch(recipe: Recipe, recipe_path: str, overrides: list[str], launcher: str = "torchrun") -> int:
    """Run the recipe's ranks to completion with `launcher`; returns its exit status."""
    if recipe.parallel.nnodes > 1:
        print("sparsedist launch: starts one node; parallel.nnodes must be 1", file=sys.stderr)
        return 2
    if launcher == "deepspeed" and recipe.parallel.backend != "deepspeed":
        print(f"sparsedist launch: --launcher deepspeed needs parallel.backend deepspeed, "
              f"not {recipe.parallel.backend}", file=sys.stderr)
        return 2
    command = LAUNCHERS[launcher](recipe, recipe_path, overrides)
    return subprocess.run(command, env=rank_environment(recipe)).returncode
