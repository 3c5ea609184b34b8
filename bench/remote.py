"""Benchmark 6: training epochs from object storage (S3) through the node-local shard cache, beside local shards.

    python -m bench.remote [--quick] [--videos N] [--repeats K] [--workers W]

The data: 3000 videos (copies cycling over the 300 HMDB-like ``bench.videos``; --quick 600) packed with the
defaults but 10 samples a shard: 2100 training clips in 210 shards of 1.5 MB, 331 MB. The shard folder is uploaded
to a real S3 server on loopback (SeaweedFS, ``tests.remote_servers.S3Server``; its ``AWS_*`` variables are put into this
process's environment, so every child reads through it) and read by the trainer's loader
(``dist_train.data.train_loader``, W = 2 forked workers, batches of 8 taken with ``materialize``, as in
``bench.load``) as ``s3://bench-shards/...`` through the node-local cache (``dist_train.data.cache``), or from
the local folder.
Every epoch runs in a fresh child process, after a ``sync`` (so that the writeback of one epoch's downloads does
not land in the next epoch); its time is the whole epoch, from making the loader (the shard indexes included) to
its last batch.

1. Speed (``--cache-size auto``, shuffle window 16 shards): one epoch from local shards, one from S3 with a cold
   (empty) cache and one more from S3 with the same, now warm, cache; in turn, K = 5 rounds, the order reversed
   every other round (local, cold, warm / cold, warm, local). The ratios are medians over the rounds of each
   round's ratio to its local epoch. Floor: warm / local <= 1.10; cold / local is reported. Nothing is sampled
   during these epochs (a sampling thread in the consuming process would slow the remote sides only).
2. Bounds: one cold epoch with ``--cache-size`` a tenth of the training shards' bytes (but at least what the
   workers read at once: W x (a shuffle window of 2 shards + the 2 shards each prefetches) = 8 shards), shuffle
   window 2, beside one local epoch with the same plan, then one more cold epoch with that least cap of 8 shards
   (reported, no floor). A thread of the child samples the cache
   (``CachedShards.cached()``: files in the node's cache, downloads at their full size; and its ``du``) and every
   loader worker's peak RSS (``VmHWM`` from /proc) and private memory (USS) every 50 ms, in each of these epochs.
   Floors: the cache's largest size sampled <= the cap (ratio <= 1.0), and no process warned that it went over
   the cap; the largest worker peak RSS <= 1.25 x that of the local epoch (a worker reading from S3 holds its own
   S3 client and event loop, some 20 MB, and its garbage collections copy pages it shares with the training
   process; the excess measured the same at 420 and at 2100 clips: it does not grow with the data streamed).

Warnings the loader logs (a cache over its cap, retried requests) are collected from every process and
reported; a sample that cannot be read fails the epoch (``--on-bad-sample error``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from bench import WORK, check, report, result, run_child

NAME = "remote"
SHARD_SIZE = 10  # samples per shard: small shards, so that a tenth of the set still holds a shuffle window
BUCKET = "bench-shards"


def _copies(count: int) -> Path:
    """A folder of ``count`` videos: copies cycling over the 300 bench videos. (Copies, not ``link_copies``'
    symbolic links: the packer reads a file reached through several links once.)"""
    from bench.videos import ensure_videos

    root, src = WORK / f"remote-videos-{count}", ensure_videos(300)
    if (root / ".done").is_file():
        return root
    shutil.rmtree(root, ignore_errors=True)
    videos = sorted(src.rglob("*.avi"), key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name))  # any prefix: all classes
    for i in range(count):
        v = videos[i % len(videos)]
        (root / v.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(v, root / v.parent.name / f"{v.stem}_c{i:05d}.avi")
    (root / ".done").write_text("ok\n")
    return root


def prepare(count: int, shard_size: int = SHARD_SIZE) -> Path:
    """Shards of ``count`` bench videos, ``shard_size`` samples each; made once, cached."""
    shards = WORK / f"remote-shards-{count}-{shard_size}"
    if not (shards / "manifest.json").is_file():
        from preprocess.shard import PackConfig, pack

        shutil.rmtree(shards, ignore_errors=True)
        inp = _copies(count)
        pack(PackConfig(str(inp), str(shards), shard_size=shard_size, progress=False))
        shutil.rmtree(inp)  # 430 KB a video: kept only until packed
    return shards


# ---------------------------------------------------------------------------------------------
# One epoch, in a fresh child process


def _loader_workers() -> list[int]:
    """This process's DataLoader workers: its forked children (same command line; not e.g. a resource tracker)."""
    from bench.memory import _children

    def cmdline(pid):
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None

    me = cmdline(os.getpid())
    return [p for p in _children(os.getpid()) if cmdline(p) == me]


