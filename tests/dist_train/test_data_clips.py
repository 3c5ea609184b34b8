"""Clips (dist_train.data.clips): JPEG header checks, decoding, crops and flips, the model's input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_train import data
from preprocess.shard_format import frame_fields, load_manifest


def sample_frames(shards: Path, split: str = "test", n: int = 3) -> list[list[bytes]]:
    """The JPEG frames of the first ``n`` samples of ``split``."""
    m = load_manifest(shards)
    return [[s[f] for f in frame_fields(m.n_frames)] for s in data.read_split(m, split, limit=n)]


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
    mean, std = torch.tensor(data.IMAGENET_STATS[0]), torch.tensor(data.IMAGENET_STATS[1])
    assert torch.allclose(x[0, 0, :, 0, 0], (1 - mean) / std)
    assert data.to_model_input(video, "BCTHW", data.KINETICS_STATS).shape == (2, 3, 4, 8, 8)


def test_decode_jpegs_round_trip():
    from torchvision.io import encode_jpeg

    img = torch.zeros(3, 16, 20, dtype=torch.uint8)
    img[0] = 200
    out = data.decode_jpegs([encode_jpeg(img).numpy().tobytes()] * 2)
    assert len(out) == 2 and out[0].shape == (3, 16, 20) and abs(int(out[0][0, 8, 10]) - 200) < 5


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


def test_make_clip_writes_into_out_and_is_deterministic(sample_shards):
    import numpy as np

    frames = sample_frames(sample_shards, n=1)[0]
    t = data.ClipTransform(24, True)
    out = np.zeros((len(frames), 24, 24, 3), np.uint8)
    clip = data.make_clip(frames, t, 11, out=out)
    assert clip.shape == (len(frames), 3, 24, 24) and clip.dtype == torch.uint8
    assert np.shares_memory(clip.numpy(), out)
    assert torch.equal(clip, data.make_clip(frames, t, 11))
    assert torch.equal(clip, t(torch.stack(data.decode_jpegs(frames)), 11))
    with pytest.raises(ValueError, match="different sizes"):
        other = torch.zeros(3, 8, 8, dtype=torch.uint8)
        from torchvision.io import encode_jpeg

        data.make_clip([frames[0], encode_jpeg(other).numpy().tobytes()], t, 0)
    with pytest.raises(ValueError, match="different sizes"):  # frame by frame into a batch slot
        data.make_clip([frames[0], encode_jpeg(other).numpy().tobytes()], t, 0, out=out[:2])


def test_random_crop_corner_and_flip_come_from_the_seed_alone():
    t = data.ClipTransform(112, True)
    draws = [t.draw(128, 171, seed) for seed in range(4000)]
    assert draws == [t.draw(128, 171, seed) for seed in range(4000)]
    tops, lefts, flips = ({d[i] for d in draws} for i in (0, 1, 4))
    assert tops == set(range(17)) and lefts == set(range(60)) and flips == {True, False}
    assert 0.45 < sum(d[4] for d in draws) / len(draws) < 0.55
    assert not any(d[4] for d in (data.ClipTransform(112, True, hflip=False).draw(128, 171, s) for s in range(50)))


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


def _jpeg(h: int = 16, w: int = 24) -> bytes:
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.full((h, w, 3), 90, np.uint8))
    return buf.tobytes()


def _claiming(jpeg: bytes, w: int, h: int) -> bytes:
    """``jpeg`` with its frame header (SOF0) claiming ``w`` x ``h`` pixels; the image data is unchanged."""
    at = jpeg.index(b"\xff\xc0")
    out = bytearray(jpeg)
    out[at + 5:at + 9] = bytes([h >> 8, h & 255, w >> 8, w & 255])
    return bytes(out)


@pytest.mark.parametrize("w, h", [(60000, 60000), (20000, 20000)])  # above and below OpenCV's own ~1 Gpx limit
def test_a_frame_claiming_huge_dimensions_is_refused_before_decoding(w, h):
    good = _jpeg()
    assert data.jpeg_size(good) == (24, 16) and data.jpeg_size(_claiming(good, w, h)) == (w, h)
    frames = [good, _claiming(good, w, h), good]
    with pytest.raises(ValueError, match=rf"frame 1 claims {w} x {h} pixels \(at most 16,777,216"):
        data.make_clip(frames, data.ClipTransform(8, True), 0)
    with pytest.raises(ValueError, match="claims"):  # evaluation too (it decodes every frame first)
        data.make_clip(frames, data.ClipTransform(8, False), None)


def test_frame_headers_are_checked_against_each_other():
    a, b = _jpeg(16, 24), _jpeg(20, 24)
    with pytest.raises(ValueError, match="different sizes"):
        data.frame_size([a, a, b])
    assert data.frame_size([a, a, a]) == (16, 24)
    # a frame whose header differs from frame 0's only after the frame size is still read in full
    assert data.frame_size([a, a[:-40] + bytes(40)]) == (16, 24)
    with pytest.raises(ValueError, match="frame 1 is a JPEG cut short"):
        data.frame_size([a, a[:20]])
    for bad, reason in ((b"", "no start-of-image"), (b"\xff\xd8\xff\xda\x00\x02", "without a frame header"),
                        (a[:20], "cut short"), (b"\xff\xd8garbage!", "no marker")):
        with pytest.raises(ValueError, match=reason):
            data.jpeg_size(bad)


def test_jpeg_header_walk_ends_on_any_input():
    import random

    rng = random.Random(0)
    good = _jpeg()
    for n in range(3000):  # random bytes, and a real header with random bytes spliced in
        blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        if n % 2:
            cut = rng.randrange(len(good))
            blob = good[:cut] + blob + good[cut:]
        try:
            w, h = data.jpeg_size(blob)
            assert 0 <= w < 65536 and 0 <= h < 65536
        except ValueError:
            pass


def test_a_progressive_jpeg_is_refused_before_decoding():
    """The packer writes baseline JPEGs; a progressive one can hold thousands of scans, each decoded in full."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".jpg", np.full((16, 24, 3), 90, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    progressive = buf.tobytes()
    assert data.jpeg_size(progressive) == (24, 16)
    with pytest.raises(ValueError, match=r"frame 1 is not a sequential JPEG \(frame marker 0xC2"):
        data.frame_size([_jpeg(), progressive])
