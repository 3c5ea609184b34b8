"""Benchmark 2: loading training-ready batches, ours (``dist_train.data``) beside the seed's Dataset.

    python -m bench.load [--quick] [--videos N] [--workers W] [--batch-size B] [--repeats K]

Ours: ``train_loader`` over shards packed by ``preprocess.shard`` (tar -> 16 JPEGs -> decode ->
the trainer's default training crop, a random 112-pixel square of the stored frames + flip, the same
for the whole clip -> uint8 batch; ``ours_resized_*`` uses ``--train-crop resized`` instead), taken
by the consuming process with ``materialize`` as the trainer takes it (copied out, buffer released);
the trainer then normalizes on its device (``ours_norm_*`` does it here on the CPU with
``to_model_input``, so that side ends, like the seed's, at a normalized float batch
``[B, 16, 3, 112, 112]``). Seed: ``bench.baselines.SeedVideoDataset`` over the seed's per-frame JPEG
folders of the same videos, in a DataLoader with the same workers and batch size.

Floors (issue 6): ours >= 2.5x the seed's clips/s per worker, and our worker time per clip <= 1.25x
the time to merely decode the same JPEG frames (``dist_train.data.decode_jpegs``, one process, one
thread).

Reported beside the floors: the *clip bound*, the same decode plus the default training crop and flip
of each clip into one reused buffer (``dist_train.data.make_clip``, in one process: no tar, no
DataLoader, no batches, no shared memory). Its ratio to the decode is the best a loader producing
these clips with this decoder can reach; ours against it is the cost of reading shards, shuffling,
batching and handing batches to the training process.

How it is timed (wall time; CPU time beside it):
- Ours with one worker, the decode and the clip bound run in one child process, paired: one epoch of
  ours (a fresh loader, timed from its first batch to its end, as the trainer's steady state), one
  decode pass and one clip-bound pass over the same clips, in turn, K = 16 rounds (the order reversed
  every other round). The ratios are medians over the rounds of each round's ratio (ours, or the
  bound, over the decode pass of the same round), so the machine's drift during a run cancels and a
  burst of load from elsewhere spoils one round, not a whole measurement; each side's fastest round
  is reported beside them (on the host of 2026-12-01, the ratio of fastest rounds moved by +-5% between
  runs of the same code where the median of round ratios moved by +-1%). With two cores or more, the
  work compared (the decode, the clip bound, our loader's worker) runs on one core and the consuming
  process on another (``os.sched_setaffinity``), so all three sides meet the same core.
- The seed's Dataset (8x slower) and the other variants of ours are whole runs, each in a fresh child
  process from its first batch to the end of the epoch, best of K.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench import WORK, check, report, result, run_child
from bench.load_child import child

NAME = "load"
DATA_MODULE = Path(__file__).resolve().parents[1] / "dist_train" / "data" / "__init__.py"


def wait_for_loader(timeout: float = 0.0, poll: float = 30.0) -> bool:
    """True once dist_train.data exists and imports (waits up to ``timeout`` seconds for it)."""
    deadline = time.monotonic() + timeout
    while True:
        if DATA_MODULE.is_file():
            try:
                import dist_train.data  # noqa: F401
                return True
            except Exception as e:  # being written right now: try again
                err = e
        else:
            err = None
        if time.monotonic() >= deadline:
            if err is not None:
                print(f"bench.load: dist_train.data does not import yet: {err}", file=sys.stderr)
            return False
        time.sleep(poll)


def prepare(count: int) -> tuple[Path, Path]:
    """Shards (ours, defaults) and seed frame folders of the same ``count`` videos; made once, cached."""
    from bench.pack import _input_folder

    inp = _input_folder(count)
    shards, seed_out = WORK / f"load-shards-{count}", WORK / f"load-seed-{count}"
    if not (shards / "manifest.json").is_file():
        from preprocess.shard import PackConfig, pack

        pack(PackConfig(str(inp), str(shards), progress=False))
    if not (seed_out / ".done").is_file():
        from bench.baselines import seed_pack

        seed_pack(sorted(inp.rglob("*.avi")), inp, seed_out)
        (seed_out / ".done").write_text("ok\n")
    return shards, seed_out


# ---------------------------------------------------------------------------------------------
# The benchmark


def _variants(worker_counts: list[int]) -> dict[str, dict]:
    """The whole runs: the seed's Dataset and ours per worker count, and two variants of ours."""
    w0 = worker_counts[0]
    variants = {}
    for w in worker_counts:
        variants[f"seed_w{w}"] = {"method": "seed", "workers": w, "epochs": 1}
        variants[f"ours_w{w}"] = {"method": "ours", "workers": w}
    variants[f"ours_norm_w{w0}"] = {"method": "ours", "workers": w0, "normalize": True}
    variants[f"ours_resized_w{w0}"] = {"method": "ours", "workers": w0, "crop": "resized"}
    return variants