def _private_kb(pid: int) -> int:
    """Memory of ``pid`` that no other process maps (USS, kB): its RSS less the pages it shares (after a fork, with
    its parent)."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    total += int(line.split()[1])
    except OSError:
        pass
    return total


def _disk_bytes(top: Path) -> int:
    """Bytes the files under ``top`` take on disk (``du``: allocated blocks)."""
    total = 0
    for folder, _, files in os.walk(top):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total


class Sampler:
    """A thread sampling, every ``interval`` seconds, the store's cache (a remote store) and the loader workers'
    peak RSS (``VmHWM``) and private memory (USS); ``peaks()`` gives the largest values seen."""

    def __init__(self, store, interval: float = 0.05):
        self.store, self.interval = store, interval
        self.cache_max = self.disk_max = self.samples = 0
        self.worker_hwm_kb: dict[int, int] = {}
        self.worker_uss_kb: dict[int, int] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()

    def sample(self) -> None:
        from bench.memory import _rss_kb

        if self.store.remote_store:
            self.cache_max = max(self.cache_max, self.store.cached())
            self.disk_max = max(self.disk_max, _disk_bytes(self.store.top))
        for pid in _loader_workers():
            hwm = _rss_kb(pid)[1]
            if hwm:
                self.worker_hwm_kb[pid] = max(self.worker_hwm_kb.get(pid, 0), hwm)
                self.worker_uss_kb[pid] = max(self.worker_uss_kb.get(pid, 0), _private_kb(pid))
        self.samples += 1

    def _run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def peaks(self) -> dict:
        hwm, uss = sorted(self.worker_hwm_kb.values()), sorted(self.worker_uss_kb.values())
        return {"cache_max": self.cache_max, "disk_max": self.disk_max, "samples": self.samples,
                "workers_seen": len(hwm), "worker_peak_mb": [round(k / 1024, 1) for k in hwm],
                "worker_peak_max_mb": round(max(hwm, default=0) / 1024, 1),
                "worker_uss_max_mb": round(max(uss, default=0) / 1024, 1)}


def _log_warnings_to(path: str) -> None:
    """Append the data layer's warnings, from this process and the loader workers it forks, to ``path``."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("pid %(process)d: %(message)s"))
    logging.getLogger("dist_train").addHandler(handler)


def child(spec: dict) -> dict:
    """One training epoch of ``spec["shards"]`` (a folder or a URL) in this process, timed and sampled."""
    import torch

    from bench.load_child import _time_loader
    from dist_train import data as D

    torch.set_num_threads(1)
    _log_warnings_to(spec["log"])
    t0 = time.perf_counter()
    m = D.open_manifest(spec["shards"], spec.get("cache_dir"), spec.get("cache_size", "auto"))
    plan = D.make_plan(m, D.resolve_layout(1, spec["batch_size"]), workers=spec["workers"], seed=0,
                       window=spec["window"])
    sspec = D.SampleSpec(n_frames=m.n_frames, num_classes=m.num_classes,
                         transform=D.ClipTransform(spec["size"], train=True), on_bad="error")
    cpu = torch.device("cpu")
    opened = time.perf_counter() - t0
    sampler = Sampler(m.store)
    with sampler if spec.get("sample") else contextlib.nullcontext():
        t1 = time.perf_counter()
        res = _time_loader(lambda e: D.train_loader(plan, sspec, rank=0, epoch=e),
                           lambda batch: D.materialize(batch, sspec, cpu)[0], 1)
        epoch = time.perf_counter() - t1
    sampler.sample()  # the cache as the epoch left it
    store = m.store
    return {**res, "epoch_s": epoch, "open_s": opened, "expected_clips": plan.steps_per_epoch * plan.global_batch,
            "cap": getattr(store, "cap", None), "cached_after": store.cached() if store.remote_store else None,
            **sampler.peaks()}


# ---------------------------------------------------------------------------------------------
# The benchmark


