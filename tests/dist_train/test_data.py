"""The data plan (steps per epoch, shard assignment) and the pipelines on real shards, in-process."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from dist_train import data
from preprocess.shard_format import Manifest, ShardInfo, load_manifest
from tests.conftest import make_shards


def fake_manifest(train: list[int], test: list[int] = (5,)) -> Manifest:
    """A manifest with shards of the given sizes (no files needed for planning)."""
    shards = {
        "train": [ShardInfo(f"train-{i:06d}.tar", n, "") for i, n in enumerate(train)],
        "test": [ShardInfo(f"test-{i:06d}.tar", n, "") for i, n in enumerate(test)],
    }
    return Manifest(Path("/shards"), ["a", "b"], 16, shards)


@pytest.mark.parametrize("train, world, batch, accum, val, steps, n_train", [
    ([17], 2, 2, 1, 0.0, 4, 17),
    ([17], 2, 2, 2, 0.0, 2, 17),
    ([6, 6, 5], 3, 3, 1, 0.0, 1, 17),
    ([6, 6, 5], 1, 4, 1, 0.34, 2, 11),  # first shard held out: 11 left, 11 // 4
    ([100] * 36 + [70], 4, 8, 1, 0.1, 102, 3270),  # HMDB-like: 4 of 37 shards for validation
])
def test_steps_per_epoch(train, world, batch, accum, val, steps, n_train):
    plan = data.make_plan(fake_manifest(train), world, batch, accum, workers=2, val_fraction=val)
    assert plan.n_train == n_train
    assert plan.steps_per_epoch == steps == n_train // (batch * accum * world)
    assert plan.micro_batches_per_epoch == steps * accum
    assert sum(s.count for s in plan.val) + plan.n_train == sum(train)


def test_plan_errors_say_what_to_change():
    with pytest.raises(ValueError, match="--batch-size"):
        data.make_plan(fake_manifest([3]), world_size=2, batch_size=2)
    with pytest.raises(ValueError, match="--val-fraction 0"):
        data.make_plan(fake_manifest([17]), 1, 1, val_fraction=0.1)


@pytest.mark.parametrize("micro, workers, start", [(7, 2, 0), (7, 2, 3), (5, 4, 0), (3, 4, 1), (0, 2, 0), (9, 3, 9)])
def test_worker_quotas_cover_each_micro_batch_once(micro, workers, start):
    quotas = [data.worker_quota(micro, workers, w, start) for w in range(workers)]
    assert sum(quotas) == micro - start
    for w in range(workers):
        assert quotas[w] == sum(1 for b in range(start, micro) if b % workers == w)


def test_shard_sequence_disjoint_when_enough_shards_and_shared_when_few():
    seqs = [data.shard_sequence(8, slot, 4, seed=3, epoch=1) for slot in range(4)]
    first_round = [[next(s) for _ in range(2)] for s in seqs]
    assert sorted(i for r in first_round for i in r) == list(range(8))  # 4 slots x 2 = every shard once
    one = [next(data.shard_sequence(1, slot, 4, 0, 0)) for slot in range(4)]
    assert one == [0, 0, 0, 0]  # fewer shards than slots: all read the one shard, nobody starves
    again = data.shard_sequence(8, 2, 4, seed=3, epoch=1)
    assert [next(again) for _ in range(2)] == first_round[2]  # deterministic
    other_epoch = data.shard_sequence(8, 0, 1, seed=3, epoch=2)
    assert [next(other_epoch) for _ in range(8)] != [next(data.shard_sequence(8, 0, 1, 3, 1)) for _ in range(1)] * 8


def test_balanced_parts():
    parts = data.balanced_parts([4, 4, 4, 1, 9], 2)
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3, 4]
    totals = [sum([4, 4, 4, 1, 9][i] for i in p) for p in parts]
    assert max(totals) - min(totals) <= 4  # greedy, largest first: within one small shard of even
    even = data.balanced_parts([5] * 6, 3)
    assert [len(p) for p in even] == [2, 2, 2]
    assert data.balanced_parts([3], 3) == [[0], [], []]


# ---------------------------------------------------------------------------------------------
# Pipelines on real shards


def spec(manifest, train=True, on_bad="skip", size=24):
    return data.SampleSpec(manifest.n_frames, manifest.num_classes, data.ClipTransform(size, train, 0.5, True), on_bad)


@pytest.fixture(scope="module")
def uneven(sample_videos, tmp_path_factory) -> dict[int, Path]:
    """The sample videos packed into 1, 2 and 3 train shards (16 train clips: 16 | 8+8 | 6+6+4)."""
    return {n: make_shards(sample_videos, tmp_path_factory.mktemp(f"uneven{n}"), shard_size=size)
            for n, size in ((1, 16), (2, 8), (3, 6))}


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_every_rank_gets_exactly_the_planned_batches(uneven, n_shards):
    m = load_manifest(uneven[n_shards])
    assert len(m.shards["train"]) == n_shards
    plan = data.make_plan(m, world_size=2, batch_size=3, workers=2)
    assert plan.steps_per_epoch == 16 // 6
    for rank in range(2):
        batches = list(data.train_loader(plan, spec(m), rank, epoch=0, seed=0, shuffle_buffer=4))
        assert len(batches) == plan.micro_batches_per_epoch
        assert all(b["video"].shape == (3, 16, 3, 24, 24) and b["video"].dtype == torch.uint8 for b in batches)
        assert [b["worker"] for b in batches] == [i % 2 for i in range(len(batches))]


def test_mid_epoch_replay_is_exact(sample_shards):
    m = load_manifest(sample_shards)
    plan = data.make_plan(m, world_size=1, batch_size=2, workers=2)
    full = list(data.train_loader(plan, spec(m), 0, epoch=1, seed=5, shuffle_buffer=5))
    for start in (1, 3, 6):
        positions = [0, 0]
        for b in full[:start]:
            positions[b["worker"]] = b["pos"]
        rest = list(data.train_loader(plan, spec(m), 0, epoch=1, seed=5, shuffle_buffer=5, start=start,
                                      positions=positions))
        assert len(rest) == len(full) - start
        assert all(torch.equal(a["video"], b["video"]) and torch.equal(a["label"], b["label"])
                   for a, b in zip(full[start:], rest))


def eval_keys(shards, m, world, workers, on_bad="skip", batch=3):
    keys, bad = [], []
    for rank in range(world):
        for b in data.eval_loader(shards, spec(m, train=False, on_bad=on_bad), rank, world, batch, workers):
            keys += b["keys"]
            bad += b["bad"]
            if b["keys"]:
                assert b["video"].shape[0] == len(b["keys"]) <= batch
    return keys, bad


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 2), (3, 1), (4, 2)])
def test_eval_sees_every_test_sample_exactly_once(sample_shards, world, workers):
    m = load_manifest(sample_shards)
    plan = data.make_plan(m, 1, 1)
    keys, bad = eval_keys(plan.test, m, world, workers)
    assert len(keys) == len(set(keys)) == m.count("test") and not bad


def test_clip_consistent_augmentation():
    base = torch.randint(0, 255, (3, 40, 56), dtype=torch.uint8)
    clip = base.expand(8, 3, 40, 56).clone()  # 8 identical frames: any per-frame difference is a bug
    t = data.ClipTransform(24, train=True, crop_scale=0.3, hflip=True)
    outs = [t(clip, seed) for seed in range(20)]
    for out in outs:
        assert out.shape == (8, 3, 24, 24)
        assert all(torch.equal(out[0], out[i]) for i in range(8))
    assert len({o[0].sum().item() for o in outs}) > 5  # crops really are random across clips
    assert torch.equal(t(clip, 7), t(clip, 7))  # the seed alone decides
    no_flip = data.ClipTransform(24, True, 1.0, False)
    full = data.ClipTransform(24, True, 1.0, True)
    # With scale 1 and square-ish ratio range the crop covers the frame: flip or not is then visible.
    seen = {torch.equal(full(clip, s), no_flip(clip, s)) for s in range(16)}
    assert seen == {True, False}


def test_to_model_input_layouts():
    video = torch.full((2, 4, 3, 8, 8), 255, dtype=torch.uint8)
    x = data.to_model_input(video, "BTCHW", data.IMAGENET_STATS)
    assert x.shape == (2, 4, 3, 8, 8)
    assert torch.allclose(x[0, 0, :, 0, 0], (1 - torch.tensor(data.IMAGENET_STATS[0])) / torch.tensor(data.IMAGENET_STATS[1]))
    assert data.to_model_input(video, "BCTHW", data.KINETICS_STATS).shape == (2, 3, 4, 8, 8)


def test_decode_jpegs_round_trip():
    from torchvision.io import encode_jpeg

    img = torch.zeros(3, 16, 20, dtype=torch.uint8)
    img[0] = 200
    out = data.decode_jpegs([encode_jpeg(img).numpy().tobytes()] * 2)
    assert len(out) == 2 and out[0].shape == (3, 16, 20) and abs(int(out[0][0, 8, 10]) - 200) < 5


# ---------------------------------------------------------------------------------------------
# Bad data


def corrupt_one_jpeg(src: Path, dst: Path) -> str:
    """Copy tar ``src`` to ``dst`` with frame 3 of its second sample replaced by garbage; returns that key."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        members = tin.getmembers()
        key = sorted({m.name.split(".")[0] for m in members})[1]
        for member in members:
            payload = tin.extractfile(member).read()
            if member.name.startswith(key) and member.name.endswith("003.jpg"):
                payload = b"\xff\xd8 this is not a jpeg" + payload[40:60]
                member.size = len(payload)
            tout.addfile(member, io.BytesIO(payload))
    return key


