"""Stopping on signals, exit statuses, the run's status file, and test hooks for fault-injection.

Exit status of ``python -m dist_train`` and of every torchrun worker:

    0    finished: all epochs trained, results.json written
    75   stopped to be resumed (EX_TEMPFAIL): a stop signal arrived, every rank agreed at the next step,
         rank 0 saved a checkpoint at the step reached; rerun the same command (``--resume auto``).
         Also after a second stop signal, or a stop while the data is stuck (see below): then at once,
         without a new checkpoint (the last complete one is kept)
    2    bad configuration or arguments (nothing trained)
    1    any other error: a data error (a damaged manifest or shard, a stuck read: its message names the
         file) or a bug (with its traceback)
    130  KeyboardInterrupt outside the training loop's signal handling

torchrun itself exits 0 when all workers exit 0 and 1 otherwise (it does not pass 75 on), and with
``--max-restarts K`` it restarts workers that exit non-zero. So a launcher decides from
``OUT/status.json``, which rank 0 rewrites atomically: ``{"state": "running" | "stopped" |
"completed" | "failed", "exit_code", "epoch", "step", "signal", "checkpoint", "time"}``.

Signals: SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGHUP set a flag in the training process (signals
within 2 s of the first count as one: Ctrl-C under torchrun reaches a worker twice).
The training loop all-reduces the flag with MAX once per optimizer step, so all ranks stop after the
same step; a signal during evaluation is acted on right after it, one during set-up after the first
step. The handler stays installed to the end, and ``ignore_stop_signals`` covers interpreter
shutdown, because torchrun SIGTERMs the remaining workers as soon as one exits. DataLoader workers
ignore these signals and are shut down by their parent. SIGKILL stops a run at once (the last
checkpoint stays valid). Seen with torchrun 2.14 (2 CPU workers): SIGTERM or SIGUSR1 to one worker,
and SIGTERM, SIGINT or SIGUSR1 (forwarded, see below) to torchrun, each ended within about 4 s with a
checkpoint at the step reached and status.json "stopped" (workers exit 75); torchrun forwards SIGTERM,
SIGINT, SIGHUP and SIGQUIT by default and needs ``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGUSR1,
SIGUSR2`` to forward SLURM's SIGUSR1/2 (without it a SIGUSR1 kills torchrun itself, workers orphaned).

Stuck data: every wait for a batch is bounded by ``--data-timeout`` (the DataLoader's timeout; the error
names the shards of the batch it waited for). After a stop signal, a wait that sees no batch for
``--stop-timeout`` seconds exits at once, and so does a second stop signal: status "stopped", exit 75,
the DataLoader workers killed (they ignore the stop signals), the last complete checkpoint kept.

Restarts: under ``torchrun --max-restarts K`` a worker killed mid-run makes torchrun restart all
workers, which resume from the newest checkpoint (see ``dist_train.distributed`` for the store
prefix that makes torchrun 2.14's restarts work at all).

Fault injection, for tests only. The hooks below act only when ``DIST_TRAIN_FAULT_INJECTION=1`` is
set as well; without it a set hook is ignored (one warning says so), so a stray variable in a job's
environment cannot stop, slow or kill a real run. When active, each hook logs a loud warning once per
process. Read on every step:

    DIST_TRAIN_TEST_STEP_DELAY=SECONDS   sleep after every optimizer step (time to send a signal mid-epoch)
    DIST_TRAIN_TEST_STOP_AT_STEP=N       behave as if a stop signal arrived on rank 0 when global step N is done
    DIST_TRAIN_TEST_KILL_AT_STEP=N[:R]   SIGKILL this process (rank R, default 0) when step N is done, on
                                         torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0/unset)
    DIST_TRAIN_TEST_PAUSE_BEFORE_RENAME  see ``dist_train.checkpoint``
    DIST_TRAIN_TEST_HANG_ON_KEY=KEY      a loader worker hangs (sleeps an hour) when it is to read sample KEY
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from preprocess.shard_format import write_json_atomic

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_STOPPED = 75
EXIT_INTERRUPTED = 130
STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")
STATUS_FILE = "status.json"
FAULT_INJECTION = "DIST_TRAIN_FAULT_INJECTION"  # =1: the DIST_TRAIN_TEST_* hooks act (tests only)

log = logging.getLogger("dist_train")
_announced: set[str] = set()


class DataStall(RuntimeError):
    """No batch came within ``--data-timeout``; the message names the shards of the batch waited for."""


class ConfigError(ValueError):
    """The run cannot start as configured (exit status 2); the message says what to change."""


class StopRequest:
    """Flag set by stop signals; installed in the training process's main thread.

    A stop is a stop even when the data is stuck: the training loop marks each wait for a batch
    (``waiting_since``), and once a stop signal has arrived, a wait that sees no batch for
    ``stuck_after`` seconds exits at once (``exit_now``: status "stopped", exit status 75, the last
    complete checkpoint kept). A second stop signal, more than ``SAME_STOP_S`` after the first, exits
    at once too, wherever the process is.
    """

    SAME_STOP_S = 2.0  # Ctrl-C under torchrun reaches a worker twice (terminal and forwarded): one stop

    def __init__(self, stuck_after: float = 30.0) -> None:
        self.signal: str | None = None
        self.stuck_after = stuck_after
        self.waiting_since: float | None = None  # set by the training loop while it waits for a batch
        self.status_out: Path | None = None  # rank 0's run folder: where exit_now records the stop
        self._first = 0.0

    @property
    def requested(self) -> bool:
        """True once a stop signal (or the test hook) arrived."""
        return self.signal is not None

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal, self._first = name, time.monotonic()
            threading.Thread(target=self._watch, name="stop-watch", daemon=True).start()
        elif time.monotonic() - self._first > self.SAME_STOP_S:
            self.exit_now(f"a second stop signal ({name})")

    def _watch(self) -> None:
        """After the first signal: exit once the training loop has waited ``stuck_after`` s for a batch."""
        while True:
            time.sleep(0.25)
            since = self.waiting_since
            if since is not None and time.monotonic() - max(since, self._first) > self.stuck_after:
                self.exit_now(f"no batch came for {self.stuck_after:g} s after the stop signal (the data is stuck)")

    def exit_now(self, why: str) -> None:
        """Exit this process at once (status 75): the last complete checkpoint stays, nothing newer is saved."""
        sys.stderr.write(f"[dist_train] stopping now after {why}: no new checkpoint, the last complete one is "
                         "kept; run the same command again to resume from it\n")
        sys.stderr.flush()
        if self.status_out is not None:
            try:
                write_status(self.status_out, "stopped", exit_code=EXIT_STOPPED, signal=self.signal,
                             note=f"exited at once after {why}, without a new checkpoint")
            except OSError:
                pass
        kill_workers()
        os._exit(EXIT_STOPPED)

    def install(self) -> StopRequest:
        """Route the stop signals to the flag for the rest of the process's life; returns self."""
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)
        return self


