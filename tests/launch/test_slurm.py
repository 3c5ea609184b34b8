"""launch/slurm/*.sbatch on a real two-node SLURM cluster (see tests/slurm_cluster.py), CPU and gloo.

Each job is submitted with the real ``sbatch`` from a temp folder; the trainer writes to
``runs/<job name>`` there, as the script does for users. Tiny shards from tests/conftest.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.slurm_cluster import NODES

pytestmark = pytest.mark.slow

TRAIN = REPO / "launch" / "slurm" / "train.sbatch"
PREPROCESS = REPO / "launch" / "slurm" / "preprocess.sbatch"
EPOCHS = 2
# 2 nodes x 1 CPU each (the cluster has 2 CPUs per node); --gpus-per-node=0 overrides the script's GPU default.
CPU_JOB = ["--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]
TINY = ["--epochs", str(EPOCHS), "--batch-size", "2", "--img-size", "32", "--workers", "1", "--hidden-size", "16",
        "--no-progress", "--ckpt-every-minutes", "0", "--log-every", "1"]


def _wait_for(what: str, check, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _job_env(cluster, **extra) -> dict:
    return {**cluster.env, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
            "WANDB_ERROR_REPORTING": "false", **extra}


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in _read(run / "metrics.jsonl").splitlines() if line.strip()]


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _steps_per_epoch(log: str) -> int:
    return int(re.search(r"(\d+) steps per epoch", log).group(1))


def _assert_each_step_and_epoch_once(run: Path, steps_per_epoch: int) -> None:
    rows = _metrics(run)
    train_steps = [r["step"] for r in rows if "train/loss" in r]
    assert train_steps == list(range(1, EPOCHS * steps_per_epoch + 1)), f"train rows by step: {train_steps}"
    epoch_rows = [r for r in rows if "epoch/train/loss" in r]
    assert [r["step"] for r in epoch_rows] == [steps_per_epoch * (e + 1) for e in range(EPOCHS)]
    history = torch.load(run / "last.pt", weights_only=True)["state"]["history"]
    assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))


def _assert_two_ranks_finished(run: Path, info: dict, log: str) -> dict:
    assert info["NodeList"] == "n[1-2]", info
    results = json.loads((run / "results.json").read_text())
    assert results["world_size"] == 2 and len(results["steps_per_rank"]) == 2, results
    assert results["steps_per_rank"][0] == results["steps_per_rank"][1] > 0
    assert "2 process(es) on cpu (gloo)" in log
    assert _status(run)["state"] == "completed"
    for name in ("last.pt", "best.pt", "config.json", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert list((run / "checkpoints").glob("step-*.pt"))
    return results


def test_two_node_training_runs_to_completion_and_does_not_requeue(slurm_cluster, sample_shards, tmp_path):
    job = slurm_cluster.sbatch([*CPU_JOB, "--job-name=twonode", str(TRAIN), "--shards", str(sample_shards),
                                "--wandb", "disabled", *TINY], env=_job_env(slurm_cluster), cwd=tmp_path)
    log_file = tmp_path / f"slurm-twonode-{job}.out"
    try:
        info = slurm_cluster.wait_job(job, "COMPLETED", timeout=150)
    finally:
        print(_read(log_file))
    log = _read(log_file)
    run = tmp_path / "runs" / "twonode"
    results = _assert_two_ranks_finished(run, info, log)
    assert info["Restarts"] == "0" and info["ExitCode"] == "0:0"
    assert "training finished" in log and "requeue" not in log
    assert results["steps"] == EPOCHS * _steps_per_epoch(log)
    _assert_each_step_and_epoch_once(run, _steps_per_epoch(log))
    cache = json.loads((run / "config.json").read_text())["cache_dir"]  # remote shards: node-local, not home
    assert re.fullmatch(r"/.+/vidshard-cache-\w+", cache) and not cache.startswith(str(Path.home())), cache


@pytest.mark.parametrize("sig, to_batch_shell", [("USR1", True), ("TERM", False)],
                         ids=["warning-USR1-to-batch-shell", "TERM-to-job-steps"])
def test_stop_signal_checkpoints_requeues_and_resumes(slurm_cluster, sample_shards, tmp_path, sig, to_batch_shell):
    # USR1 to the batch shell is what `#SBATCH --signal=B:USR1@...` sends before the time limit; the script
    # passes it on. TERM to the job steps reaches torchrun and the workers directly (the batch shell sees
    # nothing) and the script decides from status.json. A second per step lets the signal land mid-epoch.
    name = f"preempt{sig.lower()}"
    env = _job_env(slurm_cluster, DIST_TRAIN_FAULT_INJECTION="1", DIST_TRAIN_TEST_STEP_DELAY="1")
    job = slurm_cluster.sbatch([*CPU_JOB, f"--job-name={name}", str(TRAIN), "--shards", str(sample_shards),
                                "--wandb", "offline", *TINY], env=env, cwd=tmp_path)
    log_file = tmp_path / f"slurm-{name}-{job}.out"
    run = tmp_path / "runs" / name
    try:
        _wait_for("step 1 in metrics.jsonl", lambda: any(r.get("step", 0) >= 1 for r in _metrics(run)), 120, 0.2)
        slurm_cluster.run(["scancel", f"--signal={sig}", *(["--batch"] if to_batch_shell else []), str(job)])
        stopped = _wait_for("status.json 'stopped'", lambda: (s := _status(run)).get("state") == "stopped" and s, 60)
        ckpt = torch.load(run / "last.pt", weights_only=True)
        assert ckpt["step"] == stopped["step"] >= 1
        assert stopped["exit_code"] == 75 and stopped["signal"] == ("SIGUSR1" if to_batch_shell else f"SIG{sig}")
        # The job requeued itself; SLURM holds a requeued job ~120 s (BeginTime), so release it early.
        info = slurm_cluster.wait_job(job, "PENDING", timeout=60)
        assert info["Restarts"] == "1", info
        slurm_cluster.release_requeued(job)
        info = slurm_cluster.wait_job(job, "COMPLETED", timeout=150)
    finally:
        print(_read(log_file))
    log = _read(log_file)
    s = stopped["step"]
    assert re.search(rf"stopped by SIG\w+ at step {s}: checkpoint saved", log), "first run did not save"
    assert (f"got SIG{sig}" in log) == to_batch_shell
    assert "stopped to be resumed (status stopped" in log and "requeueing job" in log
    assert re.search(rf"resumed from \S+ at epoch \d+ step {s};", log), "second run did not resume at the saved step"
    assert log.count("(restart 0)") == 1 and log.count("(restart 1)") == 1 and log.count("training finished") == 1
    results = _assert_two_ranks_finished(run, info, log)
    assert info["Restarts"] == "1"
    spe = _steps_per_epoch(log)
    assert results["steps"] == EPOCHS * spe > s
    _assert_each_step_and_epoch_once(run, spe)
    # Same W&B run: both offline run folders carry the id stored in the checkpoint.
    run_id = torch.load(run / "last.pt", weights_only=True)["wandb_run_id"]
    assert run_id and ckpt["wandb_run_id"] == run_id
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) == 2


def test_preprocess_job_packs_the_same_shards_as_the_direct_command(slurm_cluster, sample_videos, tmp_path):
    args = ["--short-side", "48", "--shard-size", "4"]
    job = slurm_cluster.sbatch(["--cpus-per-task=2", str(PREPROCESS), str(sample_videos), str(tmp_path / "sl"), *args],
                               env=_job_env(slurm_cluster), cwd=tmp_path)
    log_file = tmp_path / f"slurm-preprocess-{job}.out"
    try:
        info = slurm_cluster.wait_job(job, "COMPLETED", timeout=120)
    finally:
        print(_read(log_file))
    assert info["NumCPUs"] == "2" and "2 workers" in _read(log_file)
    direct = tmp_path / "direct"
    subprocess.run([sys.executable, "-m", "preprocess.shard", str(sample_videos), str(direct), *args,
                    "--workers", "1", "--no-progress"], check=True, timeout=120, capture_output=True)
    names = sorted(p.name for p in direct.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "sl").iterdir())
    assert any(n.endswith(".tar") for n in names) and "manifest.json" in names
    for name in names:
        assert (tmp_path / "sl" / name).read_bytes() == (direct / name).read_bytes(), name
    assert set(NODES) >= {info["NodeList"]}