@pytest.fixture
def damaged(sample_shards, tmp_path) -> Path:
    """A copy of the sample shards: test-000000 has a corrupt JPEG, test-000001 is truncated."""
    out = tmp_path / "damaged"
    shutil.copytree(sample_shards, out)
    corrupt_one_jpeg(sample_shards / "test-000000.tar", out / "test-000000.tar")
    t1 = out / "test-000001.tar"
    t1.write_bytes(t1.read_bytes()[: t1.stat().st_size // 2])
    return out


def test_bad_eval_data_is_counted_per_shard_with_skip(damaged):
    m = load_manifest(damaged)
    plan = data.make_plan(m, 1, 1)
    keys, bad = eval_keys(plan.test, m, world=2, workers=1)
    unreadable = sum(b["count"] for b in bad)
    assert len(keys) + unreadable == m.count("test")  # nothing silently lost
    assert unreadable >= 2
    names = {b["shard"] for b in bad}
    assert names == {"test-000000.tar", "test-000001.tar"}
    corrupt = [b for b in bad if b["shard"] == "test-000000.tar"]
    assert len(corrupt) == 1 and corrupt[0]["key"] is not None and corrupt[0]["count"] == 1


def test_bad_eval_data_raises_naming_the_shard_with_error(damaged):
    m = load_manifest(damaged)
    plan = data.make_plan(m, 1, 1)
    with pytest.raises(data.BadDataError, match=r"test-00000[01]\.tar"):
        eval_keys(plan.test, m, world=1, workers=0, on_bad="error")


def test_training_skips_bad_samples_and_still_delivers_the_plan(sample_shards, tmp_path):
    out = tmp_path / "bad_train"
    shutil.copytree(sample_shards, out)
    key = corrupt_one_jpeg(sample_shards / "train-000000.tar", out / "train-000000.tar")
    t = out / "train-000001.tar"
    t.write_bytes(t.read_bytes()[:1000])
    m = load_manifest(out)
    plan = data.make_plan(m, world_size=1, batch_size=2, workers=0)
    batches = list(data.train_loader(plan, spec(m), 0, epoch=0, seed=0, shuffle_buffer=0))
    assert len(batches) == plan.micro_batches_per_epoch
    bad = [b for batch in batches for b in batch["bad"]]
    assert any(b["shard"] == "train-000000.tar" and b["key"] == key for b in bad)
    assert any(b["shard"] == "train-000001.tar" and b["key"] is None for b in bad)
    with pytest.raises(data.BadDataError, match="train-00000[01].tar"):
        list(data.train_loader(plan, spec(m, on_bad="error"), 0, epoch=0, seed=0, shuffle_buffer=0))
