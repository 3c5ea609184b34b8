"""The loaders and batches (dist_train.data.loaders, .batches) on real shards, in-process and with worker processes."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train import data
from preprocess.shard_format import load_manifest
from tests.conftest import make_shards


def spec(manifest, train=True, on_bad="skip", size=24):
    return data.SampleSpec(manifest.n_frames, manifest.num_classes, data.ClipTransform(size, train, 0.5, True), on_bad)


def plan_for(manifest, world=1, batch=2, workers=0, global_batch=None, val=0.0, seed=0) -> data.DataPlan:
    return data.make_plan(manifest, data.resolve_layout(world, batch, 1, global_batch), workers, seed, val)


@pytest.fixture(scope="module")
def uneven(sample_videos, tmp_path_factory) -> dict[int, Path]:
    """The sample videos packed into 1, 2 and 3 train shards (16 train clips: 16 | 8+8 | 6+6+4)."""
    return {n: make_shards(sample_videos, tmp_path_factory.mktemp(f"uneven{n}"), shard_size=size)
            for n, size in ((1, 16), (2, 8), (3, 6))}


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_every_rank_gets_exactly_its_planned_samples(uneven, n_shards):
    m = load_manifest(uneven[n_shards])
    assert len(m.shards["train"]) == n_shards
    plan = plan_for(m, world=2, batch=3, workers=2)
    assert plan.steps_per_epoch == 16 // 6
    trained = []
    for rank in range(2):
        batches = list(data.train_loader(plan, spec(m), rank, epoch=0))
        assert len(batches) == plan.micro_batches_per_epoch
        assert all(b.video.shape == (3, 16, 3, 24, 24) and b.video.dtype == torch.uint8 for b in batches)
        ids, _ = plan.rank_batches(0, rank)
        assert [b.keys for b in batches] == [[plan.train.keys[i] for i in row] for row in ids.tolist()]
        trained += [k for b in batches for k in b.keys]
    assert len(trained) == len(set(trained)) == 12  # each sample at most once per epoch, 16 - 12 left out


def test_a_resumed_epoch_reads_exactly_the_rest_with_the_same_clips(sample_shards):
    m = load_manifest(sample_shards)
    plan = plan_for(m, batch=2, workers=2, seed=5)
    full = list(data.train_loader(plan, spec(m), 0, epoch=1))
    for start in (1, 3, 6):
        rest = list(data.train_loader(plan, spec(m), 0, epoch=1, start_step=start))
        assert len(rest) == len(full) - start
        assert all(torch.equal(a.video, b.video) and torch.equal(a.label, b.label) and a.keys == b.keys
                   for a, b in zip(full[start:], rest))


def test_clips_are_keyed_by_position_not_by_layout(sample_shards):
    """The same sample at the same epoch gets the same crop and flip at any world size or worker count."""
    m = load_manifest(sample_shards)
    clips = {}
    for world, workers in ((1, 0), (2, 1), (4, 2)):
        plan = plan_for(m, world=world, workers=workers, global_batch=4)
        got = {}
        for rank in range(world):
            for b in data.train_loader(plan, spec(m), rank, epoch=2):
                got.update({k: v.clone() for k, v in zip(b.keys, b.video)})
        clips[world] = got
    assert clips[1].keys() == clips[2].keys() == clips[4].keys() and len(clips[1]) == 16
    assert all(torch.equal(clips[1][k], clips[2][k]) and torch.equal(clips[1][k], clips[4][k]) for k in clips[1])


def test_worker_batches_cross_as_slot_addresses_and_arrive_channels_last(sample_shards):
    m = load_manifest(sample_shards)
    plan = plan_for(m, batch=2, workers=1)
    inline = list(data.train_loader(plan_for(m, batch=2, workers=0), spec(m), 0, epoch=0))
    n, first = 0, None
    for b, c in zip(data.train_loader(plan, spec(m), 0, epoch=0), inline, strict=True):
        v = b.video
        assert b.slot is not None and b.slot[1] == 0 and b.slot[3] == 2  # (pool, worker 0, slot, 2 clips)
        assert v.shape == (2, 16, 3, 24, 24) and v.stride()[2] == 1 and v.permute(0, 1, 3, 4, 2).is_contiguous()
        assert torch.equal(v, c.video) and b.keys == c.keys  # a worker and the main process make the same clips
        first = data.to_model_input(v, "BTCHW", data.IMAGENET_STATS) if first is None else first
        b.release()
        n += 1
    assert n == plan.micro_batches_per_epoch
    assert first.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)  # no copy before NHWC convs


def test_pool_lends_only_released_buffers_and_never_blocks():
    pool = data.batches.BufferPool(workers=1, batch_size=2, clip_shape=(3, 4, 4, 3), per_worker=2, shared=False)
    (s0, a), (s1, b) = pool.lend(0), pool.lend(0)
    assert (s0, s1) == (0, 1) and a[0].data_ptr() != b[0].data_ptr() and int(a[2]) == int(b[2]) == 1
    s2, c = pool.lend(0)  # both lent: a buffer of its own, not one in use
    assert s2 is None and c[0].data_ptr() not in (a[0].data_ptr(), b[0].data_ptr())
    data.Batch(video=b[0], label=b[1], lease=b[2]).release()
    assert pool.lend(0)[0] == 1 and int(b[2]) == 1  # the released one comes back, marked lent again
    # video, labels and lease share one buffer; labels and lease lie past the video bytes
    assert a[0].untyped_storage().data_ptr() == a[1].untyped_storage().data_ptr() == a[2].untyped_storage().data_ptr()
    assert a[0].data_ptr() + a[0].numel() <= a[1].data_ptr() < a[2].data_ptr()


def test_a_reused_pool_lends_nothing_to_a_worker_of_the_loader_before():
    """A pool goes back to the idle list when its loader is gone; should a worker of that loader still be running
    (stalled past its shutdown), it must not write into the pool the next loader uses."""
    import gc

    class Owner:  # stands for a loader's dataset
        pass

    shape = (2, 4, 4, 3)
    first = Owner()
    pool = data.batches.pool_for(first, 1, 2, shape)
    stale = data.BatchFiller(data.SampleSpec(2, 2, data.ClipTransform(4, True), "skip"), 2, pool, 0)
    del first
    gc.collect()
    second = Owner()
    assert data.batches.pool_for(second, 1, 2, shape) is pool  # reused
    fresh = data.BatchFiller(data.SampleSpec(2, 2, data.ClipTransform(4, True), "skip"), 2, pool, 0)
    assert pool.lend(0, stale.generation)[0] is None  # the stale worker gets a buffer of its own
    assert pool.lend(0, fresh.generation)[0] == 0


@pytest.mark.parametrize("workers", [0, 2])
def test_released_buffers_are_refilled_without_touching_what_materialize_returned(sample_shards, workers):
    """Reused buffers (released by materialize, across real worker processes) give exactly the batches
    of a run that holds every batch (its workers then use buffers of their own)."""
    m = load_manifest(sample_shards)
    plan = plan_for(m, batch=1, workers=workers, seed=3)
    sp, cpu = spec(m), torch.device("cpu")
    kept = [(b.video, b.label) for b in data.train_loader(plan, sp, 0, epoch=0)]
    reused = []
    for b in data.train_loader(plan, sp, 0, epoch=0):
        assert b.lease is not None
        video, labels, keys, _ = data.materialize(b, sp, cpu)
        assert b.lease is None and video.data_ptr() != b.video.data_ptr() and len(keys) == 1
        reused.append((video, labels))
    assert len(reused) == len(kept) == plan.micro_batches_per_epoch > 4 * max(1, workers)  # more than a pool holds
    assert all(torch.equal(v, w) and torch.equal(y, z) for (v, y), (w, z) in zip(reused, kept))


def test_pinning_copies_then_releases(monkeypatch):
    """DataLoader's pin thread calls Batch.pin_memory (a plain class, not a mapping): copy first, release after."""
    pool = data.batches.BufferPool(1, 1, (1, 2, 2, 3), per_worker=1, shared=False)
    _, (video, labels, lease) = pool.lend(0)
    video.fill_(7)
    seen = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: seen.append(int(lease)) or t.clone())
    batch = data.Batch(video=video, label=labels, lease=lease, keys=["k"])
    pinned = torch.utils.data._utils.pin_memory.pin_memory(batch)  # what the pin thread does with a batch
    assert isinstance(pinned, data.Batch) and pinned.lease is None and int(lease) == 0 and seen == [1, 1]
    assert pinned.video.data_ptr() != video.data_ptr() and int(pinned.video.min()) == 7 and pinned.keys == ["k"]