def _epoch(side: str, spec: dict, work: Path) -> dict:
    """One epoch of ``spec`` in a fresh child, with the warnings its processes logged; prints a line. RuntimeError
    when it read fewer clips than planned."""
    log = work / f"warnings-{len(list(work.glob('warnings-*.log'))):02d}.log"
    os.sync()
    res = run_child("bench.remote", {**spec, "log": str(log)}, timeout=600)
    res["warnings"] = log.read_text().splitlines() if log.is_file() else []
    if res["clips"] + res["first_batch"] != res["expected_clips"]:
        raise RuntimeError(f"{side}: {res['clips'] + res['first_batch']} clips read, {res['expected_clips']} planned")
    cache = f" cache max {res['cache_max'] / 2**20:5.1f} MB of {res['cap'] / 2**20:5.1f}" if res["cap"] else ""
    memory = (f" worker peak RSS {res['worker_peak_max_mb']:5.1f} MB (private {res['worker_uss_max_mb']:5.1f})"
              if spec.get("sample") else "")
    print(f"  remote {side:14s} {res['expected_clips']:5d} clips {res['epoch_s']:6.2f} s "
          f"({res['expected_clips'] / res['epoch_s']:6.1f} clips/s)" + memory + cache, file=sys.stderr, flush=True)
    for line in res["warnings"]:
        print(f"    warning: {line}", file=sys.stderr, flush=True)
    return res


def _speed(shards: Path, url: str, base: dict, work: Path, repeats: int) -> dict[str, list[dict]]:
    """Local, cold and warm epochs in turn, ``repeats`` rounds (order reversed every other round)."""
    runs: dict[str, list[dict]] = {"local": [], "cold": [], "warm": []}
    for r in range(repeats):
        cache = work / f"cache-{r}"
        shutil.rmtree(cache, ignore_errors=True)
        remote = {**base, "shards": url, "cache_dir": str(cache), "cache_size": "auto"}
        specs = {"local": {**base, "shards": str(shards)}, "cold": remote, "warm": remote}
        for side in (["local", "cold", "warm"] if r % 2 == 0 else ["cold", "warm", "local"]):
            runs[side].append(_epoch(f"[{r + 1}/{repeats}] {side}", specs[side], work))
        shutil.rmtree(cache, ignore_errors=True)
    return runs


def _bounds(shards: Path, url: str, base: dict, work: Path, caps: dict[str, int]) -> dict[str, dict]:
    """A local epoch with shuffle window 2, then one cold epoch of the same plan per cache cap of ``caps``."""
    small = {**base, "window": 2, "sample": True}
    out = {"local": _epoch("bounds local", {**small, "shards": str(shards)}, work)}
    for name, cap in caps.items():
        cache = work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        out[name] = _epoch(f"bounds {name}", {**small, "shards": url, "cache_dir": str(cache), "cache_size": cap},
                           work)
        shutil.rmtree(cache, ignore_errors=True)
    return out


def _ratio(runs: dict[str, list[dict]], side: str) -> float:
    """Median over the rounds of ``side``'s epoch time over the local epoch of the same round."""
    return statistics.median(s["epoch_s"] / loc["epoch_s"] for s, loc in zip(runs[side], runs["local"]))


def _warned_size(line: str) -> int:
    """The cache size (bytes, rounded as printed) that the loader's over-the-cap warning ``line`` names, else 0."""
    m = re.search(r"holds ([\d.]+)([BKMGT]) in use, over --cache-size", line)
    return int(float(m.group(1)) * 1024 ** "BKMGT".index(m.group(2))) if m else 0


def _cache_check(name: str, res: dict, data_bytes: int, floor: float | None, what: str) -> dict:
    """The cache's largest size sampled against its cap; missed too when a process warned that it went over (the
    sampling may fall between two downloads)."""
    mb, cap = 2 ** 20, res["cap"]
    warned = max((_warned_size(w) for w in res["warnings"]), default=0)
    c = check(name, round(res["cache_max"] / mb, 2), round(cap / mb, 2), round(res["cache_max"] / cap, 4), floor,
              "MB", goal="<=",
              note=f"{what}: one cold epoch streaming {data_bytes / cap:.1f}x the cap through the cache (shuffle "
                   f"window 2); largest CachedShards.cached() sampled every 50 ms: {res['cache_max']} bytes (cap "
                   f"{cap}); largest size named by a warning that the cache went over its cap: {warned or 'none'}")
    if floor is not None and warned:
        c["passed"] = False
    return c


