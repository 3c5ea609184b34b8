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


def test_buffer_ring_reuses_only_released_buffers():
    ring = data._BufferRing(batch_size=2, clip_shape=(3, 4, 4, 3), keep=2)
    a, b = ring.lend(), ring.lend()
    assert a[0].data_ptr() != b[0].data_ptr() and int(a[2]) == int(b[2]) == 1
    c = ring.lend()  # both kept buffers are lent: a new one, not kept
    assert c[0].data_ptr() not in (a[0].data_ptr(), b[0].data_ptr()) and len(ring.buffers) == 2
    data.Batch(video=b[0], label=b[1], lease=b[2]).release()
    assert ring.lend()[0].data_ptr() == b[0].data_ptr()  # the released one comes back, marked lent again
    assert int(b[2]) == 1 and ring.lend()[0].data_ptr() not in (a[0].data_ptr(), b[0].data_ptr())
    # video, labels and lease share one buffer; labels and lease lie past the video bytes
    assert a[0].untyped_storage().data_ptr() == a[1].untyped_storage().data_ptr() == a[2].untyped_storage().data_ptr()
    assert a[0].data_ptr() + a[0].numel() <= a[1].data_ptr() < a[2].data_ptr()


@pytest.mark.parametrize("workers", [0, 2])
def test_released_buffers_are_refilled_without_touching_what_materialize_returned(sample_shards, workers):
    """Reused worker buffers (released by materialize, across real worker processes) give exactly the
    batches of a run that never releases: there all batches stay untouched while held (own buffers)."""
    m = load_manifest(sample_shards)
    plan = data.make_plan(m, world_size=1, batch_size=1, workers=workers)
    sp, cpu = spec(m), torch.device("cpu")
    kept = [(b["video"], b["label"]) for b in data.train_loader(plan, sp, 0, epoch=0, seed=3, shuffle_buffer=4)]
    reused = []
    for b in data.train_loader(plan, sp, 0, epoch=0, seed=3, shuffle_buffer=4):
        assert "lease" in b
        video, labels, _ = data.materialize(b, sp, cpu)
        assert "lease" not in b and video.data_ptr() != b["video"].data_ptr()
        reused.append((video, labels))
    # more batches per worker than the 4 buffers a worker keeps
    assert len(reused) == len(kept) == plan.micro_batches_per_epoch > 4 * max(1, workers)
    assert all(torch.equal(v, w) and torch.equal(y, z) for (v, y), (w, z) in zip(reused, kept))


