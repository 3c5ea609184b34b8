"""Frame selection rule and decoding of real videos (including a lying header)."""

from __future__ import annotations

import numpy as np
import pytest

from preprocess.frames import VideoError, read_clip, resize_short_side, select_indices
from preprocess.synth import write_avi
from tests.preprocess.videotools import set_avi_frame_count, solid_frames


@pytest.mark.parametrize("n,want", [
    (16, list(range(16))),
    (32, list(range(1, 32, 2))),
    (31, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30]),
    (1, [0] * 16),
    (2, [0] * 8 + [1] * 8),
])
def test_select_indices_exact_cases(n, want):
    assert select_indices(n, 16) == want


@pytest.mark.parametrize("n", [1, 2, 5, 8, 15, 16, 17, 100, 1000, 123457])
def test_select_indices_properties(n):
    idx = select_indices(n, 16)
    assert len(idx) == 16  # not 17 (the seed's linspace(0, n-1, n_frames+1) bug)
    assert idx[0] <= n // 16 and idx[-1] >= n - 1 - n // 16  # spans the whole video
    assert idx == sorted(idx) and all(0 <= i < n for i in idx)
    if n >= 16:
        assert len(set(idx)) == 16
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1  # equally spaced up to rounding
    else:
        counts = np.bincount(idx, minlength=n)
        assert counts.min() >= 1 and counts.max() - counts.min() <= 1  # every frame, repeated evenly


def test_select_indices_large_values_are_exact():
    # int16 indices (a seed bug) would overflow here; float rounding could drift.
    assert select_indices(100_001, 3) == [16_666, 50_000, 83_334]


def test_resize_short_side_keeps_aspect():
    f = np.zeros((240, 320, 3), np.uint8)
    assert resize_short_side(f, 128).shape == (128, 171, 3)
    assert resize_short_side(np.zeros((40, 30, 3), np.uint8), 60).shape == (80, 60, 3)


def _numbered_video(path, n, size=(64, 48)):
    """Frame i is a uniform grey of level 8 * i, so decoded frames reveal their index."""
    write_avi(path, solid_frames(n, size), fps=25.0)


def _frame_number(frame) -> int:
    return int(round(float(frame.mean()) / 8))


def test_read_clip_selects_decoded_frames_in_order(tmp_path):
    _numbered_video(tmp_path / "v.avi", 31)
    clip = read_clip(tmp_path / "v.avi", 16, short_side=32)
    assert clip.n_decoded == 31 and clip.header_frames == 31 and clip.passes == 1
    assert clip.indices == select_indices(31, 16)
    assert [_frame_number(f) for f in clip.frames] == clip.indices
    assert clip.frames[0].shape == (32, 43, 3)
    assert not clip.repeated


def test_read_clip_short_video_repeats_frames(tmp_path):
    _numbered_video(tmp_path / "v.avi", 5)
    clip = read_clip(tmp_path / "v.avi", 16, short_side=32)
    assert clip.repeated and clip.n_decoded == 5
    assert [_frame_number(f) for f in clip.frames] == select_indices(5, 16)


@pytest.mark.parametrize("claimed", [300, 12])
def test_read_clip_ignores_wrong_header_count(tmp_path, claimed):
    path = tmp_path / "v.avi"
    _numbered_video(path, 24)
    set_avi_frame_count(path, claimed)
    import cv2

    cap = cv2.VideoCapture(str(path))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == claimed  # the header really lies
    cap.release()
    clip = read_clip(path, 16, short_side=32)
    assert clip.header_frames == claimed and clip.n_decoded == 24 and clip.passes == 2
    assert [_frame_number(f) for f in clip.frames] == select_indices(24, 16)


def test_read_clip_min_frames(tmp_path):
    _numbered_video(tmp_path / "v.avi", 3)
    with pytest.raises(VideoError, match="only 3 frame"):
        read_clip(tmp_path / "v.avi", 16, 32, min_frames=4)
