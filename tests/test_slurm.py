"""Slurm jobs from `sparsedist slurm render`.

The script's shell logic runs first against fake `srun` and `scontrol` (every value reaches the
launcher verbatim, USR1 requeues, array tasks pick their sweep point); then, marked `slurm`, real
jobs on a one-node Slurm started here (docs: /work/shared/design/environment.md): the session
fixture installs slurm-wlm and munge with apt-get when `sbatch` is missing, and skips when it
cannot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import MICRO, micro_overrides
from sparsedist.cli import main

PY = sys.executable
CPU_JOB = ["--nodes", "1", "--gpus-per-node", "0", "--procs-per-node", "2", "parallel.backend=fsdp2",
           "train.micro_batch=2"]


def render(tmp_path: Path, *args: str) -> Path:
    script = tmp_path / "job.sbatch"
    assert main(["slurm", "render", str(MICRO), *args, "--out", str(script)]) == 0
    return script


# --- the script, against fake srun and scontrol ---------------------------------------------------

FAKE_SRUN = f"""#!{PY}
import json, os, signal, sys
signal.signal(signal.SIGUSR1, lambda *a: sys.exit(int(os.environ.get("FAKE_STATUS", "0"))))
with open(os.path.join(os.environ["FAKE_LOG"], "srun.json"), "w") as f:
    json.dump(sys.argv[1:], f)
if os.environ.get("FAKE_WAIT"):
    signal.pause()
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_LOG/scontrol"
if [ "$1 $2" = "show hostnames" ]; then echo node-7; echo node-8; fi
"""


def start_script(script: Path, tmp_path: Path, **env: str) -> subprocess.Popen:
    """Run a rendered script as job 4242 on node-[7-8], with the fake commands first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in {"srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[7-8]",
           "FAKE_LOG": str(tmp_path), **env}
    return subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def srun_argv(tmp_path: Path) -> list[str]:
    return json.loads((tmp_path / "srun.json").read_text())


def test_every_value_reaches_the_launcher_verbatim(tmp_path):
    out = tmp_path / "out"
    hostile = f"tracking.run_name=$(touch {tmp_path}/pwned) `touch {tmp_path}/pwned` ';\"x\n"
    script = render(tmp_path, *CPU_JOB, f"train.output_dir={out}", hostile)
    proc = start_script(script, tmp_path)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert srun_argv(tmp_path) == [
        "--ntasks-per-node=1", "--kill-on-bad-exit=1", PY, "-m", "sparsedist", "launch", str(MICRO),
        "--nproc", "2", "--nnodes", "1", "--max-restarts", "0", "parallel.backend=fsdp2", "train.micro_batch=2",
        f"train.output_dir={out}", hostile, f"train.output_dir={out}",
        "--rdzv-endpoint", "node-7:24242", "--rdzv-id", "4242"]  # port 20000 + job id % 20000
    assert not (tmp_path / "pwned").exists()
    text = script.read_text()
    header = text[: text.index("\nset -u")].splitlines()
    assert all(line == "" or line.startswith("#") for line in header)
    assert [line for line in header if line.startswith("#SBATCH")] == [
        "#SBATCH --job-name=micro", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1",
        "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={Path.cwd()}", f"#SBATCH --output={out}/slurm-%j.out"]
    assert out.is_dir()  # Slurm opens the log there before anything runs


