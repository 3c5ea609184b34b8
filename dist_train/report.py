"""What a run says about itself: the start-up files, summary and warnings (``config.json``,
``validation.json``), the training metrics of a log window, an epoch's record, and ``results.json``'s fields.

Functions of what the trainer passes in; the trainer does the all-reduces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dist_train import data, trace
from dist_train.faults import write_status
from dist_train.metrics import CONFIG_FILE
from dist_train.step import Sums
from preprocess.shard_format import write_json_atomic

log = logging.getLogger("dist_train")

VALIDATION_FILE = "validation.json"


def write_start(out: Path, cfg, plan: data.DataPlan, classes: list[str], pack_split: str | None, epoch: int,
                step: int, info, where: str) -> None:
    """Rank 0 at start: config.json, status.json, validation.json, the trimmed trace, the summary and warnings."""
    write_json_atomic(out / CONFIG_FILE, cfg.to_dict())
    write_status(out, "running", epoch=epoch, step=step)
    write_json_atomic(out / VALIDATION_FILE, validation_record(plan, classes, cfg.val_fraction, cfg.seed, pack_split))
    if cfg.trace_samples:
        trace.trim(out, step)
    log.info(start_summary(where, info.world_size, info.device, info.backend, plan, cfg.precision))
    for note in (data.validation_note(plan, cfg.val_fraction, len(classes)),
                 layout_note(plan.layout, cfg.batch_size, cfg.accum_steps)):
        if note:
            log.warning(note)


def start_summary(where: str, world_size: int, device: torch.device, backend: str | None, plan: data.DataPlan,
                  precision: str) -> str:
    lay = plan.layout
    return (f"{where}; {world_size} process(es) on {device.type} ({backend or 'no process group'}), "
            f"{plan.n_train} train / {len(plan.val_ids)} val / {len(plan.test)} test clips, "
            f"{plan.steps_per_epoch} steps per epoch of {lay.global_batch} clips ({lay.world_size} x "
            f"{lay.micro_batch} x {lay.accum_steps} accumulation), {plan.workers} loader worker(s) per process, "
            f"precision {precision}")


def layout_note(lay: data.Layout, batch_size: int, accum_steps: int) -> str | None:
    """A warning when the global batch overrides --accum-steps or forces micro-batches below --batch-size."""
    if lay.micro_batch * lay.accum_steps == batch_size * accum_steps:
        return None
    share = lay.global_batch // lay.world_size
    note = (f"the global batch {lay.global_batch} over {lay.world_size} process(es) runs as micro-batches of "
            f"{lay.micro_batch} x {lay.accum_steps} accumulation steps per process (--batch-size "
            f"{batch_size} and --accum-steps {accum_steps} give way to it)")
    if lay.micro_batch < batch_size and share > lay.micro_batch:
        note += (f"; {lay.micro_batch} is the largest divisor of {share} up to --batch-size: a global batch that "
                 f"is a multiple of {lay.world_size * batch_size} keeps micro-batches of {batch_size}")
    return note


def validation_record(plan: data.DataPlan, classes: list[str], fraction: float, seed: int, pack_split: str) -> dict:
    """``OUT/validation.json``: which training clips validate, and how they were chosen."""
    keys = [plan.train.keys[i] for i in plan.val_ids]
    counts = {c: 0 for c in classes}
    for i in plan.val_ids:
        counts[classes[plan.train.labels[i]]] += 1
    by = "source film" if pack_split in ("group", "official") else "class"
    return {"fraction": fraction, "held_out_by": by, "seed": seed, "count": len(keys), "of": len(plan.train),
            "per_class": counts, "keys": keys}


def skipped_per_shard(records: list[dict]) -> dict[str, int]:
    """Bad-sample counts by shard name (in metrics.jsonl and W&B, so a damaged file can be found)."""
    per_shard: dict[str, int] = {}
    for r in records:
        per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + r.get("count", 1)
    return per_shard


def window_metrics(sums: Sums, seconds: float, world_size: int, lr: float, epoch: int, skipped_total: int,
                   per_shard: dict[str, int]) -> dict:
    """The training metrics of a log window, from its sums over all ranks and rank 0's wall time."""
    seconds = max(seconds, 1e-9)
    return {
        "train/loss": sums.mean("loss"), "train/top1": sums.mean("top1"), "train/top5": sums.mean("top5"),
        "lr": lr, "epoch": epoch, "perf/clips_per_s": sums.clips / seconds,
        "perf/data_wait_frac": sums.wait / (seconds * world_size), "data/skipped_total": skipped_total,
        **{f"data/skipped/{shard}": count for shard, count in per_shard.items()},
    }


def epoch_record(epoch: int, step: int, lr: float, sums: Sums, results: dict[str, dict]) -> dict:
    """One epoch's line of the history: training means and each evaluated split's loss, top-1 and top-5."""
    record = {"epoch": epoch, "step": step, "lr": lr, "train/loss": sums.loss / sums.clips,
              "train/top1": sums.top1 / sums.clips, "train/top5": sums.top5 / sums.clips}
    for split, r in results.items():
        record.update({f"{split}/{k}": r[k] for k in ("loss", "top1", "top5")})
    return record


def final_results(test: dict, best: dict, *, classes: list[str], plan: data.DataPlan, epochs: int, steps: int,
                  world_size: int, checkpoint: str, steps_per_rank: list[int], replica_diff: float,
                  skipped: int) -> dict:
    """``results.json``: best.pt's test metrics and how the run got there."""
    selected_on = "val" if len(plan.val_ids) else "final"
    lay = plan.layout
    return {
        "top1": test["top1"], "top5": test["top5"], "loss": test["loss"], "per_class": test["per_class"],
        "view_top1": test["view_top1"], "views_note": test["views_note"],
        "n_samples": test["n_samples"], "unreadable": test["unreadable"], "confusion": test["confusion"],
        "classes": classes, "epochs": epochs, "steps": steps, "world_size": world_size,
        "global_batch": lay.global_batch, "micro_batch": lay.micro_batch, "accum_steps": lay.accum_steps,
        "n_train": plan.n_train, "n_val": len(plan.val_ids), "workers": plan.workers, "selected_on": selected_on,
        "best_epoch": best["state"]["best_epoch"], "best_step": best["step"],
        "best_val_top1": best["state"]["best_top1"] if selected_on == "val" else None,
        "checkpoint": checkpoint, "steps_per_rank": steps_per_rank, "replica_max_abs_diff": replica_diff,
        "skipped_train_samples": skipped,
    }
