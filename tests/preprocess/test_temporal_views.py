"""``--temporal-views K``: K evenly spaced frames of each of the ``--frames`` segments, and the manifest keys."""

from __future__ import annotations

import copy
import json

import cv2
import numpy as np
import pytest
import webdataset as wds

from preprocess import shard
from preprocess import shard_format as fmt
from preprocess.frames import resize_short_side, select_indices
from preprocess.synth import write_avi
from tests.conftest import make_shards, make_videos
from tests.preprocess.videotools import solid_frames

FRAMES, K = 16, 3
SHORT = {"numbered10": 10, "numbered20": 20}  # fewer frames than 16 x 3; frame i is grey level 8 * i


def _rule(n: int, frames: int, k: int) -> list[int]:
    """The TSN rule stated directly: offset o of segment i is floor((2 * (i * K + o) + 1) * n / (2 * frames * K))."""
    return [(2 * (i * k + o) + 1) * n // (2 * frames * k) for i in range(frames) for o in range(k)]


# ---------------------------------------------------------------------------------------------
# The rule (pure functions)


@pytest.mark.parametrize("frames,k", [(16, 1), (16, 2), (16, 3), (16, 4), (16, 16), (8, 3), (1, 5), (3, 2)])
def test_packer_request_is_the_tsn_rule(frames, k):
    for n in range(1, 400):
        idx = select_indices(n, frames * k)
        assert idx == _rule(n, frames, k), n
        assert idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n  # in time order, in range
        for i in range(frames):
            seg = idx[i * k:(i + 1) * k]
            # Each of segment i's frames overlaps its span [i n / F, (i + 1) n / F) ...
            assert all(i * n // frames <= j and j * frames < (i + 1) * n for j in seg), (n, i, seg)
            if n >= frames * k:  # ... and with enough frames they are distinct
                assert len(set(seg)) == k, (n, i, seg)
        if n < frames * k:  # every frame used, each repeated evenly, in order
            counts = np.bincount(idx, minlength=n)
            assert counts.min() >= (frames * k) // n and counts.max() <= (frames * k) // n + 1, n


def test_segment_floor_bounds_are_not_the_rule():
    # The half-open range [floor(i n / F), floor((i + 1) n / F)) does NOT always hold, even for K = 1 (today's
    # shards): n = 17, segment 8 spans [8.5, 9.5625), its middle 9.03 is frame 9, outside [8, 9).
    assert select_indices(17, 16)[8] == 9 and (8 + 1) * 17 // 16 == 9


@pytest.mark.parametrize("frames", [16, 5])
def test_odd_k_middle_offset_is_the_single_view_frame(frames):
    for k in (1, 3, 5):
        for n in range(1, 1000):
            middle = select_indices(n, frames * k)[(k - 1) // 2::k]
            assert middle == select_indices(n, frames), (k, n)


def test_view_positions():
    assert fmt.view_positions(16, 1, 0) == list(range(16))
    assert fmt.view_positions(4, 3, 1) == [1, 4, 7, 10]
    assert sorted(p for v in range(3) for p in fmt.view_positions(16, 3, v)) == list(range(48))
    for bad in ((16, 3, 3), (16, 3, -1), (0, 1, 0), (16, 0, 0)):
        with pytest.raises(ValueError):
            fmt.view_positions(*bad)


def test_config_and_cli():
    with pytest.raises(ValueError, match="--temporal-views must be 1..16"):
        shard.PackConfig("in", "out", temporal_views=0)
    with pytest.raises(ValueError, match="--temporal-views"):
        shard.PackConfig("in", "out", temporal_views=17)
    cfg = shard.PackConfig("in", "out", temporal_views=3, workers=1)
    assert cfg.recorded()["temporal_views"] == 3 and cfg.stored_frames == 48
    help_text = " ".join(shard.build_parser().format_help().split())
    assert "--temporal-views" in help_text and "K-fold" in help_text
    assert shard.build_parser().parse_args(["a", "b"]).temporal_views == 1


# ---------------------------------------------------------------------------------------------
# Packing


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """2 classes x 3 synthetic clips of 50-64 frames, plus two numbered clips shorter than 16 x 3."""
    root = make_videos(tmp_path_factory.mktemp("tv") / "data", classes=2, clips=3, min_len=50, max_len=64)
    first = sorted(p.name for p in root.iterdir())[0]
    for name, n in SHORT.items():
        write_avi(root / first / f"{name}.avi", solid_frames(n), fps=25.0)
    return root


@pytest.fixture(scope="module")
def packed(videos, tmp_path_factory):
    """The videos packed with the default K = 1, with ``--temporal-views 1`` (the CLI) and with K = 3."""
    base = tmp_path_factory.mktemp("packed")
    default = make_shards(videos, base / "default")
    argv = [str(videos), str(base / "one"), "--temporal-views", "1", "--short-side", "48", "--workers", "1",
            "--no-progress"]
    assert shard.main(argv) == 0
    three = make_shards(videos, base / "three", temporal_views=K)
    return default, base / "one", three


def _samples(folder):
    """{video path: (stored JPEG bytes in order, metadata)} of every sample, read by plain webdataset."""
    m = fmt.load_manifest(folder)
    out = {}
    for url in m.urls("train") + m.urls("test"):
        for s in wds.WebDataset(url, shardshuffle=False):
            jpegs = [s[f] for f in fmt.frame_fields(m.n_frames)]
            assert sorted(k for k in s if k.endswith(".jpg")) == list(fmt.frame_fields(m.n_frames))
            meta = json.loads(s[fmt.META_FIELD])
            out[meta["path"]] = (jpegs, meta)
    return out


def _decode(jpeg: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)


def test_manifest_of_k3(packed):
    raw = json.loads((packed[2] / fmt.MANIFEST_NAME).read_text())
    assert (raw["n_frames"], raw["frames"], raw["temporal_views"]) == (48, 16, 3)
    assert raw["args"]["temporal_views"] == 3 and raw["args"]["frames"] == 16
    m = fmt.load_manifest(packed[2])
    assert (m.n_frames, m.frames, m.temporal_views) == (48, 16, 3)
    assert len(m.fields) == 48 + 2 and m.skipped == []


def test_k3_members_are_the_frames_at_select_indices_48(videos, packed):
    samples = _samples(packed[2])  # plain webdataset: every sample has 48 frame members
    assert len(samples) == 2 * 3 + len(SHORT)
    for path, (jpegs, meta) in samples.items():
        assert len(jpegs) == 48 and len(meta["indices"]) == 48
        if path.rsplit("/", 1)[-1][:-4] in SHORT:
            continue
        cap = cv2.VideoCapture(str(videos / path))
        decoded = []
        while True:
            ok, f = cap.read()
            if not ok:
                break
            decoded.append(resize_short_side(f, 48).astype(np.float32))
        cap.release()
        n = len(decoded)
        assert n >= 48 and meta["n_decoded"] == n and not meta["repeated"]
        assert meta["indices"] == select_indices(n, 48)
        for j, jpeg in enumerate(jpegs):  # closest (JPEG loss aside) to the frame it claims, not to its neighbours
            got, claimed = _decode(jpeg), meta["indices"][j]
            near = range(max(0, claimed - 2), min(n, claimed + 3))
            diffs = {i: float(np.abs(decoded[i] - got).mean()) for i in near}
            assert diffs[claimed] < 12 and min(diffs, key=diffs.get) == claimed, (path, j, diffs)


def test_short_videos_pack_with_frames_repeated_evenly_in_order(packed):
    samples = _samples(packed[2])
    for name, n in SHORT.items():
        (jpegs, meta), = [v for p, v in samples.items() if p.endswith(f"/{name}.avi")]
        assert meta["n_decoded"] == n and meta["repeated"]
        assert meta["indices"] == select_indices(n, 48)
        levels = [int(round(float(_decode(j).mean()) / 8)) for j in jpegs]
        assert levels == meta["indices"]  # the stored frames are those frames
        counts = np.bincount(levels, minlength=n)
        assert set(counts) <= {48 // n, 48 // n + 1} and levels == sorted(levels)


def test_default_is_k1_and_k1_is_the_middle_view(packed):
    default, one, three = packed
    names = sorted(p.name for p in default.iterdir())
    assert names == sorted(p.name for p in one.iterdir())
    for name in names:  # shards, index files, wids descriptions and the manifest
        assert (default / name).read_bytes() == (one / name).read_bytes(), name
    raw = json.loads((default / fmt.MANIFEST_NAME).read_text())
    assert (raw["n_frames"], raw["frames"], raw["temporal_views"]) == (16, 16, 1)
    # K = 1 stores exactly the middle offset of K = 3, byte for byte (same decoded frame, same encoder).
    ones, threes = _samples(default), _samples(three)
    assert ones.keys() == threes.keys()
    for path, (jpegs, meta) in ones.items():
        middle = [threes[path][0][p] for p in fmt.view_positions(16, 3, 1)]
        assert jpegs == middle, path
        assert meta["indices"] == threes[path][1]["indices"][1::3]


def test_manifest_without_temporal_views_loads_as_one_view(packed):
    raw = json.loads((packed[0] / fmt.MANIFEST_NAME).read_text())
    del raw["temporal_views"], raw["frames"]
    m = fmt.parse_manifest(raw, packed[0])
    assert m.temporal_views == 1 and m.frames == m.n_frames == 16


@pytest.mark.parametrize("edit,match", [
    ({"temporal_views": 0}, "temporal_views must be an integer in 1..16"),
    ({"temporal_views": 17}, "temporal_views must be an integer in 1..16"),
    ({"temporal_views": "3"}, "temporal_views must be an integer"),
    ({"temporal_views": True}, "temporal_views must be an integer"),
    ({"temporal_views": 5}, "must be a multiple of temporal_views"),
    ({"frames": 15}, "frames must be n_frames / temporal_views = 16"),
    ({"frames": 48}, "frames must be n_frames / temporal_views = 16"),
    ({"frames": "16"}, "frames must be"),
])
def test_bad_manifest_values(packed, edit, match):
    raw = json.loads((packed[2] / fmt.MANIFEST_NAME).read_text())
    bad = {**copy.deepcopy(raw), **edit}
    with pytest.raises(fmt.FormatError, match=match):
        fmt.parse_manifest(bad, packed[2])


def test_more_stored_frames_than_a_manifest_takes_are_refused_before_packing():
    with pytest.raises(ValueError, match=r"--frames x --temporal-views must be at most 1000 .* 100 x 16"):
        shard.PackConfig("in", "out", frames=100, temporal_views=16)
