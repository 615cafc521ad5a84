"""The `sparsedist` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from sparsedist.config import Recipe, load_recipe, recipe_hash


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (`sparsedist launch: error: ...`), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _at_least(minimum: int, name: str):
    """An argparse type: an integer of at least `minimum`, named `name` in argparse's message."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    parse.__name__ = name
    return parse


_positive = _at_least(1, "positive integer")
_non_negative = _at_least(0, "non-negative integer")


def _max_restarts_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-restarts", type=_non_negative, default=0, metavar="N",
                        help="when a rank dies, stop the others and start the group again from the latest complete "
                        "checkpoint, up to N times (default: %(default)s)")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.steps=50")


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                        "sqlite:///mlruns.db)")


def _load_checked(path: str, overrides: list[str]) -> Recipe:
    """The recipe, checked; a source too large to prepare as the run starts is refused (`check_prepare_size`)."""
    from sparsedist.data import check_prepare_size
    from sparsedist.preflight import check_recipe

    recipe = load_recipe(path, overrides)
    check_recipe(recipe)
    check_prepare_size(recipe.data, recipe.train.seed)
    return recipe


def cmd_validate(args: argparse.Namespace) -> int:
    from sparsedist.preflight import check_recipe, deferred_line

    recipe = load_recipe(args.recipe, args.overrides)
    summary = check_recipe(recipe, defer=True)
    details = ", ".join(f"{k}={v:,}" for k, v in summary.items())
    print(f"ok: {recipe.name} ({recipe_hash(recipe)}): {details}")
    _print_deferred(deferred_line(recipe))
    return 0


def _print_deferred(line: str | None) -> None:
    if line:
        print(line)


def cmd_plan(args: argparse.Namespace) -> int:
    from sparsedist.plan import GIB, Cluster, format_plan, make_plan
    from sparsedist.preflight import deferred_line

    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib * GIB, args.peak_tflops * 1e12, args.mfu,
                      args.tokens_per_second)
    recipe = load_recipe(args.recipe, args.overrides)
    plan = make_plan(recipe, cluster)
    print(format_plan(plan, cluster))
    _print_deferred(deferred_line(recipe))
    return 0 if plan.fits else 3


def cmd_train(args: argparse.Namespace) -> int:
    from sparsedist.preflight import check_world_size
    from sparsedist.train.trainer import run_training

    recipe = _load_checked(args.recipe, args.overrides)
    check_world_size(recipe, int(os.environ.get("WORLD_SIZE", 1)))
    run_training(recipe)
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    from sparsedist_launch.local import Nodes, launch

    overrides = list(args.overrides)
    if args.nproc is not None:
        overrides.append(f"parallel.nproc_per_node={args.nproc}")
    if args.nnodes is not None:
        overrides.append(f"parallel.nnodes={args.nnodes}")
    recipe = _load_checked(args.recipe, overrides)
    return launch(recipe, args.recipe, overrides, args.launcher, Nodes(args.rdzv_endpoint, args.rdzv_id, args.hostfile),
                  args.max_restarts)


