"""Fault tolerance end to end (issue 4): stops, kills, restarts, torn checkpoint writes and bad data,
through the real ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, tiny images).

Most runs use one configuration (``BASE`` on ``sample_shards``: 12 train / 4 val / 8 test clips, so
3 steps per epoch and 9 in all) and must end exactly like the uninterrupted ``reference`` run: same
weights (fp32 tolerance), same per-epoch history and the same rows in ``metrics.jsonl``. (So the
code must not change while the file runs: an edit to the data pipeline between the reference run and
a compared run shows up here as a mismatch.)

Exit statuses asserted here, as ``dist_train.faults`` documents them for torchrun 2.14: a worker that
stops on a signal exits 75 (torchrun's failure report lists ``exitcode : 75`` per rank, and a plain
``python -m dist_train`` returns 75 itself); torchrun itself exits 1 whenever the workers stopped,
whether the signal went to a worker or to torchrun; ``OUT/status.json`` says ``"stopped"`` with
``exit_code`` 75, which is what a launcher should read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dist_train import checkpoint as ckpt_io
from dist_train import data
from preprocess.shard_format import load_manifest
from tests.conftest import make_shards, make_videos
from tests.dist_train.dt_helpers import TINY, results, start_trainer, wandb_run_contents
from tests.dist_train.test_data import corrupt_one_jpeg

pytestmark = pytest.mark.slow

EPOCHS, STEPS_PER_EPOCH = 3, 3  # sample_shards: 12 train clips / (2 ranks x batch 2)
STEPS = EPOCHS * STEPS_PER_EPOCH
BASE = [*TINY, "--workers", "1", "--epochs", str(EPOCHS), "--log-every", "1"]
SIGNALS_TO_HANDLE = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGUSR1,SIGUSR2"]
WANDB_OFFLINE = {"WANDB_MODE": None, "WANDB_API_KEY": None}
TORCHRUN_STOPPED = 1  # torchrun's own exit status when its workers stopped (it does not pass 75 on)


# ------------------------------------------------------------------------------------------- helpers
def launch(args: list[str], log: Path, timeout: float = 180, **kw) -> tuple[int, str]:
    """Run the trainer to its end (killing its whole process tree if it outlives ``timeout``)."""
    proc = start_trainer(args, log, **kw)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"trainer still running after {timeout}s (hang?):\n{log.read_text()[-4000:]}")
    finally:
        kill_tree(proc)  # normally nothing is left: a no-op
    return code, log.read_text()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (torchrun starts each worker in a session of its own, so no killpg)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                pass
    return found


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(proc: subprocess.Popen, known: list[int] = ()) -> None:
    """SIGKILL what is left of a run: torchrun's tree while torchrun runs (frozen first, so none forks or
    escapes), and the ``known`` pids still running dist_train. Nothing when all is gone."""
    def ours(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return alive(pid) and b"dist_train" in Path(f"/proc/{pid}/cmdline").read_bytes()
        return False

    pids: list[int] = []
    for _ in range(3):  # proc.poll() reaps torchrun only once it exited: its pid cannot be reused before
        pids = (process_tree(proc.pid) if proc.poll() is None else []) + [p for p in known if ours(p)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    """Poll ``condition()`` until it is truthy; fail (with the log) on timeout or if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout}s waiting for {what}:\n{log.read_text()[-4000:] if log else ''}")