def _run_paired(base: dict, quick: bool) -> dict:
    """Ours with one worker, the decode and the clip bound, paired in one child process; prints ms/clip."""
    paired = run_child("bench.load", {**base, "method": "ours", "workers": 1, "paired": True,
                                      "rounds": 2 if quick else 16})
    print("  load paired: " + ", ".join(f"{k} {v:.3f} ms/clip" for k, v in paired["ms_per_clip"].items()),
          file=sys.stderr, flush=True)
    return paired


def _whole_runs(base: dict, variants: dict[str, dict], repeats: int) -> dict[str, list[dict]]:
    """Every variant, each run in a fresh child process, ``repeats`` rounds."""
    runs: dict[str, list[dict]] = {k: [] for k in variants}
    for r in range(repeats):
        for k, spec in variants.items():
            res = run_child("bench.load", {**base, **spec})
            runs[k].append(res)
            print(f"  load [{r + 1}/{repeats}] {k:12s} {res['clips']:4d} clips {res['wall']:6.2f} s wall "
                  f"{res['cpu']:6.2f} s cpu  {res['clips'] / res['wall']:7.1f} clips/s", file=sys.stderr, flush=True)
    return runs


def _checks(per_worker: dict[str, float], paired: dict, worker_counts: list[int]) -> list[dict]:
    """The floors and the figures reported beside them."""
    pms, rr = paired["ms_per_clip"], paired["round_ratio"]
    w0 = worker_counts[0]
    checks = [
        check(f"load_vs_seed_per_worker_w{w0}", round(per_worker[f"ours_w{w0}"], 1),
              round(per_worker[f"seed_w{w0}"], 1),
              round(per_worker[f"ours_w{w0}"] / per_worker[f"seed_w{w0}"], 3), 2.5, "clips/s/worker",
              note="whole runs"),
        check("load_vs_decode_floor_w1", round(pms["ours_w1"], 3), round(pms["decode"], 3),
              round(rr["ours_w1"], 3), 1.25, "ms/clip per worker", goal="<=",
              note="floor = dist_train.data.decode_jpegs of the same 16 frames, one process, one thread; ratio: "
                   "median over the paired rounds of ours / decode in the same round (ms: each side's fastest "
                   f"round, whose ratio is {pms['ours_w1'] / pms['decode']:.3f})"),
        check("load_clip_bound_vs_decode", round(pms["clip_bound"], 3), round(pms["decode"], 3),
              round(rr["clip_bound"], 3), None, "ms/clip",
              note="decode + training crop and flip into one buffer, one process: the best ratio to the decode "
                   "that these clips and this decoder allow; median of per-round ratios"),
        check("load_vs_clip_bound_w1", round(pms["ours_w1"], 3), round(pms["clip_bound"], 3),
              round(pms["ours_w1"] / pms["clip_bound"], 3), None, "ms/clip per worker",
              note="what the loader adds (shards, shuffle, batches, hand-over) to the per-clip work it cannot avoid; "
                   "paired"),
    ]
    for w in worker_counts[1:]:
        checks.append(check(f"load_vs_seed_per_worker_w{w}", round(per_worker[f"ours_w{w}"], 1),
                            round(per_worker[f"seed_w{w}"], 1),
                            round(per_worker[f"ours_w{w}"] / per_worker[f"seed_w{w}"], 3), 2.5, "clips/s/worker",
                            note="on 2 cores, 2 workers share the cores with the consuming process; whole runs"))
    return checks