def test_pinning_copies_then_releases(monkeypatch):
    """DataLoader's pin thread calls Batch.pin_memory: the copy comes first, the release after it."""
    ring = data._BufferRing(batch_size=1, clip_shape=(1, 2, 2, 3), keep=1)
    video, labels, lease = ring.lend()
    video.fill_(7)
    seen = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a: seen.append(int(lease)) or t.clone())
    pinned = data.Batch(video=video, label=labels, lease=lease, bad=[]).pin_memory()
    assert "lease" not in pinned and int(lease) == 0 and seen == [1, 1]  # both copies made while still lent
    assert pinned["video"].data_ptr() != video.data_ptr() and int(pinned["video"].min()) == 7


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
    no_flip = data.ClipTransform(24, True, 1.0, False, crop="resized")
    full = data.ClipTransform(24, True, 1.0, True, crop="resized")
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
    """Copy tar ``src`` to ``dst`` with frame 3 of its second sample (in the tar's order) replaced by
    garbage; returns that key. Any reader of the shard meets it within its first two samples."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        members = tin.getmembers()
        key = list(dict.fromkeys(m.name.split(".")[0] for m in members))[1]
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


# ---------------------------------------------------------------------------------------------
# Decoding, clip transforms and batching (the CPU fast path and the batched decode=gpu path)


def sample_frames(shards: Path, split: str = "test", n: int = 3) -> list[list[bytes]]:
    m = load_manifest(shards)
    out = []
    for url in m.urls(split):
        for sample in data.read_shard(data.Shard(url, 0), "error"):
            out.append(data.parse_sample(sample, m.n_frames, m.num_classes)[0])
            if len(out) == n:
                return out
    return out


def test_decode_jpegs_layouts_and_errors(sample_shards):
    frames = sample_frames(sample_shards, n=1)[0]
    hwc = data.decode_jpegs(frames, hwc=True)
    chw = data.decode_jpegs(frames)
    h, w = hwc[0].shape[:2]
    assert hwc[0].dtype == "uint8" and hwc[0].shape == (h, w, 3)
    assert chw[0].shape == (3, h, w) and torch.equal(chw[0], torch.from_numpy(hwc[0]).permute(2, 0, 1))
    from torchvision.io import ImageReadMode, decode_jpeg

    ref = decode_jpeg(torch.frombuffer(bytearray(frames[0]), dtype=torch.uint8), mode=ImageReadMode.RGB)
    # libjpeg-turbo both: OpenCV's build and torchvision's may differ by a rounding step, never in colour order.
    assert (chw[0].float() - ref.float()).abs().mean() < 1.0
    with pytest.raises(ValueError, match="frame 1 is not a decodable JPEG"):
        data.decode_jpegs([frames[0], b"\xff\xd8 not a jpeg"])
    with pytest.raises(ValueError, match="frame 0"):
        data.decode_jpegs([b""])


def test_train_clip_is_the_drawn_crop_resized_bilinearly_and_flipped():
    from torchvision.transforms.v2 import functional as TF

    gen = torch.Generator().manual_seed(0)
    clip = (torch.rand(4, 3, 48, 64, generator=gen) * 255).to(torch.uint8)
    clip = TF.gaussian_blur(clip, [5, 5], [1.5, 1.5])  # smooth: rounding differences stay small
    for train_tf in (data.ClipTransform(32, True, 0.3, True, crop="resized"),
                     data.ClipTransform(72, True, 0.3, True, crop="resized")):
        for seed in range(6):
            top, left, h, w, flip = train_tf.draw(48, 64, seed)
            ref = TF.resized_crop(clip, top, left, h, w, [train_tf.size] * 2, antialias=False)
            ref = ref.flip(-1) if flip else ref
            out = train_tf(clip, seed)
            assert out.shape == ref.shape and out.dtype == torch.uint8
            assert (out.int() - ref.int()).abs().max() <= 2  # OpenCV's fixed-point bilinear vs torch's


def test_draw_keeps_the_generator_use():
    # The crop box and flip come from the same torch.Generator calls as before the OpenCV path, so a
    # seed gives the same augmentation as it did (and as torchvision's RandomResizedCrop.get_params).
    t = data.ClipTransform(24, True, 0.5, True, crop="resized")
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        box = t._resized_box(40, 56, gen)
        flip = float(torch.rand(1, generator=gen)) < 0.5
        assert t.draw(40, 56, seed) == (*box, flip)
    assert data.ClipTransform(24, True, 0.5, False, crop="resized").draw(40, 56, 3)[4] is False


@pytest.mark.parametrize("crop", data.CROPS)
def test_eval_transform_is_the_one_spatial_views_uses(sample_shards, crop):
    from torchvision.transforms.v2 import functional as TF

    from dist_train.evaluation import SpatialViews

    frames = sample_frames(sample_shards, n=1)[0]
    clip = torch.stack(data.decode_jpegs(frames)).contiguous()  # [T, 3, H, W], plain CHW layout
    size = 40
    # random: the short side at 8/7 of the clip size (46), resized: at the clip size; then the centre square
    scaled = TF.resize(clip, [46 if crop == "random" else size], antialias=True)
    ref = TF.center_crop(scaled, [size, size])
    out = data.make_clip(frames, data.ClipTransform(size, False, crop=crop), None)
    assert out.shape == ref.shape and out.dtype == torch.uint8 and torch.equal(out, ref)
    views = data.make_clip(frames, SpatialViews(size, False, crop=crop, views=3), None)  # a subclass: the tensor path
    assert views.shape == (3, len(frames), 3, size, size)
    assert torch.equal(data.make_clip(frames, SpatialViews(size, False, crop=crop, views=1), None)[0], ref)
    h, w = scaled.shape[-2:]  # the outer views are the two ends of the long side
    assert w > h and torch.equal(views[0], scaled[..., (h - size) // 2:(h - size) // 2 + size, :size])
    assert torch.equal(views[2], scaled[..., (h - size) // 2:(h - size) // 2 + size, w - size:])


def test_random_crop_is_seven_eighths_of_the_short_side_and_a_plain_slice_at_the_packed_scale():
    t = data.ClipTransform(56, True)
    clip = torch.randint(0, 255, (4, 3, 64, 80), dtype=torch.uint8)  # packed at 56 * 8 / 7 = 64
    flips = set()
    for seed in range(12):
        top, left, h, w, flip = t.draw(64, 80, seed)
        assert (h, w) == (56, 56) and 0 <= top <= 8 and 0 <= left <= 24
        ref = clip[..., top:top + 56, left:left + 56]
        assert torch.equal(t(clip, seed), ref.flip(-1) if flip else ref)  # copied exactly, no resampling
        flips.add(flip)
    assert flips == {True, False}
    # Other sizes keep the field of view (7/8 of the short side) and resize it: 112 of 128 for a 64 clip,
    # 18 of 20 scaled up to 56.
    assert data.ClipTransform(64, True).draw(128, 171, 3)[2:4] == (112, 112)
    assert t.draw(20, 30, 5)[2:4] == (18, 18)
    assert t(torch.randint(0, 255, (4, 3, 20, 30), dtype=torch.uint8), 5).shape == (4, 3, 56, 56)
    with pytest.raises(ValueError, match="crop must be one of"):
        data.ClipTransform(32, True, crop="centre")


def test_incomplete_sample_is_reported_naming_its_shard_key_and_missing_members(sample_shards):
    m = load_manifest(sample_shards)
    url = m.urls("train")[0]
    sample = next(s for s in data.read_shard(data.Shard(url, 0), "error"))
    del sample["003.jpg"], sample["cls"]
    with pytest.raises(KeyError, match=r"lacks members \['003.jpg', 'cls'\]"):
        data.parse_sample(sample, m.n_frames, m.num_classes)
    spec = data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(32, True), on_bad="skip")
    bad = spec.clip(sample, 0)
    assert bad["shard"] == Path(url).name and bad["key"] == sample["__key__"] and "003.jpg" in bad["reason"]
    with pytest.raises(data.BadDataError, match=f"sample '{sample['__key__']}' of shard {Path(url).name}"):
        data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(32, True), on_bad="error").clip(sample, 0)


def test_make_clip_writes_into_out_and_is_deterministic(sample_shards):
    import numpy as np

    frames = sample_frames(sample_shards, n=1)[0]
    t = data.ClipTransform(24, True)
    out = np.zeros((len(frames), 24, 24, 3), np.uint8)
    clip = data.make_clip(frames, t, 11, out=out)
    assert clip.shape == (len(frames), 3, 24, 24) and clip.dtype == torch.uint8
    assert np.shares_memory(clip.numpy(), out)
    assert torch.equal(clip, data.make_clip(frames, t, 11)) and torch.equal(clip, t(torch.stack(data.decode_jpegs(frames)), 11))
    with pytest.raises(ValueError, match="different sizes"):
        other = torch.zeros(3, 8, 8, dtype=torch.uint8)
        from torchvision.io import encode_jpeg

        data.make_clip([frames[0], encode_jpeg(other).numpy().tobytes()], t, 0)
    with pytest.raises(ValueError, match="different sizes"):  # frame by frame into a batch slot
        data.make_clip([frames[0], encode_jpeg(other).numpy().tobytes()], t, 0, out=out[:2])


def test_worker_batches_arrive_in_shared_memory_channels_last(sample_shards):
    m = load_manifest(sample_shards)
    plan = data.make_plan(m, world_size=1, batch_size=2, workers=1)
    batches = list(data.train_loader(plan, spec(m), 0, epoch=0, seed=1, shuffle_buffer=3))
    inline = list(data.train_loader(data.make_plan(m, 1, 2, workers=0), spec(m), 0, epoch=0, seed=1, shuffle_buffer=3))
    for b, c in zip(batches, inline, strict=True):
        v = b["video"]
        assert v.is_shared() and v.shape == (2, 16, 3, 24, 24) and v.dtype == torch.uint8
        assert v.stride()[2] == 1 and v.permute(0, 1, 3, 4, 2).is_contiguous()  # [B, T, S, S, 3] storage
        assert torch.equal(v, c["video"])  # a worker and the main process make the same clips
    x = data.to_model_input(batches[0]["video"], "BTCHW", data.IMAGENET_STATS)
    ref = (batches[0]["video"].float() / 255 - torch.tensor(data.IMAGENET_STATS[0]).view(1, 1, 3, 1, 1)) \
        / torch.tensor(data.IMAGENET_STATS[1]).view(1, 1, 3, 1, 1)
    assert torch.allclose(x, ref, atol=1e-5)
    assert x.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)  # no copy before NHWC convs


def test_eval_batches_with_spatial_views(sample_shards):
    from dist_train.evaluation import eval_spec

    m = load_manifest(sample_shards)
    plan = data.make_plan(m, 1, 1)
    s = eval_spec(m.n_frames, m.num_classes, 24, "random", "error", views=3)
    batches = list(data.eval_loader(plan.test, s, 0, 1, 3, workers=1))
    assert sum(len(b["keys"]) for b in batches) == m.count("test")
    assert all(b["video"].shape == (len(b["keys"]), 3, 16, 3, 24, 24) for b in batches)


@pytest.mark.parametrize("crop", data.CROPS)
@pytest.mark.parametrize("train", [True, False])
def test_batched_gpu_path_matches_the_cpu_path_on_cpu(sample_shards, monkeypatch, train, crop):
    """--decode gpu: materialize's batched crop+resize (run on the CPU here) against the CPU clips."""
    m = load_manifest(sample_shards)
    cpu_spec = data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(24, train, 0.5, True, crop=crop), "skip")
    gpu_spec = data.SampleSpec(m.n_frames, m.num_classes, cpu_spec.transform, "skip", decode="gpu")
    plan = data.make_plan(m, 1, 3)
    shards = plan.train if train else plan.test
    make = (lambda s: data.train_loader(plan, s, 0, 0, 4, 3)) if train else (lambda s: data.eval_loader(shards, s, 0, 1, 3, 0))
    cpu_batches, gpu_batches = list(make(cpu_spec)), list(make(gpu_spec))
    assert len(cpu_batches) == len(gpu_batches) > 0
    calls = []
    monkeypatch.setattr(data, "_decode_batch", lambda flat, device: calls.append(len(flat)) or data.decode_jpegs(flat))
    for c, g in zip(cpu_batches, gpu_batches):
        video, labels, bad = data.materialize(g, gpu_spec, torch.device("cpu"))
        ref, ref_labels, _ = data.materialize(c, cpu_spec, torch.device("cpu"))
        assert video.shape == ref.shape and video.dtype == ref.dtype == torch.uint8 and not bad
        assert torch.equal(labels, ref_labels)
        diff = (video.float() - ref.float()).abs()
        if train:  # the same bilinear sampling; OpenCV rounds in fixed point, roi_align in float
            assert diff.mean() < 0.5
        else:  # the same resize function on the same decoded frames
            assert diff.max() == 0
    assert len(calls) == len(gpu_batches)  # one decode call per batch
    # Off CUDA (no batched decode) materialize makes the CPU path's clips exactly.
    monkeypatch.setattr(data, "_decode_batch", lambda flat, device: None)
    video, _, _ = data.materialize(gpu_batches[0], gpu_spec, torch.device("cpu"))
    assert torch.equal(video, data.materialize(cpu_batches[0], cpu_spec, torch.device("cpu"))[0])