def eval_keys(samples, ids, m, world, workers, on_bad="skip", batch=3):
    keys, bad = [], []
    for rank in range(world):
        for b in data.eval_loader(samples, ids, spec(m, train=False, on_bad=on_bad), rank, world, batch, workers):
            keys += b.keys
            bad += b.bad
            if b.keys:
                assert b.video.shape[0] == len(b.keys) <= batch
    return keys, bad


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1), (4, 2)])
def test_eval_sees_every_sample_exactly_once(sample_shards, world, workers):
    m = load_manifest(sample_shards)
    plan = plan_for(m, val=0.25)
    for split in ("test", "val"):
        samples, ids = plan.eval_set(split)
        keys, bad = eval_keys(samples, ids, m, world, workers)
        assert sorted(keys) == sorted(samples.keys[i] for i in ids) and len(keys) == len(ids) > 0 and not bad


def test_eval_batches_with_spatial_views(sample_shards):
    from dist_train.evaluation import eval_spec

    m = load_manifest(sample_shards)
    samples, ids = plan_for(m).eval_set("test")
    s = eval_spec(m.n_frames, m.num_classes, 24, "random", "error", views=3)
    batches = list(data.eval_loader(samples, ids, s, 0, 1, 3, workers=1))
    assert sum(len(b.keys) for b in batches) == m.count("test")
    assert all(b.video.shape == (len(b.keys), 3, 16, 3, 24, 24) for b in batches)


