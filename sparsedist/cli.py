"""The `sparsedist` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from sparsedist.config import Recipe, RecipeError, load_recipe, recipe_hash


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")


def _load_checked(path: str, overrides: list[str]) -> Recipe:
    from sparsedist.config.check import check_recipe

    recipe = load_recipe(path, overrides)
    check_recipe(recipe)
    return recipe


def cmd_validate(args: argparse.Namespace) -> int:
    from sparsedist.config.check import check_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    summary = check_recipe(recipe)
    details = ", ".join(f"{k}={v:,}" for k, v in summary.items())
    print(f"ok: {recipe.name} ({recipe_hash(recipe)}): {details}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sparsedist.train.trainer import run_training

    run_training(_load_checked(args.recipe, args.overrides))
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from sparsedist_launch.local import launch

    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"parallel.nproc_per_node={args.nproc}")
    recipe = _load_checked(args.recipe, overrides)
    return launch(recipe, args.recipe, overrides, args.launcher)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from sparsedist.config.schema import DataConfig
    from sparsedist.data import prepare_dataset

    if args.recipe:
        recipe = load_recipe(args.recipe, args.overrides)
        out = prepare_dataset(recipe.data, recipe.train.seed)
    else:
        out = prepare_dataset(DataConfig(), seed=0)
    print(f"prepared {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sparsedist.export import export_checkpoint

    export_checkpoint(args.checkpoint, args.out)
    print(f"exported {args.checkpoint} to {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sparsedist.demo import run_demo

    return run_demo(nproc=args.nproc, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe in this process (or as one rank under torchrun)")
    _recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a recipe and its overrides without running anything")
    _recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("launch", help="validate a recipe, then start its ranks on this node")
    _recipe_args(p)
    p.add_argument("--nproc", type=int, help="processes on this node (sets parallel.nproc_per_node)")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun",
                   help="torchrun (any backend) or the deepspeed launcher (parallel.backend deepspeed)")
    p.set_defaults(func=cmd_launch)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize a recipe's data source (default: the embedded corpus)")
    p.add_argument("recipe", nargs="?", help="recipe whose data section to prepare")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("export", help="finalize a checkpoint, verify its N:M weights, write a Hugging Face dir")
    p.add_argument("checkpoint", type=Path, help="a step folder of a run's checkpoints")
    p.add_argument("out", type=Path, help="output directory")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="the main job: dense pretraining, one-shot 2:4, SR-STE retraining, on CPU")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_libraries() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    for chatty in ("megatron", "mlflow", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting KEY=VALUE overrides stand before or after options such as --nproc."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_libraries()
    from sparsedist.export import ExportError

    try:
        return args.func(args)
    except RecipeError as err:
        print(f"sparsedist: recipe error: {err}", file=sys.stderr)
        return 2
    except ExportError as err:
        print(f"sparsedist: export refused: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