def cmd_slurm_render(args: argparse.Namespace) -> int:
    from sparsedist_launch.slurm import Job, render

    job = Job(Path(args.recipe), args.overrides, args.nodes, args.gpus_per_node, args.procs_per_node,
              args.cpus_per_node, args.partition, args.time, args.array, args.sweep, args.signal_seconds, args.sbatch,
              args.max_restarts)
    script = render(job)
    if args.out is None:
        sys.stdout.write(script)
        return 0
    args.out.write_text(script)
    args.out.chmod(0o755)
    print(f"wrote {args.out}; submit it with: sbatch {args.out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from sparsedist.config.schema import DataConfig
    from sparsedist.data import prepare_dataset, prepare_text_source
    from sparsedist.errors import DataError

    if args.out is not None:
        if args.target is None or args.overrides:
            raise DataError("data prepare --out takes one SOURCE and no KEY=VALUE overrides")
        if (args.shard is None) != (args.num_shards is None):
            raise DataError("data prepare: --shard and --num-shards go together")
        shard = (0, 1) if args.shard is None else (args.shard, args.num_shards)
        out = [prepare_text_source(args.target, args.out, args.tokenizer, args.vocab_size, args.valid_fraction,
                                   args.seed, args.workers, args.skip_malformed, shard)]
    elif args.target:
        recipe = load_recipe(args.target, args.overrides)
        out = prepare_dataset(recipe.data, recipe.train.seed, args.workers, args.skip_malformed)
    else:
        out = prepare_dataset(DataConfig(), seed=0, workers=args.workers)
    print(f"prepared {', '.join(map(str, out))}")
    return 0


def cmd_data_merge(args: argparse.Namespace) -> int:
    from sparsedist.data import merge_prepared

    print(f"merged {len(args.parts)} parts into {merge_prepared(args.parts, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sparsedist.export import ExportOptions, export_checkpoint

    options = ExportOptions(args.compressed, args.quantize, args.group_size)
    report = export_checkpoint(args.checkpoint, args.out, options)
    if report is not None:
        from sparsedist.eval.report import format_footprint

        print(format_footprint(report))
    print(f"exported {args.checkpoint} to {args.out}")
    return 0


def _eval_device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def cmd_eval_ppl(args: argparse.Namespace) -> int:
    import json

    from sparsedist.errors import EvalError
    from sparsedist.eval.load import load_model
    from sparsedist.eval.perplexity import check_tokenizer, model_seq_len, perplexity, split_stream, text_stream
    from sparsedist.export import exported

    with exported(args.model) as model_dir:  # a checkpoint is evaluated as the model it would deliver
        model, tokenizer = load_model(model_dir, _eval_device(args))
    if args.text:
        stream, source = text_stream(args.text, tokenizer), str(args.text)
    else:
        check_tokenizer(tokenizer, args.data_dir)
        stream, source = split_stream(args.data_dir, args.split), f"{args.data_dir} ({args.split} split)"
    context = model_seq_len(model)
    if (args.seq_len or 0) > context:
        raise EvalError(f"--seq-len {args.seq_len} exceeds the model's context of {context} tokens")
    result = perplexity(model, stream, args.seq_len or context, args.batch)
    print(f"{args.model}: ppl {result.ppl:.4f}, loss {result.loss:.6f} on {source}: {result.windows} windows of "
          f"{result.seq_len} tokens ({result.tokens:,} predicted; the last partial window dropped)")
    if args.output:
        args.output.write_text(json.dumps({"model": str(args.model), "data": source, **result.as_dict()}, indent=1))
    return 0


def cmd_eval_tasks(args: argparse.Namespace) -> int:
    import json

    from sparsedist.eval.tasks import result_rows, run_tasks
    from sparsedist.export import exported

    tasks = [task for task in args.tasks.split(",") if task]
    with exported(args.model) as model_dir:
        results = run_tasks(model_dir, tasks, args.include_path, args.limit, args.batch, _eval_device(args))
    for task, metric, value, stderr in result_rows(results):
        print(f"{task}  {metric}  {value:.4f}" + ("" if stderr is None else f"  ± {stderr:.4f}"))
    if args.output:
        args.output.write_text(json.dumps({"model": str(args.model), **results}, indent=1, default=str))
        print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from sparsedist.demo import run_demo

    return run_demo(nproc=args.nproc, quick=args.quick)


def _tracking(args: argparse.Namespace) -> str:
    from sparsedist.config.schema import TrackingConfig
    from sparsedist.tracking import tracking_uri

    return args.tracking_uri or tracking_uri(TrackingConfig())


def cmd_runs_compare(args: argparse.Namespace) -> int:
    import csv

    from sparsedist.scaling.runs import compare, load_runs

    rows = compare(load_runs(_tracking(args), args.experiment))
    shown = ["run", "method", "family", "params", "tokens", "val_ppl", "dense_run", "gap_loss", "gap_ppl_pct"]
    table = [shown] + [[f"{row[k]:,}" if isinstance(row[k], int) else str(row[k]) for k in shown] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(shown))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


def cmd_scaling_fit(args: argparse.Namespace) -> int:
    from sparsedist.scaling.fit import fit_law, save_fits
    from sparsedist.scaling.laws import get_law
    from sparsedist.scaling.plot import plot_fits
    from sparsedist.scaling.points import datasets
    from sparsedist.scaling.runs import load_runs, log_fit

    law, uri = get_law(args.law), _tracking(args)
    records = load_runs(uri, args.experiment)
    fits = [fit_law(law, d.points, d.label, d.n_params) for d in datasets(law, records, args.method)]
    args.out.mkdir(parents=True, exist_ok=True)
    files = [save_fits(args.out / f"scaling-{law.name}.json", fits, args.experiment),
             plot_fits(fits, args.out / f"scaling-{law.name}.png")]
    for fit in fits:
        print(fit.summary())
    run_id = log_fit(uri, args.experiment, law.name, files)
    print(f"wrote {' and '.join(map(str, files))}; logged as run scaling-fit-{law.name} ({run_id})")
    return 0


def cmd_scaling_predict(args: argparse.Namespace) -> int:
    from sparsedist.scaling.fit import load_fits, prediction

    print(prediction(load_fits(args.fit), args.tokens, args.params))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sparsedist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run a recipe in this process (or as one rank under torchrun)")
    _recipe_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("validate", help="check a recipe and its overrides without running anything")
    _recipe_args(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="memory per GPU, tokens, FLOPs and time of a recipe on a cluster; "
                       "exits 3 when it does not fit")
    _recipe_args(p)
    p.add_argument("--nodes", type=_positive, required=True)
    p.add_argument("--gpus-per-node", type=_positive, required=True)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory per GPU (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense bf16 TFLOP/s per GPU (default: %(default)s, H100 SXM)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default: %(default)s)")
    p.add_argument("--tokens-per-second", type=float, help="a measured cluster throughput, instead of peak × MFU")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("launch", help="validate a recipe, then start its ranks on this node (and the "
                       "others: see docs/cluster.md)")
    _recipe_args(p)
    p.add_argument("--nproc", type=_positive, help="processes on this node (sets parallel.nproc_per_node)")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed"], default="torchrun",
                   help="torchrun (any backend) or the deepspeed launcher (parallel.backend deepspeed)")
    p.add_argument("--nnodes", type=int, help="nodes of the run (sets parallel.nnodes); torchrun: run this "
                   "command on every node with the same --rdzv-endpoint")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="torchrun: the c10d rendezvous (on HOST); "
                   "deepspeed: the master address and port")
    p.add_argument("--rdzv-id", help="torchrun: the rendezvous id, the same on every node (default: recipe "
                   "name and hash)")
    p.add_argument("--hostfile", type=Path, help="deepspeed: an MPI-style hostfile naming every node")
    _max_restarts_arg(p)
    p.set_defaults(func=cmd_launch)

    slurm = sub.add_parser("slurm", help="Slurm jobs (docs/cluster.md)")
    p = slurm.add_subparsers(dest="slurm_command", required=True).add_parser(
        "render", help="an sbatch script that runs the recipe on N nodes, checkpoints and requeues itself on "
        "USR1, and resumes")
    _recipe_args(p)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0: a CPU job (see --procs-per-node)")
    p.add_argument("--procs-per-node", type=int, help="CPU jobs: ranks per node (default 1)")
    p.add_argument("--cpus-per-node", type=int, help="CPUs of each node's task (#SBATCH --cpus-per-task)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 2-00:00:00")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 (checkpoint and requeue) this long before the time limit (default: %(default)s)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a job array over these values (repeat for a grid); task i writes to output_dir/task_i")
    p.add_argument("--array", metavar="SPEC", help="with --sweep: the tasks to run, e.g. 0-9%%2 (default: all)")
    p.add_argument("--sbatch", action="append", default=[], metavar="--OPTION=VALUE",
                   help="another #SBATCH option, e.g. --sbatch=--account=abc (repeatable)")
    _max_restarts_arg(p)
    p.add_argument("--out", type=Path, help="write the script here (default: standard output)")
    p.set_defaults(func=cmd_slurm_render)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("prepare", help="tokenize a recipe's data section (default: the embedded corpus), or with "
                        "--out one source, or one shard of it (docs/data.md)")
    p.add_argument("target", nargs="?", metavar="RECIPE | SOURCE",
                   help="a recipe whose data section to prepare; with --out, a source as data.source")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="the recipe's overrides")
    p.add_argument("--out", type=Path, help="prepare SOURCE into this directory (as data.dir)")
    p.add_argument("--tokenizer", type=Path, help="with --out: a tokenizer directory (as data.tokenizer); default: "
                   "train one on the training split")
    p.add_argument("--vocab-size", type=_positive, default=8192, help="with --out: as data.vocab_size (default: "
                   "%(default)s)")
    p.add_argument("--valid-fraction", type=float, default=0.05, help="with --out: as data.valid_fraction (default: "
                   "%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="with --out: as train.seed (default: %(default)s)")
    p.add_argument("--shard", type=_non_negative, metavar="I", help="with --out: prepare only shard I of "
                   "--num-shards (a disjoint part; join them with `sparsedist data merge`); needs --tokenizer")
    p.add_argument("--num-shards", type=_positive, metavar="K")
    p.add_argument("--workers", type=_positive, metavar="N", help="tokenizing processes (default: the CPUs this "
                   "process may use)")
    p.add_argument("--skip-malformed", action="store_true", help="skip and count malformed lines (bad JSON, no "
                   "text field, bytes that are not UTF-8) instead of refusing the source")
    p.set_defaults(func=cmd_data_prepare)
    p = data.add_parser("merge", help="join the parts of every shard of one source into one prepared dataset")
    p.add_argument("parts", nargs="+", type=Path, metavar="PART", help="the --out directories of the shards")
    p.add_argument("--out", type=Path, required=True, help="the merged dataset's directory")
    p.set_defaults(func=cmd_data_merge)

    p = sub.add_parser("export", help="finalize a checkpoint, verify its N:M weights, write a Hugging Face dir")
    p.add_argument("checkpoint", type=Path, help="a step folder of a run's checkpoints")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--compressed", action="store_true", help="also write OUT/compressed: the 2:4 linears in "
                   "compressed-tensors' sparse-24-bitmask layout (vLLM); with a per-layer report")
    p.add_argument("--quantize", choices=["int8", "int4"], help="weight-only round-to-nearest of the blocks' linears: "
                   "int8 per output channel, int4 per group (docs/eval.md)")
    p.add_argument("--group-size", type=_positive, default=128, help="int4: inputs per group (default: %(default)s)")
    p.set_defaults(func=cmd_export)

    evaluate = sub.add_parser("eval", help="evaluate an exported model, a compressed one or a checkpoint "
                              "(docs/eval.md)").add_subparsers(dest="eval_command", required=True)
    p = evaluate.add_parser("ppl", help="perplexity over a whole split or text file in non-overlapping windows")
    p.add_argument("model", type=Path, help="an exported (or compressed) model directory, or a checkpoint step folder")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", type=Path, help="a raw text file (e.g. wiki.test.raw), tokenized by the model's "
                        "tokenizer")
    source.add_argument("--data-dir", type=Path, default=Path("data/shakespeare"),
                        help="a prepared dataset (default: %(default)s, the embedded corpus)")
    p.add_argument("--split", default="valid", help="with --data-dir: the split (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive, help="window length (default: the model's context length)")
    p.add_argument("--batch", type=_positive, default=4, help="windows per forward (default: %(default)s)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--output", type=Path, help="also write the result to this JSON file")
    p.set_defaults(func=cmd_eval_ppl)
    p = evaluate.add_parser("tasks", help="zero-shot tasks through lm-evaluation-harness (lm_eval)")
    p.add_argument("model", type=Path, help="an exported (or compressed) model directory, or a checkpoint step folder")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="lm-eval task names, e.g. boolq,rte,hellaswag")
    p.add_argument("--include-path", type=Path, help="a folder of extra task YAML files")
    p.add_argument("--limit", type=_positive, help="at most this many documents per task")
    p.add_argument("--batch", type=_positive, default=4, help="batch size (default: %(default)s)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--output", type=Path, help="also write the harness's results to this JSON file")
    p.set_defaults(func=cmd_eval_tasks)

    p = sub.add_parser("demo", help="the main job: dense pretraining, one-shot 2:4, SR-STE retraining, on CPU")
    p.add_argument("--nproc", type=int, default=2, help="processes per run")
    p.add_argument("--quick", action="store_true", help="a few steps only, to check the pipeline")
    p.set_defaults(func=cmd_demo)

    runs = sub.add_parser("runs", help="finished training runs of an MLflow experiment")
    p = runs.add_subparsers(dest="runs_command", required=True).add_parser(
        "compare", help="a table of the runs, with each sparse run's gap to its dense baseline")
    _experiment_args(p)
    p.add_argument("--csv", type=Path, help="also write the table (with every column) to this CSV file")
    p.set_defaults(func=cmd_runs_compare)

    scaling = sub.add_parser("scaling", help="scaling laws fitted to an experiment's runs (docs/scaling.md)")
    scaling_sub = scaling.add_subparsers(dest="scaling_command", required=True)
    p = scaling_sub.add_parser("fit", help="fit a law, save its JSON and plot, log them as an MLflow run")
    _experiment_args(p)
    p.add_argument("--law", required=True, metavar="LAW", help="tokens, chinchilla or gap")
    p.add_argument("--out", type=Path, default=Path("runs/scaling"), help="output directory (default: %(default)s)")
    p.add_argument("--method", help="the method to fit (for gap: the sparse method compared with dense)")
    p.set_defaults(func=cmd_scaling_fit)
    p = scaling_sub.add_parser("predict", help="the loss a saved fit predicts, with its bootstrap interval")
    p.add_argument("--fit", type=Path, required=True, help="a JSON file written by `sparsedist scaling fit`")
    p.add_argument("--tokens", type=float, required=True, metavar="D", help="training tokens, e.g. 2e9")
    p.add_argument("--params", type=float, metavar="N", help="model parameters (needed by chinchilla; selects "
                   "the model of a per-model fit)")
    p.set_defaults(func=cmd_scaling_predict)
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
    from sparsedist.errors import SparsedistError

    try:
        return args.func(args)
    except SparsedistError as err:
        print(f"{err.prefix}: {err}", file=sys.stderr)
        return err.exit_code


if __name__ == "__main__":
    sys.exit(main())
