"""What protects a run folder (``--out``): one run at a time, and files replaced by ``--overwrite`` kept
until the new run has saved.

The lock: rank 0 creates ``OUT/.lock`` with ``O_CREAT | O_EXCL`` (atomic on local file systems and on
NFSv3+), holding the holder's host, pid, SLURM job and torchrun run id. A second run with the same
``--out`` refuses at once, naming the holder. A lock is stale, and taken over with a warning, when its
holder is this run's own earlier incarnation (the same SLURM job restarted or requeued, or the same
torchrun run restarting its workers) or a process of this host that no longer exists. Any other lock
stays: if its run is really gone (e.g. killed on another machine), delete the file.

``--resume never --overwrite``: the previous run's files are moved into ``OUT/.replaced-<time>/`` once
this run's configuration, data and model were checked, deleted when this run saves its first checkpoint,
and moved back if it stops or fails before that.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

from dist_train.distributed import DistInfo, broadcast_object
from dist_train.faults import ConfigError
from preprocess import lockfile

log = logging.getLogger("dist_train")

LOCK_FILE = ".lock"
REPLACED_PREFIX = ".replaced-"


def _me() -> dict:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": env.get("SLURM_JOB_ID"),
            "slurm_restart": env.get("SLURM_RESTART_COUNT", "0"), "torchrun_run": env.get("TORCHELASTIC_RUN_ID"),
            "token": uuid.uuid4().hex, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"


def _stale(holder: dict, me: dict) -> str | None:
    """Why ``holder`` can no longer be running, or None."""
    if holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"] \
            and holder.get("slurm_restart") != me["slurm_restart"]:
        return "an earlier run of this SLURM job"
    if holder.get("torchrun_run") and holder["torchrun_run"] == me["torchrun_run"] and holder.get("pid") != me["pid"]:
        return "an earlier attempt of this torchrun run"
    if holder.get("host") == me["host"] and not lockfile.pid_alive(holder.get("pid")):
        return "its process no longer exists"
    return None


class RunLock:
    """Rank 0's hold on a run folder; ``release`` removes the lock file if it is still ours."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder

    @classmethod
    def acquire(cls, out: Path) -> RunLock:
        """Take ``OUT/.lock`` or raise ConfigError naming the run that holds it."""
        out.mkdir(parents=True, exist_ok=True)
        path, me = out / LOCK_FILE, _me()
        for _ in range(3):
            if not lockfile.create(path, me):
                holder = lockfile.read(path)
                why = _stale(holder, me) if holder else _torn(path)
                if why is None:
                    raise ConfigError(
                        f"{out} is in use by another run ({_describe(holder or {})}): wait for it to finish or use "
                        f"another --out; if that run is no longer running (e.g. killed on another machine), delete "
                        f"{path}") from None
                log.warning(f"taking over the lock of {out} from {_describe(holder or {})}: {why}")
                path.unlink(missing_ok=True)
                continue
            return cls(path, me)
        raise ConfigError(f"could not take the lock {path}: another run keeps creating it")

    def release(self) -> None:
        lockfile.release(self.path, self.holder)


def claim(out: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes the run folder's lock (returned; None on other ranks); every rank hears a refusal."""
    lock, refusal = None, None
    if info.is_main:
        try:
            lock = RunLock.acquire(out)
        except ConfigError as e:
            refusal = str(e)
    refusal = broadcast_object(refusal)
    if refusal:
        raise ConfigError(refusal)
    return lock


def _torn(path: Path) -> str | None:
    """A lock file that cannot be read: being written right now, or left torn by a crash long ago."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "it is gone"
    return "it is unreadable and older than a minute" if age > 60 else None


class Replaced:
    """The previous run's files, moved aside by ``--resume never --overwrite`` (rank 0)."""

    NAMES = ("checkpoints", "last.pt", "best.pt", "config.json", "metrics.jsonl", "results.json", "samples.jsonl",
             "validation.json", "status.json", "curves.png")

    def __init__(self, out: Path):
        self.out = out
        self.folder = out / f"{REPLACED_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        self.moved: list[str] = []

    def move_aside(self) -> None:
        names = [n for n in self.NAMES if (self.out / n).exists()] + \
            sorted(p.name for p in self.out.glob("confusion_*.png"))
        if not names:
            return
        self.folder.mkdir()
        for name in names:
            os.replace(self.out / name, self.folder / name)
            self.moved.append(name)
        log.info(f"--overwrite: moved the previous run's files ({', '.join(self.moved)}) to {self.folder}; they "
                 "are deleted once this run saves its first checkpoint")

    def drop(self) -> None:
        """This run has saved: the previous run's files go."""
        if self.moved:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.moved = []

    def put_back(self) -> None:
        """This run saved nothing: the previous run's files return where they were."""
        if not self.moved:
            return
        for name in self.moved:
            target = self.out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            os.replace(self.folder / name, target)
        self.folder.rmdir()
        log.warning(f"this run stopped before its first checkpoint: the previous run's files are back in {self.out}")
        self.moved = []
