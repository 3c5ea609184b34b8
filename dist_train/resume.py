"""Resuming a run: which checkpoint (``--resume``), whether it fits this run's data plan, and restoring
the optimizer, schedule, scaler, run state and RNG from it.

Rank 0 picks the checkpoint (or refuses) and every rank gets the same answer; every rank then reads the
file, so with several nodes ``--out`` must be on a shared file system. ``--resume PATH`` from another
run folder links that folder's best.pt into ``--out`` (``checkpoint.adopt_best``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from dist_train import checkpoint as ckpt_io
from dist_train.config import TrainConfig
from dist_train.distributed import DistInfo, broadcast_object
from dist_train.faults import ConfigError
from dist_train.locations import public

log = logging.getLogger("dist_train")

@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint (with the epoch's metric sums so far)."""

    epoch: int = 0  # the epoch being trained (== epochs when training is done)
    step: int = 0  # optimizer steps done in total
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    best_top1: float = -1.0
    best_loss: float = float("inf")  # validation loss of the best epoch: breaks top-1 ties
    best_epoch: int = -1
    best_step: int = -1  # the step at which best.pt was saved (best.pt's own step)
    run_id: str = ""  # names this run in each of its checkpoints, so a best.pt of another run is never used
    skipped: int = 0  # bad training samples skipped so far (all ranks)
    history: list = field(default_factory=list)  # one dict of metrics per finished epoch


# The data order, the validation set and the position in them depend on these: a resume keeps them.
DATA_FIELDS = ("seed", "val_fraction", "shuffle_window")


def choose_checkpoint(cfg: TrainConfig, out: Path, info: DistInfo) -> Path | None:
    """The checkpoint to resume from (None: a fresh start); ConfigError saying what to do when refused."""
    answer = _choose(cfg, out) if info.is_main else None
    kind, value = broadcast_object(answer)
    if kind == "error":
        raise ConfigError(value)
    return Path(value) if value else None


def _choose(cfg: TrainConfig, out: Path) -> tuple[str, str | None]:
    """Rank 0's answer: ``("ok", path or None)`` or ``("error", message)``."""
    out.mkdir(parents=True, exist_ok=True)
    ckpt_io.clean_tmp(out)
    if cfg.resume == "auto":
        try:
            path, problems = ckpt_io.find_resume(out)
        except ckpt_io.CheckpointVersionError as e:  # every rank must hear of it, or they would wait
            return "error", str(e)
        for p in problems:
            log.info(f"passing over unloadable checkpoint {p}")
        return "ok", str(path) if path else None
    if cfg.resume == "never":
        existing = ckpt_io.checkpoint_candidates(out)
        if existing and not cfg.overwrite:
            return "error", (f"{out} already holds checkpoints ({existing[0].name}, ...): pass --resume auto to "
                             "continue that run, or --overwrite to start over")
        return "ok", None  # with --overwrite the old files are moved aside once this run is checked
    if Path(cfg.resume).is_file():
        return "ok", cfg.resume
    return "error", f"--resume {cfg.resume}: no such checkpoint file (use auto, never or a path)"


def load(source: Path) -> dict:
    """The checkpoint to resume from; one that does not load is the --resume argument's fault (exit 2)."""
    try:
        return ckpt_io.load_checkpoint(source)
    except ValueError as e:
        raise ConfigError(f"--resume: {e}") from e


def kept_global_batch(cfg: TrainConfig, ckpt: dict | None, digest: str) -> int | None:
    """The global batch this run must use: the checkpoint's (refusing a different ``--global-batch``, data
    order flags or shard set: ConfigError) or ``--global-batch`` on a fresh start."""
    if ckpt is None:
        return cfg.global_batch
    theirs = ckpt["config"]["global_batch"]
    if cfg.global_batch is not None and cfg.global_batch != theirs:
        raise ConfigError(f"the checkpoint was trained with --global-batch {theirs}, this run asks for "
                         f"{cfg.global_batch}: pass --global-batch {theirs} to continue it (the same samples in "
                         "the same order), or start a new run in another --out")
    changed = [f"--{k.replace('_', '-')} {ckpt['config'][k]} (this run: {getattr(cfg, k)})"
               for k in DATA_FIELDS if ckpt["config"][k] != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"the checkpoint was trained with {', '.join(changed)}: pass the same values to "
                         "continue it (its data order and validation set depend on them), or start a new "
                         "run in another --out")
    if ckpt["data"].get("digest") != digest:
        raise ConfigError(f"{public(cfg.shards)} is not the shard set the checkpoint was trained on (its manifest's "
                         "training shards differ: re-packed?): resume on those shards, or start a new run "
                         "in another --out")
    return theirs


def restore_training(stepper, ckpt: dict, scheduler_name: str) -> None:
    """Optimizer, LR schedule and grad scaler state; ConfigError when the optimizer state does not fit."""
    try:
        stepper.optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as e:
        raise ConfigError(f"the checkpoint's optimizer state does not fit ({e}): did --optimizer, "
                          "--freeze-trunk or --trunk-lr-scale change?") from e
    if ckpt["config"].get("scheduler") == scheduler_name and ckpt.get("scheduler"):
        stepper.scheduler.load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler"):
        stepper.scaler.load_state_dict(ckpt["scaler"])


def keep_best(state, ckpt: dict, source: Path, out: Path, info: DistInfo) -> None:
    """Make sure ``out`` holds the best.pt the restored state points at, or start model selection again."""
    if state.best_epoch < 0 or broadcast_object(ckpt_io.adopt_best(source, ckpt, out) if info.is_main else None):
        return
    if info.is_main:
        log.info(f"no best.pt for the checkpoint's best epoch {state.best_epoch} next to {source} or in {out}: "
                 "best.pt will be selected from the epochs still to train")
    state.best_top1, state.best_loss, state.best_epoch = -1.0, float("inf"), -1


def restore_rng(ckpt: dict, info: DistInfo, global_batch: int) -> None:
    """This rank's RNG states, when the number of processes is the same as the checkpoint's."""
    if ckpt["world_size"] == info.world_size:
        ckpt_io.set_rng_state(ckpt["rng"][info.rank])
    elif info.is_main:
        log.info(f"resuming with {info.world_size} process(es), the checkpoint had {ckpt['world_size']}: the data "
                 f"order goes on from the same position (global batch {global_batch}); per-process random streams "
                 "(dropout) start again from the seed")
