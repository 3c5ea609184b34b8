"""The load benchmark's measurements, each in a fresh child process: ``python -m bench.load --child SPEC``.

``child(spec)`` runs one: a whole run of the seed's Dataset or of ours (``_time_loader``), or ours with one
worker paired with the bare decode and the clip bound (``_paired``). See ``bench.load`` for how they are timed.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

from bench import cpu_seconds


def _train_samples(shards: Path) -> list[tuple[str, list[bytes]]]:
    """(source path, 16 JPEG bytes) of every train sample, read by the trainer's reader."""
    from dist_train.data import read_split
    from preprocess import shard_format as fmt

    m = fmt.load_manifest(shards)
    out = []
    for sample in read_split(m, "train"):
        frames, _, meta = fmt.split_sample(sample, m.n_frames)
        out.append((meta["path"], frames))
    return out


def _time_loader(make_loader, to_input, epochs: int, started=None) -> dict:
    """Iterate ``epochs`` fresh loaders (``make_loader(epoch)``); clips/s from each epoch's first batch
    to its end, summed over the epochs (worker start-up excluded, as the trainer's steady state).
    ``started()``, when given, runs once each loader's workers have started."""
    clips = wall = cpu = 0.0
    for epoch in range(epochs):
        it = iter(make_loader(epoch))
        if started is not None:
            started()
        first = to_input(next(it))
        t0, c0 = time.perf_counter(), cpu_seconds()
        for batch in it:
            clips += to_input(batch).shape[0]
        wall += time.perf_counter() - t0
        cpu += cpu_seconds() - c0
    return {"clips": int(clips), "first_batch": int(first.shape[0]), "wall": wall, "cpu": cpu,
            "shape": list(first.shape), "epochs": epochs}


def _paired(shards: Path, make_loader, take, spec: dict) -> dict:
    """Ours (one epoch), the bare decode and the clip bound (one pass each) in turn, ``spec["rounds"]`` times."""
    import cv2
    import numpy as np

    from dist_train.data import ClipTransform, decode_jpegs, make_clip

    cv2.setNumThreads(1)  # one thread, as in a loader worker (dist_train.data._ignore_signals)
    samples = [f for _, f in _train_samples(shards)]
    tf = ClipTransform(spec["size"], train=True)
    slot = np.empty((len(samples[0]), tf.size, tf.size, 3), np.uint8)

    # One core for the work being compared (the decode, the clip bound, ours' loader worker), the
    # other for the consuming process: otherwise the scheduler mixes a noisy core into some sides only.
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    work, consumer = ({cores[-1]}, {cores[0]}) if len(cores) >= 2 else (None, None)

    def pin(where):
        if where is not None:
            os.sched_setaffinity(0, where)

    def ours(r):
        # the worker process starts on this process's core (``work``); then the consumer moves away
        res = _time_loader(lambda e: make_loader(r), take, 1, started=lambda: pin(consumer))
        pin(work)
        return res["wall"], res["cpu"], res["clips"]

    def bare(r):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for frames in samples:
            decode_jpegs(frames, hwc=True)
        return time.perf_counter() - t0, cpu_seconds() - c0, len(samples)

    def clip(r):
        t0, c0 = time.perf_counter(), cpu_seconds()
        for i, frames in enumerate(samples):
            make_clip(frames, tf, r * len(samples) + i, out=slot)
        return time.perf_counter() - t0, cpu_seconds() - c0, len(samples)

    sides = {"ours_w1": ours, "decode": bare, "clip_bound": clip}
    pin(work)
    bare(-1), clip(-1)  # warm-up
    rounds: dict[str, list] = {k: [] for k in sides}
    for r in range(spec["rounds"]):
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            rounds[k].append(sides[k](r))
    best = {k: min(v, key=lambda x: x[0] / x[2]) for k, v in rounds.items()}
    per_clip = {k: [w / n for w, _, n in v] for k, v in rounds.items()}
    return {"ms_per_clip": {k: 1e3 * w / n for k, (w, _, n) in best.items()},
            "round_ratio": {k: statistics.median(a / d for a, d in zip(per_clip[k], per_clip["decode"]))
                            for k in ("ours_w1", "clip_bound")},
            "cpu_ms_per_clip": {k: 1e3 * c / n for k, (_, c, n) in best.items()},
            "clips": {k: n for k, (_, _, n) in best.items()}, "rounds": spec["rounds"],
            "cores": {"work": sorted(work or cores), "consumer": sorted(consumer or cores)},
            "all_ms_per_clip": {k: [round(1e3 * w / n, 3) for w, _, n in v] for k, v in rounds.items()}}


def child(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    import torch

    torch.set_num_threads(1)
    shards, seed_out = Path(spec["shards"]), Path(spec["seed"])
    b, w = spec["batch_size"], spec["workers"]
    if spec["method"] == "seed":
        from torch.utils.data import DataLoader

        from bench.baselines import SeedVideoDataset, seed_transform

        wanted = sorted({Path(p).with_suffix("").as_posix() for p, _ in _train_samples(shards)})
        classes = sorted({Path(p).parts[0] for p in wanted})
        ids = [str(seed_out / p) for p in wanted]
        labels = [classes.index(Path(p).parts[0]) for p in wanted]
        ds = SeedVideoDataset(ids, labels, seed_transform(spec["size"]))
        return _time_loader(lambda e: DataLoader(ds, batch_size=b, shuffle=True, num_workers=w, drop_last=True,
                                                 generator=torch.Generator().manual_seed(e)),
                            lambda batch: batch[0], spec["epochs"])
    if spec["method"] == "ours":
        from dist_train import data as D
        from preprocess.shard_format import load_manifest

        m = load_manifest(shards)
        plan = D.make_plan(m, D.resolve_layout(1, b), workers=w, seed=0)
        tf = D.ClipTransform(spec["size"], train=True, crop=spec.get("crop", "random"))
        sspec = D.SampleSpec(n_frames=m.n_frames, num_classes=m.num_classes, transform=tf, on_bad="skip")

        def make(epoch):
            return D.train_loader(plan, sspec, rank=0, epoch=epoch)

        stats, cpu = D.normalization("cnn_rnn"), torch.device("cpu")
        # The consumer takes each batch as the trainer does (materialize: copied out, buffer released).
        if spec.get("paired"):
            return _paired(shards, make, lambda batch: D.materialize(batch, sspec, cpu)[0], spec)
        if spec.get("normalize"):  # the trainer does this on its device; here on the CPU, in the consumer
            return _time_loader(make, lambda batch: D.to_model_input(D.materialize(batch, sspec, cpu)[0],
                                                                      "BTCHW", stats), spec["epochs"])
        return _time_loader(make, lambda batch: D.materialize(batch, sspec, cpu)[0], spec["epochs"])
    raise ValueError(f"unknown method {spec['method']!r}")