def test_batched_gpu_path_groups_frame_sizes_and_drops_bad_clips(sample_shards):
    frames = sample_frames(sample_shards, n=2)
    t = data.ClipTransform(24, True)
    decoded = [data.decode_jpegs(f) for f in frames]
    small = [torch.nn.functional.interpolate(torch.stack(d).float(), scale_factor=0.5).to(torch.uint8).unbind(0)
             for d in decoded[:1]]
    out = data.clip_batch(t, [decoded[0], small[0], decoded[1]], [1, 2, 3])
    assert out.shape == (3, len(frames[0]), 3, 24, 24)
    assert torch.equal(out[0], data.clip_batch(t, [decoded[0]], [1])[0])  # a clip does not depend on its batch
    assert torch.equal(out[1], data.clip_batch(t, [small[0]], [2])[0])
    for seed in range(4):  # roi_align (aligned=True) samples where cv2.resize does: within one rounding step
        cpu = t(torch.stack(decoded[1]), seed).int()
        assert (data.clip_batch(t, [decoded[1]], [seed])[0].int() - cpu).abs().float().mean() < 0.5


# ---------------------------------------------------------------------------------------------
# The tar reader against webdataset's


def wds_samples(path: Path) -> tuple[list[dict], bool]:
    from webdataset.tariterators import group_by_keys, tar_file_expander

    out, failed = [], False
    try:
        with open(path, "rb") as f:
            out.extend(group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])))
    except Exception:
        failed = True
    return out, failed


