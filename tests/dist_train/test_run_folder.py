"""What protects a run folder: one run at a time (the lock), --overwrite that loses nothing before the new
run has saved, and a best.pt that always matches what the run says."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dist_train import checkpoint as ckpt_io
from dist_train.faults import ConfigError
from dist_train.run_folder import LOCK_FILE, RunLock
from tests.dist_train.dt_helpers import TINY, check, results, run_trainer, start_trainer


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(out, **holder):
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": "then",
                                             **holder}))


def test_the_lock_is_exclusive_and_released(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    lock = RunLock.acquire(tmp_path)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on .*delete .*\.lock"):
        RunLock.acquire(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    RunLock.acquire(tmp_path).release()


@pytest.mark.parametrize("holder, env, taken", [
    ({"pid": "dead"}, {}, True),  # this host, process gone
    ({"host": "elsewhere.example", "pid": 1}, {}, False),  # another machine: cannot tell, keep it
    ({"host": "elsewhere.example", "slurm_job": "77", "slurm_restart": "0"}, {"SLURM_JOB_ID": "77",
                                                                              "SLURM_RESTART_COUNT": "1"}, True),
    ({"host": "elsewhere.example", "slurm_job": "77", "slurm_restart": "0"}, {"SLURM_JOB_ID": "78"}, False),
    ({"host": "elsewhere.example", "pid": 5, "torchrun_run": "r1"}, {"TORCHELASTIC_RUN_ID": "r1"}, True),
], ids=["dead-pid", "other-host", "requeued-slurm-job", "other-slurm-job", "torchrun-restart"])
def test_stale_locks_are_taken_over_and_live_ones_kept(tmp_path, monkeypatch, holder, env, taken):
    for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if holder.get("pid") == "dead":
        holder = {**holder, "pid": dead_pid()}
    write_lock(tmp_path, **holder)
    if taken:
        RunLock.acquire(tmp_path).release()
    else:
        with pytest.raises(ConfigError, match="in use by another run"):
            RunLock.acquire(tmp_path)


def test_a_torn_lock_is_kept_while_fresh_and_taken_over_when_old(tmp_path):
    (tmp_path / LOCK_FILE).write_text('{"host": ')  # a holder killed while writing it
    with pytest.raises(ConfigError, match="in use by another run"):
        RunLock.acquire(tmp_path)
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    RunLock.acquire(tmp_path).release()


def test_a_second_training_with_the_same_out_refuses_at_once(sample_shards, tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "first.log"
    first = start_trainer(["--shards", str(sample_shards), "--out", str(out), *TINY, "--epochs", "3"], log, nproc=None,
                          env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STEP_DELAY": "0.5"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        holder = json.loads((out / LOCK_FILE).read_text())
        start = time.monotonic()
        args = ["--shards", str(sample_shards), "--out", str(out), *TINY, "--epochs", "3"]
        second = check(run_trainer(args, nproc=None, timeout=120), 2)
        assert time.monotonic() - start < 60
        assert f"is in use by another run (pid {holder['pid']} on {holder['host']}" in second.stderr
        os.killpg(first.pid, signal.SIGTERM)
        assert first.wait(120) == 75, log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert not (out / LOCK_FILE).exists()  # released by the run that held it
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and ckpt_io.load_checkpoint(out / "last.pt")["step"] == status["step"]


def test_overwrite_keeps_the_old_run_until_the_new_one_saved(sample_shards, tmp_path):
    out = tmp_path / "run"
    base = ["--shards", str(sample_shards), "--out", str(out), *TINY, "--epochs", "1"]
    check(run_trainer(base, nproc=None))
    old = results(out)
    old_last = (out / "last.pt").read_bytes()
    # A typo found while building the model: nothing trained, nothing of the old run lost.
    proc = check(run_trainer([*base, "--resume", "never", "--overwrite", "--pretrained", str(tmp_path / "typo.pth")],
                             nproc=None), 2)
    assert "typo.pth" in proc.stderr
    assert (out / "last.pt").read_bytes() == old_last and results(out) == old
    assert not list(out.glob(".replaced-*"))
    # A new run that saves: the old files are gone, and so is the folder that kept them meanwhile.
    check(run_trainer([*base, "--resume", "never", "--overwrite", "--seed", "1"], nproc=None))
    assert (out / "last.pt").read_bytes() != old_last and not list(out.glob(".replaced-*"))
    assert json.loads((out / "config.json").read_text())["seed"] == 1
