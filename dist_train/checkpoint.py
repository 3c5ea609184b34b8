"""Checkpoints: atomic writes by rank 0, the run folder's layout, resume discovery and compatibility.

Run folder::

    OUT/checkpoints/step-00001234.pt   the newest ``--keep-last`` step checkpoints
    OUT/last.pt                        the newest of them (hard link, or a copy where links fail)
    OUT/best.pt                        the model with the best validation top-1 so far (written before
                                       the last.pt of the same step, so last.pt never names a best.pt
                                       that is not there; its state names its run, epoch and step)

Every file is written as ``NAME.<host>-<pid>.tmp`` and renamed with ``os.replace``, so a kill at any moment
leaves the previous file intact; leftover ``*.tmp`` files are deleted by ``clean_tmp`` when a run starts
(holding the run folder's lock, see ``dist_train.run_folder``).
Rank 0 writes, then all ranks meet at a barrier.

A checkpoint is a dict of tensors and plain Python values (loadable with ``weights_only=True``):
``format_version``, ``model`` (unwrapped state dict: no ``module.``/``_orig_mod.`` prefixes),
``optimizer``, ``scheduler``, ``scaler``, ``epoch`` (the epoch being trained), ``step_in_epoch``
(optimizer steps of that epoch already done), ``step`` (global optimizer steps), ``data`` (the
global data position: ``epoch``, ``samples_consumed``, ``global_batch`` and the ``digest`` of the shard
set, see ``dist_train.data.plan``), ``rng`` (per-rank RNG states), ``state`` (the trainer's
``TrainState``: per-epoch ``history``, the best validation top-1 and its epoch, ...), ``config``
(resolved), ``classes``,
``packing`` (frames, temporal_views, short_side, quality, min_frames of the shards: how predict prepares raw
videos),
``world_size``, ``wandb_run_id``, ``kind`` (``"last"`` or ``"best"``) and ``time``.

Test hook (with ``DIST_TRAIN_FAULT_INJECTION=1``, see ``dist_train.faults``):
``DIST_TRAIN_TEST_PAUSE_BEFORE_RENAME=SECONDS`` makes rank 0 print
``checkpoint-tmp-written PATH`` to stderr and sleep that long between writing a temp file and renaming
it, so a test can kill the run in the middle of a checkpoint write.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_train import faults

FORMAT_VERSION = 2  # 2: the global data order (``data`` is a global position, the config has global_batch)
TMP_SUFFIX = ".tmp"
STEP_DIR = "checkpoints"
LAST, BEST = "last.pt", "best.pt"
# Config fields that change the model's parameters: a checkpoint must agree on all of them.
MODEL_FIELDS = ("model", "rnn", "hidden_size", "rnn_layers", "bidirectional", "head")
REQUIRED_KEYS = ("format_version", "model", "optimizer", "epoch", "step", "config", "classes")

log = logging.getLogger("dist_train")


class CheckpointMismatch(faults.ConfigError):
    """A checkpoint does not fit the model or data of this run; the message says what differs."""


class CheckpointVersionError(faults.ConfigError):
    """A whole checkpoint written by another version of dist_train: never passed over silently."""


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _pause_hook(tmp: Path) -> None:
    delay = float(faults.fault_hook("DIST_TRAIN_TEST_PAUSE_BEFORE_RENAME") or 0)
    if delay > 0:
        print(f"checkpoint-tmp-written {tmp}", file=sys.stderr, flush=True)
        time.sleep(delay)


def _tmp_name(path: Path) -> Path:
    """``NAME.<host>-<pid>.tmp``: unique per writer, so two writers never write into one temp file."""
    return path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}{TMP_SUFFIX}")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file of this writer, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    _pause_hook(tmp)
    os.replace(tmp, path)


def _link_atomic(src: Path, dst: Path) -> None:
    tmp = _tmp_name(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links
        shutil.copy2(src, tmp)
    _pause_hook(tmp)
    os.replace(tmp, dst)


def step_path(out: Path, step: int) -> Path:
    """Where the step checkpoint of ``step`` lives."""
    return Path(out) / STEP_DIR / f"step-{step:08d}.pt"


def save_last(state: dict, out: Path, keep_last: int, best: bool = False) -> Path:
    """Write the step checkpoint, then best.pt when ``best``, then point last.pt at the step checkpoint and
    prune old ones (call on rank 0 only).

    In this order a kill at any moment leaves a consistent folder: a resume takes the newest step
    checkpoint, and the best.pt it names is either there or is that checkpoint itself (``adopt_best``
    writes it again from it).
    """
    path = step_path(out, state["step"])
    atomic_save({**state, "kind": "last"}, path)
    if best:
        save_best(state, out)
    _link_atomic(path, Path(out) / LAST)
    for old in sorted((Path(out) / STEP_DIR).glob("step-*.pt"))[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def save_best(state: dict, out: Path) -> Path:
    """Write best.pt (call on rank 0 only)."""
    path = Path(out) / BEST
    atomic_save({**state, "kind": "best"}, path)
    return path


def best_matches(best: dict, ckpt: dict) -> bool:
    """Whether ``best`` is the best.pt that ``ckpt``'s state names: the same run, best epoch and step."""
    ours, theirs = best.get("state", {}), ckpt.get("state", {})
    return (ours.get("run_id") == theirs.get("run_id") and ours.get("best_epoch") == theirs.get("best_epoch")
            and best.get("step") == theirs.get("best_step", best.get("step")))