def _checks(runs: dict[str, list[dict]], bounds: dict[str, dict], data_bytes: int, workers: int) -> list[dict]:
    best = {k: min(r["epoch_s"] for r in v) for k, v in runs.items()}
    cold_b, local_b = bounds["cold"], bounds["local"]
    return [
        check("remote_warm_vs_local", round(best["warm"], 3), round(best["local"], 3), round(_ratio(runs, "warm"), 3),
              1.10, "s/epoch", goal="<=",
              note="warm cache vs local shards; ratio: median over the rounds of warm / local of the same round "
                   "(seconds: each side's fastest epoch)"),
        check("remote_cold_vs_local", round(best["cold"], 3), round(best["local"], 3), round(_ratio(runs, "cold"), 3),
              None, "s/epoch", note="empty cache: every shard downloaded from the loopback S3 server during the epoch"),
        _cache_check("remote_cache_max_vs_cap", cold_b, data_bytes, 1.0, "cap a tenth of the training shards"),
        check("remote_worker_peak_rss_vs_local", cold_b["worker_peak_max_mb"], local_b["worker_peak_max_mb"],
              round(cold_b["worker_peak_max_mb"] / local_b["worker_peak_max_mb"], 3), 1.25, "MB (peak RSS per worker)",
              goal="<=", note="largest VmHWM of a loader worker, bounded cold epoch vs the same plan on local shards "
                              f"(private memory, USS: {cold_b['worker_uss_max_mb']} vs {local_b['worker_uss_max_mb']} "
                              "MB)"),
        check("remote_bounded_cold_vs_local", round(cold_b["epoch_s"], 3), round(local_b["epoch_s"], 3),
              round(cold_b["epoch_s"] / local_b["epoch_s"], 3), None, "s/epoch",
              note="the bounded epoch's time (one run each; shuffle window 2)"),
        _cache_check(f"remote_cache_max_vs_cap_{4 * workers}_shards", bounds["tight"], data_bytes, None,
                     f"cap {4 * workers} shards: {workers} workers x (the shuffle window of 2 shards + the 2 "
                     "prefetched)"),
    ]


def _train_bytes(shards: Path) -> tuple[int, int, int]:
    """(bytes of the training shards, their number, the largest one's bytes)."""
    from preprocess.shard_format import load_manifest

    train = load_manifest(shards).shards["train"]
    return sum(s.bytes for s in train), len(train), max(s.bytes for s in train)


def run(quick: bool = False, videos: int | None = None, repeats: int | None = None, workers: int = 2,
        batch_size: int = 8, size: int = 112) -> dict:
    from tests.remote_servers import S3Server

    count = videos or (600 if quick else 3000)
    repeats = repeats or (1 if quick else 5)
    shards = prepare(count)
    data_bytes, n_shards, largest = _train_bytes(shards)
    need = workers * (2 + 2) * largest  # each worker: its shuffle window of 2 shards and the 2 it prefetches
    caps = {"cold": max(data_bytes // 10, need), "tight": need}
    work = WORK / "remote"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = {"batch_size": batch_size, "workers": workers, "size": size, "window": 16}
    with S3Server(work / "s3") as s3:
        os.environ.update(s3.env())  # the benchmark's children inherit them
        t0 = time.perf_counter()
        url = s3.upload(shards, BUCKET, shards.name)
        upload_s = time.perf_counter() - t0
        print(f"  remote: uploaded {shards.name} to {url} in {upload_s:.1f} s", file=sys.stderr, flush=True)
        runs = _speed(shards, url, base, work, repeats)
        bounds = _bounds(shards, url, base, work, caps)
    shutil.rmtree(work / "s3", ignore_errors=True)  # the uploaded copy of the shards
    checks = _checks(runs, bounds, data_bytes, workers)
    inputs = {"videos": count, "shard_size": SHARD_SIZE, "train_shards": n_shards, "train_bytes": data_bytes,
              "clips_per_epoch": runs["local"][0]["expected_clips"], "workers": workers, "batch_size": batch_size,
              "size": size, "repeats": repeats, "cache_caps": caps, "server": "SeaweedFS S3 on 127.0.0.1",
              "loader": "dist_train.data.train_loader, uint8 clips taken with materialize, --on-bad-sample error"}
    extra = {"upload_s": round(upload_s, 2), "bounds": bounds,
             "ratios_per_round": {k: [round(s["epoch_s"] / loc["epoch_s"], 3)
                                      for s, loc in zip(runs[k], runs["local"])] for k in ("cold", "warm")},
             "runs": runs}
    return result(NAME, checks, inputs, extra)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--videos", type=int, default=None, help="videos packed (default 3000; --quick 600)")
    p.add_argument("--repeats", type=int, default=None, help="rounds of local, cold and warm epochs (default 5)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return 0
    return report(run(a.quick, a.videos, a.repeats, a.workers))


if __name__ == "__main__":
    sys.exit(main())
