"""A stop is a stop, even when the data is stuck: a loader worker that hangs on purpose in a read
(``DIST_TRAIN_TEST_HANG_ON_KEY``), and a training process that does not reach its next step."""

from __future__ import annotations

import json
import os
import signal
import time

from dist_train import checkpoint as ckpt_io
from dist_train import data
from preprocess.shard_format import load_manifest
from tests.dist_train.dt_helpers import TINY, start_trainer
from tests.dist_train.test_faults import alive, kill_tree, process_tree, wait_for

ONE = [*TINY, "--workers", "1", "--epochs", "2", "--log-every", "1", "--ckpt-every-steps", "1"]


def key_of_step(shards, step: int) -> tuple[str, str]:
    """(key, shard) of the first sample that a one-process run of ``ONE`` trains on in ``step`` of epoch 1."""
    manifest = load_manifest(shards)
    plan = data.make_plan(manifest, data.resolve_layout(1, 2), 0, 0, val_fraction=0.1)
    sid = int(plan.rank_batches(0, 0)[0][step][0])
    return plan.train.keys[sid], plan.train.shards[plan.train.shard[sid]].name


def hang_run(shards, out, log, step: int, *extra, env=None):
    key, shard = key_of_step(shards, step)
    proc = start_trainer(["--shards", str(shards), "--out", str(out), *ONE, *extra], log, nproc=None,
                         env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_HANG_ON_KEY": key, **(env or {})})
    return proc, key, shard


def signal_and_wait(proc, log, within: float) -> float:
    """SIGTERM the run, wait for it to exit; the seconds it took."""
    start = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    wait_for(lambda: proc.poll() is not None, within, "the run to exit", None, log)
    return time.monotonic() - start


def workers_of(pid: int) -> list[int]:
    return [p for p in process_tree(pid) if p != pid]


def test_a_stuck_read_fails_after_data_timeout_naming_the_shard(sample_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc, key, shard = hang_run(sample_shards, out, log, 2, "--data-timeout", "4")
    try:
        wait_for(lambda: proc.poll() is not None, 120, "the run to fail", None, log)
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "no batch from the data loader for 4 s (--data-timeout)" in text and shard in text and key in text
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 2  # the steps before the stuck one, saved
    assert json.loads((out / "status.json").read_text())["state"] == "failed"


def test_a_stop_signal_while_the_data_is_stuck_stops_at_once(sample_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc, _, _ = hang_run(sample_shards, out, log, 2, "--data-timeout", "0", "--stop-timeout", "3")
    try:
        wait_for(lambda: (out / "last.pt").exists() and ckpt_io.load_checkpoint(out / "last.pt")["step"] == 2, 120,
                 "the checkpoint before the stuck step", proc, log)
        workers = workers_of(proc.pid)
        time.sleep(1)
        took = signal_and_wait(proc, log, 60)
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 75, text[-3000:]
    assert took < 30 and "no batch came for 3 s after the stop signal (the data is stuck)" in text
    status = json.loads((out / "status.json").read_text())
    assert status["state"] == "stopped" and status["signal"] == "SIGTERM"
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 2  # the last complete checkpoint, intact
    assert workers and not any(alive(p) for p in workers)  # the hung worker too


def test_a_second_stop_signal_exits_at_once(sample_shards, tmp_path):
    out, log = tmp_path / "run", tmp_path / "log.txt"
    # The training process itself stalls after step 1 (the step hook sleeps), so the first signal's stop
    # is never reached; the second one, a few seconds later, ends it.
    proc = start_trainer(["--shards", str(sample_shards), "--out", str(out), *ONE], log, nproc=None,
                         env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STEP_DELAY": "600"})
    try:
        wait_for(lambda: "FAULT INJECTION ACTIVE (tests only): DIST_TRAIN_TEST_STEP_DELAY" in log.read_text(), 120,
                 "step 1's hook", proc, log)  # announced as the hook starts its sleep
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(3)
        assert proc.poll() is None  # one signal: the stop waits for the step
        took = signal_and_wait(proc, log, 30)
    finally:
        kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 75 and took < 10, text[-3000:]
    assert "stopping now after a second stop signal (SIGTERM)" in text
    assert json.loads((out / "status.json").read_text())["state"] == "stopped"
