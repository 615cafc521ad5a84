"""The training run, top to bottom: recipe → data → model → sparsity method → parallel wrap → loop.

Every rank runs the same code; rank 0 alone tracks, shows progress and exports.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sparsedist.checkpoint.checkpointer import Checkpointer
from sparsedist.config import Recipe, recipe_hash
from sparsedist.config.load import flatten
from sparsedist.data import TokenBatches, eval_batches, load_tokenizer, prepare_dataset
from sparsedist.errors import NonFiniteError
from sparsedist.export import export_state
from sparsedist.models import model_config
from sparsedist.parallel import Runtime, init_runtime, make_backend, shutdown
from sparsedist.plan import training_flops
from sparsedist.student import build_student
from sparsedist.tracking import Tracker
from sparsedist.tracking.mlflow_run import git_revision, hardware, peak_flops
from sparsedist.train.evaluate import evaluate
from sparsedist.train.losses import training_loss
from sparsedist.train.optim import lr_factor, set_lr
from sparsedist.train.preemption import Preemption
from sparsedist.train.step import optimizer_step
from sparsedist.train.teacher import build_teacher, precompute_teacher

log = logging.getLogger(__name__)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one rank at one step: resumed runs replay the same randomness without saving it."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def run_training(recipe: Recipe) -> dict[str, float]:
    """Run a recipe on this rank (alone, or as one rank under torchrun); returns the final metrics."""
    runtime = init_runtime()
    try:
        return Trainer(recipe, runtime).fit()
    finally:
        shutdown()


class Trainer:
    """One run of a recipe on this rank."""

    def __init__(self, recipe: Recipe, runtime: Runtime):
        self.preemption = Preemption(runtime.device)  # first: a signal during set-up stops after the first step
        self.recipe = recipe
        self.runtime = runtime
        self.backend = make_backend(recipe, runtime)
        self.output_dir: Path = recipe.train.output_dir

        if runtime.is_main:
            prepare_dataset(recipe.data, recipe.train.seed)
        torch.distributed.barrier()
        self.tokenizer = load_tokenizer(recipe.data.tokenizer_dir)
        t, d = recipe.train, recipe.data
        self.train_data = TokenBatches([(p.dir / "train", p.weight) for p in d.parts], d.seq_len, t.global_batch,
                                       t.micro_batch, runtime.rank, runtime.world_size, t.seed)
        self.eval_data = eval_batches([(p.dir / "valid", p.weight) for p in d.parts], d.seq_len,
                                      recipe.eval.micro_batch, runtime.rank, runtime.world_size, recipe.eval.sequences)
        config = model_config(recipe.model, len(self.tokenizer), d.seq_len, self.tokenizer.eos_token_id)
        if recipe.distill.weight > 0 and recipe.distill.teacher.placement == "precomputed":
            precompute_teacher(recipe, config, self.backend, self.train_data)  # before the student exists
        self.student = build_student(recipe, self.backend, config)
        self.model, self.method, self.optimizer = self.student.model, self.student.method, self.student.optimizer
        self.teacher = build_teacher(recipe, config, self.backend)
        self.tokens_per_step = t.global_batch * d.seq_len
        self.flops_per_token = training_flops(self.student.num_params, config.num_hidden_layers, config.hidden_size,
                                              d.seq_len, 1)
        self.peak_flops = peak_flops(recipe.tracking)
        self.checkpointer = Checkpointer(self.output_dir / "checkpoints", recipe.checkpoint.keep, self.backend,
                                         self.method.store)
        self.tracker = Tracker(recipe.tracking, runtime.is_main, self.output_dir / "tracking-buffer.jsonl")
        self.nonfinite_steps = 0

    def _resume(self) -> tuple[int, str | None]:
        """Restore the latest (or the named) checkpoint; returns (first step to run, tracking run id)."""
        choice = self.recipe.checkpoint.resume
        if choice == "never":
            return 0, None
        path = self.checkpointer.latest() if choice == "auto" else Path(choice)
        if path is None:
            return 0, None
        state = self.checkpointer.load(path, self.model, self.optimizer)
        if state.get("recipe_hash") != recipe_hash(self.recipe):
            log.warning("resuming %s with a recipe that differs from the one that wrote it", path)
        self.method.load_host_state(state.get("method", {}))
        log.info("resumed from %s at step %d", path, state["step"])
        return state["step"], state.get("mlflow_run_id")

    def fit(self) -> dict[str, float]:
        """Train to the recipe's last step, then finalize, evaluate and export. Returns the final metrics
        (none when preempted: then it returns after checkpointing the last finished step)."""
        r = self.recipe
        start, run_id = self._resume()
        self.tracker.start(r.name, flatten(r), self._tags(), run_id)
        if start == 0:
            self.tracker.log_metrics(self._evaluate(), step=0)
        bar = tqdm(total=r.train.steps, initial=start, disable=not self.runtime.is_main, unit="step",
                   dynamic_ncols=True)
        try:
            for step in range(start, r.train.steps):
                metrics = self.train_step(step)
                done = step + 1
                if done % r.train.log_interval == 0 or done == r.train.steps:
                    metrics.update(self._global_loss(metrics))
                    bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    self.tracker.log_metrics(metrics | self.method.metrics(), step=done)
                if done % r.eval.interval == 0 and done < r.train.steps:
                    self.tracker.log_metrics(self._evaluate(), step=done)
                if done % r.checkpoint.interval == 0 or done == r.train.steps:
                    self._save(done)
                bar.update(1)
                if done < r.train.steps and self.preemption.due(done) and (signum := self.preemption.agreed()):
                    return self._preempted(done, signum, saved=done % r.checkpoint.interval == 0)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        finally:
            bar.close()
        return self._finish()

    def train_step(self, step: int) -> dict[str, Any]:
        """Optimizer step `step` (0-based) over this rank's micro-batches; returns its local metrics (the loss
        terms as 0-d device tensors, read back by `_global_loss` at logging steps only)."""
        r = self.recipe
        started = time.perf_counter()
        torch.manual_seed(step_seed(r.train.seed, step, self.runtime.rank))
        lr = r.optim.lr * lr_factor(step, r.train.steps, r.schedule)
        set_lr(self.optimizer, lr)

        def loss_of(i: int, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            logits = self.model(input_ids=inputs, use_cache=False).logits
            targets = None if self.teacher is None else self.teacher.targets(step, i, inputs)
            return training_loss(logits, labels, targets, r.distill)

        grad_norm, parts_sum = optimizer_step(step, self.student, self.backend, self.train_data.micro_batches(step),
                                              loss_of, r.optim.grad_clip)
        self._count_nonfinite(step, grad_norm)
        tokens_per_s = self.tokens_per_step / (time.perf_counter() - started)
        metrics = {**parts_sum, "lr": lr, "grad_norm": grad_norm, "tokens": (step + 1) * self.tokens_per_step,
                   "tokens_per_s": tokens_per_s}
        if self.peak_flops:  # model FLOPs utilisation of the whole job
            metrics["mfu"] = self.flops_per_token * tokens_per_s / (self.runtime.world_size * self.peak_flops)
        return metrics

    def _count_nonfinite(self, step: int, grad_norm: float) -> None:
        """A non-finite gradient norm (from a NaN or Inf loss or gradient on any rank) means the backend
        skipped the update; more than `train.max_nonfinite_steps` such steps in a row stop the run."""
        if math.isfinite(grad_norm):
            self.nonfinite_steps = 0
            return
        self.nonfinite_steps += 1
        limit = self.recipe.train.max_nonfinite_steps
        log.warning("step %d: gradient norm %s, update skipped (%d in a row, at most %d)", step, grad_norm,
                    self.nonfinite_steps, limit)
        if self.nonfinite_steps > limit:
            raise NonFiniteError(f"train.max_nonfinite_steps: {self.nonfinite_steps} steps in a row had a non-finite "
                                 f"loss or gradient (the last: step {step}); the last checkpoint is intact")

    def _global_loss(self, metrics: dict[str, Any]) -> dict[str, float]:
        """This step's loss terms (0-d device tensors) averaged over ranks (each rank saw an equal share of the
        global batch): summed on the device and read back once, at logging steps only."""
        keys = [k for k in ("loss", "ce", "kd") if k in metrics]
        sums = self.backend.sum_over_ranks(torch.stack([metrics[k].double() for k in keys])).tolist()
        return {k: s / self.runtime.world_size for k, s in zip(keys, sums, strict=True)}

    def _evaluate(self) -> dict[str, float]:
        """Validation of the model the run would deliver now (CAST: pruned with the current masks)."""
        with self.method.delivered():
            return evaluate(self.model, self.eval_data, self.backend)

    def _save(self, step: int) -> None:
        if not self.backend.all_finite(self.model):
            raise NonFiniteError(f"step {step}: the weights hold a NaN or Inf; no checkpoint is written")
        self.checkpointer.save(step, self.model, self.optimizer, {
            "tokens": step * self.tokens_per_step,
            "mlflow_run_id": self.tracker.run_id,
            "recipe_hash": recipe_hash(self.recipe),
            "world_size": self.runtime.world_size,
            "recipe": self.recipe.model_dump(mode="json"),
            "method": self.method.host_state(),
        })

    def _preempted(self, step: int, signum: int, saved: bool) -> dict[str, float]:
        """Stop after `step`: checkpoint it (unless just saved), mark the MLflow run KILLED."""
        if not saved:
            self._save(step)
        log.info("%s: stopped after step %d; its checkpoint is where the run resumes",
                 signal.Signals(signum).name, step)
        self.tracker.finish("KILLED")
        return {}

    def _finish(self) -> dict[str, float]:
        self.method.finalize()
        final = {f"final_{k}": v for k, v in self._evaluate().items()}
        self.tracker.log_metrics(final, step=self.recipe.train.steps)
        tokens = self.recipe.train.steps * self.tokens_per_step
        self.tracker.set_tags({"tokens": tokens, "flops": self.flops_per_token * tokens})
        if self.recipe.checkpoint.export:
            self._export(self.output_dir / "model")
        self.tracker.finish()
        return final

    def _export(self, out: Path) -> None:
        """The delivered model as a Hugging Face directory, with its tokenizer (rank 0 writes)."""
        state = self.student.full_state()
        if self.runtime.is_main:
            export_state(state, self.recipe, self.student, self.tokenizer, out)
            self.tracker.set_tags({"export_dir": str(out.resolve())})
            log.info("exported the model to %s", out)

    def _tags(self) -> dict[str, Any]:
        r = self.recipe
        return {
            "method": r.sparsity.method,
            "model_family": r.model.family,
            "params": self.student.num_params,
            "sparse_params": sum(layer.weight.numel() for layer in self.method.layers.values()),
            "sparsity_pattern": "dense" if r.sparsity.method == "dense" else f"{r.sparsity.n}:{r.sparsity.m}",
            "tokens_per_step": self.tokens_per_step,
            "recipe": r.name,
            "recipe_hash": recipe_hash(r),
            "git_revision": git_revision(),
            "world_size": self.runtime.world_size,
            "hardware": hardware(),
        }