@pytest.mark.parametrize("step_status, requeued", [(0, True), (1, False)])
def test_usr1_reaches_the_step_and_a_clean_stop_requeues_the_job(tmp_path, step_status, requeued):
    script = render(tmp_path, *CPU_JOB, f"train.output_dir={tmp_path / 'out'}")
    proc = start_script(script, tmp_path, FAKE_WAIT="1", FAKE_STATUS=str(step_status))
    deadline = time.monotonic() + 30
    while not (tmp_path / "srun.json").exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@N` or `scancel --signal=USR1 --batch` do
    assert proc.wait(timeout=30) == step_status  # the fake step exited on the forwarded USR1
    calls = (tmp_path / "scontrol").read_text().splitlines()
    assert calls == ["show hostnames node-[7-8]", *(["requeue 4242"] if requeued else [])]


def test_a_sweep_is_a_job_array_of_its_grid(tmp_path):
    out = tmp_path / "out"
    script = render(tmp_path, *CPU_JOB, f"train.output_dir={out}", "--sweep", "optim.lr=1e-3,3e-3",
                    "--sweep", "train.seed=1,2", "--array", "1-3%2")
    assert "#SBATCH --array=1-3%2\n" in script.read_text()
    assert f"#SBATCH --output={out}/slurm-%A_%a.out\n" in script.read_text()
    proc = start_script(script, tmp_path, SLURM_ARRAY_TASK_ID="2")
    assert proc.wait(timeout=30) == 0, proc.stderr.read()
    assert srun_argv(tmp_path)[-8:-4] == [f"train.output_dir={out}", "optim.lr=3e-3", "train.seed=1",
                                          f"train.output_dir={out}/task_2"]
    proc = start_script(script, tmp_path, SLURM_ARRAY_TASK_ID="4")
    assert proc.wait(timeout=30) == 2
    assert "array task 4: not a sweep point (0-3)" in proc.stderr.read()


def test_a_gpu_job_runs_one_rank_per_gpu(tmp_path):
    script = render(tmp_path, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu", "--time", "1-00:00:00",
                    "--cpus-per-node", "64", "--signal-seconds", "600", "--sbatch=--account=abc", "--max-restarts", "3",
                    "parallel.backend=fsdp2", "train.global_batch=64", "train.micro_batch=2", "eval.sequences=32",
                    f"train.output_dir={tmp_path / 'out'}")
    text = script.read_text()
    for line in ["--nodes=4", "--gpus-per-node=8", "--cpus-per-task=64", "--time=1-00:00:00", "--partition=gpu",
                 "--signal=B:USR1@600", "--account=abc"]:
        assert f"#SBATCH {line}\n" in text
    assert f" launch {MICRO} --nproc 8 --nnodes 4 --max-restarts 3 " in text


@pytest.mark.parametrize("args, message", [
    (["--array", "0-3"], "--array needs --sweep"),
    (["--time", "1:00\n#SBATCH --x=1"], "--time '1:00\\n#SBATCH --x=1': not a value an #SBATCH line can take"),
    (["--partition", "a b"], "--partition 'a b': not a value"),
    (["--sbatch=--qos=high;rm"], "--sbatch '--qos=high;rm': not a value"),
    (["--sweep", "optim.lr"], "--sweep 'optim.lr': expected KEY=V1,V2,..."),
    (["--gpus-per-node", "1"], "--procs-per-node is for CPU jobs"),
    (["--procs-per-node", "0"], "--nodes, --procs-per-node and --cpus-per-node must be at least 1"),
    (["--sweep", "optim.nope=1,2"], "override optim.nope: unknown key optim.nope"),
])
def test_refusals(tmp_path, capsys, args, message):
    assert main(["slurm", "render", str(MICRO), *CPU_JOB, f"train.output_dir={tmp_path / 'out'}", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- a real Slurm -------------------------------------------------------------------------------------

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]

    def run(self, *command: str) -> str:
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"
        return done.stdout

    def submit(self, script: Path) -> str:
        return self.run("sbatch", "--parsable", str(script)).strip()

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, log: Path, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.job(job_id))["JobState"] not in DONE:
            assert time.monotonic() < deadline, f"job {job_id}: {info['JobState']}\n{tail(log)}"
            time.sleep(1)
        return info


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else f"(no log {log})"


def _install() -> str | None:
    """apt-get install slurm-wlm and munge; returns why it could not, or None."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return "sbatch not found, and installing slurm-wlm needs root and apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} timed out"
        if done.returncode:
            return f"{' '.join(command)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except OSError:
            return
        time.sleep(0.1)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm (slurmctld + slurmd as root, munge), its state in a temporary folder."""
    if shutil.which("sbatch") is None and (reason := _install()):
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("slurmd runs as root here (SlurmUser=root); not root")
    missing = [tool for tool in ("munged", "slurmctld", "slurmd") if not Path("/usr/sbin", tool).exists()]
    if missing or shutil.which("munge") is None:
        pytest.skip(f"sbatch is here but not {', '.join(missing) or 'munge'}: install slurm-wlm and munge")
    root = tmp_path_factory.mktemp("slurm")
    started = []
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode:
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        started.append(Path("/run/munge/munged.pid"))
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 * 9 // 10
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=sparsedist-tests
SlurmctldHost={host}
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SchedulerParameters=sched_interval=2,bf_interval=1
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
NodeName={host} CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory} State=UNKNOWN
PartitionName=tests Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    cluster = Cluster(root, {**os.environ, "SLURM_CONF": str(conf)})
    try:
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([f"/usr/sbin/{daemon}", "-f", str(conf)], env=cluster.env, check=True, timeout=60)
            started.insert(0, root / f"{daemon}.pid")
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], env=cluster.env, capture_output=True,
                                           text=True).stdout:
            assert time.monotonic() < deadline, tail(root / "slurmctld.log") + tail(root / "slurmd.log")
            time.sleep(0.5)
        yield cluster
    finally:
        for pid_file in started:
            _stop(pid_file)


def slurm_job(tmp_path: Path, corpus: Path, out: Path, *extra: str) -> Path:
    """A job for the micro recipe rendered in tmp_path: 2 CPU ranks on the one node, its own MLflow store."""
    return render(tmp_path, *CPU_JOB, *micro_overrides(corpus, out, *extra))


def mlflow_run(out: Path) -> tuple[str, int]:
    """The status of the only run of a micro run's store, and how many loss values it logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    (found,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    return found.info.status, len(client.get_metric_history(found.info.run_id, "loss"))


@pytest.mark.slurm
def test_a_rendered_job_runs_the_recipe_to_the_end(slurm, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the job's working directory
    out = tmp_path / "run"
    job = slurm.submit(slurm_job(tmp_path, corpus, out))
    log = out / f"slurm-{job}.out"
    info = slurm.wait(job, log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), tail(log)
    assert mlflow_run(out) == ("FINISHED", 6)
    assert (out / "checkpoints" / "step_00000006" / "trainer.json").is_file()
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slurm
def test_usr1_checkpoints_requeues_and_the_job_resumes(slurm, corpus, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    steps = 60
    job = slurm.submit(slurm_job(tmp_path, corpus, out, f"train.steps={steps}", "checkpoint.interval=1000",
                                 "eval.interval=1000"))
    log = out / f"slurm-{job}.out"
    deadline = time.monotonic() + 300
    while max(map(int, re.findall(rf"(\d+)/{steps} \[", tail(log))), default=0) < 2:  # rank 0's progress bar
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] not in DONE, tail(log)
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # as `--signal=B:USR1@N` does before the limit
    # requeued, the job starts again once its credential has expired (AuthInfo=cred_expire=10): starting
    # it sooner (`scontrol update StartTime=now`) can fail with "Job credential revoked"
    info = slurm.wait(job, log)
    text = log.read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    stopped = int(re.search(r"SIGUSR1: stopped after step (\d+)", text)[1])
    assert 2 <= stopped < steps
    assert f"requeueing job {job}" in text and f"job {job} (restart 1)" in text
    # checkpoint.interval=1000: the only checkpoint before the end is the one the preemption wrote
    assert f"resumed from {out}/checkpoints/step_{stopped:08d} at step {stopped}" in text
    assert mlflow_run(out) == ("FINISHED", steps)  # one MLflow run; no step ran twice
    assert (out / "model" / "model.safetensors").is_file()
