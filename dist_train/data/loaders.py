"""The DataLoaders: a rank's planned micro-batches (training) or its share of a split (evaluation).

Both are ``IterableDataset``s over a list of batches fixed in advance by ``dist_train.data.plan``:
loader worker ``i`` of ``W`` makes batches ``i, i + W, i + 2W, ...`` and the DataLoader yields them
round-robin, so batch ``b`` always comes ``b``-th, whatever ``W`` is. A training batch holds exactly
the samples its positions in the epoch's global order name (a sample that cannot be read is left
out and reported, never replaced by another), each augmented with the seed
``mix_seed(seed, epoch, position)``. So the samples and clips of every step depend on the seed, the
epoch and the global batch only, never on the number of processes or workers, and a run resumed at
step ``k`` starts reading at step ``k``: nothing is replayed or decoded twice.

Workers are forked (``multiprocessing_context="fork"``: Python's default on Linux up to 3.13, made
explicit) after the training process has read the shards' indexes and made the workers' batch
buffers (``batches.pool_for``), so both are shared, not copied: a batch crosses to the training
process as the address of its buffer. Where fork is not available, batches travel the usual way.
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import time
from collections.abc import Iterator
from functools import partial

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dist_train.data.batches import Batch, BatchFiller, BufferPool, SampleSpec, pool_for
from dist_train.data.cache import Prefetch
from dist_train.data.clips import _plain
from dist_train.data.plan import DataPlan, Samples, eval_share, mix_seed
from dist_train.data.reader import SampleError, ShardReader, bad_record
from dist_train.faults import DataStall, StopRequest, fault_hook


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _read_batches(samples: Samples, spec: SampleSpec, batches: list[np.ndarray], seeds: list | None,
                  bad_shards: dict[str, str], pool: BufferPool | None, ahead: int) -> Iterator[Batch]:
    """This worker's share (every ``W``-th) of ``batches`` (arrays of sample ids), read, decoded and batched;
    from a remote store, its next ``ahead`` shards are fetched meanwhile."""
    i, n_workers = _worker()
    # From a remote store, a shard open is a shard in use that the cache cannot evict: hold open only the
    # shards of a shuffle window (the samples of a window interleave), plus one.
    reader = ShardReader(samples.store, samples.shards, samples.fields, bad_shards, indexes=samples.indexes,
                         max_open=min(16, ahead + 1) if samples.store.remote_store else 16)
    filler = BatchFiller(spec, _batch_size(batches), pool if get_worker_info() else None, i)
    prefetch = None
    if samples.store.remote_store:
        order = dict.fromkeys(int(s) for b in batches[i::n_workers] for s in samples.shard[b])  # first-read order
        prefetch = Prefetch(samples.store, samples.shards, list(order), ahead)
    hang_on = fault_hook("DIST_TRAIN_TEST_HANG_ON_KEY")  # tests only: a worker stuck in a read
    try:
        for b in range(i, len(batches), n_workers):
            for j, sid in enumerate(batches[b].tolist()):
                shard, key = samples.shards[samples.shard[sid]], samples.keys[sid]
                if prefetch:
                    prefetch.reading(int(samples.shard[sid]))
                if key == hang_on:
                    time.sleep(3600)
                try:
                    sample = reader.sample(int(samples.shard[sid]), int(samples.row[sid]))
                except SampleError as e:
                    filler.add_bad(bad_record(spec.on_bad, shard.name, key, str(e)))
                    continue
                sample["__shard__"] = shard.name
                filler.add(sample, None if seeds is None else seeds[b][j], int(samples.labels[sid]))
            yield filler.take()
    finally:
        if prefetch:
            prefetch.stop()
        reader.close()


def _batch_size(batches: list[np.ndarray]) -> int:
    return max((len(b) for b in batches), default=1)


class _Stream(IterableDataset):
    """What both streams share: their samples, spec and batches, and the buffer pool of their workers."""

    samples: Samples
    spec: SampleSpec
    batches: list[np.ndarray]
    seeds: list | None = None
    bad_shards: dict[str, str]
    pool: BufferPool | None = None
    ahead: int = 2  # shards a worker prefetches past the one it reads (remote shards only)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return _read_batches(self.samples, self.spec, self.batches, self.seeds, self.bad_shards, self.pool,
                             self.ahead)


class TrainStream(_Stream):
    """One rank's training micro-batches of one epoch from step ``start_step`` on (see the module docstring)."""

    def __init__(self, plan: DataPlan, spec: SampleSpec, rank: int, epoch: int, start_step: int = 0):
        self.samples, self.spec, self.bad_shards = plan.train, spec, plan.bad_shards
        self.ahead = plan.window  # the next shuffle window, while reading this one
        ids, positions = plan.rank_batches(epoch, rank, start_step)
        self.batches = list(ids)
        self.seeds = [[mix_seed(plan.seed, epoch, p) for p in row] for row in positions.tolist()]


