"""Batches: clips written into shared-memory buffers by loader workers, handed to the training process.

The training process makes each loader worker's batch buffers before the workers start
(``BufferPool``: anonymous shared memory, which the forked workers inherit); a worker writes a batch
into a free buffer and sends the training process only its address, and fills that buffer again
once the training process has released the batch (``Batch.release``, called by ``materialize`` after
copying out, or by ``Batch.pin_memory`` after pinning). A worker whose buffers are all lent uses one
of its own (``share_memory_``, the public API), sent with the batch. ``Batch`` is a plain class, not
a mapping, so torch's pin-memory thread calls its ``pin_memory()`` (torch's documented hook for
custom batch types) whatever order a torch version checks types in.

A batch that fails to decode a sample carries the bad-sample record instead of the clip, so a
micro-batch can be smaller than ``--batch-size``; its ``keys`` are the samples it does hold.
"""

from __future__ import annotations

import math
import mmap
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import get_worker_info

from dist_train.data.clips import ClipTransform, _plain, frame_size, make_clip
from dist_train.data.plan import mix_seed
from dist_train.data.reader import bad_record
from preprocess.shard_format import LABEL_FIELD, frame_fields, split_sample, view_positions


def parse_sample(sample: dict, n_frames: int, num_classes: int) -> tuple[list, int]:
    """A sample's JPEG frames and label; KeyError/ValueError when members or label are wrong."""
    try:
        frames = [sample[f] for f in frame_fields(n_frames)]
        label = sample[LABEL_FIELD]
        label = label if isinstance(label, int) else int(bytes(label))
    except KeyError:
        split_sample(sample, n_frames)  # raises the KeyError that names the missing members
        raise
    if not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside 0..{num_classes - 1}")
    return frames, label


TEMPORAL = ("jitter", "centre", "all")  # SampleSpec.temporal


