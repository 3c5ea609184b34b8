"""Stopping on signals, exit statuses, the run's status file, and test hooks for fault-injection.

Exit status of ``python -m dist_train`` and of every torchrun worker:

    0    finished: all epochs trained, results.json written
    75   stopped to be resumed (EX_TEMPFAIL): a stop signal arrived, every rank agreed at the next step,
         rank 0 saved a checkpoint at the step reached; rerun the same command (``--resume auto``)
    2    bad configuration or arguments (nothing trained)
    1    any other error (the traceback says which)
    130  KeyboardInterrupt outside the training loop's signal handling

torchrun itself exits 0 when all workers exit 0 and 1 otherwise (it does not pass 75 on), and with
``--max-restarts K`` it restarts workers that exit non-zero. So a launcher decides from
``OUT/status.json``, which rank 0 rewrites atomically: ``{"state": "running" | "stopped" |
"completed" | "failed", "exit_code", "epoch", "step", "signal", "checkpoint", "time"}``.

Signals: SIGTERM, SIGINT, SIGUSR1, SIGUSR2 and SIGHUP only set a flag in the training process (the
handler does nothing else, also on repeated signals: Ctrl-C under torchrun reaches a worker twice).
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

Restarts: under ``torchrun --max-restarts K`` a worker killed mid-run makes torchrun restart all
workers, which resume from the newest checkpoint (see ``dist_train.distributed`` for the store
prefix that makes torchrun 2.14's restarts work at all).

Test hooks (environment variables, read on every step; unset in normal runs):

    DIST_TRAIN_TEST_STEP_DELAY=SECONDS   sleep after every optimizer step (time to send a signal mid-epoch)
    DIST_TRAIN_TEST_STOP_AT_STEP=N       behave as if a stop signal arrived on rank 0 when global step N is done
    DIST_TRAIN_TEST_KILL_AT_STEP=N[:R]   SIGKILL this process (rank R, default 0) when step N is done, on
                                         torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT 0/unset)
    DIST_TRAIN_TEST_PAUSE_BEFORE_RENAME  see ``dist_train.checkpoint``
"""

from __future__ import annotations

import os
import signal
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


class ConfigError(ValueError):
    """The run cannot start as configured (exit status 2); the message says what to change."""


class StopRequest:
    """Flag set by stop signals; installed in the training process's main thread."""

    def __init__(self) -> None:
        self.signal: str | None = None

    @property
    def requested(self) -> bool:
        """True once a stop signal (or the test hook) arrived."""
        return self.signal is not None

    def _handle(self, signum: int, frame) -> None:
        # Only the flag: Ctrl-C under torchrun reaches a worker twice (from the terminal and forwarded),
        # so a second signal must not mean "die now" either.
        self.signal = self.signal or signal.Signals(signum).name

    def install(self) -> StopRequest:
        """Route the stop signals to the flag for the rest of the process's life; returns self."""
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)
        return self


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


def _env_int(name: str) -> tuple[int, int] | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    step, _, rank = value.partition(":")
    return int(step), int(rank or 0)


def after_step_hooks(step: int, rank: int, stop: StopRequest) -> None:
    """Run the test hooks configured in the environment after global step ``step``."""
    delay = float(os.environ.get("DIST_TRAIN_TEST_STEP_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)
    at = _env_int("DIST_TRAIN_TEST_STOP_AT_STEP")
    if at and step == at[0] and rank == 0 and not stop.requested:
        stop.signal = "DIST_TRAIN_TEST_STOP_AT_STEP"
    at = _env_int("DIST_TRAIN_TEST_KILL_AT_STEP")
    if at and step == at[0] and rank == at[1] and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:
        os.kill(os.getpid(), signal.SIGKILL)
