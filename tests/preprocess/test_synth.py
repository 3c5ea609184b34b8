"""Sample video generator: real XVID AVIs in HMDB51 layout, deterministic, temporal-only classes."""

from __future__ import annotations

import subprocess
import sys

import cv2
import pytest

from preprocess.splits import source_of
from preprocess.synth import CLASSES, generate


def test_layout_codec_and_variety(tmp_path):
    paths = generate(tmp_path, num_classes=4, clips=8, seed=3, min_len=8, max_len=40)
    assert sorted(p.parent.name for p in paths) == sorted([c for c in CLASSES[:4] for _ in range(8)])
    lengths, fps, sizes, sources = set(), set(), set(), set()
    for p in paths:
        cap = cv2.VideoCapture(str(p))
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC)).to_bytes(4, "little").decode()
        assert fourcc.upper() in ("XVID", "FMP4", "DIVX"), fourcc
        n = 0
        while cap.grab():
            n += 1
        lengths.add(n)
        fps.add(cap.get(cv2.CAP_PROP_FPS))
        sizes.add((cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
        cap.release()
        sources.add(source_of(p.name, p.parent.name))
    assert min(lengths) < 16 < max(lengths)
    assert len(fps) > 1 and len(sizes) > 1
    assert len(sources) == 4


def test_deterministic_for_a_seed(tmp_path):
    a = generate(tmp_path / "a", num_classes=2, clips=3, seed=7)
    b = generate(tmp_path / "b", num_classes=2, clips=3, seed=7)
    c = generate(tmp_path / "c", num_classes=2, clips=3, seed=8)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def _object_area(path) -> list[float]:
    """Fraction of bright (object) pixels in each decoded frame."""
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        out.append(float((f.mean(axis=2) > 120).mean()))
    return out


def test_grow_and_shrink_differ_only_in_time(tmp_path):
    paths = generate(tmp_path, num_classes=2, clips=6, seed=0, size=(96, 72))
    areas = {c: [] for c in ("grow", "shrink")}
    for p in paths:
        areas[p.parent.name].append(_object_area(p))
    for a in areas["grow"]:
        assert a[-1] > 2 * a[0]
    for a in areas["shrink"]:
        assert a[0] > 2 * a[-1]
    # As unordered sets of frames the classes look alike: same range of object sizes.
    lo = {c: sorted(min(a) for a in v) for c, v in areas.items()}
    hi = {c: sorted(max(a) for a in v) for c, v in areas.items()}
    assert abs(sum(lo["grow"]) - sum(lo["shrink"])) / sum(lo["grow"]) < 0.25
    assert abs(sum(hi["grow"]) - sum(hi["shrink"])) / sum(hi["grow"]) < 0.25


def test_cli_rejects_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "preprocess.synth", str(tmp_path), "--classes", "99"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--classes must be between 2 and" in r.stderr


@pytest.mark.parametrize("bad", ["12", "axb"])
def test_cli_rejects_bad_size(tmp_path, bad):
    r = subprocess.run([sys.executable, "-m", "preprocess.synth", str(tmp_path), "--size", bad],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--size must look like" in r.stderr
