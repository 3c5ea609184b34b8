"""The data plan and the WebDataset pipelines that feed training and evaluation.

Everything is derived from ``manifest.json`` (read with ``preprocess.shard_format``), never from
listing the folder. Shards are read as webdataset reads them (see "Shards are read" below); members
are split with ``shard_format.split_sample``.

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

Shards are read by ``_tar_files``, a small reader for the ustar/GNU tars the packer writes (Python's
``tarfile`` spends more time parsing headers than the JPEG decoder spends on a clip). It behaves like
webdataset's ``tar_file_expander`` + ``group_by_keys`` (same sample dicts, same end-of-archive and
truncation rules); a tar with headers it does not handle (pax, GNU long names, links) is read with
webdataset's iterators instead.

Clips (CPU): JPEG decoding goes through ``decode_jpegs`` alone (OpenCV's libjpeg-turbo on the CPU,
torchvision's batched nvjpeg on CUDA), so the backend changes in one place. A training clip is cropped
as a view of each decoded frame and copied (``crop="random"``, the default) or resized with
``cv2.resize`` (bilinear, ``crop="resized"``) straight into its slot of the batch, which a DataLoader
worker allocates in shared memory (as torch's ``default_collate`` does), so a batch crosses to the
training process without a copy. A worker keeps a few such buffers and fills one again once the
training process has released its batch (``Batch``: ``materialize`` and pinning release), which spares
it fresh shared-memory pages for every batch. Frames are stored channels-last: ``video`` is uint8
``[B, T, 3, S, S]`` with strides of ``[B, T, S, S, 3]``, which is also the layout the channels-last
convolutions want. The evaluation transform (``ClipTransform.eval_scale``, then the centre crop) is
the one ``evaluation.SpatialViews`` uses.

``decode="gpu"`` moves decoding and cropping into the training process (``materialize``): one batched
``decode_jpeg(device="cuda")`` call per batch, then one ``roi_align`` (training crops, bilinear like
the CPU path) or one ``resize`` (evaluation) per frame size in the batch (``clip_batch``). It falls
back to the CPU per sample when decoding fails; in that mode a bad sample is dropped from its batch.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import random
import re
import signal
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF
from webdataset.tariterators import group_by_keys, tar_file_expander

from preprocess.shard_format import Manifest, split_sample

# Per-channel mean/std of the data each family's pretrained weights were trained on.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KINETICS_STATS = ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))
CROPS = ("random", "resized")  # ClipTransform.crop


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
    """A 63-bit seed from integers (stable across machines and Python versions): BLAKE2b of their
    64-bit encodings. About 1 us (numpy's SeedSequence took 20); a loader worker draws four a clip."""
    data = b"".join((int(p) % 2**63).to_bytes(8, "little") for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


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

# OpenCV >= 4.10 decodes straight to RGB; older versions decode BGR and convert. EXIF orientation is
# ignored, as torchvision's decode_jpeg does by default.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_IMREAD_FLAGS = (cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


def decode_jpegs(data: Sequence[bytes], device: str | torch.device = "cpu", hwc: bool = False) -> list:
    """Decode JPEG files into RGB uint8 frames: the one place the JPEG backend is chosen.

    CPU: OpenCV's libjpeg-turbo (``cv2.imdecode``), one frame at a time. CUDA: one batched nvjpeg call
    (``torchvision.io.decode_jpeg``). Returns ``[3, H, W]`` tensors (on the CPU, channels-last views of
    the decoded ``[H, W, 3]`` arrays, no copy), or with ``hwc=True`` the ``[H, W, 3]`` frames: numpy
    arrays on the CPU, tensors on CUDA. Raises ``ValueError`` naming a frame that does not decode on
    the CPU (nvjpeg raises ``RuntimeError`` for the whole call).
    """
    device = torch.device(device)
    if device.type != "cpu":
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return [t.permute(1, 2, 0) for t in out] if hwc else out
    frames = []
    for i, b in enumerate(data):
        try:
            a = cv2.imdecode(np.frombuffer(b, np.uint8), _IMREAD_FLAGS)
        except cv2.error as e:  # e.g. an empty member
            raise ValueError(f"frame {i} is not a decodable JPEG ({e.err})") from None
        if a is None:
            raise ValueError(f"frame {i} is not a decodable JPEG")
        if _IMREAD_RGB is None:
            a = cv2.cvtColor(a, cv2.COLOR_BGR2RGB)
        frames.append(a)
    return frames if hwc else [torch.from_numpy(a).permute(2, 0, 1) for a in frames]


def _same_size(frames: Sequence) -> None:
    shape = frames[0].shape
    if any(f.shape != shape for f in frames):
        raise ValueError(f"frames of different sizes ({sorted({tuple(f.shape) for f in frames})})")


@dataclass(frozen=True)
class ClipTransform:
    """Crop, resize and flip a clip ``[T, 3, H, W]`` (uint8) the same way for all its frames.

    ``crop="random"`` (the default; torchvision's video classification recipe, 112-pixel crops of
    128-pixel frames): training takes a random square of 7/8 of the short side, evaluation the centre
    one, resized to ``size``. With frames packed at ``size * 8 / 7`` (the defaults: 128 and 112) the
    square is ``size`` already: a plain crop, no resize.
    ``crop="resized"``: training takes a random resized crop (torchvision's RandomResizedCrop
    parameters, area ``crop_scale..1``, aspect ``ratio``) resized bilinearly (half-pixel centres, no
    anti-aliasing); evaluation resizes the short side to ``size`` with torchvision's anti-aliased
    ``resize``, then takes the centre crop (the resize ``SpatialViews`` uses). Both: a random flip,
    all drawn from ``seed`` alone (``draw``); resizing is ``cv2.resize`` on the CPU, ``roi_align`` on CUDA.
    """

    size: int
    train: bool
    crop_scale: float = 0.5
    hflip: bool = True
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop: str = "random"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")

    def _resized_box(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """``crop="resized"``: torchvision's RandomResizedCrop.get_params, drawing from ``gen``."""
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

    def draw(self, h: int, w: int, seed: int) -> tuple[int, int, int, int, bool]:
        """The training crop ``(top, left, height, width)`` and flip for ``h x w`` frames, from ``seed`` alone.

        ``crop="random"`` takes the corner and the flip straight from ``mix_seed(seed, i)`` (a
        torch.Generator and its calls cost 20 us a clip, a few % of a loader worker's time);
        ``"resized"`` draws from a torch.Generator, as torchvision does."""
        if self.crop == "random":
            side = self._random_side(h, w)
            top, left = mix_seed(seed, 1) % (h - side + 1), mix_seed(seed, 2) % (w - side + 1)
            return top, left, side, side, self.hflip and mix_seed(seed, 3) % 2 == 1
        gen = torch.Generator().manual_seed(int(seed))
        top, left, ch, cw = self._resized_box(h, w, gen)
        flip = self.hflip and float(torch.rand(1, generator=gen)) < 0.5
        return top, left, ch, cw, flip

    def transform_frames(self, frames: Sequence[np.ndarray] | np.ndarray, seed: int | None,
                         out: np.ndarray | None = None) -> np.ndarray:
        """Transform decoded ``[H, W, 3]`` uint8 frames (CPU) into ``out``, uint8 ``[T, S, S, 3]`` (new if None)."""
        s = self.size
        if out is None:
            out = np.empty((len(frames), s, s, 3), np.uint8)
        if not self.train:
            clip = torch.from_numpy(frames if isinstance(frames, np.ndarray) else np.stack(frames))
            torch.from_numpy(out).copy_(self._eval_crop(clip.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
            return out
        h, w = frames[0].shape[:2]
        top, left, ch, cw, flip = self.draw(h, w, seed)
        if (ch, cw) == (s, s):  # a crop at the stored scale: copied (and flipped) into place, no resize
            for f, o in zip(frames, out):
                if flip:
                    cv2.flip(f[top:top + s, left:left + s], 1, dst=o)
                else:
                    o[...] = f[top:top + s, left:left + s]
            return out
        for f, o in zip(frames, out):
            r = cv2.resize(f[top:top + ch, left:left + cw], (s, s), dst=o, interpolation=cv2.INTER_LINEAR)
            if r is not o:  # OpenCV allocated its own output after all
                o[...] = r
            if flip:
                cv2.flip(o, 1, dst=o)
        return out

    def _random_side(self, h: int, w: int) -> int:
        """Side of the ``crop="random"`` square in ``h x w`` frames: 7/8 of the short side (``size`` at
        ``size * 8 / 7``), the same field of view for any ``size``."""
        return min(h, w, max(1, round(min(h, w) * self.size / round(self.size * 8 / 7))))

    def eval_scale(self, clip: torch.Tensor) -> torch.Tensor:
        """The frames at the scale evaluation crops ``size`` squares from: the short side at ``size * 8 / 7``
        (``crop="random"``, unchanged when already so) or at ``size`` (``crop="resized"``)."""
        short = round(self.size * 8 / 7) if self.crop == "random" else self.size
        return clip if min(clip.shape[-2:]) == short else TF.resize(clip, [short], antialias=True)

    def _eval_crop(self, clip: torch.Tensor) -> torch.Tensor:
        return TF.center_crop(self.eval_scale(clip), [self.size, self.size])

    def __call__(self, clip: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The transformed clip ``[T, 3, size, size]``; ``seed`` draws the training crop and flip."""
        if not self.train:
            return self._eval_crop(clip)
        if clip.device.type == "cpu":
            frames = clip.permute(0, 2, 3, 1)
            frames = frames.numpy() if frames.is_contiguous() else frames.contiguous().numpy()
            return torch.from_numpy(self.transform_frames(frames, seed)).permute(0, 3, 1, 2)
        return clip_batch(self, [clip], [seed])[0]


def _plain(transform: ClipTransform) -> bool:
    """True when ``transform`` is a ClipTransform whose ``__call__`` is not overridden (its output is ``[T, 3, S, S]``)."""
    return isinstance(transform, ClipTransform) and type(transform).__call__ is ClipTransform.__call__


def clip_batch(transform: ClipTransform, clips: Sequence[Sequence[torch.Tensor] | torch.Tensor],
               seeds: Sequence[int | None]) -> torch.Tensor:
    """Transform decoded clips (each ``T`` frames ``[3, H, W]`` of one size, any device) in one batch.

    One call per frame size in the batch: ``roi_align`` (training: each clip's own crop, bilinear,
    then its flip) or ``resize`` + centre crop (evaluation). Returns uint8 ``[B, T, 3, S, S]``.
    """
    s, t = transform.size, len(clips[0])
    first = clips[0][0]
    out = torch.empty((len(clips), t, 3, s, s), dtype=torch.uint8, device=first.device)
    groups: dict[tuple, list[int]] = {}
    for j, clip in enumerate(clips):
        groups.setdefault(tuple(clip[0].shape), []).append(j)
    for (_, h, w), idx in groups.items():
        frames = torch.stack([f for j in idx for f in clips[j]])  # [len(idx) * T, 3, H, W]
        if not transform.train:
            out[idx] = transform._eval_crop(frames).reshape(len(idx), t, 3, s, s)
            continue
        boxes, flips = [], []
        for k, j in enumerate(idx):
            top, left, ch, cw, flip = transform.draw(h, w, seeds[j])
            boxes += [[k * t + i, left, top, left + cw, top + ch] for i in range(t)]
            flips += [flip] * t
        rois = torch.tensor(boxes, dtype=torch.float32, device=frames.device)
        res = roi_align(frames.float(), rois, (s, s), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        flipped = torch.tensor(flips, device=frames.device)
        res = torch.where(flipped[:, None, None, None], res.flip(-1), res)
        out[idx] = res.round_().clamp_(0, 255).to(torch.uint8).reshape(len(idx), t, 3, s, s)
    return out


def make_clip(jpegs: Sequence[bytes], transform: ClipTransform, seed: int | None,
              device: str | torch.device = "cpu", out: np.ndarray | None = None) -> torch.Tensor:
    """Decode one sample's frames and transform them: uint8 ``[T, 3, size, size]``.

    On the CPU a plain ``ClipTransform`` writes the clip into ``out`` (uint8 ``[T, S, S, 3]``, e.g. a
    slot of a batch) when given; the result is then a view of it. Other transforms (e.g.
    ``evaluation.SpatialViews``) get the decoded clip as a ``[T, 3, H, W]`` tensor.
    """
    device = torch.device(device)
    if device.type != "cpu":
        frames = decode_jpegs(jpegs, device)
        _same_size(frames)
        return transform(torch.stack(frames), seed)
    frames = decode_jpegs(jpegs, hwc=True)
    _same_size(frames)
    if _plain(transform):
        return torch.from_numpy(transform.transform_frames(frames, seed, out)).permute(0, 3, 1, 2)
    return transform(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), seed)


# ---------------------------------------------------------------------------------------------
# Reading shards


def _bad(on_bad: str, shard: str, key: str | None, reason: str, count: int = 1) -> dict:
    if on_bad == "error":
        where = f"sample {key!r} of shard {shard}" if key else f"shard {shard}"
        raise BadDataError(f"{where}: {reason}. Re-pack the data, or pass --on-bad-sample skip to skip and count it.")
    return {"shard": shard, "key": key, "reason": reason, "count": count}


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_POSIX_MAGIC = b"ustar\x0000"
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta


class _NeedsTarfile(Exception):
    """A tar header ``_tar_files`` does not handle: read the shard with webdataset's iterators instead."""


def _octal(field: bytes) -> int:
    # tarfile's nti(): NUL-terminated octal; base-256 (GNU, huge values) is left to tarfile.
    if field[0] in (0o200, 0o377):
        raise _NeedsTarfile("base-256 number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _checksums_ok(headers: list[bytes]) -> int:
    """How many of the tar ``headers`` (512-byte blocks) carry a valid checksum before the first bad one.

    Vectorized over the headers: the stored checksum (octal digits after optional spaces, up to the
    first other byte) must equal the unsigned or the signed byte sum of the header with its checksum
    field counted as spaces, as tarfile requires.
    """
    if not headers:
        return 0
    blocks = np.frombuffer(b"".join(headers), np.uint8).reshape(len(headers), _BLOCK)
    stored = np.zeros(len(headers), np.int64)
    ended = np.zeros(len(headers), bool)
    started = np.zeros(len(headers), bool)
    for c in range(148, 156):
        col = blocks[:, c].astype(np.int64)
        digit = (col >= 0x30) & (col <= 0x37)
        ended |= ~digit & (started | (col != 0x20))
        take = digit & ~ended
        stored = np.where(take, stored * 8 + col - 0x30, stored)
        started |= take
    ok = blocks.sum(1, dtype=np.int64) - blocks[:, 148:156].sum(1, dtype=np.int64) + 8 * 32 == stored
    if not ok.all():  # the signed sum (old tars) only where the unsigned one fails
        signed = blocks.view(np.int8)
        ok |= signed.sum(1, dtype=np.int64) - signed[:, 148:156].sum(1, dtype=np.int64) + 8 * 32 == stored
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if len(bad) else len(headers)


def _tar_files(buf) -> Iterator[tuple[str, bytes]]:
    """``(name, content)`` of the regular files of a ustar/GNU tar held in ``buf`` (an mmap), in order.

    Behaves like ``tarfile`` in stream mode: the archive ends at a zero block, at the end of the file on
    a header boundary, or at an unreadable header after the first; a member cut short raises
    ``tarfile.ReadError``. Raises ``_NeedsTarfile`` for what tarfile should judge: a file that does not
    start with a tar header (empty, compressed, not a tar), and pax, GNU long-name, link and other
    special headers. Headers are checksummed in bulk before the members they describe are yielded.
    """
    n = len(buf)
    if n < _BLOCK:
        raise _NeedsTarfile("empty or tiny file")
    pos = 0
    while True:
        heads, headers, sizes, stop = [], [], [], None
        while len(heads) < 1024:
            if n - pos < _BLOCK:
                stop = "eof"  # on a header boundary, or a cut header: the end, as for tarfile
                break
            hb = buf[pos:pos + _BLOCK]
            try:
                if hb[135] not in (0, 0x20):
                    raise ValueError
                size = int(hb[124:135], 8)  # what tarfile writes: 11 octal digits, NUL
            except ValueError:
                try:
                    size = _octal(hb[124:136])
                except ValueError:
                    stop = "bad"
                    break
                if hb == _ZERO_BLOCK:
                    stop = "end"
                    break
            kind = hb[156]
            if kind == 0x35:  # '5' directory: no data blocks (tarfile skips none)
                size = 0
            elif kind not in (0x30, 0x00, 0x37):  # regular files: '0', NUL, '7' (contiguous)
                raise _NeedsTarfile(f"tar member type {chr(kind)!r}")
            if pos + _BLOCK + size > n:
                stop = "cut"
                break
            heads.append(pos)
            headers.append(hb)
            sizes.append(size)
            pos += _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
            if pos > n:  # data whole, padding cut: tarfile yields the member, then fails to move on
                stop = "padding"
                break
        good = _checksums_ok(headers)
        for hb, head, size in zip(headers[:good], heads, sizes):
            kind = hb[156]
            if kind == 0x35:
                continue
            name = hb[:100].split(b"\0", 1)[0]
            if hb[345] and hb[257:265] == _POSIX_MAGIC:
                name = hb[345:500].split(b"\0", 1)[0] + b"/" + name
            name = name.decode("utf-8", "surrogateescape")
            if kind == 0 and name.endswith("/"):
                continue  # an old-style directory entry
            yield name, buf[head + _BLOCK:head + _BLOCK + size]
        if good < len(heads):
            pos, stop = heads[good], "bad"
        elif stop == "cut" and _checksums_ok([buf[pos:pos + _BLOCK]]) == 0:
            stop = "bad"
        if stop == "bad" and pos == 0:
            raise _NeedsTarfile("no valid tar header at the start (compressed? not a tar?)")
        if stop == "cut":
            raise tarfile.ReadError(f"unexpected end of data: the member at byte {pos} is cut short")
        if stop == "padding":
            raise tarfile.ReadError("unexpected end of data: the last member's padding is cut short")
        if stop is not None:
            return


def _tar_samples(url: str, buf) -> Iterator[dict]:
    """webdataset's ``group_by_keys(tar_file_expander(...))`` over ``_tar_files``: the same sample dicts."""
    current: dict | None = None
    for name, data in _tar_files(buf):
        if name.startswith("__") and (("/" not in name and name.endswith("__")) or _META.match(name)):
            continue
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot <= slash + 1:  # no extension: webdataset's base_plus_ext gives no key
            continue
        key, suffix = name[:dot], name[dot + 1:].lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if suffix in current:
            raise ValueError(f"{name}: duplicate file name in tar file {suffix} {current.keys()}")
        current[suffix] = data
    if current is not None:
        yield current


def _shard_samples(url: str) -> Iterator[dict]:
    """Samples of one tar: ``_tar_samples`` on a memory map, or webdataset's iterators for tars it cannot parse."""
    n = 0
    with open(url, "rb") as f:
        try:  # mapped in one go where the OS can (cheaper than a page fault per 4 kB)
            buf = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                            prot=mmap.PROT_READ)
        except (ValueError, OSError):  # empty, or not a regular file
            buf = None
        if buf is not None:
            try:
                for sample in _tar_samples(url, buf):
                    n += 1
                    yield sample
                return
            except _NeedsTarfile:
                pass
            finally:
                buf.close()
    with open(url, "rb") as stream:
        for i, sample in enumerate(group_by_keys(tar_file_expander([{"url": url, "stream": stream}]))):
            if i >= n:
                yield sample


def read_shard(shard: Shard, on_bad: str) -> Iterator[dict]:
    """Raw samples of one tar; a shard-level problem yields one ``{"bad": record}`` item instead."""
    n = 0
    try:
        for sample in _shard_samples(shard.url):
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
    cv2.setNumThreads(1)  # one decode/resize thread per worker: the workers are the parallelism
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

    def clip(self, sample: dict, seed: int | None, out: np.ndarray | None = None) -> tuple[object, int] | dict:
        """``(clip or JPEG list, label)`` for a good sample, else a bad record (or BadDataError).

        ``out``: where a plain ``ClipTransform`` writes the clip (see ``make_clip``)."""
        try:
            jpegs, label = parse_sample(sample, self.n_frames, self.num_classes)
            if self.decode == "gpu":
                return jpegs, label
            return make_clip(jpegs, self.transform, seed, out=out), label
        except Exception as e:
            shard = Path(sample.get("__url__", "?")).name
            return _bad(self.on_bad, shard, sample.get("__key__"), f"{type(e).__name__}: {e}")


def _shared_storage(nbytes: int) -> torch.UntypedStorage:
    """Bytes in shared memory inside a DataLoader worker (as ``default_collate`` makes its batches), so
    the worker hands them to the training process without the copy that pickling private memory makes."""
    if get_worker_info() is None:
        return torch.UntypedStorage(nbytes)
    try:  # what default_collate uses (a private API: fall back to the public one)
        return torch.UntypedStorage._new_shared(nbytes)
    except AttributeError:
        return torch.empty(nbytes, dtype=torch.uint8).share_memory_().untyped_storage()


def _view(storage: torch.UntypedStorage, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape`` on ``storage`` from byte ``offset`` (a multiple of its item size)."""
    return torch.empty(0, dtype=dtype).set_(storage, offset // torch.empty((), dtype=dtype).element_size(),
                                            tuple(shape))


def _shared_empty(shape: Sequence[int], dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """An empty tensor on ``_shared_storage``."""
    return _view(_shared_storage(math.prod(shape) * torch.empty((), dtype=dtype).element_size()), 0, shape, dtype)


class Batch(dict):
    """A batch as the loaders yield it: a dict (``video``, ``label``, ``bad``, ...), possibly with a ``lease``.

    On the CPU path a worker writes video and labels into a buffer it lends with the batch (``lease``,
    one byte of that buffer, 1 while lent) and fills again once the batch is released: ``release()``
    after copying video and labels out (``materialize`` does), or ``pin_memory()`` (the DataLoader's
    pin thread) after pinning them. Reusing buffers spares the worker fresh shared-memory pages for
    every batch; a batch that is never released costs its worker a new buffer, never its data.
    """

    def release(self) -> None:
        """Hand the buffer back to the worker: ``video`` and ``label`` may be overwritten from now on."""
        lease = self.pop("lease", None)
        if lease is not None:
            lease.fill_(0)

    def pin_memory(self, device=None) -> Batch:
        """A pinned copy (what DataLoader's ``pin_memory=True`` calls); releases this batch's buffer."""
        pinned = Batch({k: v.pin_memory() if isinstance(v, torch.Tensor) else v
                        for k, v in self.items() if k != "lease"})
        self.release()
        return pinned


class _BufferRing:
    """A worker's batch buffers (video ``[B, T, S, S, 3]`` uint8, labels ``[B]`` int64, a lease byte):
    a buffer is filled again only after its batch was released; never more than ``keep`` are kept."""

    def __init__(self, batch_size: int, clip_shape: Sequence[int], keep: int = 4):
        self.video_shape = (batch_size, *clip_shape)
        self.label_at = -(-math.prod(self.video_shape) // 8) * 8
        self.lease_at = self.label_at + 8 * batch_size
        self.keep, self.buffers = keep, []

    def lend(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(video, labels, lease)`` views of a free buffer, marked lent."""
        free = [buf for buf in self.buffers if int(buf[2]) == 0]
        if free:
            buf = free[0]
        else:
            st = _shared_storage(self.lease_at + 1)
            buf = (_view(st, 0, self.video_shape, torch.uint8),
                   _view(st, self.label_at, (self.video_shape[0],), torch.int64),
                   _view(st, self.lease_at, (1,), torch.uint8))
            if len(self.buffers) < self.keep:
                self.buffers.append(buf)
        buf[2].fill_(1)
        return buf


class _Batch:
    """One batch being filled: clips go straight into a batch buffer (shared memory in a worker)."""

    def __init__(self, spec: SampleSpec, size: int):
        self.spec, self.size = spec, size
        # Plain transforms have a known output shape, so each clip is written into its slot.
        self.direct = spec.decode != "gpu" and _plain(spec.transform)
        if self.direct:
            s = spec.transform.size
            self.ring = _BufferRing(size, (spec.n_frames, s, s, 3))
        self.buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # video, labels, lease
        self.slots: np.ndarray | None = None  # numpy view of the video buffer, [B, T, S, S, 3]
        self.items: list = []
        self.labels: list[int] = []
        self.seeds: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, sample: dict, seed: int | None) -> dict | None:
        """Add ``sample``'s clip; returns the bad record instead when it cannot be used."""
        out = None
        if self.direct:
            if self.buf is None:
                self.buf = self.ring.lend()
                self.slots = self.buf[0].numpy()
            out = self.slots[len(self.labels)]
        res = self.spec.clip(sample, seed, out)
        if isinstance(res, dict):
            return res
        if not self.direct:
            self.items.append(res[0])
        self.labels.append(res[1])
        self.seeds.append(0 if seed is None else seed)
        return None

    def take(self) -> Batch:
        """The batch (``video``, or ``jpegs`` + ``seed`` for decode=gpu, and ``label``); empties this one."""
        n = len(self.labels)
        if self.spec.decode == "gpu":
            out = Batch(jpegs=self.items, seed=torch.tensor(self.seeds), label=torch.tensor(self.labels))
        elif self.direct:
            video, labels, lease = self.buf
            labels[:n] = torch.tensor(self.labels)
            # video [B, T, 3, S, S] with channels-last strides; the lease last, after what it covers
            out = Batch(video=video[:n].permute(0, 1, 4, 2, 3), label=labels[:n], lease=lease)
        else:
            out = Batch(video=torch.stack(self.items, out=_shared_empty((n, *self.items[0].shape), self.items[0].dtype)),
                        label=torch.tensor(self.labels))
        self.buf, self.items, self.labels, self.seeds = None, [], [], []
        return out


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
        batch = _Batch(self.spec, self.plan.batch_size)
        for sample in stream:
            pos += 1
            if pos <= skip:
                if pos == skip:
                    pending.clear()  # counted before the checkpoint
                continue
            bad = batch.add(sample, mix_seed(self.seed, self.epoch, slot, pos))
            if bad is not None:
                pending.append(bad)
                continue
            if len(batch) == self.plan.batch_size:
                out = batch.take()
                out.update(bad=list(pending), pos=pos, worker=worker)
                yield out
                pending.clear()
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
        batch, keys = _Batch(self.spec, self.batch_size), []
        for shard in (self.shards[j] for j in mine):
            for sample in read_shard(shard, self.spec.on_bad):
                bad = sample["bad"] if "bad" in sample else batch.add(sample, None)
                if bad is not None:
                    pending.append(bad)
                    continue
                keys.append(sample["__key__"])
                if len(batch) == self.batch_size:
                    out = batch.take()
                    out.update(bad=list(pending), keys=keys)
                    yield out
                    pending.clear()
                    keys = []
        if len(batch) or pending:
            out = batch.take() if len(batch) else Batch()
            out.update(bad=list(pending), keys=keys)
            yield out


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


def _decode_batch(flat: list[bytes], device: torch.device) -> list[torch.Tensor] | None:
    """All frames of a batch decoded in one call on ``device`` (CUDA), or None: off CUDA, or when one bad
    JPEG fails the batched call (the caller then makes the clips on the CPU, sample by sample)."""
    if device.type != "cuda":
        return None
    try:
        return decode_jpegs(flat, device)
    except RuntimeError:
        return None


def materialize(batch: dict, spec: SampleSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """``(video uint8 [B, T, 3, S, S], labels, bad records)`` on ``device``; decodes here when decode=gpu.

    decode=gpu on CUDA: one batched decode, then ``clip_batch`` (one crop+resize call per frame size);
    a transform that overrides ``__call__`` (e.g. ``evaluation.SpatialViews``) runs per clip. When the
    batched decode fails (one bad JPEG fails it all), or off CUDA, clips are made on the CPU one by one.
    """
    bad = list(batch.get("bad", []))
    if "video" in batch:
        video, labels = batch["video"], batch["label"]
        if "lease" not in batch:  # pinned already, or a private buffer
            return video.to(device, non_blocking=True), labels.to(device, non_blocking=True), bad
        # A worker's lent buffer: copy out (synchronously), then hand it back for the next batch.
        if device.type == "cpu":
            video, labels = video.clone(), labels.clone()
        else:
            video, labels = video.to(device), labels.to(device)
        batch.release()
        return video, labels, bad
    if "jpegs" not in batch:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device), bad
    seeds = [s if spec.transform.train else None for s in batch["seed"].tolist()]
    decoded = _decode_batch([f for frames in batch["jpegs"] for f in frames], device)
    t = spec.n_frames
    clips: dict[int, torch.Tensor] = {}
    if decoded is not None:
        groups = {}
        for j in range(len(batch["jpegs"])):
            frames = decoded[j * t:(j + 1) * t]
            if all(f.shape == frames[0].shape for f in frames):
                groups[j] = frames
            else:
                bad.append(_bad(spec.on_bad, "?", None, "decode in the training process: frames of different sizes"))
        if groups and _plain(spec.transform):
            idx = list(groups)
            video = clip_batch(spec.transform, [groups[j] for j in idx], [seeds[j] for j in idx])
            if len(idx) == len(batch["jpegs"]):
                return video, batch["label"].to(device), bad
            clips = dict(zip(idx, video))
        else:
            clips = {j: spec.transform(torch.stack(frames), seeds[j]) for j, frames in groups.items()}
    else:
        for j, frames in enumerate(batch["jpegs"]):
            try:
                clips[j] = make_clip(frames, spec.transform, seeds[j]).to(device)
            except Exception as e:
                bad.append(_bad(spec.on_bad, "?", None, f"decode failed in the training process: {e}"))
    keep = sorted(clips)
    labels = batch["label"][keep].to(device)
    video = torch.stack([clips[j] for j in keep]) if keep else torch.empty(0, device=device)
    return video, labels, bad


def to_model_input(video: torch.Tensor, layout: str, stats: tuple) -> torch.Tensor:
    """uint8 ``[B, T, 3, H, W]`` -> normalized float in the model's layout (``BTCHW`` or ``BCTHW``).

    One pass (``addcmul`` converts and scales together); the memory layout of ``video`` is kept, so
    the channels-last clips of the CPU path stay channels-last (what the convolutions want).
    """
    mean = torch.tensor(stats[0], dtype=torch.float32, device=video.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32, device=video.device).view(1, 1, 3, 1, 1)
    x = torch.addcmul(-mean / std, video, 1.0 / (255.0 * std))  # (v / 255 - mean) / std
    return x.permute(0, 2, 1, 3, 4) if layout == "BCTHW" else x


def normalization(model_name: str) -> tuple:
    """Mean/std matching the model family's pretrained weights."""
    return IMAGENET_STATS if model_name == "cnn_rnn" else KINETICS_STATS