# ---------------------------------------------------------------------------------------------
# Bad data


def corrupt_one_jpeg(src: Path, dst: Path, key: str | None = None) -> str:
    """Copy tar ``src`` to ``dst`` with frame 3 of sample ``key`` (default: the second in the tar) overwritten
    by garbage in place (same size: the index still fits); returns that key."""
    with tarfile.open(src) as tar:
        members = tar.getmembers()
        key = key or list(dict.fromkeys(m.name.split(".")[0] for m in members))[1]
        member = next(m for m in members if m.name == f"{key}.003.jpg")
    blob = bytearray(Path(src).read_bytes())
    blob[member.offset_data + 2:member.offset_data + 40] = b"this is not a jpeg, not at all, no.!!!"
    Path(dst).write_bytes(bytes(blob))
    return key


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.fixture
def damaged(sample_shards, tmp_path) -> tuple[Path, str]:
    """A copy of the sample shards: test-000000 has a corrupt JPEG (its key returned), test-000001 is cut in half."""
    out = tmp_path / "damaged"
    shutil.copytree(sample_shards, out)
    key = corrupt_one_jpeg(sample_shards / "test-000000.tar", out / "test-000000.tar")
    truncate(out / "test-000001.tar", (out / "test-000001.tar").stat().st_size // 2)
    return out, key


def test_bad_eval_data_is_counted_sample_by_sample_with_skip(damaged):
    shards, key = damaged
    m = load_manifest(shards)
    samples, ids = plan_for(m).eval_set("test")
    keys, bad = eval_keys(samples, ids, m, world=2, workers=1)
    assert len(keys) + sum(b["count"] for b in bad) == m.count("test")  # nothing silently lost
    corrupt = [b for b in bad if b["shard"] == "test-000000.tar"]
    assert [b["key"] for b in corrupt] == [key] and "frame 3" in corrupt[0]["reason"]
    cut = [b for b in bad if b["shard"] == "test-000001.tar"]
    cut_keys = {b["key"] for b in cut}
    assert cut and all("past the end of the shard" in b["reason"] for b in cut)
    # the samples before the cut are still read
    assert set(m.shards["test"][1].keys) - cut_keys <= set(keys) and set(m.shards["test"][1].keys) - cut_keys


def test_bad_eval_data_raises_naming_shard_and_sample_with_error(damaged):
    shards, key = damaged
    m = load_manifest(shards)
    samples, ids = plan_for(m).eval_set("test")
    with pytest.raises(data.BadDataError, match=r"sample '\d+' of shard test-00000[01]\.tar"):
        eval_keys(samples, ids, m, world=1, workers=0, on_bad="error")


def test_training_skips_bad_samples_and_still_delivers_the_planned_batches(sample_shards, tmp_path):
    out = tmp_path / "bad_train"
    shutil.copytree(sample_shards, out)
    m = load_manifest(out)
    plan = plan_for(m, batch=2)
    trained = {plan.train.keys[i] for i in plan.epoch_order(0)}
    shard0 = m.shards["train"][0]
    key = corrupt_one_jpeg(sample_shards / shard0.name, out / shard0.name,
                           next(k for k in shard0.keys if k in trained))
    truncate(out / "train-000001.tar", 1000)
    batches = list(data.train_loader(plan, spec(m), 0, epoch=0))
    assert len(batches) == plan.micro_batches_per_epoch
    bad = [b for batch in batches for b in batch.bad]
    assert any(b["shard"] == shard0.name and b["key"] == key for b in bad)
    cut = [b for b in bad if b["shard"] == "train-000001.tar"]
    assert {b["key"] for b in cut} == set(m.shards["train"][1].keys) & trained  # each of its samples, by key
    good = [k for batch in batches for k in batch.keys]
    assert len(good) + len(bad) == len(trained) and key not in good  # smaller batches, no replacements
    with pytest.raises(data.BadDataError, match="train-00000[01].tar"):
        list(data.train_loader(plan, spec(m, on_bad="error"), 0, epoch=0))


@pytest.mark.parametrize("crop", data.CROPS)
@pytest.mark.parametrize("train", [True, False])
def test_batched_gpu_path_matches_the_cpu_path_on_cpu(sample_shards, monkeypatch, train, crop):
    """--decode gpu: materialize's batched crop+resize (run on the CPU here) against the CPU clips."""
    m = load_manifest(sample_shards)
    cpu_spec = data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(24, train, 0.5, True, crop=crop), "skip")
    gpu_spec = data.SampleSpec(m.n_frames, m.num_classes, cpu_spec.transform, "skip", decode="gpu")
    plan = plan_for(m, batch=3, seed=4)
    samples, ids = plan.eval_set("test")
    make = ((lambda s: data.train_loader(plan, s, 0, 0)) if train
            else (lambda s: data.eval_loader(samples, ids, s, 0, 1, 3, 0)))
    cpu_batches, gpu_batches = list(make(cpu_spec)), list(make(gpu_spec))
    assert len(cpu_batches) == len(gpu_batches) > 0
    calls = []
    monkeypatch.setattr(data.device, "_decode_batch",
                        lambda flat, device: calls.append(len(flat)) or data.decode_jpegs(flat))
    for c, g in zip(cpu_batches, gpu_batches):
        video, labels, keys, bad = data.materialize(g, gpu_spec, torch.device("cpu"))
        ref, ref_labels, ref_keys, _ = data.materialize(c, cpu_spec, torch.device("cpu"))
        assert video.shape == ref.shape and video.dtype == ref.dtype == torch.uint8 and not bad
        assert torch.equal(labels, ref_labels) and keys == ref_keys
        diff = (video.float() - ref.float()).abs()
        if train:  # the same bilinear sampling; OpenCV rounds in fixed point, roi_align in float
            assert diff.mean() < 0.5
        else:  # the same resize function on the same decoded frames
            assert diff.max() == 0
    assert len(calls) == len(gpu_batches)  # one decode call per batch
    # Off CUDA (no batched decode) materialize makes the CPU path's clips exactly.
    monkeypatch.setattr(data.device, "_decode_batch", lambda flat, device: None)
    video = data.materialize(gpu_batches[0], gpu_spec, torch.device("cpu")).video
    assert torch.equal(video, data.materialize(cpu_batches[0], cpu_spec, torch.device("cpu")).video)


def test_label_member_must_agree_with_the_manifest(sample_shards, tmp_path):
    out = tmp_path / "relabelled"
    shutil.copytree(sample_shards, out)
    m = load_manifest(out)
    info = m.shards["test"][0]
    with tarfile.open(out / info.name) as tar:
        member = tar.getmember(f"{info.keys[0]}.cls")
    blob = bytearray((out / info.name).read_bytes())
    blob[member.offset_data] = ord("1") if info.labels[0] == 0 else ord("0")  # the other of the 2 classes
    (out / info.name).write_bytes(bytes(blob))
    samples, ids = plan_for(m).eval_set("test")
    keys, bad = eval_keys(samples, ids, m, world=1, workers=0)
    assert [b["key"] for b in bad] == [info.keys[0]] and "manifest.json says" in bad[0]["reason"]
    assert np.isin(info.keys[1:], keys).all()