def our_samples(path: Path) -> tuple[list[dict], bool]:
    out, failed = [], False
    try:
        out.extend(data._shard_samples(str(path)))
    except Exception:
        failed = True
    return out, failed


def write_tar(path: Path, members: list[tuple[str, bytes]], fmt=tarfile.USTAR_FORMAT, mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=fmt) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            if payload is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def test_tar_reader_gives_webdataset_samples(sample_shards, tmp_path):
    for url in load_manifest(sample_shards).urls("train")[:2]:
        assert our_samples(Path(url)) == wds_samples(Path(url))
    odd = [("dir", None), ("__meta__", b"m"), ("a/b/000.JPG", b"x" * 700), ("a/b/000.cls", b"1"),
           ("a/b/000.x.y", b"xy"), ("noext", b"n"), ("a.b/c", b"c"), (".hidden", b"h"), ("k1.txt", b""),
           ("k2.txt", b"2" * 512), ("p" * 120 + "/k3.txt", b"long path: ustar prefix"), ("k3.txt", b"3")]
    cases = {"ustar": write_tar(tmp_path / "ustar.tar", odd),
             "gnu": write_tar(tmp_path / "gnu.tar", odd, tarfile.GNU_FORMAT),
             "pax": write_tar(tmp_path / "pax.tar", odd + [("ünïcode.txt", b"u")], tarfile.PAX_FORMAT),
             "gzip": write_tar(tmp_path / "gz.tar", odd, mode="w:gz"),
             "duplicate": write_tar(tmp_path / "dup.tar", [("k.a", b"1"), ("k.a", b"2")]),
             "empty": tmp_path / "empty.tar", "garbage": tmp_path / "garbage.tar"}
    cases["empty"].write_bytes(b"")
    cases["garbage"].write_bytes(b"not a tar at all" * 100)
    for name, path in cases.items():
        assert our_samples(path) == wds_samples(path), name


