"""HMDB-like benchmark inputs: 320x240 XVID AVIs of 2-6 s at 30 fps, cached under bench/work/.

    python -m bench.videos [--count 300]

Unlike ``preprocess.synth`` (small, mostly static clips made for learning tests), these are sized
like HMDB51 clips and carry what makes real video cost something to decode: a panning textured
background (global motion), a moving textured object and sensor-like noise, so that P-frames hold
real residuals instead of skipped blocks. Content is deterministic for a given index.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from bench import WORK
from preprocess.synth import write_avi

SIZE = (320, 240)
FPS = 30.0
CLASSES = ("walk", "run", "jump", "wave")
VERSION = 1  # bump when the content changes, so caches are rebuilt


def _texture(rng: np.random.Generator, h: int, w: int, lo: int, hi: int, cell: int = 6) -> np.ndarray:
    small = rng.integers(lo, hi, size=(h // cell + 2, w // cell + 2, 3), dtype=np.uint8)
    big = cv2.resize(small, ((w // cell + 2) * cell, (h // cell + 2) * cell), interpolation=cv2.INTER_LINEAR)
    return big[:h, :w]


def render(index: int, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Frames (BGR, 320x240) of video ``index`` and its class name."""
    rng = np.random.default_rng([seed, index])
    w, h = SIZE
    n = int(rng.integers(int(2 * FPS), int(6 * FPS) + 1))
    bg = _texture(rng, h + 80, w + 160, 0, 140)
    obj = _texture(rng, 80, 60, 110, 256, cell=4)
    pan = rng.uniform(0.3, 1.2) * rng.choice([-1, 1])
    x0, y0 = rng.uniform(20, w - 80), rng.uniform(20, h - 100)
    vx, vy = rng.uniform(-2.5, 2.5), rng.uniform(-1.0, 1.0)
    frames = []
    for t in range(n):
        ox = int(80 + pan * t) % 160
        oy = int(40 + 10 * np.sin(t / 15.0))
        frame = bg[oy:oy + h, ox:ox + w].copy()
        x = int(x0 + vx * t) % (w - 60)
        y = int(np.clip(y0 + vy * t + 8 * np.sin(t / 4.0), 0, h - 80))
        frame[y:y + 80, x:x + 60] = obj
        noise = rng.integers(-6, 7, size=frame.shape, dtype=np.int16)
        frames.append(np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    return frames, CLASSES[index % len(CLASSES)]


def _write_one(args) -> str:
    index, root = args
    frames, cls = render(index)
    path = Path(root) / cls / f"bench_{cls}_{index:05d}.avi"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_avi(path, frames, FPS)
    return str(path)


def ensure_videos(count: int = 300, workers: int | None = None, root: Path | None = None) -> Path:
    """Folder ``<class>/<video>.avi`` holding ``count`` bench videos; made once, then reused."""
    root = Path(root or WORK / f"videos-{count}")
    stamp = root / ".done.json"
    want = {"count": count, "version": VERSION, "size": list(SIZE), "fps": FPS}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    workers = workers or os.cpu_count() or 1
    print(f"bench: writing {count} HMDB-like videos to {root} (once) ...", file=sys.stderr, flush=True)
    jobs = [(i, str(root)) for i in range(count)]
    if workers == 1:
        list(map(_write_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as ex:
            list(ex.map(_write_one, jobs, chunksize=4))
    stamp.write_text(json.dumps(want))
    return root


def link_copies(src: Path, count: int, root: Path) -> Path:
    """A folder of ``count`` videos that are symlinks cycling over the videos in ``src`` (no decoding cost to make)."""
    stamp = root / ".done.json"
    want = {"src": str(src), "count": count}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return root
    if root.exists():
        shutil.rmtree(root)
    # Index order (not path order) so any prefix holds every class.
    videos = sorted(src.rglob("*.avi"), key=lambda p: (p.stem.rsplit("_", 1)[-1], p.name))
    for i in range(count):
        v = videos[i % len(videos)]
        dst = root / v.parent.name / f"{v.stem}_c{i:05d}.avi"
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.symlink_to(v.resolve())
    stamp.write_text(json.dumps(want))
    return root


def describe(root: Path) -> dict:
    """Count, total frames (by header) and total bytes of the videos under ``root``."""
    vids = sorted(root.rglob("*.avi"))
    frames = 0
    for v in vids:
        cap = cv2.VideoCapture(str(v), cv2.CAP_FFMPEG)
        frames += int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
    size = sum(v.stat().st_size for v in vids)
    return {"videos": len(vids), "frames": frames, "mean_frames": frames / max(1, len(vids)),
            "mean_kbytes": size / max(1, len(vids)) / 1e3, "size": f"{SIZE[0]}x{SIZE[1]}", "fps": FPS,
            "codec": "XVID (OpenCV FFmpeg writer)"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.videos", description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=300)
    a = p.parse_args(argv)
    root = ensure_videos(a.count)
    print(json.dumps(describe(root), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
