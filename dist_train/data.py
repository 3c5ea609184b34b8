"""The data plan and the WebDataset pipelines that feed training and evaluation.

Everything is derived from ``manifest.json`` (read with ``preprocess.shard_format``), never from
listing the folder. Shard reading uses webdataset's tar iterators; members are split with
``shard_format.split_sample``.

Training (every rank runs exactly the same number of steps, so no rank waits in an all-reduce
that the others never reach):

* ``steps_per_epoch = n_train // (batch_size * accum_steps * world_size)``, where ``n_train``
  counts the manifest's train shards minus the validation shards. Each rank reads exactly
  ``steps_per_epoch * accum_steps`` micro-batches per epoch, whatever the shard count or sizes.
* Each (rank, worker) pair is a *slot* ``rank * workers + worker``. A slot reads the shards
  ``P[slot], P[slot + S], P[slot + 2S], ...`` of an endless sequence ``P`` of per-epoch shard
  permutations (``S`` = number of slots; same permutations on every rank), so with many shards the
  slots read disjoint shards, and with fewer shards than slots (even one) slots share shards and
  simply read them again: an epoch is a fixed number of steps, and a sample may be seen 0, 1 or
  more times in one epoch (as with webdataset's ``resampled=True`` + ``with_epoch``).
* A slot shuffles samples through a buffer; shard order, buffer and augmentation are seeded from
  ``(seed, epoch, slot)`` (augmentation also from the sample's position), never from global RNG.
  DataLoader worker ``i`` plays logical worker ``(i + start) % workers`` so that the loader's
  round-robin yields micro-batch ``b`` from logical worker ``b % workers``: the batch sequence of a
  rank is a pure function of the seed, the epoch and the layout.
* Mid-epoch resume is exact: each batch carries how many raw samples its worker has consumed; the
  checkpoint stores those positions, and a resumed worker replays its stream up to them without
  decoding. (With a different world size, worker count or batch size the positions are re-derived
  from the step count: same number of steps, but not the same samples.)

Evaluation (validation and test): shards are split between ranks (balanced by sample count, so
ranks are disjoint) and between each rank's workers; no resampling, no shuffling, a partial last
batch. Every sample is evaluated once; samples that cannot be read are counted per shard (a shard
with fewer readable samples than the manifest says counts the difference), so the caller can check
``evaluated + unreadable == manifest count`` exactly.

Bad data (``on_bad="skip"|"error"``): a sample with missing members, a JPEG that does not decode,
frames of different sizes or a label out of range, and a shard that is missing, truncated or shorter
than the manifest says, are either skipped and reported in the batch's ``"bad"`` list (dicts with
``shard``, ``key``, ``reason``, ``count``) or raise ``BadDataError`` naming the shard and sample.

JPEG decoding goes through ``decode_jpegs`` alone (torchvision.io.decode_jpeg today), so the backend
changes in one place. ``decode="gpu"`` moves decoding and cropping into the training process as one
batched ``decode_jpeg(device="cuda")`` call per batch (``materialize``), falling back to the CPU per
sample when that fails; in that mode a bad sample is dropped from its batch.
"""

from __future__ import annotations

import math
import random
import signal
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF
from webdataset.tariterators import group_by_keys, tar_file_expander

from preprocess.shard_format import Manifest, split_sample

# Per-channel mean/std of the data each family's pretrained weights were trained on.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KINETICS_STATS = ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))


class BadDataError(RuntimeError):
    """A sample or shard cannot be read and ``--on-bad-sample error`` is set."""


@dataclass(frozen=True)
class Shard:
    """One tar of the plan: its path and the sample count the manifest gives it."""

    url: str
    count: int

    @property
    def name(self) -> str:
        """File name, for messages."""
        return Path(self.url).name