def rows(out: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock values (time, throughput, data wait)."""
    lines = (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").is_file() else []
    return [{k: v for k, v in json.loads(line).items() if k != "time" and not k.startswith("perf/")} for line in lines]


def train_steps_logged(out: Path) -> list[int]:
    return [r["step"] for r in rows(out) if "train/loss" in r]


def status(out: Path) -> dict:
    return json.loads((out / "status.json").read_text())


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (its children, rank read from their environment)."""
    pids = {}
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that just ended
            continue
        for pid in children:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [e for e in env if e.startswith(b"RANK=")]
            if rank:
                pids[int(rank[0][5:])] = int(pid)
    return pids


def worker_exit_codes(output: str) -> dict[int, int]:
    """{rank: exit status} from torchrun's failure report (printed when a worker exits non-zero)."""
    found = re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\s+exitcode\s+: (-?\d+)", output)
    return {int(rank): int(code) for rank, code in found}


def resumed_line(output: str) -> tuple[str, int, int]:
    """(checkpoint, epoch, step) of the trainer's 'resumed from ...' line (exactly one expected)."""
    found = re.findall(r"resumed from (\S+) at epoch (\d+) step (\d+)", output)
    assert len(found) == 1, f"expected one resume, found {found}:\n{output[-3000:]}"
    path, epoch, step = found[0]
    return path, int(epoch), int(step)


def assert_same_rows(got: list[dict], want: list[dict], what: str) -> None:
    """Same rows with the same keys in the same order, numbers equal within fp32 tolerance."""
    assert [sorted(r) for r in got] == [sorted(r) for r in want], what
    for i, (a, b) in enumerate(zip(got, want)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), f"{what} row {i}"


def assert_same_run(out: Path, ref: Path, after_step: int = 0) -> None:
    """``out`` ended like the uninterrupted ``ref``: weights, history, metrics rows (after ``after_step``), results."""
    mine, theirs = (torch.load(p / "last.pt", weights_only=True) for p in (out, ref))
    assert (mine["step"], mine["epoch"]) == (theirs["step"], theirs["epoch"]) == (STEPS, EPOCHS)
    assert mine["model"].keys() == theirs["model"].keys()
    for k, v in theirs["model"].items():  # parameters and buffers (BatchNorm statistics)
        torch.testing.assert_close(mine["model"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert len(mine["state"]["history"]) == EPOCHS
    assert_same_rows(mine["state"]["history"], theirs["state"]["history"], "history")
    assert_same_rows([r for r in rows(out) if r["step"] > after_step], [r for r in rows(ref) if r["step"] > after_step],
                     "metrics.jsonl")
    a, b = results(out), results(ref)
    for key in ("top1", "top5", "loss", "per_class"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    for key in ("n_samples", "confusion", "steps", "epochs", "best_epoch"):
        assert a[key] == b[key], key


# ------------------------------------------------------------------------------------------- reference
@pytest.fixture(scope="module")
def reference(sample_shards, tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run is compared with."""
    out = tmp_path_factory.mktemp("faults_ref") / "run"
    code, output = launch(["--shards", str(sample_shards), "--out", str(out), *BASE], out.parent / "log.txt")
    assert code == 0, output[-4000:]
    assert train_steps_logged(out) == list(range(1, STEPS + 1))
    return out


def test_stop_on_the_last_step_of_epoch_1_then_resume_equals_uninterrupted(sample_shards, reference, tmp_path):
    """Regression: the stop lands after epoch 1's training but before its evaluation; the resumed run evaluates
    epoch 1 first. Its test metrics used to differ: rank 1 evaluated with its own BatchNorm statistics
    in the uninterrupted run but with rank 0's (from the checkpoint) after the resume."""
    out = tmp_path / "run"
    args = ["--shards", str(sample_shards), "--out", str(out), *BASE]
    code, output = launch(args, tmp_path / "stop.txt",
                          env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STOP_AT_STEP": str(STEPS_PER_EPOCH)})
    assert code == TORCHRUN_STOPPED, output[-4000:]
    assert worker_exit_codes(output) == {0: 75, 1: 75}, output[-3000:]  # both workers: "stopped to be resumed"
    st = status(out)
    assert st["state"] == "stopped" and st["exit_code"] == 75 and st["step"] == STEPS_PER_EPOCH
    ck = ckpt_io.load_checkpoint(st["checkpoint"])
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (3, 0, 3) and ck["state"]["history"] == []

    code, output = launch(args, tmp_path / "resume.txt")
    assert code == 0, output[-4000:]
    assert resumed_line(output) == (st["checkpoint"], 1, 3)
    assert_same_run(out, reference)


def test_resume_path_after_epoch_1_into_a_new_folder_equals_uninterrupted(sample_shards, reference, tmp_path):
    """``--resume PATH``: the reference's checkpoint written after epoch 1's evaluation, continued elsewhere."""
    start = ckpt_io.step_path(reference, STEPS_PER_EPOCH)
    out = tmp_path / "run"
    code, output = launch(["--shards", str(sample_shards), "--out", str(out), *BASE, "--resume", str(start)],
                          tmp_path / "log.txt")
    assert code == 0, output[-4000:]
    assert resumed_line(output) == (str(start), 2, STEPS_PER_EPOCH)
    assert train_steps_logged(out) == list(range(STEPS_PER_EPOCH + 1, STEPS + 1))
    # The reference's best.pt (which the restored best-so-far state names) was linked in; the run used to
    # crash at the end without it when no later epoch beat it.
    best = ckpt_io.load_checkpoint(out / "best.pt")["state"]["best_epoch"]
    assert best == ckpt_io.load_checkpoint(reference / "best.pt")["state"]["best_epoch"] == results(out)["best_epoch"]
    assert_same_run(out, reference, after_step=STEPS_PER_EPOCH)


def test_sigkill_of_a_worker_under_max_restarts_resumes_from_the_last_checkpoint(sample_shards, reference, tmp_path):
    """Rank 1 is SIGKILLed after step 5 (torchrun's first attempt only); the newest checkpoint is step 4's
    (mid-epoch 2, ``--ckpt-every-steps 2``); torchrun restarts both workers, which resume there."""
    out = tmp_path / "run"
    args = ["--shards", str(sample_shards), "--out", str(out), *BASE, "--ckpt-every-steps", "2", "--trace-samples"]
    code, output = launch(args, tmp_path / "log.txt", launcher=["--max-restarts=2"],
                          env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_KILL_AT_STEP": "5:1"})
    assert code == 0, output[-4000:]
    assert output.count("fresh start") == 1
    assert resumed_line(output) == (str(ckpt_io.step_path(out, 4)), 2, 4)
    res = results(out)
    assert res["steps"] == STEPS and res["epochs"] == EPOCHS
    assert res["steps_per_rank"] == [STEPS - 4, STEPS - 4]  # each rank ran steps 5..9 after the restart
    assert status(out)["state"] == "completed"
    assert train_steps_logged(out) == list(range(1, STEPS + 1))  # step 5 died before it was logged
    # The trace holds each step once per rank: what the killed attempt traced after step 4 was dropped.
    trace = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["rank"]) for r in trace] == [(s, r) for s in range(1, STEPS + 1) for r in (0, 1)]
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------- signals
LEGS = [  # (who gets the signal, signal): each leg stops the run, the next one resumes it
    ("rank 1", "SIGTERM"),
    ("rank 0", "SIGUSR1"),
    ("torchrun", "SIGTERM"),
    ("torchrun", "SIGUSR1"),  # forwarded only with --signals-to-handle (else it kills torchrun itself)
]


@pytest.fixture(scope="module")
def signal_chain(sample_shards, tmp_path_factory) -> dict:
    """One run stopped four times by real signals (each leg resuming the last), then run to the end;
    W&B offline. Records what each leg saw; the tests below judge it."""
    tmp = tmp_path_factory.mktemp("faults_signals")
    out, wandb_dir = tmp / "run", tmp / "wandb"
    args = ["--shards", str(sample_shards), "--out", str(out), *BASE, "--wandb", "offline"]
    env = {**WANDB_OFFLINE, "WANDB_DIR": str(wandb_dir)}
    legs = []
    for i, (target, sig) in enumerate(LEGS):
        log, tree = tmp / f"leg{i}.txt", []
        before = ckpt_io.load_checkpoint(out / "last.pt")["step"] if (out / "last.pt").is_file() else 0
        # 1 s after every step: the signal lands while the step after the first new one is running.
        proc = start_trainer(args, log, env={**env, "DIST_TRAIN_FAULT_INJECTION": "1",
                                             "DIST_TRAIN_TEST_STEP_DELAY": "1"},
                             launcher=SIGNALS_TO_HANDLE if sig == "SIGUSR1" and target == "torchrun" else [])
        try:
            wait_for(lambda b=before: any(s > b for s in train_steps_logged(out)), 150, f"a step after {before}",
                     proc, log)
            pid = proc.pid if target == "torchrun" else worker_pids(proc.pid)[int(target[-1])]
            tree = process_tree(proc.pid)  # torchrun, both workers, their DataLoader workers
            sent = time.monotonic()
            os.kill(pid, getattr(signal, sig))
            code = proc.wait(timeout=90)
            seconds = time.monotonic() - sent
            wait_for(lambda t=tree: not any(map(alive, t)), 15, "every process of the run to be gone", None, log)
        finally:
            kill_tree(proc, tree)  # normally nothing is left: a no-op
        st = status(out)
        # Loaded now: later legs prune old step checkpoints (--keep-last).
        ck = ckpt_io.load_checkpoint(st["checkpoint"]) if st.get("checkpoint") else {}  # weights_only=True
        legs.append({"target": target, "signal": sig, "before": before, "code": code, "seconds": seconds,
                     "output": log.read_text(), "status": st,
                     "last_step": ckpt_io.load_checkpoint(out / "last.pt")["step"],
                     "ckpt": {k: ck.get(k) for k in ("step", "epoch", "step_in_epoch")}})
    code, output = launch(args, tmp / "final.txt", env=env)
    return {"out": out, "wandb_dir": wandb_dir, "legs": legs, "final": (code, output)}


@pytest.mark.parametrize("leg", range(len(LEGS)), ids=[f"{s}-to-{t.replace(' ', '')}" for t, s in LEGS])
def test_stop_signal_saves_a_loadable_checkpoint_exits_as_documented_and_the_next_run_resumes(signal_chain, leg):
    legs = signal_chain["legs"]
    got = legs[leg]
    out, st = got["output"], got["status"]
    # Agreed at the next step, saved and exited within seconds (not killed by torchrun's SIGKILL fallback).
    assert got["code"] == TORCHRUN_STOPPED, out[-4000:]
    assert got["seconds"] < 30, got["seconds"]
    assert "SIGKILL" not in out, out[-3000:]
    assert st["state"] == "stopped" and st["exit_code"] == 75, st
    # Rank 0 names the signal it got; a signal to rank 1 reaches rank 0 through the all-reduced flag.
    assert st["signal"] == ("another rank" if got["target"] == "rank 1" else got["signal"]), st
    if got["target"].startswith("rank"):
        assert worker_exit_codes(out) == {0: 75, 1: 75}, out[-3000:]
    else:
        assert f"got signal: {getattr(signal, got['signal']).value}" in out  # torchrun: SignalException, exit 1
    assert st["step"] > got["before"]
    assert f"stopped by {st['signal']} at step {st['step']}: checkpoint saved, exit status 75" in out
    ck = got["ckpt"]
    assert ck["step"] == st["step"] == got["last_step"]
    assert ck["epoch"] * STEPS_PER_EPOCH + ck["step_in_epoch"] == ck["step"]
    next_output = legs[leg + 1]["output"] if leg + 1 < len(legs) else signal_chain["final"][1]
    assert resumed_line(next_output) == (st["checkpoint"], ck["epoch"] + 1, ck["step"])


def test_run_stopped_by_signals_ends_like_the_uninterrupted_run(signal_chain, reference):
    code, output = signal_chain["final"]
    assert code == 0, output[-4000:]
    stops = [leg["status"]["step"] for leg in signal_chain["legs"]]
    assert any(s % STEPS_PER_EPOCH for s in stops), stops  # at least one stop in the middle of an epoch
    assert train_steps_logged(signal_chain["out"]) == list(range(1, STEPS + 1))  # nothing repeated or skipped
    assert_same_run(signal_chain["out"], reference)


def test_wandb_offline_resumed_runs_keep_the_run_id_and_continue_from_the_resumed_step(signal_chain, reference):
    runs = sorted(Path(signal_chain["wandb_dir"]).rglob("offline-run-*/run-*.wandb"))  # named by start time
    assert len(runs) == len(LEGS) + 1, runs
    contents = [wandb_run_contents(r) for r in runs]
    run_id = torch.load(signal_chain["out"] / "last.pt", weights_only=True)["wandb_run_id"]
    assert run_id and [c[0] for c in contents] == [run_id] * len(runs)
    resumed_at = [0] + [leg["status"]["step"] for leg in signal_chain["legs"]]
    ends = [leg["status"]["step"] for leg in signal_chain["legs"]] + [STEPS]
    for (_, _, history), start, end in zip(contents, resumed_at, ends):
        steps = [h["_step"] for h in history]
        assert steps and min(steps) >= start and max(steps) <= end, (start, end, steps)
    # Together the runs hold the uninterrupted run's training curve, each step exactly once.
    losses = [(h["_step"], h["train/loss"]) for _, _, history in contents for h in history if "train/loss" in h]
    want = [(r["step"], r["train/loss"]) for r in rows(reference) if "train/loss" in r]
    assert [s for s, _ in losses] == [s for s, _ in want]
    assert [v for _, v in losses] == pytest.approx([v for _, v in want], rel=1e-5)


# ------------------------------------------------------------------------------------------- torn writes
def test_kill_during_checkpoint_write_keeps_the_previous_one_and_resume_cleans_the_tmp(sample_shards, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", str(sample_shards), "--out", str(out), *BASE]
    log = tmp_path / "killed.txt"
    proc = start_trainer([*args, "--ckpt-every-steps", "2"], log,
                         env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_PAUSE_BEFORE_RENAME": "2"})
    torn = f"checkpoint-tmp-written {ckpt_io.step_path(out, 4)}."  # NAME.<host>-<pid>.tmp: one per writer
    try:  # steps 2 and 3 save whole checkpoints (each write pausing 2 s); step 4's is killed mid-write
        wait_for(lambda: torn in log.read_text(), 180, "step 4's temp file", proc, log)
    finally:
        kill_tree(proc)
    assert len(list(out.glob("checkpoints/step-00000004.pt.*.tmp"))) == 1 and not ckpt_io.step_path(out, 4).exists()
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 3  # the previous checkpoint, intact
    assert ckpt_io.find_resume(out) == (ckpt_io.step_path(out, 3), [])

    # Resumed without step checkpoints and stopped after step 5: step 4 is never written again, so the
    # .tmp is gone because the start-up cleaned it, not because a later write replaced it.
    code, output = launch(args, tmp_path / "resume.txt",
                          env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STOP_AT_STEP": "5"})
    assert code == TORCHRUN_STOPPED, output[-4000:]
    assert resumed_line(output) == (str(ckpt_io.step_path(out, 3)), 2, 3)
    assert not list(out.rglob("*.tmp")) and not ckpt_io.step_path(out, 4).exists()
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 5 and status(out)["state"] == "stopped"
    assert train_steps_logged(out) == [1, 2, 3, 4, 4, 5]  # step 4 was logged, then lost with its checkpoint, redone


# ------------------------------------------------------------------------------------------- bad data
def trained_in_epoch_1(shards: Path) -> set[str]:
    """Keys the 2-process runs below (global batch 4, the default --val-fraction) train on in epoch 1."""
    plan = data.make_plan(load_manifest(shards), data.resolve_layout(2, 2), 0, 0, val_fraction=0.1)
    return {plan.train.keys[i] for i in plan.epoch_order(0)}


@pytest.fixture(scope="module")
def damaged(sample_shards, tmp_path_factory) -> dict:
    """Copies of the sample shards: ``both`` has a corrupt JPEG and a truncated shard in train and in test;
    ``jpeg`` only the corrupt train JPEG; ``truncated`` only the truncated test shard. The corrupt train
    sample is one that epoch 1 trains on."""
    root = tmp_path_factory.mktemp("damaged")
    m, trained = load_manifest(sample_shards), trained_in_epoch_1(sample_shards)
    pick = {"train-000001": next(k for k in m.shards["train"][1].keys if k in trained), "test-000000": None}
    made = {}
    for name, jpeg_in, cut in (("both", ("train-000001", "test-000000"), ("train-000002", "test-000001")),
                               ("jpeg", ("train-000001",), ()), ("truncated", (), ("test-000001",))):
        folder = root / name
        shutil.copytree(sample_shards, folder)
        keys = {s: corrupt_one_jpeg(sample_shards / f"{s}.tar", folder / f"{s}.tar", pick[s]) for s in jpeg_in}
        for s in cut:  # a train shard cut to its first 1000 bytes (nothing readable), a test one to half
            t = folder / f"{s}.tar"
            t.write_bytes(t.read_bytes()[: 1000 if s.startswith("train") else t.stat().st_size // 2])
        made[name] = (folder, keys)
    return made


def test_bad_samples_skipped_counted_and_logged_with_the_shard(damaged, tmp_path):
    shards, keys = damaged["both"]
    out = tmp_path / "run"
    # Every sample of the epoch's order is read, so both bad train shards are met in epoch 1.
    code, output = launch(["--shards", str(shards), "--out", str(out), *TINY, "--workers", "1", "--epochs", "1",
                           "--log-every", "1", "--on-bad-sample", "skip"], tmp_path / "log.txt")
    assert code == 0, output[-4000:]
    assert f"skipped bad data: shard train-000001.tar sample {keys['train-000001']}: " in output
    cut = set(load_manifest(shards).shards["train"][2].keys) & trained_in_epoch_1(shards)
    for key in cut:  # each sample of the cut shard, by key
        assert f"skipped bad data: shard train-000002.tar sample {key}: its members end at byte" in output, key
    res = results(out)
    skipped = [r["data/skipped_total"] for r in rows(out) if "data/skipped_total" in r]
    assert skipped[-1] == res["skipped_train_samples"] == 1 + len(cut)
    by_shard = {k: v for r in rows(out) for k, v in r.items() if k.startswith("data/skipped/")}
    assert set(by_shard) == {"data/skipped/train-000001.tar", "data/skipped/train-000002.tar"}
    # Evaluation: nothing silently lost; the unreadable count reaches results.json and the metrics.
    assert res["n_samples"] + res["unreadable"] == 8 and res["unreadable"] >= 2
    test_rows = [r for r in rows(out) if "test/unreadable" in r]
    assert test_rows and all(r["test/unreadable"] == res["unreadable"] for r in test_rows)
    assert f"test: unreadable data: shard test-000000.tar sample {keys['test-000000']}" in output
    assert "test: unreadable data: shard test-000001.tar" in output
    assert status(out)["state"] == "completed"


@pytest.mark.parametrize("case, shard", [("jpeg", "train-000001.tar"), ("truncated", "test-000001.tar")],
                         ids=["corrupt-jpeg-in-training", "truncated-shard-in-evaluation"])
def test_bad_data_with_on_bad_sample_error_fails_fast_naming_the_shard(damaged, case, shard, tmp_path):
    shards, keys = damaged[case]
    out = tmp_path / "run"
    start = time.monotonic()
    code, output = launch(["--shards", str(shards), "--out", str(out), *TINY, "--workers", "1", "--epochs", "1",
                           "--on-bad-sample", "error"], tmp_path / "log.txt", timeout=120)
    assert code == 1, output[-4000:]  # the failing worker exits 1 (torchrun: 1)
    assert time.monotonic() - start < 90  # no rank waits forever (in a collective, or for its loader workers)
    assert "BadDataError" in output and "--on-bad-sample skip" in output
    where = f"sample {keys['train-000001']!r} of shard {shard}" if case == "jpeg" else f"shard {shard}: "
    assert where in output, output[-4000:]
    assert status(out)["state"] == "failed"


def test_a_micro_batch_with_no_readable_clip_adds_nothing_and_no_rank_waits(damaged, tmp_path):
    """Batch 1 per process: the process that draws the corrupt clip has nothing to train on in that step. It
    still joins the gradient all-reduce (a zero contribution); the run ends normally."""
    shards, keys = damaged["jpeg"]
    out = tmp_path / "run"
    code, output = launch(["--shards", str(shards), "--out", str(out), *TINY, "--batch-size", "1", "--workers", "1",
                           "--epochs", "1", "--log-every", "1", "--test-every", "0"], tmp_path / "log.txt", timeout=150)
    assert code == 0, output[-4000:]
    assert f"skipped bad data: shard train-000001.tar sample {keys['train-000001']}: " in output
    res = results(out)
    assert res["skipped_train_samples"] == 1 and res["steps"] == 15 // 2 and res["replica_max_abs_diff"] == 0.0


@pytest.mark.parametrize("on_bad", ["skip", "error"])
def test_verify_shards_finds_a_shard_that_changed_after_packing(damaged, on_bad, tmp_path):
    shards, keys = damaged["jpeg"]  # train-000001.tar: one JPEG overwritten in place, same size
    code, output = launch(["--shards", str(shards), "--out", str(tmp_path / "run"), *TINY, "--workers", "1",
                           "--epochs", "1", "--verify-shards", "--on-bad-sample", on_bad], tmp_path / "log.txt",
                          nproc=None, timeout=150)
    reason = "train-000001.tar is not the file manifest.json lists (sha256"
    if on_bad == "error":
        assert code == 1 and f"shard train-000001.tar: {reason}" in output, output[-3000:]
        return
    assert code == 0 and f"--verify-shards: skipping shard train-000001.tar: {reason}" in output, output[-3000:]
    plan = data.make_plan(load_manifest(shards), data.resolve_layout(1, 2), 0, 0, val_fraction=0.1)  # this run's
    trained = set(load_manifest(shards).shards["train"][1].keys) & {plan.train.keys[i] for i in plan.epoch_order(0)}
    assert results(tmp_path / "run")["skipped_train_samples"] == len(trained) > 1  # the whole shard, not one JPEG


# ------------------------------------------------------------------------------------------- run folder
def test_resume_never_overwrite_starts_fresh_in_a_folder_with_checkpoints(sample_shards, reference, tmp_path):
    """(``--resume never`` without ``--overwrite`` refusing is in test_train_e2e.) One process: its own
    exit status is the documented 75 when stopped."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    assert len(list((out / "checkpoints").glob("step-*.pt"))) == 3
    code, output = launch(["--shards", str(sample_shards), "--out", str(out), *BASE, "--resume", "never",
                           "--overwrite"], tmp_path / "log.txt", nproc=None,
                          env={"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STOP_AT_STEP": "1"})
    assert code == 75, output[-4000:]
    assert "fresh start" in output and "resumed from" not in output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001.pt"]
    assert ckpt_io.load_checkpoint(out / "last.pt")["step"] == 1
    assert not (out / "results.json").exists() and not (out / "best.pt").exists()
    assert [r["step"] for r in rows(out)] == [1]  # the old run's metrics are gone too


def test_checkpoint_of_another_class_list_and_model_is_refused_saying_what_differs(reference, tmp_path):
    """(Each difference alone: test_checkpoint.py; --hidden-size through the CLI: test_train_e2e.py.)"""
    three = make_shards(make_videos(tmp_path / "videos", classes=3, clips=4), tmp_path / "shards3", shard_size=4)
    code, output = launch(["--shards", str(three), "--out", str(tmp_path / "run"), *BASE, "--model", "r3d_18",
                           "--resume", str(reference / "last.pt")], tmp_path / "log.txt", nproc=None)
    assert code == 2, output[-4000:]
    assert f"checkpoint {reference / 'last.pt'} does not fit this run" in output
    assert re.search(r"class list: checkpoint \['grow', 'shrink'\], shards \[.*'move_right'", output)
    assert "model: checkpoint 'cnn_rnn', this run 'r3d_18'" in output
    assert "parameters missing from the checkpoint" in output
    code, output = launch(["--shards", str(three), "--out", str(tmp_path / "run"), *BASE,
                           "--resume", str(tmp_path / "nothing.pt")], tmp_path / "log2.txt", nproc=None)
    assert code == 2 and "no such checkpoint file" in output, output[-4000:]


def test_a_checkpoint_of_another_format_version_is_refused_not_passed_over(reference, sample_shards, tmp_path):
    """A checkpoint written by another version of dist_train (another data order, other fields) is refused with a
    message saying what to do, by --resume PATH and by --resume auto (which must not start over silently)."""
    old = ckpt_io.load_checkpoint(ckpt_io.step_path(reference, STEPS_PER_EPOCH))
    old["format_version"] = 1
    torch.save(old, tmp_path / "old.pt")
    code, output = launch(["--shards", str(sample_shards), "--out", str(tmp_path / "run"), *BASE,
                           "--resume", str(tmp_path / "old.pt")], tmp_path / "log.txt", nproc=None)
    assert code == 2 and "checkpoint format 1, this code reads 2" in output and "retrain" in output, output[-3000:]
    out = tmp_path / "auto"
    (out / "checkpoints").mkdir(parents=True)
    torch.save(old, out / "checkpoints" / "step-00000003.pt")
    code, output = launch(["--shards", str(sample_shards), "--out", str(out), *BASE], tmp_path / "log2.txt")
    assert code == 1 and "checkpoint format 1" in output and "--resume never --overwrite" in output, output[-3000:]
    assert not (out / "last.pt").exists()  # nothing trained, nothing overwritten
