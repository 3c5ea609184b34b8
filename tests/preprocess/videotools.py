"""Helpers that write real, and deliberately broken, video files for tests."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def solid_frames(n: int, size=(64, 48)) -> list[np.ndarray]:
    """n frames; frame i is a uniform grey of level 8 * i (readable back after compression)."""
    w, h = size
    return [np.full((h, w, 3), min(8 * i, 255), np.uint8) for i in range(n)]


def set_avi_frame_count(path: Path, frames: int) -> None:
    """Overwrite the frame counts an AVI header claims (avih.dwTotalFrames and strh.dwLength)."""
    data = bytearray(Path(path).read_bytes())
    avih = data.find(b"avih")
    struct.pack_into("<I", data, avih + 8 + 16, frames)
    strh = data.find(b"strh")
    struct.pack_into("<I", data, strh + 8 + 32, frames)
    Path(path).write_bytes(bytes(data))


def truncate(path: Path, fraction: float) -> None:
    """Cut a file to ``fraction`` of its size, as an interrupted download would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])
