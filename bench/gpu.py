"""Benchmark 5 (GPU): training clips/s of the default model, synthetic and end-to-end from shards.

    bash bench/gpu.sh [--batch 32] [--steps 30] [--workers N]      (one NVIDIA GPU, < 8 minutes)

Model: the trainer's default ``cnn_rnn`` (ResNet18 + LSTM 256, 51 classes), clips 16 x 3 x 112 x 112,
``--batch`` clips per step. One step = forward, label-smoothed cross-entropy, backward, gradient
clipping and a fused AdamW step, as in ``dist_train.train``. Rows:

    fp32 seed loop      the seed's model (bench.seed_model: trunk called once per frame), fp32
    fp32 batched        ours, trunk once on all B*T frames, fp32 (cuDNN's default TF32 for convolutions)
    fp32 batched, no TF32   the same with TF32 off everywhere (strict fp32, for reference)
    bf16                ours under bf16 autocast
    bf16 + channels_last
    bf16 + channels_last + compile   torch.compile of the model

Each row is timed on synthetic data already on the GPU and end to end: shards packed here from
HMDB-like videos (bench.videos), read by ``dist_train.data.train_loader`` (CPU decode in DataLoader
workers, pinned memory), moved and normalized as the trainer does; plus the best row with
``--decode gpu`` (batched nvjpeg). Also: JPEG decode frames/s, CPU (one thread) vs batched on the GPU.

Floors (issue 6): best end-to-end >= 0.9x its synthetic figure; best end-to-end >= 4x the fp32
seed loop at the same batch. Writes bench/results/gpu.json (and --out DIR/gpu.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import check, result, write_result
from bench.gpu_timing import (
    FRAMES,
    SIZE,
    Stepper,
    build,
    jpeg_decode,
    loader_iter,
    make_shards,
    restore_tf32,
    set_tf32,
    tf32_state,
    time_end_to_end,
    time_synthetic,
)

NAME = "gpu"


VARIANTS = {
    "fp32 seed loop": {"seed_loop": True},
    "fp32 batched": {},
    "fp32 batched, no TF32": {"no_tf32": True},
    "bf16": {"bf16": True},
    "bf16 + channels_last": {"bf16": True, "channels_last": True},
    "bf16 + channels_last + compile": {"bf16": True, "channels_last": True, "compile": True},
}


@dataclass
class Timing:
    """What every row is timed with, and the rows timed so far (name -> figures)."""

    device: torch.device
    batch: int
    steps: int
    warmup: int
    e2e_steps: int
    drain: int
    tf32_default: dict
    t_start: float
    partial: str | None
    dec: dict
    rows: dict[str, dict] = field(default_factory=dict)

    def measure(self, name: str, v: dict, batches, spec, synthetic: bool = True) -> None:
        """Time variant ``v`` on synthetic data and end to end from ``batches``; print and record its row."""
        rows = self.rows
        set_tf32(not v.get("no_tf32"))
        if not v.get("no_tf32"):  # restore PyTorch's own defaults, whatever they are
            restore_tf32(self.tf32_default)
        model = build(v, self.device)
        step = Stepper(model, v, self.device)
        t0 = time.perf_counter()
        w = self.warmup + (4 if v.get("compile") else 0)
        syn = time_synthetic(step, self.batch, self.steps if synthetic else 2, w, self.device)
        e2e = time_end_to_end(step, batches, spec, self.e2e_steps, self.drain, self.device)
        rows[name] = {"synthetic": float(f"{syn:.4g}"), "end_to_end": float(f"{e2e['clips_per_s']:.4g}"),
                      "data_wait_frac": round(e2e["data_wait_frac"], 3), "seconds": round(time.perf_counter() - t0, 1)}
        if not synthetic:
            rows[name]["synthetic"] = rows[name.split(" (")[0]]["synthetic"]
        print(f"gpu bench: {name:44s} synthetic {rows[name]['synthetic']:8.1f} clips/s   end-to-end "
              f"{e2e['clips_per_s']:8.1f} clips/s (waiting for data {100 * e2e['data_wait_frac']:.0f}%)  "
              f"[{rows[name]['seconds']} s, {time.perf_counter() - self.t_start:.0f} s total]", flush=True)
        if self.partial:
            Path(self.partial).write_text(json.dumps({"rows": rows, "jpeg_decode": self.dec,
                                                      "tf32": self.tf32_default}, indent=1))


def _variants(quick: bool, no_compile: bool) -> dict[str, dict]:
    """The rows to time: all of VARIANTS, less compile under ``no_compile``, two rows under ``quick``."""
    variants = {k: v for k, v in VARIANTS.items() if not (no_compile and v.get("compile"))}
    if quick:
        variants = {k: v for k, v in variants.items() if k in ("fp32 seed loop", "bf16 + channels_last")}
    return variants


def _loader_only(timing: Timing, shards: Path, workers: int) -> dict[str, float]:
    """The loader alone (no model): its steady clips/s with these workers is the end-to-end ceiling."""
    e2e_steps, drain = timing.e2e_steps, timing.drain
    lb, lspec = loader_iter(shards, timing.batch, workers, "cpu", 2 * (e2e_steps + drain))
    lo = time_end_to_end(None, lb, lspec, e2e_steps, drain, timing.device)
    loader_rows = {"loader only, dist_train.data (CPU decode)": round(lo["clips_per_s"], 1)}
    del lb
    for k, r in loader_rows.items():
        print(f"gpu bench: {k:44s} {r:8.1f} clips/s ({workers} workers)", flush=True)
    return loader_rows


def _time_rows(timing: Timing, variants: dict[str, dict], shards: Path, workers: int,
               compile_deadline: float) -> dict[str, float]:
    """Every row into ``timing.rows``, compiled rows last; returns the loader-only figures."""
    e2e_steps, drain = timing.e2e_steps, timing.drain
    batches, spec = loader_iter(shards, timing.batch, workers, "cpu",
                                (e2e_steps + drain + timing.warmup) * (len(variants) + 1))
    for name, v in variants.items():
        if v.get("compile"):
            continue  # last: its compile time is the least predictable
        timing.measure(name, v, batches, spec)
    loader_rows = _loader_only(timing, shards, workers)
    if timing.device.type == "cuda" and "bf16 + channels_last" in variants:
        # --decode gpu: workers only read tars, nvjpeg decodes each whole batch in the training process.
        gb, gspec = loader_iter(shards, timing.batch, max(2, workers // 2), "gpu", 2 * (e2e_steps + drain))
        timing.measure("bf16 + channels_last (decode gpu)", variants["bf16 + channels_last"], gb, gspec,
                       synthetic=False)
        del gb
    for name, v in variants.items():
        if v.get("compile"):
            if time.perf_counter() - timing.t_start > compile_deadline:
                print(f"gpu bench: {name}: skipped, {compile_deadline} s already spent", flush=True)
                continue
            timing.measure(name, v, batches, spec)
    del batches
    restore_tf32(timing.tf32_default)
    return loader_rows


def _checks(rows: dict[str, dict], batch: int) -> list[dict]:
    """The two floors, for the best end-to-end row other than the seed loop."""
    best_e2e_name = max((k for k in rows if k != "fp32 seed loop"),
                        key=lambda k: rows[k]["end_to_end"])
    best = rows[best_e2e_name]
    seed = rows["fp32 seed loop"]
    return [
        check("gpu_best_end_to_end_vs_synthetic", best["end_to_end"], best["synthetic"],
              round(best["end_to_end"] / best["synthetic"], 3), 0.9, "clips/s", note=best_e2e_name),
        check("gpu_best_end_to_end_vs_fp32_seed_loop", best["end_to_end"], seed["synthetic"],
              round(best["end_to_end"] / seed["synthetic"], 3), 4.0, "clips/s",
              note=f"{best_e2e_name} end-to-end vs the seed loop on synthetic data, batch {batch}"),
    ]


def run(quick: bool = False, batch: int = 32, steps: int = 30, warmup: int = 8, workers: int | None = None,
        videos: int = 400, allow_cpu: bool = False, no_compile: bool = False, partial: str | None = None,
        compile_deadline: float = 300.0) -> dict:
    """All rows; raises RuntimeError without a CUDA GPU (unless ``allow_cpu``, a smoke test)."""
    if not torch.cuda.is_available() and not allow_cpu:
        raise RuntimeError("bench/gpu.py needs a CUDA GPU: torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run bench/gpu.sh on a "
                           "machine with one NVIDIA GPU.")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    workers = workers or max(1, min(12, (os.cpu_count() or 2) - 2))
    tf32_default = tf32_state()
    torch.backends.cudnn.benchmark = True
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke test)"
    print(f"gpu bench: {dev_name}, torch {torch.__version__}, batch {batch}, {workers} loader workers", flush=True)
    print(f"gpu bench: TF32 defaults {tf32_default}", flush=True)

    shards = make_shards(videos, max(1, (os.cpu_count() or 2)))
    print(f"gpu bench: shards ready ({time.perf_counter() - t_start:.0f} s)", flush=True)
    dec = jpeg_decode(shards, device)
    print(f"gpu bench: JPEG decode {dec}", flush=True)

    variants = _variants(quick, no_compile)
    e2e_steps, drain = (steps if allow_cpu else max(steps, 60)), 2 * workers + 4
    timing = Timing(device, batch, steps, warmup, e2e_steps, drain, tf32_default, t_start, partial, dec)
    loader_rows = _time_rows(timing, variants, shards, workers, compile_deadline)
    rows = timing.rows

    checks = _checks(rows, batch)
    inputs = {"device": dev_name, "torch": torch.__version__, "cuda": torch.version.cuda,
              "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
              "model": "cnn_rnn: ResNet18 + LSTM(256), 51 classes", "clip": [FRAMES, 3, SIZE, SIZE],
              "batch_per_gpu": batch, "timed_steps_synthetic": steps, "timed_steps_end_to_end": e2e_steps,
              "untimed_batches_before_end_to_end": drain, "warmup_steps": warmup, "loader_workers": workers,
              "cpu_cores": os.cpu_count(), "tf32_defaults": tf32_default, "cudnn_benchmark": True,
              "shards": f"{videos} HMDB-like videos (bench.videos), packed with preprocess.shard defaults"}
    res = result(NAME, checks, inputs, {"rows": rows, "loader_only": loader_rows, "jpeg_decode": dec,
                                         "seconds": round(time.perf_counter() - t_start, 1)})
    return res


def print_rows(res: dict) -> None:
    rows = res["extra"]["rows"]
    print(f"\n{res['inputs']['device']} | torch {res['inputs']['torch']} | batch {res['inputs']['batch_per_gpu']} "
          f"clips x {FRAMES} x {SIZE}px | TF32 defaults: {res['inputs']['tf32_defaults']}")
    print("| config | synthetic clips/s | end-to-end clips/s | e2e / synthetic | data wait |")
    print("|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['synthetic']:.1f} | {r['end_to_end']:.1f} | {r['end_to_end'] / r['synthetic']:.2f} | "
              f"{100 * r['data_wait_frac']:.0f}% |")
    for k, r in res["extra"].get("loader_only", {}).items():
        print(f"{k}: {r:.1f} clips/s with {res['inputs']['loader_workers']} workers")
    d = res["extra"]["jpeg_decode"]
    gpu = d.get("gpu_batch512_fps")
    print(f"\nJPEG decode ({d['frames']} frames 171x128): CPU 1 thread {d['cpu_1thread_fps']:.0f} frames/s"
          + (f"; GPU batched (512) {gpu:.0f} frames/s ({d['gpu_vs_cpu_1thread']}x)" if gpu else ""))
    from bench.__main__ import print_table

    print()
    print_table([res])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="clips per step (per GPU)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per row and mode")
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 2, at most 12)")
    p.add_argument("--videos", type=int, default=400)
    p.add_argument("--quick", action="store_true", help="two rows only")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--allow-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke test of the script itself
    p.add_argument("--out", default=None, help="also write gpu.json here")
    a = p.parse_args(argv)
    try:
        partial = str(Path(a.out) / "gpu_partial.json") if a.out else None
        if a.out:
            Path(a.out).mkdir(parents=True, exist_ok=True)
        res = run(a.quick, a.batch, a.steps, a.warmup, a.workers, a.videos, a.allow_cpu, a.no_compile, partial)
    except RuntimeError as e:
        if "needs a CUDA GPU" in str(e):
            print(f"error: {e}", file=sys.stderr)
            return 3
        raise
    path = write_result(res)
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "gpu.json").write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    print_rows(res)
    print(f"\nwrote {path}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
