"""Benchmark 1: packing speed, ours (``preprocess.shard.pack``) beside the seed's per-frame JPEG folders.

    python -m bench.pack [--quick] [--videos N] [--repeats K] [--profile]

Floors: ours >= 1.5x the seed's videos/s with one worker; parallel efficiency >= 0.8 from 1 to 2
workers; our time per video <= 1.1x the *kept-frames bound*: the decode pass plus only what every
frame we store costs whatever the packer around it (colour conversion, the anti-aliased resize and
the JPEG encode of the 16 kept frames, with the packer's own functions; nothing checked, written or
hashed). Ours against it is the cost of everything else (bad-input checks, tar, index, manifest,
hashing).

Reported beside the floors: ours and the bound against a grab()-only decode pass (no colour
conversion, no resize, no encode, nothing written; FFmpeg's default thread count and one thread, the
faster of the two). The bound's ratio to it is the best any packer of this output and this decoder
can reach (1.3-1.7 on the VMs measured, so a floor against the decode alone could not be met); the
seed against the bound, the best vs-seed ratio our per-frame work allows on the machine at hand.

How it is timed (wall time; CPU time is reported beside it):
- One-worker sides (decode, seed, ours with one worker, the bound) run in one child process over the
  videos cut into folders of 30: each folder is done by every side in turn, K rounds, and a side's
  time is the sum over the folders of its fastest run (``bench.paired_min``; ``sync`` before each
  run so one side's written files are not flushed during another's). The sides are compared seconds
  apart, so a burst of load from elsewhere spoils one run of one folder, not a whole measurement
  (on the shared 2-core VM, whole-run figures of one side moved by up to 40% between repeats).
- Parallel efficiency compares whole runs over all the videos (each in a fresh child process, best of
  K), ours with 2 workers against ours with 1: a worker pool's start-up would dominate a 30-video run.

"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import time
from pathlib import Path

import cv2

from bench import WORK, check, cpu_seconds, paired_min, report, result, run_child

NAME = "pack"


# ---------------------------------------------------------------------------------------------
# One measurement, in a child process


def _videos(root: Path) -> list[Path]:
    return sorted(root.rglob("*.avi"))


def _decode_only(videos: list[Path], threads: int | None) -> int:
    params = [] if threads is None else [cv2.CAP_PROP_N_THREADS, threads]
    n = 0
    for v in videos:
        cap = cv2.VideoCapture(str(v), cv2.CAP_FFMPEG, params)
        while cap.grab():
            n += 1
        cap.release()
    return n


def _kept_frames_only(videos: list[Path]) -> int:
    """Decode every frame; colour-convert and resize the 16 kept ones as they come, then encode them
    (the order ``read_clip_jpegs`` uses; PackConfig defaults)."""
    from preprocess.frames import encode_jpeg, resize_short_side, select_indices
    from preprocess.shard import PackConfig

    d = PackConfig("", "")
    cv2.setNumThreads(1)  # as in a packing worker (preprocess.shard._init_worker)
    n = 0
    for v in videos:
        cap = cv2.VideoCapture(str(v), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
        kept = set(select_indices(max(1, int(cap.get(cv2.CAP_PROP_FRAME_COUNT))), d.frames))
        i, frames = 0, []
        while cap.grab():
            if i in kept:
                frames.append(resize_short_side(cap.retrieve()[1], d.short_side))
            i += 1
        cap.release()
        n += len([encode_jpeg(f, d.quality) for f in frames])
    return n


def _ours(inp: Path, out: Path, workers: int) -> dict:
    from preprocess.shard import PackConfig, pack

    m = pack(PackConfig(str(inp), str(out), workers=workers, progress=False))
    return {"packed": sum(m["splits"][s]["count"] for s in m["splits"]), "skipped": len(m["skipped"])}


def _paired(spec: dict) -> dict:
    """The one-worker sides over the chunk folders, paired (see the module docstring)."""
    import sklearn.model_selection  # noqa: F401  (pack imports it lazily; keep imports out of the timing)

    from bench.baselines import seed_pack

    chunks = [Path(c) for c in spec["chunks"]]
    n_videos = sum(len(_videos(c)) for c in chunks)
    out = Path(spec["out"])

    def each(fn):
        return lambda part: [fn(c) for c in part]

    def seed(c):
        cv2.setNumThreads(-1)  # OpenCV's default threads, as the seed runs (our sides set one thread)
        seed_pack(_videos(c), c, out / "seed")

    sides = {
        "decode_t1": each(lambda c: _decode_only(_videos(c), 1)),
        "decode_tdefault": each(lambda c: _decode_only(_videos(c), None)),
        "seed": each(seed),
        "ours_w1": each(lambda c: _ours(c, out / "ours", 1)),
        "kept_frames": each(lambda c: _kept_frames_only(_videos(c))),
    }

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        os.sync()

    c0 = {k: 0.0 for k in sides}

    def timed(k, fn):  # CPU seconds of every run beside the wall-clock pairing
        def run(part):
            t = cpu_seconds()
            fn(part)
            c0[k] += cpu_seconds() - t
        return run

    wall = paired_min(chunks, {k: timed(k, fn) for k, fn in sides.items()}, chunk=1, rounds=spec["rounds"],
                      setup=setup)
    shutil.rmtree(out, ignore_errors=True)
    return {"videos": n_videos, "chunks": len(chunks), "rounds": spec["rounds"],
            "ms_per_video": {k: 1e3 * v / n_videos for k, v in wall.items()},
            "cpu_ms_per_video_mean": {k: 1e3 * v / n_videos / spec["rounds"] for k, v in c0.items()}}


def child(spec: dict) -> dict:
    """Run one measurement described by ``spec``; returns wall and CPU seconds and what was done."""
    if spec["method"] == "paired":
        return _paired(spec)
    if spec["method"] != "ours":
        raise ValueError(f"unknown method {spec['method']!r}")
    import sklearn.model_selection  # noqa: F401  (pack imports it lazily; keep imports out of the timing)

    inp, out = Path(spec["input"]), Path(spec["out"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    os.sync()  # the previous measurement's files go to disk now, not in the background during this one
    t0, c0 = time.perf_counter(), cpu_seconds()
    info = _ours(inp, out, spec["workers"])
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"wall": wall, "cpu": cpu, "videos": len(_videos(inp)), **info}


# ---------------------------------------------------------------------------------------------
# The benchmark


def _input_folder(count: int) -> Path:
    from bench.videos import ensure_videos, link_copies

    src = ensure_videos(300)
    return link_copies(src, count, WORK / f"pack-input-{count}")


def _chunk_folders(inp: Path, size: int) -> list[Path]:
    """``inp``'s videos (sorted) split into folders of ``size`` (symbolic links, class folders kept)."""
    root = WORK / f"{inp.name}-chunks-{size}"
    shutil.rmtree(root, ignore_errors=True)
    videos = _videos(inp)
    chunks = []
    for j in range(0, len(videos), size):
        chunk = root / f"chunk-{j // size:03d}"
        for v in videos[j:j + size]:
            dst = chunk / v.relative_to(inp)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(v.resolve())
        chunks.append(chunk)
    return chunks