@dataclass
class SampleSpec:
    """What a worker needs to turn samples into clips.

    A sample stores ``n_frames`` frames: ``frames`` segments of ``temporal_views`` frames each (the
    manifest's ``temporal_views``, ``preprocess.shard --temporal-views``). A clip takes one frame per
    segment, by ``temporal``: ``jitter`` one of them at random, seeded by the clip's seed (training);
    ``centre`` the middle one (offset ``(K - 1) // 2``; for odd K exactly the frame a one-view pack
    stores); ``all`` every temporal view (view k: offset k of every segment), stacked before the
    spatial views: ``[K x S, T, ...]``, whose scores evaluation averages."""

    n_frames: int
    num_classes: int
    transform: ClipTransform
    on_bad: str
    decode: str = "cpu"
    temporal_views: int = 1
    temporal: str = "centre"

    @property
    def frames(self) -> int:
        """Frames of a clip (``T``): one per segment."""
        return self.n_frames // self.temporal_views

    @property
    def multi_view(self) -> bool:
        """Whether a clip is several temporal views (then it has no plain ``[T, S, S, 3]`` shape)."""
        return self.temporal == "all" and self.temporal_views > 1

    def pick(self, jpegs: Sequence, seed: int | None) -> list[list]:
        """The frames of each temporal view the clip takes (one list unless ``multi_view``)."""
        k, t = self.temporal_views, self.frames
        if k == 1:
            return [jpegs]
        if self.temporal == "all":
            return [[jpegs[p] for p in view_positions(t, k, v)] for v in range(k)]
        if self.temporal == "jitter" and seed is not None:
            offsets = np.random.PCG64(mix_seed(seed, 0x7E3D)).random_raw(t) % k
            return [[jpegs[i * k + int(o)] for i, o in enumerate(offsets)]]
        return [[jpegs[p] for p in view_positions(t, k, (k - 1) // 2)]]

    def make(self, jpegs: Sequence, seed: int | None, out: np.ndarray | None = None):
        """The clip of a sample's stored frames ``jpegs`` (see ``pick``); ``out`` as for ``make_clip``."""
        views = self.pick(jpegs, seed)
        if len(views) == 1:
            if out is not None and self.transform.train and _plain(self.transform):  # the batch filler's hot path
                self.transform.train_clip(views[0], *frame_size(views[0]), seed, out)
                return out
            return make_clip(views[0], self.transform, seed, out=out)
        parts = [make_clip(v, self.transform, seed) for v in views]
        return torch.cat(parts) if parts[0].dim() == 5 else torch.stack(parts)

    def clip(self, sample: dict, seed: int | None, out: np.ndarray | None = None,
             label: int | None = None) -> tuple[object, int] | dict:
        """``(clip or JPEG list, label)`` for a good sample, else a bad record (or BadDataError).

        ``out``: where a plain ``ClipTransform`` writes the clip (see ``make_clip``); ``label``: what the
        manifest says the sample's label is (its label member must agree)."""
        try:
            jpegs, got = parse_sample(sample, self.n_frames, self.num_classes)
            if label is not None and got != label:
                raise ValueError(f"its label member says {got}, manifest.json says {label}")
            if self.decode == "gpu":  # the frames travel to the training process: copies of the reader's views
                return [bytes(j) for j in self.pick(jpegs, seed)[0]], got
            return self.make(jpegs, seed, out), got
        except Exception as e:
            return bad_record(self.on_bad, sample.get("__shard__", "?"), sample.get("__key__"),
                              f"{type(e).__name__}: {e}")


class Batch:
    """A batch as the loaders yield it: ``video`` uint8 ``[B, T, 3, S, S]`` (or ``jpegs`` + ``seeds`` for
    ``--decode gpu``), ``label``, ``keys``, ``bad`` records, and the ``lease`` of the buffer it lies in.

    A batch in a ``BufferPool`` slot crosses from a loader worker to the training process as the slot's
    address alone (``__getstate__``); the training process finds the same memory in its pool."""

    __slots__ = ("video", "label", "keys", "bad", "lease", "jpegs", "seeds", "slot")

    def __init__(self, video=None, label=None, keys=(), bad=(), lease=None, jpegs=None, seeds=None, slot=None):
        self.video, self.label, self.keys, self.bad = video, label, list(keys), list(bad)
        self.lease, self.jpegs, self.seeds, self.slot = lease, jpegs, seeds, slot

    def __getstate__(self) -> dict:
        state = {k: getattr(self, k) for k in self.__slots__}
        if self.slot is not None:  # (pool token, worker, slot, n): the memory is the pool's
            state.update(video=None, label=None, lease=None)
        return state

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        if self.slot is not None:
            token, worker, slot, n = self.slot
            video, label, self.lease = _POOLS[token].buffer(worker, slot)
            self.video, self.label = _as_batch(video, n), label[:n]

    def release(self) -> None:
        """Hand the buffer back to the worker: ``video`` and ``label`` may be overwritten from now on."""
        if self.lease is not None:
            self.lease.fill_(0)
            self.lease = None

    def pin_memory(self, device=None) -> Batch:
        """A pinned copy (what DataLoader's ``pin_memory=True`` calls); releases this batch's buffer."""
        pinned = Batch(_pinned(self.video), _pinned(self.label), self.keys, self.bad, None, self.jpegs,
                       _pinned(self.seeds))
        self.release()
        return pinned


def _pinned(t):
    return t.pin_memory() if isinstance(t, torch.Tensor) else t


def _as_batch(video: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` clips of a ``[B, T, S, S, 3]`` buffer as ``[n, T, 3, S, S]`` (channels-last strides)."""
    return video[:n].permute(0, 1, 4, 2, 3)


def _shared_empty(nbytes: int) -> torch.Tensor:
    """``nbytes`` of uint8 in shared memory inside a DataLoader worker (private memory elsewhere)."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    return t.share_memory_() if get_worker_info() is not None else t


def _view(buf: torch.Tensor, offset: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A ``dtype`` tensor of ``shape`` on ``buf``'s bytes from byte ``offset`` (a multiple of its item size)."""
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return buf[offset:offset + n].view(dtype).view(tuple(shape))


_POOLS: weakref.WeakValueDictionary[str, BufferPool] = weakref.WeakValueDictionary()


class BufferPool:
    """Batch buffers (video ``[B, T, S, S, 3]`` uint8, labels ``[B]`` int64, a lease byte), ``per_worker``
    for each loader worker, made by the training process before its workers start.

    ``shared=True``: anonymous shared memory (``mmap``), which the workers inherit when they are forked
    (the loaders start them so): a worker writes a batch into a free slot of its own and sends only the
    slot's address, where torch's default sharing would pass a file descriptor per tensor per batch
    (about 1.1 ms of a worker's time per batch of 8 clips, 7% of what it spends decoding them, on the
    2-core AMD EPYC VM of 2026-12-01). The pages are touched once here, not by each new worker (another
    4-6%). A buffer is lent (lease byte 1) until the training process releases the batch. When all of a
    worker's buffers are lent (a batch held on to), it uses a new buffer of its own, sent with the batch:
    slower, never blocking, never overwriting a batch in use. ``pool_for`` reuses pools across loaders.
    """

    def __init__(self, workers: int, batch_size: int, clip_shape: Sequence[int], per_worker: int = 4,
                 shared: bool = True):
        self.token = uuid.uuid4().hex
        self.video_shape = (batch_size, *clip_shape)
        self.label_at = -(-math.prod(self.video_shape) // 8) * 8
        self.lease_at = self.label_at + 8 * batch_size
        self.nbytes, self.shared = self.lease_at + 1, shared
        self._buffers = [[self._make(shared) for _ in range(per_worker)] for _ in range(max(1, workers))]
        # Bumped each time the pool serves a new loader: a worker of an earlier one (stalled past its loader's
        # shutdown) then finds another generation and lends itself no buffer of the pool.
        self.generation = torch.frombuffer(mmap.mmap(-1, 8), dtype=torch.int64) if shared \
            else torch.zeros(1, dtype=torch.int64)
        _POOLS[self.token] = self

    def _make(self, shared: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raw = torch.frombuffer(mmap.mmap(-1, self.nbytes), dtype=torch.uint8).fill_(0) if shared \
            else torch.zeros(self.nbytes, dtype=torch.uint8)
        return self._views(raw)

    def _views(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(video, labels, lease)`` of a buffer's bytes."""
        return (_view(raw, 0, self.video_shape, torch.uint8),
                _view(raw, self.label_at, (self.video_shape[0],), torch.int64),
                _view(raw, self.lease_at, (1,), torch.uint8))

    def buffer(self, worker: int, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(video, labels, lease)`` of a slot."""
        return self._buffers[worker][slot]

    def lend(self, worker: int, generation: int = 0) -> tuple[int | None, tuple[torch.Tensor, ...]]:
        """``(slot, (video, labels, lease))`` of a free buffer of ``worker``, marked lent; slot None for a
        buffer of its own (in shared memory inside a worker) when all are lent, or when the pool serves
        another loader than the one of ``generation``."""
        for slot, buf in enumerate(self._buffers[worker]):
            if int(buf[2]) == 0 and int(self.generation) == generation:
                buf[2].fill_(1)
                return slot, buf
        buf = self._views(_shared_empty(self.nbytes))
        buf[2].fill_(1)
        return None, buf


_IDLE: dict[tuple, list[BufferPool]] = {}


def pool_for(owner: object, workers: int, batch_size: int, clip_shape: Sequence[int]) -> BufferPool:
    """A shared pool for ``owner`` (a loader's dataset) while it lives: an idle pool of this shape, or a new one.

    The pool becomes idle again when ``owner`` is collected, which happens only after the loader that
    holds it has shut its workers down, and only if no batch of it is still lent (else it is dropped).
    """
    key = (workers, batch_size, tuple(clip_shape))
    idle = _IDLE.setdefault(key, [])
    pool = idle.pop() if idle else BufferPool(workers, batch_size, clip_shape)
    pool.generation += 1  # what this owner's workers will find (they start after this)
    weakref.finalize(owner, _idle_again, idle, pool)
    return pool


def _idle_again(idle: list, pool: BufferPool) -> None:
    if len(idle) < 2 and all(int(buf[2]) == 0 for bufs in pool._buffers for buf in bufs):
        idle.append(pool)


class BatchFiller:
    """One batch being filled: clips go straight into a buffer of ``pool`` (for plain transforms)."""

    def __init__(self, spec: SampleSpec, size: int, pool: BufferPool | None = None, worker: int = 0):
        self.spec, self.size, self.worker = spec, size, worker
        self.generation = int(pool.generation) if pool is not None else 0
        # Plain transforms have a known output shape, so each clip is written into its slot.
        self.direct = spec.decode != "gpu" and _plain(spec.transform) and not spec.multi_view
        if self.direct:
            s = spec.transform.size
            pool = pool or BufferPool(1, size, (spec.frames, s, s, 3), shared=False)
            # Each clip is made in this one buffer, which stays in the CPU's cache, then copied into its
            # batch slot in one pass: 7% of a worker's time less than cropping frame by frame into a batch
            # that does not fit in the cache (2-core AMD EPYC VM, 2026-12-01; bench.load).
            self.scratch = np.empty((spec.frames, s, s, 3), np.uint8)
        self.pool = pool
        self._clear()

    def _clear(self) -> None:
        self.slot: int | None = None
        self.buf: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # video, labels, lease
        self.slots: np.ndarray | None = None  # numpy view of the video buffer, [B, T, S, S, 3]
        self.items, self.labels, self.seeds, self.keys, self.bad = [], [], [], [], []

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, sample: dict, seed: int | None, label: int | None = None) -> None:
        """Add ``sample``'s clip, or its bad record when it cannot be used."""
        res = self.spec.clip(sample, seed, self.scratch if self.direct else None, label)
        if isinstance(res, dict):
            self.bad.append(res)
            return
        if self.direct:
            if self.buf is None:
                self.slot, self.buf = self.pool.lend(self.worker, self.generation)
                self.slots = self.buf[0].numpy()
            np.copyto(self.slots[len(self.labels)], self.scratch)
        else:
            self.items.append(res[0])
        self.labels.append(res[1])
        self.seeds.append(0 if seed is None else seed)
        self.keys.append(sample["__key__"])

    def add_bad(self, record: dict) -> None:
        """Record a sample that could not even be read."""
        self.bad.append(record)

    def take(self) -> Batch:
        """The batch; empties this filler."""
        n, keys, bad = len(self.labels), self.keys, self.bad
        if n == 0:
            out = Batch(keys=keys, bad=bad)
            if self.buf is not None:
                self.buf[2].fill_(0)
        elif self.spec.decode == "gpu":
            out = Batch(jpegs=self.items, seeds=torch.tensor(self.seeds), label=torch.tensor(self.labels),
                        keys=keys, bad=bad)
        elif self.direct:
            video, labels, lease = self.buf
            labels[:n] = torch.tensor(self.labels)
            shared = self.slot is not None and self.pool.shared
            out = Batch(video=_as_batch(video, n), label=labels[:n], keys=keys, bad=bad, lease=lease,
                        slot=(self.pool.token, self.worker, self.slot, n) if shared else None)
        else:
            video = torch.stack(self.items)
            out = Batch(video=_view(_shared_empty(video.numel() * video.element_size()), 0, video.shape,
                                    video.dtype).copy_(video), label=torch.tensor(self.labels), keys=keys, bad=bad)
        self._clear()
        return out