class EvalStream(_Stream):
    """Samples ``ids`` of ``samples`` once each, in batches of ``batch_size`` (the last one partial)."""

    def __init__(self, samples: Samples, ids: np.ndarray, spec: SampleSpec, batch_size: int,
                 bad_shards: dict[str, str] | None = None):
        self.samples, self.spec, self.bad_shards = samples, spec, dict(bad_shards or {})
        self.batches = [ids[j:j + batch_size] for j in range(0, len(ids), batch_size)]


def _worker_init(seed: int, rank: int, worker_id: int) -> None:
    # Stop signals are the training process's business: workers keep serving until it shuts them down.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)  # one decode/resize thread per worker: the workers are the parallelism
    random.seed(mix_seed(seed, rank, worker_id))
    np.random.seed(mix_seed(seed, rank, worker_id) % 2**32)


def _loader(dataset: _Stream, workers: int, pin: bool, seed: int, rank: int, timeout: float = 0.0) -> DataLoader:
    workers = min(workers, len(dataset))
    dataset.samples.indexes.load_all()  # here, once: the workers inherit them
    spec, fork = dataset.spec, "fork" in multiprocessing.get_all_start_methods()
    if workers and fork and spec.decode != "gpu" and _plain(spec.transform) and not spec.multi_view:
        s = spec.transform.size  # buffers the workers inherit: a batch crosses as its address
        dataset.pool = pool_for(dataset, workers, _batch_size(dataset.batches), (spec.frames, s, s, 3))
    # An own generator: creating a loader must not draw from the global RNG (dropout's stream), or a
    # resumed run would drift from an uninterrupted one.
    return DataLoader(
        dataset, batch_size=None, num_workers=workers, pin_memory=pin,
        worker_init_fn=partial(_worker_init, seed, rank) if workers else None,
        prefetch_factor=2 if workers else None, generator=torch.Generator().manual_seed(mix_seed(seed, rank)),
        multiprocessing_context="fork" if dataset.pool is not None else None, timeout=timeout if workers else 0,
    )


def train_loader(plan: DataPlan, spec: SampleSpec, rank: int, epoch: int, start_step: int = 0,
                 pin: bool = False, timeout: float = 0.0) -> DataLoader:
    """This rank's micro-batches of ``epoch`` from optimizer step ``start_step`` on (exactly as planned);
    ``timeout``: seconds the DataLoader waits for a batch from its workers (0 = forever)."""
    return _loader(TrainStream(plan, spec, rank, epoch, start_step), plan.workers, pin, mix_seed(plan.seed, epoch),
                   rank, timeout)


def watched(loader: DataLoader, stop: StopRequest, timeout: float, where: str) -> Iterator[Batch]:
    """The loader's batches, each wait for one marked in ``stop`` (a stop that finds the data stuck exits at
    once, see ``dist_train.faults``); the loader's ``timeout`` becomes a DataStall naming the shards."""
    it = iter(loader)
    for b in range(len(loader.dataset)):
        stop.waiting_since = time.monotonic()
        try:
            batch = next(it)
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            raise DataStall(f"no batch from the data loader for {timeout:g} s (--data-timeout): its workers were "
                            f"reading {waited_for(loader, b)} of {where}; a shard may be on a stuck file system. "
                            "Check it, then rerun the same command to resume from the last checkpoint") from None
        finally:
            stop.waiting_since = None
        yield batch


def waited_for(loader: DataLoader, b: int) -> str:
    """What batch ``b`` of ``loader`` holds: its shards and first keys (for a message about a stuck read)."""
    samples, ids = loader.dataset.samples, loader.dataset.batches[b].tolist()
    shards = sorted({samples.shards[samples.shard[sid]].name for sid in ids})
    keys = [samples.keys[sid] for sid in ids[:3]]
    return f"shard(s) {', '.join(shards)} (samples {', '.join(keys)}{', ...' if len(ids) > 3 else ''})"


def eval_loader(samples: Samples, ids: np.ndarray, spec: SampleSpec, rank: int, world_size: int, batch_size: int,
                workers: int, pin: bool = False, bad_shards: dict[str, str] | None = None,
                timeout: float = 0.0) -> DataLoader | list:
    """This rank's contiguous share of samples ``ids`` (an empty list when it has none)."""
    mine = ids[eval_share(len(ids), rank, world_size).start:eval_share(len(ids), rank, world_size).stop]
    if len(mine) == 0:
        return []
    return _loader(EvalStream(samples, mine, spec, batch_size, bad_shards), workers, pin, 0, rank, timeout)