def _run_paired(chunks: list[Path], repeats: int, out: Path) -> dict:
    """The one-worker sides, paired over the chunk folders, in one child process; prints ms/video of each."""
    # Two rounds at least: each side's first run of a folder also pays its warm-up.
    paired = run_child("bench.pack", {"method": "paired", "chunks": [str(c) for c in chunks],
                                      "rounds": max(2, repeats), "out": str(out)})
    for k, v in paired["ms_per_video"].items():
        print(f"  pack paired {k:16s} {v:7.2f} ms/video  ({1e3 / v:6.1f} videos/s)", file=sys.stderr, flush=True)
    return paired


def _whole_runs(inp: Path, count: int, repeats: int, out: Path) -> dict[str, list[dict]]:
    """Ours with 1 and 2 workers over all the videos, each run in a fresh child process, ``repeats`` rounds."""
    runs: dict[str, list[dict]] = {"ours_w1": [], "ours_w2": []}
    for r in range(repeats):
        for k in runs:
            res = run_child("bench.pack", {"method": "ours", "workers": int(k[-1]), "input": str(inp),
                                           "out": str(out)})
            runs[k].append(res)
            print(f"  pack [{r + 1}/{repeats}] {k:8s} {res['wall']:7.2f} s wall  {res['cpu']:7.2f} s cpu  "
                  f"{count / res['wall']:6.1f} videos/s", file=sys.stderr, flush=True)
    return runs


