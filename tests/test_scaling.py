"""Scaling-law fits on synthetic runs logged to a real sqlite MLflow store, as the trainer logs them.

Losses come from known coefficients times lognormal noise of 0.05%; the fits must recover E within 2%, exponents
within 10%, scale coefficients within 10% (or inside their 95% interval for the gap's G, poorly determined by a
gap of a few hundredths), and predict the held-out largest budget within 0.5%.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO
from sparsedist import cli
from sparsedist.errors import ScalingError
from sparsedist.scaling.fit import fit_law
from sparsedist.scaling.laws import get_law
from sparsedist.scaling.points import datasets
from sparsedist.scaling.runs import load_runs

BATCH, SEQ = 64, 512  # tokens per step 32,768
NOISE = 5e-4
TOKENS_LAW = {1_000_000: (2.0, 200.0, 0.3), 4_000_000: (1.8, 150.0, 0.28)}  # N -> E, B, beta
CHINCHILLA = (1.69, 406.4, 0.34, 410.7, 0.28)  # E, A, alpha, B, beta (Hoffmann et al.)
GAP = (30.0, 0.4, 0.05)  # G, gamma, G_inf


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow.tracking import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    return uri, MlflowClient(uri), root


def experiment(store, name: str) -> str:
    uri, client, root = store
    return client.create_experiment(name, artifact_location=str(root / "artifacts" / name))


def log_run(client, exp_id: str, name: str, *, method: str, n: int, steps: int, loss, family: str = "llama",
            pretrained: str | None = None, every: int = 50, status: str = "FINISHED", tags: dict | None = None,
            seed: int = 0) -> str:
    """A run as `Trainer` logs it: tags, flattened params, val_loss every `every` steps, final_val_* and `tokens`."""
    from mlflow.entities import Metric, Param

    rng = np.random.default_rng(seed)
    start_tags = {"method": method, "model_family": family, "params": n, "sparse_params": 0 if method == "dense"
                  else n // 2, "sparsity_pattern": "dense" if method == "dense" else "2:4", "recipe": name,
                  "recipe_hash": "0" * 12, "git_revision": "test", "world_size": 1, "hardware": "cpu"}
    run_id = client.create_run(exp_id, run_name=name, tags={k: str(v) for k, v in (tags or start_tags).items()}
                               ).info.run_id
    params = {"train.global_batch": BATCH, "data.seq_len": SEQ, "train.steps": steps, "eval.interval": every,
              "model.config.hidden_size": n // 10_000,
              "model.family": family, "model.pretrained": pretrained, "sparsity.method": method,
              "data.source": "embedded", "data.tokenizer": None, "data.vocab_size": 8192}
    now = int(time.time() * 1000)
    metrics = [Metric("val_loss", 9.0, now, 0)]  # the initial evaluation (D = 0: not a curve point)
    for step in range(every, steps, every):
        metrics.append(Metric("val_loss", loss(step * BATCH * SEQ) * math.exp(rng.normal(0, NOISE)), now, step))
    final = loss(steps * BATCH * SEQ) * math.exp(rng.normal(0, NOISE))
    metrics += [Metric("final_val_loss", final, now, steps), Metric("final_val_ppl", math.exp(final), now, steps),
                Metric("loss", final + 0.1, now, steps)]
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=metrics)
    if status == "FINISHED" and tags is None:
        client.set_tag(run_id, "tokens", str(steps * BATCH * SEQ))
        client.set_tag(run_id, "flops", str(6 * n * steps * BATCH * SEQ))
    client.set_terminated(run_id, status=status)
    return run_id


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def close(value: float, truth: float, tol: float) -> bool:
    return abs(value / truth - 1) <= tol


def test_tokens_law_through_the_cli(store, tmp_path, capsys):
    """Per-model L(D) fits, the JSON, the plot and the MLflow run of `scaling fit`, and `scaling predict`."""
    uri, client, _ = store
    exp_id = experiment(store, "tokens")
    for i, (n, (e, b, beta)) in enumerate(TOKENS_LAW.items()):
        log_run(client, exp_id, f"dense-{n}", method="dense", n=n, steps=5000, seed=i,
                loss=lambda d, e=e, b=b, beta=beta: e + b * d**-beta)
    log_run(client, exp_id, "crashed", method="dense", n=1_000_000, steps=5000, loss=lambda d: 1.0, status="FAILED")
    resumed = client.search_runs([exp_id], "attributes.run_name = 'dense-1000000'")[0].info.run_id
    from mlflow.entities import Metric  # a resume re-logs step 1000 later: the later value is the one kept

    client.log_batch(resumed, metrics=[Metric("val_loss", 2.0 + 200.0 * (1000 * BATCH * SEQ) ** -0.3,
                                              int(time.time() * 1000) + 10, 1000)])
    client.log_batch(resumed, metrics=[Metric("val_loss", 50.0, int(time.time() * 1000) - 10_000, 1000)])

    code, out, err = run_cli(capsys, "scaling", "fit", "--experiment", "tokens", "--law", "tokens",
                             "--tracking-uri", uri, "--out", str(tmp_path))
    assert code == 0, err
    doc = json.loads((tmp_path / "scaling-tokens.json").read_text())
    assert doc["law"] == "tokens" and len(doc["fits"]) == 2
    for fit in doc["fits"]:
        e, b, beta = TOKENS_LAW[fit["n_params"]]
        p, ci = fit["params"], fit["intervals"]
        assert fit["n_points"] == 100  # steps 50 ... 4950 and the final evaluation; not step 0 nor the failed run
        assert close(p["E"], e, 0.02) and close(p["beta"], beta, 0.10) and close(p["B"], b, 0.10), p
        assert all(lo < p[k] < hi for k, (lo, hi) in ci.items()), ci
        assert abs(fit["heldout_error"]) < 0.005
        assert len(fit["bootstrap"]) == 200
    assert (tmp_path / "scaling-tokens.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "E      = 2.00" in out and "held-out largest budget" in out
    (fit_run,) = client.search_runs([exp_id], "attributes.run_name = 'scaling-fit-tokens'")
    assert sorted(a.path for a in client.list_artifacts(fit_run.info.run_id)) == [
        "scaling-tokens.json", "scaling-tokens.png"]
    records = load_runs(uri, "tokens")
    assert len(records) == 2  # neither the failed run nor the fit's own run
    curve = dict(next(r for r in records if r.run_id == resumed).curve)
    assert curve[1000 * BATCH * SEQ] == 2.0 + 200.0 * (1000 * BATCH * SEQ) ** -0.3

    fit_json = str(tmp_path / "scaling-tokens.json")
    code, out, err = run_cli(capsys, "scaling", "predict", "--fit", fit_json, "--tokens", "1e9", "--params", "4e6")
    assert code == 0, err
    e, b, beta = TOKENS_LAW[4_000_000]
    value, lo, hi = map(float, re.search(r"loss ([\d.]+) \[([\d.]+), ([\d.]+)\]", out).groups())
    assert close(value, e + b * 1e9**-beta, 0.01) and lo < value < hi
    assert "6.1× the largest fitted budget" in out
    code, _, err = run_cli(capsys, "scaling", "predict", "--fit", fit_json, "--tokens", "1e9")
    assert code == 1 and err.startswith("sparsedist: the fit holds 2 models") and err.count("\n") == 1


def test_chinchilla_law_recovers_its_coefficients(store):
    uri, client, _ = store
    exp_id = experiment(store, "chinchilla")
    e, a, alpha, b, beta = CHINCHILLA
    for i, (n, d) in enumerate((n, d) for n in (1e6, 3e6, 1e7, 3e7, 1e8) for d in np.geomspace(3e7, 3e9, 6)):
        log_run(client, exp_id, f"dense-{i}", method="dense", n=int(n), steps=round(d / (BATCH * SEQ)), every=10**6,
                seed=i, loss=lambda d, n=n: e + a * n**-alpha + b * d**-beta)
    (data,) = datasets(get_law("chinchilla"), load_runs(uri, "chinchilla"), None)
    fit = fit_law(get_law("chinchilla"), data.points, data.label)
    p = fit.params
    assert fit.n_points == 30
    assert close(p["E"], e, 0.02) and close(p["alpha"], alpha, 0.10) and close(p["beta"], beta, 0.10), p
    assert close(p["A"], a, 0.10) and close(p["B"], b, 0.10), p
    assert abs(fit.heldout_error) < 0.005
    assert fit.heldout_budget == pytest.approx(1e8 * 3e9, rel=1e-3)


def test_gap_law_recovers_the_gap(store, tmp_path):
    uri, client, _ = store
    exp_id = experiment(store, "gap")
    g, gamma, g_inf = GAP
    dense = (2.0, 200.0, 0.3)

    def dense_loss(d):
        return dense[0] + dense[1] * d ** -dense[2]

    log_run(client, exp_id, "dense", method="dense", n=1_000_000, steps=5000, seed=1, loss=dense_loss)
    log_run(client, exp_id, "srste", method="srste", n=1_000_000, steps=5000, seed=2,
            loss=lambda d: dense_loss(d) + g * d**-gamma + g_inf)
    (data,) = datasets(get_law("gap"), load_runs(uri, "gap"), None)
    fit = fit_law(get_law("gap"), data.points, data.label, data.n_params)
    p, ci = fit.params, fit.intervals
    assert close(p["gamma"], gamma, 0.10) and close(p["G_inf"], g_inf, 0.10), p
    assert ci["G"][0] < g < ci["G"][1], ci
    assert abs(fit.heldout_error) < 0.005
    from sparsedist.scaling.plot import plot_fits

    assert plot_fits([fit], tmp_path / "gap.png").stat().st_size > 10_000


def test_runs_compare_writes_the_table(store, tmp_path, capsys):
    """Sparse runs are compared with the dense run of their family, N and start, of the closest budget."""
    uri, client, _ = store
    exp_id = experiment(store, "compare")
    log_run(client, exp_id, "dense-short", method="dense", n=1_000_000, steps=100, loss=lambda d: 4.0)
    log_run(client, exp_id, "dense-long", method="dense", n=1_000_000, steps=400, loss=lambda d: 3.5)
    log_run(client, exp_id, "srste", method="srste", n=1_000_000, steps=300, loss=lambda d: 3.6)
    log_run(client, exp_id, "srste-ft", method="srste", n=1_000_000, steps=300, pretrained="runs/dense/model",
            loss=lambda d: 3.4)
    log_run(client, exp_id, "gpt2-srste", method="srste", n=1_000_000, family="gpt2", steps=300, loss=lambda d: 3.0)
    out_csv = tmp_path / "runs.csv"
    code, out, err = run_cli(capsys, "runs", "compare", "--experiment", "compare", "--tracking-uri", uri,
                             "--csv", str(out_csv))
    assert code == 0, err
    rows = {row["run"]: row for row in csv.DictReader(out_csv.open())}
    assert sorted(rows) == ["dense-long", "dense-short", "gpt2-srste", "srste", "srste-ft"]
    srste = rows["srste"]
    assert srste["dense_run"] == "dense-long" and srste["tokens"] == str(300 * BATCH * SEQ)
    assert float(srste["gap_loss"]) == pytest.approx(0.1, abs=0.01)
    assert float(srste["gap_ppl_pct"]) == pytest.approx(100 * (math.exp(0.1) - 1), abs=1.0)
    assert float(srste["flops"]) == 6 * 1_000_000 * 300 * BATCH * SEQ
    assert rows["srste-ft"]["dense_run"] == rows["gpt2-srste"]["dense_run"] == rows["dense-long"]["gap_loss"] == ""
    assert out.splitlines()[0].split() == ["run", "method", "family", "params", "tokens", "val_ppl", "dense_run",
                                           "gap_loss", "gap_ppl_pct"]


def test_an_empty_experiment_exits_with_one_line(store, tmp_path):
    uri, _, _ = store
    experiment(store, "empty")
    done = subprocess.run([sys.executable, "-m", "sparsedist", "scaling", "fit", "--experiment", "empty", "--law",
                           "tokens", "--tracking-uri", uri, "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["sparsedist: experiment 'empty' has no finished training runs"]
    assert not (tmp_path / "scaling-tokens.json").exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--experiment", "mixed", "--law", "chinchilla"],
     "inconsistent runs: they mix methods dense, srste; choose one with --method"),
    (["--experiment", "mixed", "--law", "gap"],
     "inconsistent runs: no dense run of llama (hidden_size=200) to compare srste-2m with"),
    (["--experiment", "mixed", "--law", "tokens", "--method", "ste"],
     "no finished runs of method 'ste' (there are dense, srste)"),
    (["--experiment", "mixed", "--law", "quadratic"], "unknown law 'quadratic': choose one of tokens, chinchilla, gap"),
    (["--experiment", "missing", "--law", "tokens"], "no experiment 'missing' at "),
    (["--experiment", "untagged", "--law", "tokens"], "lacks tag model_family, tag tokens, tag flops"),
])
def test_inconsistent_runs_exit_with_one_line(store, tmp_path, capsys, argv, message):
    uri, client, _ = store
    if client.get_experiment_by_name("mixed") is None:
        exp_id = experiment(store, "mixed")
        for method, n in (("dense", 1_000_000), ("srste", 1_000_000), ("srste", 2_000_000)):
            log_run(client, exp_id, f"{method}-{n // 10**6}m", method=method, n=n, steps=500, loss=lambda d: 3.0)
        log_run(client, experiment(store, "untagged"), "foreign", method="dense", n=1, steps=500,
                loss=lambda d: 3.0, tags={"method": "dense", "params": "1"})
    code, out, err = run_cli(capsys, "scaling", "fit", *argv, "--tracking-uri", uri, "--out", str(tmp_path))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sparsedist: ") and message in err, err


def test_heldout_error_too_few_points_and_a_bad_fit_file(tmp_path):
    """The held-out error is the fit without the largest D, predicting it: (predicted − observed) / observed."""
    from sparsedist.scaling.points import Points

    law = get_law("tokens")
    tokens = np.geomspace(1e6, 1e8, 12)
    loss = 2.0 + 200.0 * tokens**-0.3
    loss[-1] *= 1.05
    fit = fit_law(law, Points(tokens[:, None], loss, np.zeros(12)), "off", resamples=5)
    assert fit.heldout_error == pytest.approx(1 / 1.05 - 1, abs=1e-3)
    assert fit_law(law, Points(tokens[:6, None], loss[:6], np.zeros(6)), resamples=5).heldout_error is None
    x = np.array([[1e6], [2e6], [4e6]])
    with pytest.raises(ScalingError, match="3 distinct points; the tokens law needs at least 4"):
        fit_law(law, Points(x, np.array([3.0, 2.9, 2.8]), np.zeros(3)), "tiny")
    bad = tmp_path / "fit.json"
    bad.write_text('{"law": "tokens"}')
    from sparsedist.scaling.fit import load_fits

    with pytest.raises(ScalingError, match="is not a sparsedist scaling fit"):
        load_fits(bad)
