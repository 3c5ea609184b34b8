"""Video -> a fixed number of equally spaced, resized frames.

Used by the packer and by ``dist_train.predict`` so that a raw video at prediction time goes
through exactly the same frame selection and resizing as at packing time.

Frame counts come from decoding, never from the container header alone: some AVIs claim
hundreds of frames more than decode (or fewer). The header count is only a guess that lets the
common case finish in one decoding pass; when it is wrong a second pass fetches the right frames.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

VIDEO_EXTENSIONS = (
    ".avi", ".mp4", ".mkv", ".mov", ".webm", ".mpg", ".mpeg", ".m4v", ".wmv", ".flv", ".ogv", ".3gp",
)


class VideoError(Exception):
    """A video that cannot be used; the message is the reason, fit for a skip report."""


def select_indices(n_decoded: int, n_frames: int) -> list[int]:
    """``n_frames`` equally spaced frame indices over ``n_decoded`` frames, in order.

    Index i is the middle frame of the i-th of ``n_frames`` equal segments:
    floor((2i + 1) * n_decoded / (2 * n_frames)), in integer arithmetic (no float drift, no
    overflow). With fewer decoded frames than wanted, every frame is used and repeats evenly
    (each ``n_frames // n_decoded`` or one more times), still in order.

    ``select_indices(n, frames * k)`` is ``frames`` segments with ``k`` evenly spaced frames in each
    (``--temporal-views``): index ``i * k + j`` is offset ``j`` of segment i, a frame that overlaps the
    segment's span [i * n / frames, (i + 1) * n / frames), i.e. in [floor(i * n / frames),
    ceil((i + 1) * n / frames)) (neighbouring segments may share the frame that straddles their border),
    and distinct when n >= frames * k. For odd k the middle offset ``(k - 1) // 2`` is exactly
    ``select_indices(n, frames)[i]``.
    """
    if n_decoded < 1 or n_frames < 1:
        raise ValueError(f"need n_decoded >= 1 and n_frames >= 1, got {n_decoded}, {n_frames}")
    return [(2 * i + 1) * n_decoded // (2 * n_frames) for i in range(n_frames)]


def resize_short_side(frame: np.ndarray, short_side: int) -> np.ndarray:
    """Resize so the shorter side is ``short_side`` pixels, keeping the aspect ratio."""
    h, w = frame.shape[:2]
    if min(h, w) == short_side:
        return frame
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale >= 1:
        return cv2.resize(frame, size, interpolation=cv2.INTER_LINEAR)
    if scale > 0.5 and not (1 / scale).is_integer():
        # INTER_AREA at a non-integer factor above 1/2 takes ~7x INTER_LINEAR (0.30 vs 0.04 ms for
        # 320x240 -> 171x128); a 3x3 Gaussian pre-blur anti-aliases as well (47 dB PSNR against
        # INTER_AREA) for 0.12 ms.
        blurred = cv2.GaussianBlur(frame, (3, 3), 0.7 * (1 / scale - 1))
        return cv2.resize(blurred, size, interpolation=cv2.INTER_LINEAR)
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(frame_bgr: np.ndarray, quality: int = 90) -> bytes:
    """Encode an OpenCV (BGR) frame as an RGB JPEG file's bytes."""
    ok, buf = cv2.imencode(".jpg", frame_bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise VideoError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class Clip:
    """Selected frames of one video (BGR, resized) and what decoding found."""

    frames: list[np.ndarray]
    indices: list[int]
    n_decoded: int
    header_frames: int
    fps: float
    size: tuple[int, int]  # original (width, height)
    passes: int

    @property
    def repeated(self) -> bool:
        """True when the video had fewer frames than selected, so some repeat."""
        return self.n_decoded < len(self.indices)


def _capture(path: Path) -> cv2.VideoCapture:
    """``cv2.VideoCapture`` of ``path``, whatever bytes name it.

    OpenCV (4.x) crashes the process (SIGSEGV) on a file name that is not UTF-8, such as the Latin-1
    bytes ``caf\\xe9.avi``: such a file is opened through a symbolic link with a plain name, removed as
    soon as FFmpeg holds the file open.
    """
    # One decoding thread: FFmpeg's default frame threads cost 30-60% more CPU per frame on small
    # frames and compete with the worker processes, which are where parallelism comes from.
    params = [cv2.CAP_PROP_N_THREADS, 1]
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="video-") as tmp:
            link = os.path.join(tmp, "video" + (path.suffix if path.suffix.isascii() else ""))
            os.symlink(os.path.abspath(path), link)
            return cv2.VideoCapture(link, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, params)