def adopt_best(source: Path, ckpt: dict, out: Path) -> bool:
    """Make sure ``out`` has the best.pt that ``ckpt`` (loaded from ``source``) refers to (rank 0 only).

    A best.pt in ``out`` that is not the one ``ckpt`` names (another run's, or one written after
    ``ckpt`` by a run killed before its next last.pt) is moved aside to ``best-unmatched-<time>.pt``,
    never used. Resuming from a checkpoint of another run folder (``--resume PATH``) links that
    folder's best.pt in when it is the one named. False when none fits: model selection starts over.
    """
    dst = Path(out) / BEST
    if dst.is_file():
        try:
            if best_matches(load_checkpoint(dst), ckpt):
                return True
        except (OSError, ValueError):
            pass
        aside = dst.with_name(f"best-unmatched-{time.strftime('%Y%m%d-%H%M%S')}.pt")
        os.replace(dst, aside)
        log.warning(f"{dst} is not the best.pt the checkpoint {source} names (run, epoch "
                    f"{ckpt.get('state', {}).get('best_epoch')}): moved to {aside}")
    if ckpt.get("state", {}).get("best_step") == ckpt.get("step"):  # the checkpoint is the best model itself
        save_best({k: v for k, v in ckpt.items() if k != "kind"}, out)
        return True
    source = Path(source)
    src = (source.parent.parent if source.parent.name == STEP_DIR else source.parent) / BEST
    try:
        best = load_checkpoint(src)
    except (OSError, ValueError):
        return False
    if not best_matches(best, ckpt):
        return False
    _link_atomic(src, dst)
    return True


def clean_tmp(out: Path) -> list[Path]:
    """Delete incomplete ``*.tmp`` checkpoint files left by a killed run; returns what was removed."""
    out = Path(out)
    found = [p for d in (out, out / STEP_DIR) if d.is_dir() for p in d.glob(f"*.pt*{TMP_SUFFIX}")]
    for p in found:
        p.unlink(missing_ok=True)
    return found


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True`` on the CPU; ValueError when it is not one of our checkpoints."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{path} is not a loadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise ValueError(f"{path} is not a dist_train checkpoint (keys {REQUIRED_KEYS} expected)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{path} has checkpoint format {ckpt['format_version']}, this code reads {FORMAT_VERSION}: it was "
            "written by another version of dist_train (another data order); retrain, or resume or evaluate it with "
            "that version")
    return ckpt


def checkpoint_candidates(out: Path) -> list[Path]:
    """Resumable files in a run folder, newest first (step checkpoints, then last.pt)."""
    out = Path(out)
    steps = sorted((out / STEP_DIR).glob("step-*.pt"), reverse=True) if (out / STEP_DIR).is_dir() else []
    last = [out / LAST] if (out / LAST).is_file() else []
    return steps + last


def find_resume(out: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint in ``out`` that loads, and why newer ones were passed over."""
    problems = []
    for path in checkpoint_candidates(out):
        try:
            load_checkpoint(path)
            return path, problems
        except CheckpointVersionError as e:
            raise CheckpointVersionError(f"{e}; or pass --resume never --overwrite to start a new run in {out}, "
                                         "or another --out") from None
        except (ValueError, OSError) as e:
            problems.append(f"{path}: {e}")
    return None, problems


def check_compatible(ckpt: dict, config: dict, classes: list[str], model: torch.nn.Module, source: str) -> None:
    """Raise CheckpointMismatch saying what differs between ``ckpt`` and this run's model/classes."""
    diffs = []
    if list(ckpt["classes"]) != list(classes):
        diffs.append(f"class list: checkpoint {list(ckpt['classes'])}, shards {list(classes)}")
    for key in MODEL_FIELDS:
        theirs, ours = ckpt["config"].get(key), config.get(key)
        if theirs != ours:
            diffs.append(f"{key}: checkpoint {theirs!r}, this run {ours!r}")
    own = model.state_dict()
    theirs_sd = ckpt["model"]
    missing, unexpected = sorted(set(own) - set(theirs_sd)), sorted(set(theirs_sd) - set(own))
    if missing:
        more = " ..." if len(missing) > 5 else ""
        diffs.append(f"parameters missing from the checkpoint: {', '.join(missing[:5])}{more}")
    if unexpected:
        more = " ..." if len(unexpected) > 5 else ""
        diffs.append(f"parameters this model lacks: {', '.join(unexpected[:5])}{more}")
    shapes = [f"{k} {tuple(theirs_sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in theirs_sd and tuple(theirs_sd[k].shape) != tuple(v.shape)]
    if shapes:
        diffs.append("shapes (checkpoint vs this model): " + "; ".join(shapes[:5]))
    if diffs:
        raise CheckpointMismatch(
            f"checkpoint {source} does not fit this run:\n  " + "\n  ".join(diffs)
            + "\nUse a matching --model/--hidden-size/... and shard folder, or a new --out"
            " (or --resume never --overwrite)."
        )


def load_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """The model stored in a training checkpoint (eval mode, CPU) and the checkpoint itself."""
    from dist_train.models import build_model

    ckpt = load_checkpoint(path)
    cfg = ckpt["config"]
    model = build_model(cfg["model"], len(ckpt["classes"]), rnn=cfg["rnn"], hidden=cfg["hidden_size"],
                        layers=cfg["rnn_layers"], bidirectional=cfg["bidirectional"], dropout=cfg["dropout"],
                        head=cfg["head"])
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt
