"""Temporal views on the sample data: accuracy of K = 1 and K = 3 packs, one view and all views.

    python -m bench.temporal [--epochs 3] [--seeds 0,1,2] [--classes 4] [--clips 24]

A measurement, not a floor (it is not part of ``python -m bench``). The sample videos of
``preprocess.synth`` (4 classes x 24 clips: grow/shrink, move_right/move_left, so the model must use
frame order) are packed twice with ``python -m preprocess.shard --frames 8 --short-side 64``: once with
``--temporal-views 1`` and once with ``--temporal-views 3`` (the same stratified split, seed 0: the same
test clips in both). For each seed a small cnn_rnn (``--img-size 48 --hidden-size 64``, batch 8,
``--no-hflip`` because a flip turns move_right into move_left) is trained on each pack with
``python -m dist_train`` (one process, one loader worker, the same epochs and seed; the K = 3 run jitters
among the 3 frames of each segment, the default ``--temporal-jitter``). Each best.pt is evaluated on the
test split with ``python -m dist_train.evaluate``:

- ``single``: ``--views 1 --temporal-views 1``, the centre crop of the middle frame of each segment (for
  odd K exactly the frames a K = 1 pack holds);
- ``multi``: ``--views 3 --temporal-views all``, 3 spatial crops x every temporal view the pack holds,
  probabilities averaged;
- ``temporal`` (K = 3 runs only): ``--views 1 --temporal-views all``, the temporal views alone, to tell
  the two kinds of view apart.

The table gives top-1, top-5 (1.0 whenever there are at most 5 classes), mean class accuracy,
view_top1 (mean top-1 of the single views) and the test clip count, per seed and as the mean over the
seeds. Figures go to ``bench/results/temporal.json``, the packs and runs to ``bench/work/temporal/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO, WORK, command, machine, write_result

NAME = "temporal"
PACK = ["--frames", "8", "--short-side", "64", "--split", "stratified", "--seed", "0", "--workers", "2",
        "--no-progress"]
TRAIN = ["--model", "cnn_rnn", "--img-size", "48", "--hidden-size", "64", "--batch-size", "8", "--wandb", "disabled",
         "--no-progress", "--val-fraction", "0.1", "--workers", "1", "--no-hflip", "--test-every", "0"]
EVALS = {"single": ["--views", "1", "--temporal-views", "1"], "temporal": ["--views", "1", "--temporal-views", "all"],
         "multi": ["--views", "3", "--temporal-views", "all"]}
PACKS = (1, 3)
METRICS = ("top1", "top5", "mean_class_accuracy", "view_top1")


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), WANDB_MODE="disabled")


def _run(cmd: list[str], what: str, timeout: float = 900) -> float:
    """Run ``python -m ...`` from the repository; the seconds it took; RuntimeError with its output if it failed."""
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{what} exited {p.returncode}: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return seconds


def make_videos(work: Path, classes: int, clips: int) -> Path:
    """The sample videos (``preprocess.synth``), written once per class and clip count."""
    from preprocess.synth import generate

    out = work / f"videos-{classes}x{clips}"
    if not (out / ".done").is_file():
        shutil.rmtree(out, ignore_errors=True)
        generate(out, num_classes=classes, clips=clips, seed=0)
        (out / ".done").write_text("ok\n")
    return out


def pack(videos: Path, out: Path, k: int) -> float:
    """Pack ``videos`` into ``out`` with ``--temporal-views k``; seconds."""
    shutil.rmtree(out, ignore_errors=True)
    return _run(["preprocess.shard", str(videos), str(out), "--temporal-views", str(k), *PACK], f"packing K={k}")


def train(shards: Path, out: Path, epochs: int, seed: int) -> float:
    """Train a fresh run into ``out``; seconds."""
    shutil.rmtree(out, ignore_errors=True)
    return _run(["dist_train", "--shards", str(shards), "--out", str(out), "--epochs", str(epochs),
                 "--seed", str(seed), *TRAIN], f"training {out.name}")


def evaluate(run: Path, shards: Path, view: str) -> dict:
    """``report.json`` of ``run/best.pt`` on the test split, evaluated the ``view`` way (a key of ``EVALS``)."""
    out = run / f"eval-{view}"
    shutil.rmtree(out, ignore_errors=True)
    _run(["dist_train.evaluate", "--checkpoint", str(run / "best.pt"), "--shards", str(shards), "--out", str(out),
          "--workers", "1", *EVALS[view]], f"evaluating {run.name} ({view})")
    return json.loads((out / "report.json").read_text())


def evals_of(k: int) -> list[str]:
    """The evaluations of a run on a K-view pack: ``temporal`` (all K views, centre crop) only where K > 1."""
    return [v for v in EVALS if v != "temporal" or k > 1]


def row(seed: int | str, k: int, view: str, report: dict) -> dict:
    """One table row of an evaluation report."""
    return {"seed": seed, "train_k": k, "eval": view, **{m: report[m] for m in METRICS},
            "clips": report["n_samples"], "views_note": report["views_note"]}


def mean_rows(rows: list[dict]) -> list[dict]:
    """The mean over the seeds of each (pack, evaluation) pair."""
    out = []
    for k in PACKS:
        for view in evals_of(k):
            same = [r for r in rows if r["train_k"] == k and r["eval"] == view]
            out.append({"seed": "mean", "train_k": k, "eval": view,
                        **{m: statistics.mean(r[m] for r in same) for m in METRICS}, "clips": same[0]["clips"],
                        "views_note": same[0]["views_note"]})
    return out


def print_table(rows: list[dict], out=sys.stdout) -> None:
    """Markdown table: one row per seed, pack and evaluation."""
    print("| seed | training shards | evaluation | top-1 | top-5 | mean class acc. | view_top1 | test clips |",
          file=out)
    print("|---|---|---|---:|---:|---:|---:|---:|", file=out)
    for r in rows:
        print(f"| {r['seed']} | K={r['train_k']} | {r['eval']} | {r['top1']:.3f} | {r['top5']:.3f} | "
              f"{r['mean_class_accuracy']:.3f} | {r['view_top1']:.3f} | {r['clips']} |", file=out)


def run(epochs: int = 3, seeds: tuple[int, ...] = (0, 1, 2), classes: int = 4, clips: int = 24) -> dict:
    """Pack, train and evaluate everything; the result written to ``bench/results/temporal.json``."""
    start = time.monotonic()
    work = WORK / NAME
    work.mkdir(parents=True, exist_ok=True)
    videos = make_videos(work, classes, clips)
    shards = {k: work / f"shards-k{k}" for k in PACKS}
    seconds: dict[str, float] = {}
    for k in PACKS:
        seconds[f"pack_k{k}"] = round(pack(videos, shards[k], k), 1)
    rows = []
    for seed in seeds:
        for k in PACKS:
            run_dir = work / f"run-k{k}-seed{seed}"
            seconds[f"train_k{k}_seed{seed}"] = round(train(shards[k], run_dir, epochs, seed), 1)
            for view in evals_of(k):
                rows.append(row(seed, k, view, evaluate(run_dir, shards[k], view)))
            done = ", ".join(f"{r['eval']} top-1 {r['top1']:.3f}" for r in rows[-len(evals_of(k)):])
            print(f"  temporal: seed {seed}, K={k}: trained in {seconds[f'train_k{k}_seed{seed}']:.0f} s; {done}",
                  file=sys.stderr, flush=True)
    table = rows + mean_rows(rows)
    res = {"name": NAME, "passed": True, "rows": table, "seconds": seconds,
           "inputs": {"classes": classes, "clips_per_class": clips, "epochs": epochs, "seeds": list(seeds),
                      "pack": PACK, "train": TRAIN, "evals": EVALS},
           "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command(),
           "total_seconds": round(time.monotonic() - start, 1)}
    write_result(res)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.temporal", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="training epochs of every run")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    p.add_argument("--classes", type=int, default=4, help="sample classes (preprocess.synth)")
    p.add_argument("--clips", type=int, default=24, help="sample clips per class")
    a = p.parse_args(argv)
    seeds = tuple(int(s) for s in a.seeds.split(",") if s.strip())
    res = run(a.epochs, seeds, a.classes, a.clips)
    print_table(res["rows"])
    m = res["machine"]
    print(f"\nmachine: {m.get('cpu')} x{m.get('cores')} (load {m.get('load_avg_1m')}); "
          f"total {res['total_seconds']:.0f} s; figures in bench/results/{NAME}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