@dataclass(frozen=True)
class DataPlan:
    """Which shards train / validate / test, and how many steps an epoch has."""

    train: tuple[Shard, ...]
    val: tuple[Shard, ...]
    test: tuple[Shard, ...]
    world_size: int
    batch_size: int
    accum_steps: int
    workers: int

    @property
    def n_train(self) -> int:
        """Training samples (train split minus validation shards)."""
        return sum(s.count for s in self.train)

    @property
    def global_batch(self) -> int:
        """Clips per optimizer step over all ranks."""
        return self.batch_size * self.accum_steps * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, the same on every rank."""
        return self.n_train // self.global_batch

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each rank reads per epoch."""
        return self.steps_per_epoch * self.accum_steps


def split_validation(train: Sequence[Shard], fraction: float) -> tuple[list[Shard], list[Shard]]:
    """Hold out the first ``round(fraction * n)`` (at least 1) train shards for validation.

    The packer mixes classes within shards, and only the last shard may be short, so the first
    shards make the largest validation set for a given number of shards.
    """
    train = list(train)
    if fraction <= 0.0:
        return train, []
    k = max(1, round(fraction * len(train)))
    if len(train) - k < 1:
        raise ValueError(
            f"--val-fraction {fraction} holds out whole shards, but the train split has only {len(train)} "
            "shard(s): re-pack with a smaller --shard-size, or pass --val-fraction 0 (then best.pt is the "
            "final model, not one selected on validation data)"
        )
    return train[k:], train[:k]


def make_plan(manifest: Manifest, world_size: int, batch_size: int, accum_steps: int = 1, workers: int = 0,
              val_fraction: float = 0.0) -> DataPlan:
    """The data plan for this manifest and layout; ValueError when one step needs more data than there is."""
    shards = {split: [Shard(u, s.count) for u, s in zip(manifest.urls(split), manifest.shards.get(split, []))]
              for split in ("train", "test")}
    if not shards["train"] or manifest.count("train") == 0:
        raise ValueError(f"{manifest.root}/manifest.json lists no training samples; re-pack with train videos")
    train, val = split_validation(shards["train"], val_fraction)
    plan = DataPlan(tuple(train), tuple(val), tuple(shards["test"]), world_size, batch_size, accum_steps, workers)
    if plan.steps_per_epoch < 1:
        raise ValueError(
            f"{plan.n_train} training samples cannot fill one optimizer step of {plan.global_batch} clips "
            f"(--batch-size {batch_size} x --accum-steps {accum_steps} x {world_size} processes): lower "
            "--batch-size or --accum-steps, start fewer processes, or add data"
        )
    return plan


def worker_quota(micro_batches: int, workers: int, worker: int, start: int = 0) -> int:
    """Micro-batches in ``[start, micro_batches)`` that logical worker ``worker`` produces (those ``b % workers == worker``)."""
    first = start + (worker - start) % workers
    return len(range(first, micro_batches, workers))


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across machines and Python versions)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def shard_sequence(n_shards: int, slot: int, n_slots: int, seed: int, epoch: int) -> Iterator[int]:
    """Endless shard indices for ``slot``: every ``n_slots``-th entry of a chain of per-epoch permutations."""
    i, cycle, perm = slot, -1, []
    while True:
        if i // n_shards != cycle:
            cycle = i // n_shards
            perm = random.Random(mix_seed(seed, epoch, cycle)).sample(range(n_shards), n_shards)
        yield perm[i % n_shards]
        i += n_slots


