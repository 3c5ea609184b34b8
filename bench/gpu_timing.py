"""The parts of the GPU benchmark (``bench.gpu``) that time one row: the model and its training step,
the shards and the trainer's loader that feed it, the clocks, and the JPEG decode figures.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from bench import WORK

FRAMES, SIZE, CLASSES = 16, 112, 51


def tf32_state() -> dict:
    """PyTorch's TF32 switches as they are now."""
    s = {"cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
         "cudnn.allow_tf32 (convolutions)": torch.backends.cudnn.allow_tf32,
         "float32_matmul_precision": torch.get_float32_matmul_precision()}
    for name, obj in (("cuda.matmul.fp32_precision", getattr(torch.backends.cuda.matmul, "fp32_precision", None)),
                      ("cudnn.conv.fp32_precision", getattr(getattr(torch.backends.cudnn, "conv", None),
                                                            "fp32_precision", None))):
        if obj is not None:
            s[name] = obj
    return s


def set_tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def restore_tf32(default: dict) -> None:
    """Back to the TF32 switches ``default`` (a ``tf32_state()``) holds."""
    torch.backends.cudnn.allow_tf32 = default["cudnn.allow_tf32 (convolutions)"]
    torch.backends.cuda.matmul.allow_tf32 = default["cuda.matmul.allow_tf32"]


def build(variant: dict, device: torch.device) -> nn.Module:
    from dist_train.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn_rnn", CLASSES)
    if variant.get("seed_loop"):
        from bench.seed_model import seed_like

        model = seed_like(model, dropout=0.0)
    model = model.to(device)
    if variant.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    model.train()
    return model


class Stepper:
    """One training step of ``model`` as dist_train.train does it."""

    def __init__(self, model: nn.Module, variant: dict, device: torch.device):
        self.model = torch.compile(model) if variant.get("compile") else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=device.type == "cuda")
        self.crit = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.bf16 = variant.get("bf16", False)
        self.device = device
        self.params = list(model.parameters())

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        ctx = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        with ctx:
            logits = self.model(x)
        loss = self.crit(logits.float(), y)
        loss.backward()
        nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_synthetic(step: Stepper, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    """clips/s on random normalized clips already on the device (several buffers, rotated)."""
    g = torch.Generator(device=device).manual_seed(1)
    xs = [torch.randn(batch, FRAMES, 3, SIZE, SIZE, device=device, generator=g) for _ in range(2)]
    ys = [torch.randint(0, CLASSES, (batch,), device=device, generator=g) for _ in range(2)]
    for i in range(warmup):
        step(xs[i % 2], ys[i % 2])
    sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        step(xs[i % 2], ys[i % 2])
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def time_end_to_end(step: Stepper | None, batches, spec, steps: int, warmup: int, device: torch.device) -> dict:
    """clips/s reading batches from ``batches`` (a live loader iterator), as the trainer feeds its step.

    ``warmup`` batches are consumed untimed first: make it larger than what the workers may have
    prefetched (2 per worker), so the timing sees the loader's steady rate, not its buffer.
    ``step=None`` times the loader alone (batches moved and normalized on the device, no model).
    """
    from dist_train import data as D

    stats = D.normalization("cnn_rnn")
    wait = 0.0

    def one():
        nonlocal wait
        t = time.perf_counter()
        b = next(batches)
        wait += time.perf_counter() - t
        video, labels, _, _ = D.materialize(b, spec, device)
        x = D.to_model_input(video, "BTCHW", stats)
        if step is not None:
            step(x, labels)
        return labels.shape[0]

    for _ in range(warmup):
        one()
    sync(device)
    wait = 0.0
    t0 = time.perf_counter()
    clips = sum(one() for _ in range(steps))
    sync(device)
    dt = time.perf_counter() - t0
    return {"clips_per_s": clips / dt, "data_wait_frac": wait / dt}


def make_shards(videos: int, workers: int) -> Path:
    """HMDB-like videos packed with the defaults, made here (cached in bench/work)."""
    from bench.videos import ensure_videos
    from preprocess.shard import PackConfig, pack

    out = WORK / f"gpu-shards-{videos}"
    if not (out / "manifest.json").is_file():
        src = ensure_videos(videos, workers=workers)
        pack(PackConfig(str(src), str(out), workers=workers, progress=False, shard_size=50))
    return out


def loader_iter(shards: Path, batch: int, workers: int, decode: str, steps: int):
    """Training batches of as many epochs as ``steps`` needs, one trainer loader per epoch."""
    from dist_train import data as D
    from preprocess.shard_format import load_manifest

    m = load_manifest(shards)
    plan = D.make_plan(m, D.resolve_layout(1, batch), workers, seed=0)
    spec = D.SampleSpec(m.n_frames, m.num_classes, D.ClipTransform(SIZE, train=True), "skip", decode=decode)

    def batches():
        for epoch in range(-(-steps // plan.steps_per_epoch) + 1):
            yield from D.train_loader(plan, spec, rank=0, epoch=epoch, pin=True)

    return batches(), spec


def jpeg_decode(shards: Path, device: torch.device, n: int = 2048) -> dict:
    """frames/s of decode_jpegs on the CPU (one thread) and batched on the GPU, same frames."""
    from dist_train.data import decode_jpegs, read_split
    from preprocess.shard_format import frame_fields, load_manifest

    m = load_manifest(shards)
    frames = []
    for sample in read_split(m, "train", limit=-(-n // m.n_frames)):
        frames += [sample[f] for f in frame_fields(m.n_frames)]
    frames = (frames * (n // max(1, len(frames)) + 1))[:n]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    decode_jpegs(frames[:64])
    t0 = time.perf_counter()
    decode_jpegs(frames)
    cpu = n / (time.perf_counter() - t0)
    torch.set_num_threads(threads)
    out = {"frames": n, "cpu_1thread_fps": round(cpu, 1)}
    if device.type == "cuda":
        for bs in (512,):
            decode_jpegs(frames[:bs], device)
            sync(device)
            t0 = time.perf_counter()
            for i in range(0, n, bs):
                decode_jpegs(frames[i:i + bs], device)
            sync(device)
            out[f"gpu_batch{bs}_fps"] = round(n / (time.perf_counter() - t0), 1)
        out["gpu_vs_cpu_1thread"] = round(out["gpu_batch512_fps"] / cpu, 2)
    return out
