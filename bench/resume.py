"""Benchmark 5: the cost of resuming is the same wherever in the epoch the checkpoint was taken.

    python -m bench.resume [--quick] [--repeats K]

A resumed run starts reading at the checkpoint's global position (``dist_train.data.plan``): nothing
before it is read, replayed or decoded again. Measured with the real trainer (``python -m dist_train``,
one process, one loader worker) on the load benchmark's shards (210 training clips of 300 HMDB-like
videos, 26 steps of 8 an epoch): one checkpoint written after step 1, then copies of it placed at
step 1 and at step 24 of epoch 1 (step and position edited; the model is the same), each resumed and
stopped after its first step (``DIST_TRAIN_TEST_STOP_AT_STEP``). The figure is the wall time of the
whole process, start to exit, so it holds everything a resume costs (imports, the plan, the loader's
start, the first batch, the first step). The two positions run in turn, K = 7 rounds; the ratio is the
median over the rounds of late / early in the same round.

Floor: resuming late in the epoch <= 1.1x resuming at its start.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import REPO, WORK, check, report, result

NAME = "resume"
FLAGS = ["--img-size", "64", "--hidden-size", "64", "--batch-size", "8", "--workers", "1", "--val-fraction", "0",
         "--test-every", "0", "--wandb", "disabled", "--no-progress", "--ckpt-every-minutes", "0", "--epochs", "2"]


def _train(shards: Path, out: Path, stop_at: int, resume: Path | None = None) -> float:
    """Seconds from the start of ``python -m dist_train`` to its exit after global step ``stop_at``."""
    cmd = [sys.executable, "-m", "dist_train", "--shards", str(shards), "--out", str(out), *FLAGS]
    if resume is not None:
        cmd += ["--resume", str(resume)]
    env = {"DIST_TRAIN_FAULT_INJECTION": "1", "DIST_TRAIN_TEST_STOP_AT_STEP": str(stop_at), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PATH": str(Path(sys.executable).parent)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    if p.returncode != 75:
        raise RuntimeError(f"trainer exited {p.returncode}, expected 75 (stopped):\n{p.stderr[-3000:]}")
    return seconds


def run(quick: bool = False, repeats: int | None = None) -> dict:
    import torch

    from bench.load import prepare
    from dist_train import checkpoint as ckpt_io

    shards, _ = prepare(60 if quick else 300)
    work = WORK / "resume"
    shutil.rmtree(work, ignore_errors=True)
    _train(shards, work / "seed-run", 1)
    first = ckpt_io.load_checkpoint(ckpt_io.step_path(work / "seed-run", 1))
    from preprocess.shard_format import load_manifest

    steps = load_manifest(shards).count("train") // 8
    positions = {"early": 1, "late": steps - 2}
    ckpts = {}
    for name, step in positions.items():  # the same model and optimizer, placed at another position
        ckpts[name] = work / f"{name}.pt"
        torch.save({**first, "step": step, "step_in_epoch": step,
                    "state": {**first["state"], "step": step, "step_in_epoch": step},
                    "data": {**first["data"], "samples_consumed": step * 8}}, ckpts[name])
    repeats = repeats or (1 if quick else 7)
    times: dict[str, list[float]] = {k: [] for k in positions}
    for r in range(repeats):
        for name in (list(positions) if r % 2 == 0 else list(positions)[::-1]):
            out = work / f"run-{name}-{r}"
            times[name].append(_train(shards, out, positions[name] + 1, ckpts[name]))
            shutil.rmtree(out, ignore_errors=True)
            print(f"  resume [{r + 1}/{repeats}] {name:5s} at step {positions[name]}: {times[name][-1]:.2f} s",
                  file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = statistics.median(late / early for late, early in zip(times["late"], times["early"]))
    checks = [check("resume_late_vs_early", round(med["late"], 2), round(med["early"], 2), round(ratio, 3), 1.1,
                    "s from start to exit after one step", goal="<=",
                    note=f"resumed at step {positions['late']} vs step {positions['early']} of {steps}; ratio: "
                         f"median over {repeats} rounds of late / early in the same round; seconds: medians")]
    inputs = {"shards": str(shards), "steps_per_epoch": steps, "positions": positions, "flags": FLAGS,
              "repeats": repeats}
    return result(NAME, checks, inputs, {"seconds": times})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.resume", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=None)
    a = p.parse_args(argv)
    res = run(a.quick, a.repeats)
    return report(res)


if __name__ == "__main__":
    sys.exit(main())
