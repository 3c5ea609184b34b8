"""The data plan: which samples train, validate and test, in which order, on which rank and step.

Everything here is computed from ``manifest.json`` alone (keys, labels and groups of every sample);
no shard is opened.

**Layout.** The global batch ``G`` (clips per optimizer step over all processes) is the one number a
run keeps: ``--global-batch G`` splits it over the processes (``G / world_size`` each, as
micro-batches of at most ``--batch-size`` with gradient accumulation making up the rest); without it
``G = batch_size x accum_steps x world_size`` at a fresh start, and a resumed run keeps the
checkpoint's ``G`` (``resolve_layout``).

**Epochs are exact.** An epoch has ``steps = n_train // G`` steps and visits ``steps x G`` training
samples, each once. The ``r = n_train - steps x G`` (fewer than one global batch) left over are a
rotating slice of the canonical sample order (epoch ``e`` leaves out ``[e r, (e + 1) r)`` modulo
``n_train``), so a sample is left out at most once in every ``floor(n_train / r)`` epochs.

**The global order** of an epoch is a pure function of ``(seed, epoch)``, the data, the global batch
(which clips are left out) and the validation hold-out, never of the number of nodes, processes or
loader workers: the train shards are permuted, cut into windows of
``--shuffle-window`` shards, and the samples of each window are permuted (a two-level shuffle that
reads a few shards at a time, for remote storage). Step ``k`` trains on positions
``[k G, (k + 1) G)`` of that order: rank ``r`` takes the ``r``-th ``G / world_size`` of them, as
consecutive micro-batches, and micro-batch ``b`` of a rank is made by its loader worker
``b % workers``. Augmentation is seeded by ``(seed, epoch, position)``. So a resume at any world size
continues the same order from one global cursor: ``step_in_epoch x G`` samples consumed.

**Validation** holds out ``floor(val_fraction x n)`` training *samples*: stratified by class
(largest remainders), or whole source films when the pack split by film (``--split group`` or
``official``), chosen from the seed; never more than the fraction asks.

**Evaluation** (validation and test) splits its samples into contiguous equal blocks over the ranks
and batches over each rank's workers: every sample once, the last batch partial.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dist_train.data.reader import LocalShards, ShardIndexes, store_of
from preprocess.shard_format import Manifest, ShardInfo

MAX_AUTO_WORKERS = 16


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across machines and Python versions): BLAKE2b of their
    64-bit encodings. About 1 us (numpy's SeedSequence took 20); a loader worker draws four a clip."""
    data = b"".join((int(p) % 2**63).to_bytes(8, "little") for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def data_digest(manifest: Manifest) -> str:
    """A digest of the shard set (each shard's split, name, sample count and sha256): a resume checks it."""
    listed = [(split, s.name, s.count, s.sha256) for split in sorted(manifest.shards) for s in manifest.shards[split]]
    return hashlib.sha256(repr(listed).encode()).hexdigest()


def _random_keys(n: int, *seed: int) -> np.ndarray:
    """``n`` uint64 sort keys from the raw PCG64 stream of ``seed`` (a stream numpy keeps stable)."""
    return np.random.PCG64(mix_seed(*seed)).random_raw(n)


@dataclass(frozen=True)
class Samples:
    """The samples of one split in canonical order (shard by shard, as packed), and where to read them."""

    store: LocalShards  # or cache.CachedShards: the same methods
    fields: tuple[str, ...]  # member suffixes of every sample
    shards: tuple[ShardInfo, ...]
    shard: np.ndarray  # int32 [n]: index into ``shards``
    row: np.ndarray  # int32 [n]: position in its shard (and its index file)
    labels: np.ndarray  # int64 [n]
    keys: tuple[str, ...]
    groups: tuple[str, ...]
    indexes: ShardIndexes  # read once, on first use

    @classmethod
    def of(cls, manifest: Manifest, split: str) -> Samples:
        """All samples of ``split``."""
        shards: Sequence[ShardInfo] = manifest.shards.get(split, [])
        counts, store = [s.count for s in shards], store_of(manifest)
        return cls(store, manifest.fields, tuple(shards),
                   np.repeat(np.arange(len(shards), dtype=np.int32), counts),
                   np.concatenate([np.arange(c, dtype=np.int32) for c in counts] or [np.zeros(0, np.int32)]),
                   np.array([y for s in shards for y in s.labels], np.int64),
                   tuple(k for s in shards for k in s.keys), tuple(g for s in shards for g in s.groups),
                   ShardIndexes(store, shards, manifest.fields, manifest.num_classes))

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class Layout:
    """How the global batch is split: ``global_batch = world_size x micro_batch x accum_steps``."""

    global_batch: int
    world_size: int
    micro_batch: int
    accum_steps: int

    @property
    def per_rank(self) -> int:
        """Clips each rank trains on per optimizer step."""
        return self.micro_batch * self.accum_steps


def resolve_layout(world_size: int, batch_size: int, accum_steps: int = 1, global_batch: int | None = None,
                   fixed: bool = False) -> Layout:
    """The layout for ``world_size`` processes; ValueError when ``global_batch`` does not split over them.

    With ``global_batch``, each process takes ``global_batch / world_size`` clips per step as
    micro-batches of the largest size ``<= batch_size`` that divides its share (``accum_steps`` is
    then derived); without it, ``global_batch = batch_size x accum_steps x world_size``. ``fixed``: the
    global batch cannot change (a resume), so the message only offers other process counts.
    """
    if global_batch is None:
        return Layout(batch_size * accum_steps * world_size, world_size, batch_size, accum_steps)
    if global_batch % world_size:
        fits = ", ".join(str(d) for d in range(1, min(global_batch, 64) + 1) if global_batch % d == 0)
        other = "" if fixed else f", or pass a --global-batch that is a multiple of {world_size}"
        raise ValueError(f"--global-batch {global_batch} does not split evenly over {world_size} processes: start "
                         f"{fits} processes{other}" + (" (a resumed run keeps its global batch)" if fixed else ""))
    share = global_batch // world_size
    micro = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return Layout(global_batch, world_size, micro, share // micro)


def hold_out(samples: Samples, fraction: float, seed: int, by_group: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(train ids, validation ids)`` of ``samples``, both in canonical order (see the module docstring)."""
    n = len(samples)
    k = math.floor(fraction * n + 1e-9)
    ids = np.arange(n)
    if k == 0:
        return ids, ids[:0]
    if by_group:
        names = sorted(set(samples.groups))
        sizes = {g: 0 for g in names}
        for g in samples.groups:
            sizes[g] += 1
        keys = _random_keys(len(names), seed, 1)
        chosen, total = set(), 0
        for j in np.argsort(keys, kind="stable"):
            if total + sizes[names[j]] <= k:
                chosen.add(names[j])
                total += sizes[names[j]]
        val = np.array([g in chosen for g in samples.groups])
    else:
        classes, counts = np.unique(samples.labels, return_counts=True)
        exact = k * counts / n
        quota = np.floor(exact).astype(int)
        for j in np.lexsort((classes, -(exact - quota)))[: k - quota.sum()]:  # largest remainders first
            quota[j] += 1
        quota = np.minimum(quota, np.maximum(counts - 1, 0))  # every class keeps a training sample
        keys = _random_keys(n, seed, 2)
        val = np.zeros(n, bool)
        for c, q in zip(classes, quota):
            members = np.flatnonzero(samples.labels == c)
            val[members[np.argsort(keys[members], kind="stable")[:q]]] = True
    return ids[~val], ids[val]


@dataclass(frozen=True)
class DataPlan:
    """Which samples train / validate / test, the layout, and each epoch's global order."""

    train: Samples  # the whole train split; ``train_ids`` and ``val_ids`` index into it
    train_ids: np.ndarray
    val_ids: np.ndarray
    test: Samples
    layout: Layout
    workers: int
    seed: int
    window: int  # shards per shuffle window
    bad_shards: dict[str, str] = field(default_factory=dict)  # name -> reason (``--verify-shards``)

    def eval_set(self, split: str) -> tuple[Samples, np.ndarray]:
        """``(samples, ids)`` evaluated as ``split``: "val" (held-out training samples) or "test"."""
        return (self.train, self.val_ids) if split == "val" else (self.test, np.arange(len(self.test)))

    @property
    def n_train(self) -> int:
        """Training samples (the train split minus validation)."""
        return len(self.train_ids)

    @property
    def global_batch(self) -> int:
        return self.layout.global_batch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch, the same on every rank."""
        return self.n_train // self.global_batch

    @property
    def micro_batches_per_epoch(self) -> int:
        """Micro-batches each rank reads per epoch."""
        return self.steps_per_epoch * self.layout.accum_steps

    def left_out(self, epoch: int) -> np.ndarray:
        """Ids of the training samples epoch ``epoch`` does not visit (fewer than one global batch)."""
        n = self.n_train
        r = n - self.steps_per_epoch * self.global_batch
        return self.train_ids[(epoch * r + np.arange(r)) % n] if r else self.train_ids[:0]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Ids (into ``train``) of epoch ``epoch``'s ``steps x G`` samples, in training order."""
        kept = np.setdiff1d(self.train_ids, self.left_out(epoch), assume_unique=True)
        n_shards = len(self.train.shards)
        keys = _random_keys(n_shards + len(kept), self.seed, epoch, 3)
        shard_rank = np.empty(n_shards, np.int64)
        shard_rank[np.argsort(keys[:n_shards], kind="stable")] = np.arange(n_shards)
        window = shard_rank[self.train.shard[kept]] // self.window
        return kept[np.lexsort((keys[n_shards:], window))]

    def rank_batches(self, epoch: int, rank: int, start_step: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, positions)``, both ``[micro-batches, micro_batch]``: what rank ``rank`` trains on from
        step ``start_step`` of ``epoch`` to its end, and each sample's position in the epoch's order."""
        lay, steps = self.layout, self.steps_per_epoch
        positions = np.arange(start_step * lay.global_batch, steps * lay.global_batch)
        mine = positions.reshape(steps - start_step, lay.world_size, lay.per_rank)[:, rank]
        mine = mine.reshape(-1, lay.micro_batch)
        return self.epoch_order(epoch)[mine], mine


def eval_share(n: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``n`` evaluation samples (blocks differ by at most one)."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def resolve_workers(value: int | str, local_world_size: int | None = None) -> int:
    """Loader workers per process: ``value``, or for ``"auto"`` the CPUs this process may use
    (``os.sched_getaffinity``, capped by ``SLURM_CPUS_PER_TASK``) shared by the node's processes, less
    one for the training process itself; at least 1, at most ``MAX_AUTO_WORKERS``."""
    if value != "auto":
        return int(value)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        cpus = min(cpus, int(slurm))
    procs = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, min(MAX_AUTO_WORKERS, cpus // max(1, procs) - 1))


def make_plan(manifest: Manifest, layout: Layout, workers: int = 0, seed: int = 0, val_fraction: float = 0.0,
              window: int = 16, bad_shards: dict[str, str] | None = None) -> DataPlan:
    """The data plan for this manifest and layout; ValueError when one step needs more data than there is."""
    train, test = Samples.of(manifest, "train"), Samples.of(manifest, "test")
    if len(train) == 0:
        raise ValueError(f"{store_of(manifest).where}/manifest.json lists no training samples; re-pack with train "
                         "videos")
    by_group = manifest.args.get("split") in ("group", "official")
    train_ids, val_ids = hold_out(train, val_fraction, seed, by_group)
    plan = DataPlan(train, train_ids, val_ids, test, layout, workers, seed, max(1, window), dict(bad_shards or {}))
    if plan.steps_per_epoch < 1:
        raise ValueError(
            f"{plan.n_train} training samples cannot fill one optimizer step of {layout.global_batch} clips "
            f"({layout.world_size} processes x {layout.per_rank} clips): lower --global-batch or --batch-size, "
            "start fewer processes, or add data"
        )
    return plan


def validation_note(plan: DataPlan, val_fraction: float, num_classes: int) -> str | None:
    """A warning when the validation set is empty or too small to choose a model on, else None."""
    n_val, n = len(plan.val_ids), len(plan.train)
    if val_fraction > 0 and n_val == 0:
        return (f"--val-fraction {val_fraction} of {n} training clips holds out none: no validation set, "
                "best.pt is the final model")
    if 0 < n_val < max(20, 2 * num_classes):
        return (f"the validation set has only {n_val} clip{'s' if n_val > 1 else ''}: too few to choose a model on "
                "reliably (best.pt may be a lucky epoch); add data, raise --val-fraction, or pass --val-fraction 0 "
                "to keep the final model")
    return None