def _checks(ms: dict[str, float], whole: dict[str, float]) -> list[dict]:
    """The floors and the figures reported beside them, from the paired ms/video and the whole-run videos/s."""
    vps = {k: 1e3 / v for k, v in ms.items()}
    floor_key = min(("decode_t1", "decode_tdefault"), key=lambda k: ms[k])
    return [
        check("pack_vs_seed_1worker", round(vps["ours_w1"], 2), round(vps["seed"], 2),
              round(vps["ours_w1"] / vps["seed"], 3), 1.5, "videos/s", note="paired over folders of 30 videos"),
        check("pack_parallel_efficiency_1to2", round(whole["ours_w2"], 2), round(2 * whole["ours_w1"], 2),
              round(whole["ours_w2"] / (2 * whole["ours_w1"]), 3), 0.8, "videos/s (baseline = 2x one worker)",
              note="whole runs"),
        check("pack_vs_kept_frames_bound", round(ms["ours_w1"], 2), round(ms["kept_frames"], 2),
              round(ms["ours_w1"] / ms["kept_frames"], 3), 1.1, "ms/video", goal="<=",
              note="what the packer adds (checks, tar, index, hashing, manifest) to the per-frame work it cannot "
                   "avoid; paired over folders of 30 videos"),
        check("pack_vs_decode_floor", round(ms["ours_w1"], 2), round(ms[floor_key], 2),
              round(ms["ours_w1"] / ms[floor_key], 3), None, "ms/video",
              note=f"decode = grab()-only pass, {floor_key}; paired over folders of 30 videos"),
        check("pack_kept_frames_bound_vs_decode", round(ms["kept_frames"], 2), round(ms[floor_key], 2),
              round(ms["kept_frames"] / ms[floor_key], 3), None, "ms/video",
              note="decode + colour conversion, resize and encode of the kept frames only: the best ratio to the "
                   "decode that this output and decoder allow"),
        check("pack_kept_frames_bound_vs_seed", round(vps["kept_frames"], 2), round(vps["seed"], 2),
              round(vps["kept_frames"] / vps["seed"], 3), None, "videos/s",
              note="the best vs-seed ratio that our per-frame work allows here"),
    ]


def _inputs(inp: Path, repeats: int) -> dict:
    """What was measured and how (the result's ``inputs``)."""
    from bench.videos import describe

    return {"videos": describe(inp), "repeats": repeats,
            "statistic": "one-worker sides: sum over folders of 30 videos of the best of K paired runs; "
                         "parallel efficiency: best of K whole runs",
            "ours_args": "PackConfig defaults: 16 frames, short side 128, JPEG q90, shard size 100",
            "seed_output": "16 full-size JPEG files per video, cv2.imwrite default quality 95"}


def _extra(ms: dict[str, float], whole: dict[str, float], paired: dict, runs: dict[str, list[dict]]) -> dict:
    """Wall and CPU figures of every side, and the raw measurements (the result's ``extra``)."""
    cpu = paired["cpu_ms_per_video_mean"]
    return {
        "wall_ms_per_video": {**{k: round(v, 2) for k, v in ms.items()},
                              **{f"{k}_whole_run": round(1e3 / v, 2) for k, v in whole.items()}},
        "cpu_ms_per_video_mean": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_ratio_ours_w1_vs_decode_t1": round(cpu["ours_w1"] / cpu["decode_t1"], 3),
        "cpu_ratio_kept_frames_vs_decode_t1": round(cpu["kept_frames"] / cpu["decode_t1"], 3),
        "cpu_ratio_seed_vs_ours_w1": round(cpu["seed"] / cpu["ours_w1"], 3),
        "paired": paired,
        "runs": runs,
    }


def run(quick: bool = False, videos: int | None = None, repeats: int | None = None) -> dict:
    """Time seed packing, ours with 1 and 2 workers, the kept-frames bound and the decode-only floor on the
    same videos."""
    count = videos or (60 if quick else 300)
    repeats = repeats or (1 if quick else 3)
    inp = _input_folder(count)
    outs = WORK / "pack-out"
    paired = _run_paired(_chunk_folders(inp, 30), repeats, outs / "paired")
    runs = _whole_runs(inp, count, repeats, outs / "ours")
    shutil.rmtree(outs, ignore_errors=True)

    ms = paired["ms_per_video"]
    whole = {k: count / min(x["wall"] for x in v) for k, v in runs.items()}  # videos/s, best whole run
    return result(NAME, _checks(ms, whole), _inputs(inp, repeats), _extra(ms, whole, paired, runs))


def profile(count: int = 60) -> None:
    """cProfile of the per-video work of ours (what a packing worker process runs), in this process; prints
    the top functions by own time. (``pack`` itself hands every video to a worker process.)"""
    inp = _input_folder(count)
    from preprocess import shard
    from preprocess.inputs import scan

    cfg = shard.PackConfig(str(inp), str(WORK / "pack-out" / "profile"), workers=1, progress=False)
    _, items, _ = scan(inp)
    shard._init_worker(str(inp))
    pr = cProfile.Profile()
    pr.enable()
    for item in items:
        shard.encode_item(item, cfg.frames, cfg.short_side, cfg.quality, cfg.min_frames, cfg.max_pixels,
                          cfg.max_frames)
    pr.disable()
    pstats.Stats(pr).sort_stats("tottime").print_stats(15)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pack", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--videos", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="cProfile ours (1 worker) instead")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    if a.profile:
        profile(a.videos or 60)
        return 0
    res = run(a.quick, a.videos, a.repeats)
    return report(res)


if __name__ == "__main__":
    sys.exit(main())