def _open(path: Path) -> cv2.VideoCapture:
    if not path.exists():
        raise VideoError("file not found (a broken symbolic link?)")
    if not path.is_file():
        raise VideoError("not a regular file (a pipe, socket or device would block the decoder)")
    if not os.access(path, os.R_OK):
        raise VideoError("file is not readable (permissions)")
    if path.stat().st_size == 0:
        raise VideoError("empty file (0 bytes)")
    cap = _capture(path)
    if not cap.isOpened():
        cap.release()
        raise VideoError("OpenCV/FFmpeg cannot open it (not a video, unsupported codec or damaged header)")
    return cap


def _decode_pass(cap: cv2.VideoCapture, wanted: set[int], short_side: int,
                 stop_after: int | None) -> tuple[dict, int]:
    """Decode from an opened capture (released here), colour-converting and resizing only ``wanted`` frames.

    Returns the kept frames by index and the number of frames that decoded (up to ``stop_after``).
    """
    kept: dict[int, np.ndarray] = {}
    n = 0
    try:
        while stop_after is None or n <= stop_after:
            if not cap.grab():
                break
            if n in wanted:
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                kept[n] = resize_short_side(frame, short_side)
            n += 1
    finally:
        cap.release()
    return kept, n


def read_clip(path: str | Path, n_frames: int = 16, short_side: int = 128, min_frames: int = 1,
              max_pixels: int | None = None, max_frames: int | None = None) -> Clip:
    """Decode ``path`` and return ``n_frames`` equally spaced frames over the frames that decode.

    ``max_pixels`` bounds the frame size the container declares (checked before any frame decodes) and
    ``max_frames`` the frames that decode (decoding stops one frame past it), so one huge or endless
    video cannot take all the memory or time of a packing run. Raises ``VideoError`` with the reason
    when the file cannot be used.
    """
    path = Path(path)
    cap = _open(path)  # one open serves the header and the first pass
    header = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0))
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        cap.release()
        raise VideoError(f"frames of {size[0]}x{size[1]} ({size[0] * size[1]} pixels) are over the --max-pixels "
                         f"limit of {max_pixels}; raise it to pack this video")

    guess = set(select_indices(header, n_frames)) if header > 0 else set()
    kept, n_decoded = _decode_pass(cap, guess, short_side, max_frames)
    passes = 1
    if max_frames is not None and n_decoded > max_frames:
        raise VideoError(f"more than {max_frames} frames decode (the --max-frames limit); raise it to pack this video")
    if n_decoded == 0:
        raise VideoError("no frame decodes (truncated, corrupt or not a video)")
    if n_decoded < min_frames:
        raise VideoError(f"only {n_decoded} frame(s) decode, fewer than the minimum of {min_frames}")
    indices = select_indices(n_decoded, n_frames)
    missing = set(indices) - kept.keys()
    if missing:
        # The header count was wrong: fetch the right frames now that the real count is known.
        extra, n2 = _decode_pass(_open(path), missing, short_side, max(missing))
        passes = 2
        kept.update(extra)
        if set(indices) - kept.keys():
            raise VideoError(
                f"decoding is not repeatable: {n_decoded} frames decoded in the first pass, {n2} in the second"
            )
    return Clip(
        frames=[kept[i] for i in indices],
        indices=indices,
        n_decoded=n_decoded,
        header_frames=header,
        fps=fps,
        size=size,
        passes=passes,
    )


def read_clip_jpegs(path: str | Path, n_frames: int = 16, short_side: int = 128, quality: int = 90,
                    min_frames: int = 1, max_pixels: int | None = None,
                    max_frames: int | None = None) -> tuple[Clip, list[bytes]]:
    """``read_clip`` plus the JPEG encoding of its frames: exactly what a packed sample holds."""
    clip = read_clip(path, n_frames, short_side, min_frames, max_pixels, max_frames)
    return clip, [encode_jpeg(f, quality) for f in clip.frames]


def is_video_name(name: str) -> bool:
    """True for file names with a video extension this tool looks at."""
    return name.lower().endswith(VIDEO_EXTENSIONS)