def run(quick: bool = False, videos: int | None = None, workers: int | None = None, batch_size: int = 8,
        repeats: int | None = None, size: int = 112, wait: float = 0.0) -> dict:
    """Seed Dataset vs our loader vs the pure-decode floor, on the same clips."""
    count = videos or (60 if quick else 300)
    repeats = repeats or (1 if quick else 3)
    worker_counts = [workers] if workers else [1, 2]
    if not wait_for_loader(wait):
        raise RuntimeError("dist_train.data (our loader) is not there yet: the load benchmark needs it")
    shards, seed_out = prepare(count)
    # Whole runs of ours last 4 epochs (one epoch takes about half a second); the seed's one epoch lasts seconds.
    epochs = 1 if quick else 4
    base = {"shards": str(shards), "seed": str(seed_out), "batch_size": batch_size, "size": size, "epochs": epochs}
    w0 = worker_counts[0]
    variants = _variants(worker_counts)
    paired = _run_paired(base, quick)
    runs = _whole_runs(base, variants, repeats)

    best = {k: min(v, key=lambda x: x["wall"] / x["clips"]) for k, v in runs.items()}
    cps = {k: b["clips"] / b["wall"] for k, b in best.items()}
    per_worker = {k: cps[k] / variants[k]["workers"] for k in cps}
    ms_per_clip_worker = {k: 1e3 / v for k, v in per_worker.items()}
    checks = _checks(per_worker, paired, worker_counts)
    from bench.videos import describe

    inputs = {"videos": describe(_input_folder_of(shards)), "clips_per_epoch": best[f"ours_w{w0}"]["clips"],
              "batch_size": batch_size, "workers": worker_counts, "size": size, "repeats": repeats,
              "ours": "dist_train.data.train_loader, uint8 clips, default --train-crop random (the trainer "
                      "normalizes on its device; ours_norm_* adds to_model_input on the CPU; ours_resized_* uses "
                      "--train-crop resized), the global order (one process, shuffle window 16 shards)",
              "seed": "SeedVideoDataset: PIL open, Resize((112,112)), ToTensor, Normalize per frame; full-size JPEGs",
              "epochs": {"ours_whole_runs": epochs, "seed": 1, "paired_rounds": paired["rounds"]},
              "statistic": "floor and bounds: median of per-round paired ratios; vs seed: best of whole runs, "
                           "timed from "
                           "each epoch's first batch to its end, summed over epochs"}
    extra = {"clips_per_s": {k: round(v, 1) for k, v in cps.items()},
             "ms_per_clip_per_worker": {k: round(v, 2) for k, v in ms_per_clip_worker.items()},
             "ours_with_cpu_normalize_vs_seed": round(per_worker[f"ours_norm_w{w0}"] / per_worker[f"seed_w{w0}"], 3),
             "ours_resized_crop_vs_ours": round(ms_per_clip_worker[f"ours_resized_w{w0}"]
                                                / ms_per_clip_worker[f"ours_w{w0}"], 3),
             "paired": paired, "runs": runs}
    return result(NAME, checks, inputs, extra)


def _input_folder_of(shards: Path) -> Path:
    count = int(shards.name.rsplit("-", 1)[1])
    return WORK / f"pack-input-{count}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--videos", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for both sides (default: 1 and 2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for dist_train.data to appear")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    res = run(a.quick, a.videos, a.workers, a.batch_size, a.repeats, wait=a.wait)
    return report(res)


if __name__ == "__main__":
    sys.exit(main())
