"""The finished training runs of an MLflow experiment as plain records, and the scaling-fit runs written back.

A record holds what the trainer logs (see `sparsedist.train.trainer`): tags `method`, `model_family`, `params` (N),
`sparse_params` and, once finished, `tokens` (D) and `flops` (C); the flattened recipe as params; `val_loss` every
`eval.interval` steps and `final_val_loss` after the method's finalize at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from sparsedist.errors import ScalingError

REQUIRED_TAGS = ("method", "model_family", "params", "tokens", "flops")
REQUIRED_PARAMS = ("train.global_batch", "data.seq_len")
VALIDATION_PARAMS = ("data.source", "data.tokenizer", "data.vocab_size")  # runs fitted together must share them
SIZES = "model.config."  # the flattened recipe's model sizes: they identify a sparse run's dense baseline
KIND_TAG, FIT_KIND = "sparsedist.kind", "scaling-fit"  # marks the runs `sparsedist scaling fit` logs (skipped here)


@dataclass(frozen=True)
class RunRecord:
    """One finished run. `curve` is its learning curve: (tokens, validation loss) for D > 0, ascending in D,
    ending with the final validation loss at D; `pretrained` the checkpoint it starts from ("" from scratch)."""

    run_id: str
    name: str
    method: str
    family: str
    params: int
    sparse_params: int
    tokens: int
    flops: float
    """Training compute C, as the trainer counts it (`sparsedist.plan.training_flops`)."""
    final_val_loss: float
    curve: tuple[tuple[int, float], ...]
    pretrained: str
    architecture: str
    """The recipe's `model.config` sizes, e.g. `hidden_size=128, num_hidden_layers=4, …` ("" for a pretrained model's
    own config): a sparse run's dense baseline has the same, while N may differ by the method's own parameters
    (CAST's scales, SLoRB)."""
    validation: str  # the validation data, as VALIDATION_PARAMS

    @property
    def dense(self) -> bool:
        return self.method == "dense"

    @property
    def final_val_ppl(self) -> float:
        return math.exp(self.final_val_loss)

    @property
    def dense_model(self) -> str:
        """The model a dense baseline must be: same family, sizes and starting checkpoint."""
        sizes = f" ({self.architecture})" if self.architecture else ""
        return f"{self.family}{sizes}" + (f" from {self.pretrained}" if self.pretrained else "")

    @property
    def model(self) -> str:
        """The model and method, e.g. `llama N=2,950,272 srste from runs/dense/model`."""
        start = f" from {self.pretrained}" if self.pretrained else ""
        return f"{self.family} N={self.params:,} {self.method}{start}"


def load_runs(uri: str, experiment: str) -> list[RunRecord]:
    """The finished training runs of `experiment` at tracking URI `uri`, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ScalingError(f"no experiment {experiment!r} at {uri}")
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs += [r for r in page if r.data.tags.get(KIND_TAG) != FIT_KIND]
        token = page.token
        if not token:
            break
    if not runs:
        raise ScalingError(f"experiment {experiment!r} has no finished training runs")
    return [_record(client, run) for run in runs]


def _record(client, run) -> RunRecord:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    name = f"{run.info.run_name} ({run.info.run_id[:8]})"
    missing = [f"tag {k}" for k in REQUIRED_TAGS if k not in tags]
    missing += [f"param {k}" for k in REQUIRED_PARAMS if k not in params]
    missing += ["metric final_val_loss"] if "final_val_loss" not in metrics else []
    if missing:
        raise ScalingError(f"run {name} lacks {', '.join(missing)}: not a finished sparsedist training run")
    try:
        n, d, c = int(tags["params"]), int(tags["tokens"]), float(tags["flops"])
        per_step = int(params["train.global_batch"]) * int(params["data.seq_len"])
    except ValueError as err:
        raise ScalingError(f"run {name}: {err}") from None
    latest: dict[int, tuple[int, float]] = {}  # step -> (timestamp, loss): a resumed run may log a step twice
    for m in client.get_metric_history(run.info.run_id, "val_loss"):
        if m.step > 0 and m.step * per_step < d and m.timestamp >= latest.get(m.step, (-1, 0.0))[0]:
            latest[m.step] = (m.timestamp, m.value)
    curve = [(step * per_step, loss) for step, (_, loss) in sorted(latest.items())]
    pretrained = params.get("model.pretrained", "None")
    sizes = ", ".join(f"{k.removeprefix(SIZES)}={v}" for k, v in sorted(params.items()) if k.startswith(SIZES))
    return RunRecord(
        run_id=run.info.run_id, name=run.info.run_name, method=tags["method"], family=tags["model_family"],
        params=n, sparse_params=int(tags.get("sparse_params", 0)), tokens=d, flops=c,
        final_val_loss=metrics["final_val_loss"],
        curve=(*curve, (d, metrics["final_val_loss"])), pretrained="" if pretrained == "None" else pretrained,
        architecture=sizes,
        validation=", ".join(f"{k}={params.get(k)}" for k in VALIDATION_PARAMS))


def dense_match(run: RunRecord, records: list[RunRecord]) -> RunRecord | None:
    """The dense run of `run`'s family, sizes and starting checkpoint with the closest token budget (the latest on
    ties)."""
    same = [r for r in records if r.dense and r.dense_model == run.dense_model and r.run_id != run.run_id]
    return min(reversed(same), key=lambda r: abs(math.log(r.tokens / run.tokens)), default=None)


def compare(records: list[RunRecord]) -> list[dict[str, object]]:
    """One row per run: its size, budget and final perplexity, and its gap to its dense baseline when there is one."""
    rows = []
    for r in sorted(records, key=lambda r: (r.family, r.params, r.pretrained, not r.dense, r.method, r.tokens)):
        base = None if r.dense else dense_match(r, records)
        rows.append({
            "run": r.name, "run_id": r.run_id, "method": r.method, "family": r.family, "params": r.params,
            "tokens": r.tokens, "flops": r.flops, "val_loss": round(r.final_val_loss, 4),
            "val_ppl": round(r.final_val_ppl, 2), "dense_run": base.name if base else "",
            "dense_tokens": base.tokens if base else "",
            "gap_loss": round(r.final_val_loss - base.final_val_loss, 4) if base else "",
            "gap_ppl_pct": round(100 * (r.final_val_ppl / base.final_val_ppl - 1), 2) if base else "",
        })
    return rows


def log_fit(uri: str, experiment: str, law: str, files: list[Path]) -> str:
    """Log `files` as the artifacts of a new run `scaling-fit-<law>` in `experiment`; returns its id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.create_run(client.get_experiment_by_name(experiment).experiment_id, run_name=f"scaling-fit-{law}",
                            tags={KIND_TAG: FIT_KIND, "law": law})
    for path in files:
        client.log_artifact(run.info.run_id, str(path))
    client.set_terminated(run.info.run_id)
    return run.info.run_id