def test_tar_reader_accepts_signed_checksums_like_tarfile(tmp_path):
    # Old tar writers summed header bytes as signed chars; tarfile accepts either sum. A name byte
    # >= 0x80 makes the two differ: rewrite the checksum of each header as the signed sum.
    src = write_tar(tmp_path / "plain.tar", [("k\u00e9y.txt", b"abc"), ("k\u00e9y.cls", b"1")]).read_bytes()
    blob = bytearray(src)
    for at in (0, 1024):
        header = blob[at:at + 512]
        header[148:156] = b" " * 8
        signed = sum(b - 256 if b > 127 else b for b in header)
        assert signed != sum(header)
        blob[at + 148:at + 156] = b"%06o\0 " % signed
    p = tmp_path / "signed.tar"
    p.write_bytes(bytes(blob))
    ours, theirs = our_samples(p), wds_samples(p)
    assert ours == theirs and not ours[1] and ours[0][0]["txt"] == b"abc"
    # ... read by our own reader, not by the fallback to webdataset's
    assert [name for name, _ in data._tar_files(p.read_bytes())] == ["k\u00e9y.txt", "k\u00e9y.cls"]


def test_random_crop_corner_and_flip_come_from_the_seed_alone():
    t = data.ClipTransform(112, True)
    draws = [t.draw(128, 171, seed) for seed in range(4000)]
    assert draws == [t.draw(128, 171, seed) for seed in range(4000)]
    tops, lefts, flips = ({d[i] for d in draws} for i in (0, 1, 4))
    assert tops == set(range(17)) and lefts == set(range(60)) and flips == {True, False}
    assert 0.45 < sum(d[4] for d in draws) / len(draws) < 0.55
    assert not any(d[4] for d in (data.ClipTransform(112, True, hflip=False).draw(128, 171, s) for s in range(50)))


def test_tar_reader_cut_or_damaged_anywhere_ends_like_webdataset(sample_shards, tmp_path):
    url = load_manifest(sample_shards).urls("test")[0]
    src = Path(url).read_bytes()
    with tarfile.open(url) as tar:  # cut inside headers, at and just after each member's data end (padding)
        edges = {x for m in tar.getmembers() for x in (m.offset + 100, m.offset_data + m.size, m.offset_data + m.size + 1)}
    cuts = sorted({*range(0, len(src), 997), *range(512, len(src), 512), *edges, len(src) - 1024, len(src) - 700})
    for cut in cuts:
        p = tmp_path / "cut.tar"
        p.write_bytes(src[:cut])
        assert our_samples(p) == wds_samples(p), f"cut at {cut}"
    for at in (0, 148, 1024 + 5, 3 * 512 + 124):  # a broken checksum / size field / data byte
        blob = bytearray(src)
        blob[at] ^= 0x5A
        p = tmp_path / "flip.tar"
        p.write_bytes(bytes(blob))
        assert our_samples(p) == wds_samples(p), f"byte {at}"