def kill_workers() -> None:
    """SIGKILL this process's multiprocessing children (DataLoader workers ignore the stop signals, and one
    stuck in a read would otherwise keep the exit waiting for it forever)."""
    for child in multiprocessing.active_children():
        child.kill()


def ignore_stop_signals() -> None:
    """Ignore the stop signals from now on: for a process that is about to exit.

    Python resets handlers to the default (terminate) during interpreter shutdown, so a SIGTERM that
    torchrun sends once another rank has exited would turn this rank's clean exit into a kill;
    ignored signals are left ignored.
    """
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def release_frames(exc: BaseException) -> None:
    """Drop what the finished frames of ``exc``'s traceback (and of its chained exceptions) hold.

    A DataLoader error keeps the loader's iterator alive through those frames (in a reference cycle),
    so its workers are never told to stop; they ignore SIGTERM, so multiprocessing's exit handler,
    which terminates and then joins them, would wait forever and the rank would never exit. Dropping
    the references shuts the workers down now. (``gc.collect()`` is no cure: collecting the cycle
    closes the loader's queues before the iterator can send its workers the stop message.)
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)  # the frames still running are left alone
        exc = exc.__cause__ or exc.__context__


def write_status(out: Path, state: str, **info) -> None:
    """Rewrite ``OUT/status.json`` atomically (rank 0 only)."""
    write_json_atomic(Path(out) / STATUS_FILE, {"state": state, "time": time.time(), **info})


def fault_hook(name: str) -> str:
    """The value of fault-injection variable ``name``, or "" unless ``DIST_TRAIN_FAULT_INJECTION=1`` opts in.

    Either way a set variable is announced once per process: a loud warning when active, a note that
    it is ignored otherwise.
    """
    value = os.environ.get(name, "")
    if not value:
        return ""
    active = os.environ.get(FAULT_INJECTION) == "1"
    if name not in _announced:
        _announced.add(name)
        if active:
            log.warning("FAULT INJECTION ACTIVE (tests only): %s=%s; unset %s for real runs", name, value,
                        FAULT_INJECTION)
        else:
            log.warning("%s=%s is ignored: fault-injection hooks act only with %s=1 (tests only); unset it",
                        name, value, FAULT_INJECTION)
    return value if active else ""


def _env_int(name: str) -> tuple[int, int] | None:
    value = fault_hook(name)
    if not value:
        return None
    step, _, rank = value.partition(":")
    return int(step), int(rank or 0)


def after_step_hooks(step: int, rank: int, stop: StopRequest) -> None:
    """Run the fault-injection hooks configured in the environment after global step ``step`` (tests only)."""
    delay = float(fault_hook("DIST_TRAIN_TEST_STEP_DELAY") or 0)
    if delay > 0:
        time.sleep(delay)
    at = _env_int("DIST_TRAIN_TEST_STOP_AT_STEP")
    if at and step == at[0] and rank == 0 and not stop.requested:
        stop.signal = "DIST_TRAIN_TEST_STOP_AT_STEP"
    at = _env_int("DIST_TRAIN_TEST_KILL_AT_STEP")
    if at and step == at[0] and rank == at[1] and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
