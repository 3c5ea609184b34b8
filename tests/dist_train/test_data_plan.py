"""The data plan (dist_train.data.plan): layout, validation hold-out, exact epochs, the global order."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dist_train import data
from preprocess.shard_format import Manifest, ShardInfo


def fake_manifest(train: list[int], test: list[int] = (5,), classes: int = 2, split: str = "stratified",
                  films: int = 0) -> Manifest:
    """A manifest with shards of the given sizes; labels cycle over the classes, groups over ``films``
    source films (one per sample when 0). No files: planning needs none."""
    shards, n = {}, 0
    for split_name, sizes in (("train", train), ("test", test)):
        shards[split_name] = []
        for i, count in enumerate(sizes):
            ids = range(n, n + count)
            shards[split_name].append(ShardInfo(
                f"{split_name}-{i:06d}.tar", count, "0" * 64, 0, f"{split_name}-{i:06d}.idx", "0" * 64,
                keys=tuple(f"{k:08d}" for k in ids), labels=tuple(k % classes for k in ids),
                groups=tuple(f"film{(k // classes) % films if films else k}" for k in ids)))
            n += count
    return Manifest(Path("/shards"), [f"c{i}" for i in range(classes)], 16, shards, args={"split": split})


def plan_of(train, world=1, batch=2, accum=1, global_batch=None, val=0.0, window=16, seed=0, **kw) -> data.DataPlan:
    layout = data.resolve_layout(world, batch, accum, global_batch)
    return data.make_plan(fake_manifest(train, **kw), layout, workers=2, seed=seed, val_fraction=val, window=window)


# ------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("world, batch, accum, global_batch, want", [
    (2, 8, 1, None, (16, 2, 8, 1)),
    (2, 2, 3, None, (12, 2, 2, 3)),
    (1, 2, 1, 12, (12, 1, 2, 6)),
    (2, 2, 1, 12, (12, 2, 2, 3)),
    (3, 2, 1, 12, (12, 3, 2, 2)),
    (4, 2, 1, 12, (12, 4, 1, 3)),  # a share of 3: micro-batches of 1, the largest size <= 2 that divides it
    (8, 8, 1, 128, (128, 8, 8, 2)),
])
def test_layout_splits_the_global_batch(world, batch, accum, global_batch, want):
    lay = data.resolve_layout(world, batch, accum, global_batch)
    assert (lay.global_batch, lay.world_size, lay.micro_batch, lay.accum_steps) == want
    assert lay.world_size * lay.per_rank == lay.global_batch


def test_layout_refuses_a_global_batch_that_does_not_split_naming_what_fits():
    with pytest.raises(ValueError, match=r"--global-batch 12 does not split evenly over 5 processes: "
                                         r"start 1, 2, 3, 4, 6, 12"):
        data.resolve_layout(5, 2, 1, 12)


def test_steps_and_plan_errors():
    plan = plan_of([17], world=2, batch=2)
    assert plan.steps_per_epoch == 17 // 4 and plan.micro_batches_per_epoch == 4
    with pytest.raises(ValueError, match="--global-batch or --batch-size"):
        plan_of([3], world=2, batch=2)


# ------------------------------------------------------------------------------------------- validation
def test_validation_is_a_stratified_fraction_of_samples_never_more():
    plan = plan_of([100, 80], val=0.1, classes=4)
    val_labels = Counter(plan.train.labels[plan.val_ids].tolist())
    assert len(plan.val_ids) == 18 and sorted(val_labels.values()) == [4, 4, 5, 5]  # 45 clips a class
    assert not set(plan.val_ids) & set(plan.train_ids) and len(plan.val_ids) + plan.n_train == 180
    again = plan_of([100, 80], val=0.1, classes=4)
    assert np.array_equal(again.val_ids, plan.val_ids)  # from the seed alone
    assert not np.array_equal(plan_of([100, 80], val=0.1, classes=4, seed=1).val_ids, plan.val_ids)
    # 180 clips in shards of 100 + 80 used to give 80 training clips (a whole shard held out); 48 clips in
    # one shard could not train at all. Now: 162 and 44.
    assert plan.n_train == 162 and plan_of([48], val=0.1).n_train == 44
    for n in (5, 9, 19, 33, 50):  # small sets: floor(fraction x n), never more
        assert len(plan_of([n], val=0.1).val_ids) == n // 10


def test_validation_keeps_a_training_sample_of_every_class():
    plan = plan_of([12], val=0.5, classes=6)  # 2 clips a class: one each may go to validation
    assert set(plan.train.labels[plan.train_ids].tolist()) == set(range(6))


@pytest.mark.parametrize("split", ["group", "official"])
def test_validation_holds_out_whole_films_when_the_pack_split_by_film(split):
    plan = plan_of([60, 60], val=0.2, classes=3, split=split, films=8)
    groups = np.array(plan.train.groups)
    assert 0 < len(plan.val_ids) <= 24
    assert not set(groups[plan.val_ids]) & set(groups[plan.train_ids])  # no film on both sides


def test_hmdb51_sized_plan():
    # 3,570 train clips of 51 classes in 36 shards (35 x 100 + 70), 1,530 test: the default layout on 8 GPUs.
    plan = plan_of([100] * 35 + [70], test=[100] * 15 + [30], world=8, batch=8, val=0.1, classes=51)
    assert len(plan.val_ids) == 357 and plan.n_train == 3213
    per_class = Counter(plan.train.labels[plan.val_ids].tolist())
    assert set(per_class) == set(range(51)) and max(per_class.values()) - min(per_class.values()) <= 1
    assert plan.steps_per_epoch == 3213 // 64 == 50 and data.validation_note(plan, 0.1, 51) is None


def test_validation_note_when_too_small_or_empty():
    assert "only 3 clips" in data.validation_note(plan_of([35], val=0.1), 0.1, 2)
    assert "holds out none" in data.validation_note(plan_of([9], val=0.1), 0.1, 2)
    assert data.validation_note(plan_of([9]), 0.0, 2) is None


# ------------------------------------------------------------------------------------------- the order
def test_each_epoch_visits_every_sample_once_but_a_rotating_remainder():
    plan = plan_of([7, 7, 6], batch=3, val=0.0)  # 20 samples, global batch 3: 6 steps, 2 left out
    seen_out = Counter()
    for epoch in range(12):
        order = plan.epoch_order(epoch)
        out = plan.left_out(epoch)
        assert len(order) == 18 and len(set(order.tolist())) == 18
        assert sorted([*order.tolist(), *out.tolist()]) == list(range(20))
        seen_out.update(out.tolist())
    # 2 left out per epoch, rotating through the canonical order: none twice in floor(20 / 2) = 10 epochs
    assert max(Counter(np.concatenate([plan.left_out(e) for e in range(10)]).tolist()).values()) == 1
    assert not np.array_equal(plan.epoch_order(0), plan.epoch_order(1))
    assert np.array_equal(plan.epoch_order(3), plan_of([7, 7, 6], batch=3).epoch_order(3))  # (seed, epoch) alone


def test_order_is_a_two_level_shuffle_over_windows_of_shards():
    plan = plan_of([10] * 12, batch=4, window=3)
    order = plan.epoch_order(0)
    shards = plan.train.shard[order]
    # consecutive windows of 30 samples (3 shards each), each drawn from 3 shards only
    windows = [set(shards[j:j + 30].tolist()) for j in range(0, 120, 30)]
    assert all(len(w) == 3 for w in windows) and set().union(*windows) == set(range(12))
    assert len(set(shards[:10].tolist())) > 1  # samples of a window are mixed, not shard by shard
    assert [sorted(w) for w in windows] != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]  # shards permuted too


def test_the_order_of_each_step_does_not_depend_on_the_world_size():
    # global batch 12 at 1, 2, 3, 4 processes: per step, the concatenation over ranks is the same slice
    reference = plan_of([30, 30], global_batch=12).epoch_order(2)
    for world in (1, 2, 3, 4):
        plan = plan_of([30, 30], world=world, global_batch=12)
        steps = plan.steps_per_epoch
        per_rank = [plan.rank_batches(2, r) for r in range(world)]
        for k in range(steps):
            accum = plan.layout.accum_steps
            got = np.concatenate([ids[k * accum:(k + 1) * accum].ravel() for ids, _ in per_rank])
            assert np.array_equal(got, reference[k * 12:(k + 1) * 12]), (world, k)
            pos = np.concatenate([p[k * accum:(k + 1) * accum].ravel() for _, p in per_rank])
            assert np.array_equal(pos, np.arange(k * 12, (k + 1) * 12))
        # resuming at step 3 reads exactly the rest
        ids, _ = plan.rank_batches(2, world - 1, start_step=3)
        assert np.array_equal(ids, per_rank[-1][0][3 * plan.layout.accum_steps:])


def test_eval_shares_cover_every_sample_once():
    for n, world in ((10, 3), (2, 4), (0, 2), (1000, 7)):
        shares = [data.eval_share(n, r, world) for r in range(world)]
        assert [i for s in shares for i in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ------------------------------------------------------------------------------------------- workers
def test_auto_workers_from_affinity_slurm_and_processes_per_node(monkeypatch):
    monkeypatch.setattr(data.plan.os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert data.resolve_workers("auto", local_world_size=8) == 11  # 12 CPUs per process, one for itself
    assert data.resolve_workers("auto", local_world_size=1) == data.plan.MAX_AUTO_WORKERS
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")
    assert data.resolve_workers("auto", local_world_size=4) == 3
    monkeypatch.setattr(data.plan.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert data.resolve_workers("auto") == 1  # never fewer than one
    assert data.resolve_workers(0) == 0 and data.resolve_workers(5) == 5
