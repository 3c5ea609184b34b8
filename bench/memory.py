"""Benchmark 4: peak memory of packing and of training stays flat when the dataset grows 10x.

    python -m bench.memory [--quick] [--small 100] [--factor 10]

Packing: ``python -m preprocess.shard`` (2 workers, shard size 25) on N and 10N videos (the larger
set is symlinks cycling over the bench videos, so it costs no extra generation): 100 -> 1000 videos
gives about 4 -> 40 shards. Training: ``python -m dist_train`` (one process, one epoch, small crops so
that a CPU run takes seconds; the crop size is a constant, not what grows) on each of those shard sets.

Memory is the peak, over the run, of the summed RSS of the process and all its descendants (pool
workers, DataLoader workers), polled from /proc every 20 ms; the largest single process's peak (``VmHWM``) is
reported beside it. (``ru_maxrss`` is not used: a forked child inherits its parent's high-water mark.)
Floor: peak(10N) <= 1.10 x peak(N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import REPO, WORK, check, result, write_result

NAME = "memory"
TRAIN_MAIN = REPO / "dist_train" / "__main__.py"


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of ``pid`` in kB: its resident size now and its peak since exec."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def tree_rss_kb(pid: int) -> tuple[int, int, int]:
    """(summed RSS of ``pid`` and all its descendants, number of processes, largest VmHWM), in kB."""
    total, n, top, todo = 0, 0, 0, [pid]
    while todo:
        p = todo.pop()
        rss, hwm = _rss_kb(p)
        total += rss
        top = max(top, hwm)
        n += 1
        todo += _children(p)
    return total, n, top


def measure(cmd: list[str], env: dict | None = None, interval: float = 0.02, timeout: float = 1200) -> dict:
    """Run ``cmd``; its wall time, peak tree RSS (MB), most processes seen, and largest single RSS (MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, **(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"kb": 0, "procs": 0, "hwm": 0}
    done = threading.Event()

    def poll():
        while not done.is_set():
            kb, n, hwm = tree_rss_kb(proc.pid)
            peak["kb"] = max(peak["kb"], kb)
            peak["procs"] = max(peak["procs"], n)
            peak["hwm"] = max(peak["hwm"], hwm)
            done.wait(interval)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    try:
        out = proc.stdout.read()
        proc.wait()
    finally:
        killer.cancel()
        done.set()
        th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"failed ({proc.returncode}): {' '.join(cmd)}\n{out[-3000:]}")
    return {"wall": round(time.perf_counter() - t0, 2), "peak_tree_mb": round(peak["kb"] / 1024, 1),
            "max_procs": peak["procs"], "largest_process_hwm_mb": round(peak["hwm"] / 1024, 1)}


def _videos(count: int) -> Path:
    from bench.videos import ensure_videos, link_copies

    return link_copies(ensure_videos(300), count, WORK / f"mem-videos-{count}")


def _pack_cmd(inp: Path, out: Path, shard_size: int) -> list[str]:
    return [sys.executable, "-m", "preprocess.shard", str(inp), str(out), "--workers", "2",
            "--shard-size", str(shard_size), "--no-progress"]


def _train_cmd(shards: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "dist_train", "--shards", str(shards), "--out", str(out), "--epochs", "1",
            "--batch-size", "4", "--img-size", "32", "--workers", "1", "--wandb", "disabled", "--no-progress",
            "--resume", "never", "--overwrite"]


def run(quick: bool = False, small: int | None = None, factor: int = 10, train: bool | None = None) -> dict:
    """Packing (and, when the trainer exists, training) peak RSS at N and factor x N videos."""
    small = small or (40 if quick else 100)
    shard_size = max(1, small // 4)
    sizes = [small, small * factor]
    env = {"OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_MODE": "disabled"}
    pack_runs, train_runs = {}, {}
    for n in sizes:
        out = WORK / f"mem-shards-{n}"
        shutil.rmtree(out, ignore_errors=True)
        pack_runs[n] = measure(_pack_cmd(_videos(n), out, shard_size), env)
        pack_runs[n]["shards"] = len(list(out.glob("*.tar")))
        print(f"  memory pack {n:5d} videos: {pack_runs[n]}", file=sys.stderr, flush=True)
    train = TRAIN_MAIN.is_file() if train is None else train
    if train:
        for n in sizes:
            runs_dir = WORK / f"mem-run-{n}"
            shutil.rmtree(runs_dir, ignore_errors=True)
            train_runs[n] = measure(_train_cmd(WORK / f"mem-shards-{n}", runs_dir), env, timeout=1800)
            print(f"  memory train {n:5d} videos: {train_runs[n]}", file=sys.stderr, flush=True)
            shutil.rmtree(runs_dir, ignore_errors=True)
    a, b = sizes
    checks = [check("pack_peak_rss_growth", pack_runs[b]["peak_tree_mb"], pack_runs[a]["peak_tree_mb"],
                    round(pack_runs[b]["peak_tree_mb"] / pack_runs[a]["peak_tree_mb"], 3), 1.10, "MB (peak tree RSS)",
                    goal="<=", note=f"{a} -> {b} videos, {pack_runs[a]['shards']} -> {pack_runs[b]['shards']} shards")]
    if train_runs:
        checks.append(check("train_peak_rss_growth", train_runs[b]["peak_tree_mb"], train_runs[a]["peak_tree_mb"],
                            round(train_runs[b]["peak_tree_mb"] / train_runs[a]["peak_tree_mb"], 3), 1.10,
                            "MB (peak tree RSS)", goal="<=",
                            note="one epoch, batch 4, 32 px crops, 1 DataLoader worker, CPU"))
    inputs = {"videos": sizes, "shard_size": shard_size, "pack_workers": 2,
              "train": " ".join(_train_cmd(Path("SHARDS"), Path("RUN"))[1:]) if train_runs else "skipped: no trainer"}
    return result(NAME, checks, inputs, {"pack": pack_runs, "train": train_runs})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--small", type=int, default=None, help="videos in the small set (default 100; --quick 40)")
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--no-train", dest="train", action="store_false", default=None)
    a = p.parse_args(argv)
    res = run(a.quick, a.small, a.factor, a.train)
    path = write_result(res)
    from bench.__main__ import print_table

    print_table([res])
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(res["extra"], indent=1), file=sys.stderr)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