def balanced_parts(counts: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``counts`` split into ``parts`` groups of similar total (largest first, deterministic)."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    totals = [0] * parts
    for i in sorted(range(len(counts)), key=lambda i: (-counts[i], i)):
        j = min(range(parts), key=lambda j: (totals[j], j))
        groups[j].append(i)
        totals[j] += counts[i]
    return [sorted(g) for g in groups]


# ---------------------------------------------------------------------------------------------
# Decoding and augmentation


def decode_jpegs(data: Sequence[bytes], device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Decode JPEG files into RGB uint8 ``[3, H, W]`` tensors: the one place the JPEG backend is chosen."""
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


@dataclass(frozen=True)
class ClipTransform:
    """Crop, resize and flip a clip ``[T, 3, H, W]`` (uint8) the same way for all its frames."""

    size: int
    train: bool
    crop_scale: float = 0.5
    hflip: bool = True
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def _crop_box(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        # torchvision's RandomResizedCrop.get_params, drawing from an explicit generator.
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            r = torch.rand(3, generator=gen).tolist()
            target = area * (self.crop_scale + (1.0 - self.crop_scale) * r[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * r[1])
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                return top, left, ch, cw
        s = min(h, w)
        return (h - s) // 2, (w - s) // 2, s, s

    def __call__(self, clip: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The transformed clip ``[T, 3, size, size]``; ``seed`` draws the training crop and flip."""
        if not self.train:
            clip = TF.resize(clip, [self.size], antialias=True)
            return TF.center_crop(clip, [self.size, self.size])
        gen = torch.Generator().manual_seed(int(seed))
        top, left, h, w = self._crop_box(clip.shape[-2], clip.shape[-1], gen)
        clip = TF.resized_crop(clip, top, left, h, w, [self.size, self.size], antialias=True)
        if self.hflip and float(torch.rand(1, generator=gen)) < 0.5:
            clip = clip.flip(-1)
        return clip


def make_clip(jpegs: Sequence[bytes], transform: ClipTransform, seed: int | None,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode one sample's frames and transform them: uint8 ``[T, 3, size, size]``."""
    return transform(torch.stack(decode_jpegs(jpegs, device)), seed)


# ---------------------------------------------------------------------------------------------
# Reading shards


def _bad(on_bad: str, shard: str, key: str | None, reason: str, count: int = 1) -> dict:
    if on_bad == "error":
        where = f"sample {key!r} of shard {shard}" if key else f"shard {shard}"
        raise BadDataError(f"{where}: {reason}. Re-pack the data, or pass --on-bad-sample skip to skip and count it.")
    return {"shard": shard, "key": key, "reason": reason, "count": count}


def read_shard(shard: Shard, on_bad: str) -> Iterator[dict]:
    """Raw samples of one tar; a shard-level problem yields one ``{"bad": record}`` item instead."""
    n = 0
    try:
        with open(shard.url, "rb") as stream:
            for sample in group_by_keys(tar_file_expander([{"url": shard.url, "stream": stream}])):
                n += 1
                yield sample
    except Exception as e:  # missing file, truncated tar, bad header: all end this shard
        yield {"bad": _bad(on_bad, shard.name, None, f"unreadable after {n} samples ({type(e).__name__}: {e})",
                           max(shard.count - n, 1))}
        return
    if n < shard.count:
        yield {"bad": _bad(on_bad, shard.name, None,
                           f"holds {n} samples but manifest.json says {shard.count} (truncated?)", shard.count - n)}


def parse_sample(sample: dict, n_frames: int, num_classes: int) -> tuple[list[bytes], int]:
    """A raw sample's JPEG frames and label; KeyError/ValueError when members or label are wrong."""
    frames, label, _ = split_sample({k: v for k, v in sample.items() if k != "json"}, n_frames)
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    return frames, label


def _ignore_signals(seed: int, rank: int, worker_id: int) -> None:
    # Stop signals are the training process's business: workers keep serving until it shuts them down.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)
    random.seed(mix_seed(seed, rank, worker_id))
    np.random.seed(mix_seed(seed, rank, worker_id) % 2**32)


@dataclass
class SampleSpec:
    """What a worker needs to turn raw samples into clips."""

    n_frames: int
    num_classes: int
    transform: ClipTransform
    on_bad: str
    decode: str = "cpu"

    def clip(self, sample: dict, seed: int | None) -> tuple[object, int] | dict:
        """``(clip or JPEG list, label)`` for a good sample, else a bad record (or BadDataError)."""
        shard, key = Path(sample.get("__url__", "?")).name, sample.get("__key__")
        try:
            jpegs, label = parse_sample(sample, self.n_frames, self.num_classes)
            if self.decode == "gpu":
                return jpegs, label
            return make_clip(jpegs, self.transform, seed), label
        except Exception as e:
            return _bad(self.on_bad, shard, key, f"{type(e).__name__}: {e}")


def _batch(items: list, labels: list[int], seeds: list[int], decode: str) -> dict:
    if decode == "gpu":
        return {"jpegs": items, "label": torch.tensor(labels), "seed": torch.tensor(seeds)}
    return {"video": torch.stack(items), "label": torch.tensor(labels)}


class TrainStream(IterableDataset):
    """One epoch's training micro-batches of one rank (see the module docstring for the plan)."""

    def __init__(self, plan: DataPlan, spec: SampleSpec, rank: int, epoch: int, seed: int, shuffle_buffer: int,
                 start: int = 0, positions: Sequence[int] | None = None):
        self.plan, self.spec, self.rank, self.epoch, self.seed = plan, spec, rank, epoch, seed
        self.shuffle_buffer, self.start, self.positions = shuffle_buffer, start, positions

    def _raw(self, slot: int, n_slots: int, pending: list) -> Iterator[dict]:
        shards = self.plan.train
        empty_in_a_row = 0
        for i in shard_sequence(len(shards), slot, n_slots, self.seed, self.epoch):
            got = 0
            for item in read_shard(shards[i], self.spec.on_bad):
                if "bad" in item:
                    pending.append(item["bad"])
                else:
                    got += 1
                    yield item
            empty_in_a_row = 0 if got else empty_in_a_row + 1
            if empty_in_a_row > len(shards):
                raise BadDataError(f"no readable training sample in any of the {len(shards)} train shards")

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        i, n_workers = (info.id, info.num_workers) if info else (0, 1)
        worker = (i + self.start) % n_workers
        slot = self.rank * n_workers + worker
        quota = worker_quota(self.plan.micro_batches_per_epoch, n_workers, worker, self.start)
        if quota == 0:
            return
        skip = (self.positions[worker] if self.positions is not None
                else worker_quota(self.start, n_workers, worker) * self.plan.batch_size)
        pending: list[dict] = []
        rng = random.Random(mix_seed(self.seed, self.epoch, slot, 1))
        stream = _shuffled(self._raw(slot, n_workers * self.plan.world_size, pending), self.shuffle_buffer, rng)
        pos = 0
        items, labels, seeds = [], [], []
        for sample in stream:
            pos += 1
            if pos <= skip:
                if pos == skip:
                    pending.clear()  # counted before the checkpoint
                continue
            seed = mix_seed(self.seed, self.epoch, slot, pos)
            out = self.spec.clip(sample, seed)
            if isinstance(out, dict):
                pending.append(out)
                continue
            items.append(out[0])
            labels.append(out[1])
            seeds.append(seed)
            if len(items) == self.plan.batch_size:
                batch = _batch(items, labels, seeds, self.spec.decode)
                batch.update(bad=list(pending), pos=pos, worker=worker)
                yield batch
                pending.clear()
                items, labels, seeds = [], [], []
                quota -= 1
                if quota == 0:
                    return


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle through a buffer of ``size`` items (``size <= 1``: unchanged)."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for x in items:
        buf.append(x)
        if len(buf) >= size:
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


class EvalStream(IterableDataset):
    """Every readable sample of ``shards`` once, in batches (the last one partial), plus bad-data records."""

    def __init__(self, shards: Sequence[Shard], spec: SampleSpec, batch_size: int):
        self.shards, self.spec, self.batch_size = list(shards), spec, batch_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        i, n_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = balanced_parts([s.count for s in self.shards], n_workers)[i]
        pending: list[dict] = []
        items, labels, keys = [], [], []
        for shard in (self.shards[j] for j in mine):
            for sample in read_shard(shard, self.spec.on_bad):
                out = sample["bad"] if "bad" in sample else self.spec.clip(sample, None)
                if isinstance(out, dict):
                    pending.append(out)
                    continue
                items.append(out[0])
                labels.append(out[1])
                keys.append(sample["__key__"])
                if len(items) == self.batch_size:
                    yield {**_batch(items, labels, [0] * len(items), self.spec.decode), "bad": list(pending),
                           "keys": keys}
                    pending.clear()
                    items, labels, keys = [], [], []
        if items or pending:
            batch = _batch(items, labels, [0] * len(items), self.spec.decode) if items else {}
            yield {**batch, "bad": list(pending), "keys": keys}


def _loader(dataset: IterableDataset, workers: int, pin: bool, seed: int, rank: int) -> DataLoader:
    # An own generator: creating a loader must not draw from the global RNG (dropout's stream), or a
    # resumed run would drift from an uninterrupted one.
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin,
        worker_init_fn=partial(_ignore_signals, seed, rank) if workers else None,
        prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
    )


def train_loader(plan: DataPlan, spec: SampleSpec, rank: int, epoch: int, seed: int, shuffle_buffer: int,
                 start: int = 0, positions: Sequence[int] | None = None, pin: bool = False) -> DataLoader:
    """This rank's micro-batches of ``epoch`` from micro-batch ``start`` on (exactly the planned number)."""
    stream = TrainStream(plan, spec, rank, epoch, seed, shuffle_buffer, start, positions)
    return _loader(stream, plan.workers, pin, mix_seed(seed, epoch), rank)


def eval_loader(shards: Sequence[Shard], spec: SampleSpec, rank: int, world_size: int, batch_size: int,
                workers: int, pin: bool = False) -> DataLoader | list:
    """This rank's disjoint share of ``shards`` (empty list when it has none)."""
    mine = [shards[j] for j in balanced_parts([s.count for s in shards], world_size)[rank]]
    if not mine:
        return []
    return _loader(EvalStream(mine, spec, batch_size), min(workers, len(mine)), pin, 0, rank)


def materialize(batch: dict, spec: SampleSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(video uint8 [B, T, 3, S, S], labels, bad records)`` on ``device``; decodes here when decode=gpu."""
    bad = list(batch.get("bad", []))
    if "video" in batch:
        return batch["video"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True), bad
    if "jpegs" not in batch:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device), bad
    clips, keep = [], []
    seeds = batch["seed"].tolist()
    flat = [f for frames in batch["jpegs"] for f in frames]
    try:
        decoded = decode_jpegs(flat, device) if device.type == "cuda" else None
    except RuntimeError:
        decoded = None  # one bad JPEG fails the batched call: fall back to the CPU, sample by sample
    t = spec.n_frames
    for j, frames in enumerate(batch["jpegs"]):
        seed = seeds[j] if spec.transform.train else None
        try:
            if decoded is not None:
                clip = spec.transform(torch.stack(decoded[j * t:(j + 1) * t]), seed)
            else:
                clip = make_clip(frames, spec.transform, seed).to(device)
        except Exception as e:
            bad.append(_bad(spec.on_bad, "?", None, f"decode failed in the training process: {e}"))
            continue
        clips.append(clip)
        keep.append(j)
    labels = batch["label"][keep].to(device)
    video = torch.stack(clips) if clips else torch.empty(0, device=device)
    return video, labels, bad


def to_model_input(video: torch.Tensor, layout: str, stats: tuple) -> torch.Tensor:
    """uint8 ``[B, T, 3, H, W]`` -> normalized float in the model's layout (``BTCHW`` or ``BCTHW``)."""
    mean = torch.tensor(stats[0], device=video.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(stats[1], device=video.device).view(1, 1, 3, 1, 1)
    x = (video.float().div_(255.0) - mean).div_(std)
    return x.permute(0, 2, 1, 3, 4) if layout == "BCTHW" else x


def normalization(model_name: str) -> tuple:
    """Mean/std matching the model family's pretrained weights."""
    return IMAGENET_STATS if model_name == "cnn_rnn" else KINETICS_STATS
