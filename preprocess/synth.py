"""Write HMDB51-style sample videos: ``data/<class>/<source>_<class>_<tags>_<clip>.avi``.

Classes come in time-reversed pairs (grow/shrink, move_right/move_left, ...): a clip of one class
played backwards is a clip of its partner, so every single frame, and every unordered set of
frames, is equally likely under both classes. Only a model that uses frame order can beat chance;
this is what proves the CNN-RNN learns temporal structure.

Files are real MPEG-4 Part 2 (XVID) AVIs written by OpenCV's FFmpeg backend, like HMDB51, with
varied lengths (some shorter than 16 frames), frame rates and sizes. Each "source film" has its
own textures and contributes several clips, and its name prefixes the file name (as in HMDB51),
so group-aware splitting can be tested. Output is deterministic for a given seed.

    python -m preprocess.synth data/ --classes 4 --clips 12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

# Pairs: each class is its partner reversed in time. Direction-dependent pairs (left/right,
# cw/ccw) also swap meaning under a horizontal flip, so train them with --no-hflip.
CLASSES = ("grow", "shrink", "move_right", "move_left", "rotate_cw", "rotate_ccw", "move_down", "move_up")
SIZES = ((160, 120), (176, 144), (200, 150), (240, 180))
FPS = (10.0, 15.0, 25.0, 30.0)


def _texture(rng: np.random.Generator, h: int, w: int, lo: int, hi: int) -> np.ndarray:
    """Blocky random colour texture (survives MPEG-4 compression better than pixel noise)."""
    cell = 4
    small = rng.integers(lo, hi, size=(h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
    return np.kron(small, np.ones((cell, cell, 1), dtype=np.uint8))[:h, :w]


def _forward_kind(name: str) -> tuple[str, bool]:
    """The motion a class shows, and whether it is that motion reversed in time."""
    pair = CLASSES.index(name) // 2
    return CLASSES[2 * pair], CLASSES.index(name) % 2 == 1


def render_clip(kind: str, n: int, size: tuple[int, int], rng: np.random.Generator,
                background: np.ndarray, texture: np.ndarray) -> list[np.ndarray]:
    """Frames (BGR) of one clip of the forward motion ``kind``: a textured object on a textured background."""
    w, h = size
    s = min(w, h)
    t = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    yy, xx = np.mgrid[0:h, 0:w]
    cx0, cy0 = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    phase = rng.uniform(0, np.pi)
    frames = []
    for ti in t:
        if kind == "grow":
            r = s * (0.12 + 0.3 * ti)
            mask = (xx - cx0) ** 2 + (yy - cy0) ** 2 <= r * r
        elif kind == "move_right":
            cx = w * (0.2 + 0.6 * ti)
            half = s * 0.2
            mask = (np.abs(xx - cx) <= half) & (np.abs(yy - cy0) <= half)
        elif kind == "move_down":
            cy = h * (0.2 + 0.6 * ti)
            half = s * 0.2
            mask = (np.abs(xx - cx0) <= half) & (np.abs(yy - cy) <= half)
        elif kind == "rotate_cw":
            ang = phase + ti * np.pi * 0.9
            dx, dy = xx - cx0, yy - cy0
            along = dx * np.cos(ang) + dy * np.sin(ang)
            across = -dx * np.sin(ang) + dy * np.cos(ang)
            mask = (np.abs(along) <= s * 0.42) & (np.abs(across) <= s * 0.08)
        else:
            raise ValueError(f"unknown motion {kind!r}")
        frames.append(np.where(mask[..., None], texture, background))
    return frames


def write_avi(path: Path, frames: list[np.ndarray], fps: float) -> None:
    """Write BGR frames as an XVID (MPEG-4 Part 2) AVI."""
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"XVID"), fps, (w, h))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write XVID video {path}; is opencv-python-headless installed?")
    try:
        for f in frames:
            writer.write(np.ascontiguousarray(f))
    finally:
        writer.release()


def generate(out: Path, num_classes: int = 4, clips: int = 12, sources: int = 4, seed: int = 0,
             min_len: int = 10, max_len: int = 48, size: tuple[int, int] | None = None) -> list[Path]:
    """Write ``clips`` videos for each of the first ``num_classes`` classes; return their paths."""
    if not 2 <= num_classes <= len(CLASSES):
        raise ValueError(f"--classes must be between 2 and {len(CLASSES)}, got {num_classes}")
    if min_len < 1 or max_len < min_len:
        raise ValueError(f"need 1 <= --min-len <= --max-len, got {min_len}, {max_len}")
    out = Path(out)
    written = []
    for label, name in enumerate(CLASSES[:num_classes]):
        kind, reverse = _forward_kind(name)
        (out / name).mkdir(parents=True, exist_ok=True)
        for clip in range(clips):
            source = clip % sources
            rng = np.random.default_rng([seed, label, clip])
            src_rng = np.random.default_rng([seed, 10_000 + source])
            w, h = size or SIZES[int(src_rng.integers(len(SIZES)))]
            background = _texture(src_rng, h, w, 0, 110)
            texture = _texture(src_rng, h, w, 120, 256)
            n = int(rng.integers(min_len, max_len + 1))
            frames = render_clip(kind, n, (w, h), rng, background, texture)
            if reverse:
                frames = frames[::-1]
            fps = FPS[int(rng.integers(len(FPS)))]
            path = out / name / f"film{source:02d}_{name}_u_nm_np1_fr_med_{clip}.avi"
            write_avi(path, frames, fps)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocess.synth", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (class sub-folders are created)")
    p.add_argument("--classes", type=int, default=4, help=f"number of classes, 2..{len(CLASSES)}: {', '.join(CLASSES)}")
    p.add_argument("--clips", type=int, default=12, help="clips per class")
    p.add_argument("--sources", type=int, default=4, help="source films the clips of a class come from")
    p.add_argument("--min-len", type=int, default=10, help="fewest frames in a clip")
    p.add_argument("--max-len", type=int, default=48, help="most frames in a clip")
    p.add_argument("--size", type=str, default=None, help="WxH for every clip (default: varied per source)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    size = None
    if a.size:
        try:
            w, h = (int(v) for v in a.size.lower().split("x"))
        except ValueError:
            p.error(f"--size must look like 160x120, got {a.size!r}")
        size = (w, h)
    try:
        paths = generate(a.out, a.classes, a.clips, a.sources, a.seed, a.min_len, a.max_len, size)
    except ValueError as e:
        p.error(str(e))
    print(f"wrote {len(paths)} videos in {a.classes} classes to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
