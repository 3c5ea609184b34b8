"""Clips: JPEG frames -> decoded, checked, cropped and flipped uint8 clips, and the model's input.

JPEG decoding goes through ``decode_jpegs`` alone (OpenCV's libjpeg-turbo on the CPU, torchvision's
batched nvjpeg on CUDA), so the backend changes in one place. Before anything is decoded,
``frame_size`` reads each frame's size from its JPEG header (``jpeg_size``): frames of one clip must
agree, be sequential JPEGs (as the packer writes; a progressive one could make its decoder read
thousands of scans) and hold at most ``MAX_FRAME_PIXELS`` pixels, so a header claiming 60,000 x
60,000 pixels is a bad sample, not a 10 GB allocation (OpenCV's own limit is about a gigapixel).

A training clip (``make_clip`` with a plain ``ClipTransform``) is decoded frame by frame, each frame
cropped (as a view) and copied, or resized with ``cv2.resize``, straight into its slot of the batch
(``out``), so at most one decoded frame is held at a time. Frames are stored channels-last:
``[T, S, S, 3]`` slots, seen as ``[T, 3, S, S]`` tensors with channels-last strides, which is also the
layout the channels-last convolutions want. The evaluation transform (``ClipTransform.eval_scale``,
then the centre crop) is the one ``evaluation.SpatialViews`` uses.

``clip_batch`` is the ``--decode gpu`` path: one ``roi_align`` (training crops, bilinear like the CPU
path) or one ``resize`` (evaluation) per frame size in a batch decoded on the GPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as TF

from dist_train.config import TRAIN_CROPS
from dist_train.data.plan import mix_seed

# Per-channel mean/std of the data each family's pretrained weights were trained on.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
KINETICS_STATS = ((0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989))
CROPS = TRAIN_CROPS  # ClipTransform.crop; the choices are listed once, in config.py
MAX_FRAME_PIXELS = 1 << 24  # 16.8 M pixels (4096 x 4096) per frame; packed frames are far smaller

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC excluded)
_SEQUENTIAL = frozenset({0xC0, 0xC1})  # baseline and extended sequential DCT: what the packer (OpenCV) writes


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's frame header, without decoding; ValueError when there is none."""
    return _frame_header(data)[:2]


def _frame_header(data: bytes) -> tuple[int, int, int, int]:
    """``(width, height, end, marker)`` of a JPEG's frame header, ``end`` the byte after it; ValueError when none.

    Walks the marker segments from the start of the file to the first start-of-frame marker; every
    step moves forward, so any input ends the walk within its length.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ValueError("not a JPEG (no start-of-image marker)")
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise ValueError(f"not a JPEG (no marker at byte {i})")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in _SOF:
            if i + 9 > n:
                break
            return (data[i + 7] << 8) | data[i + 8], (data[i + 5] << 8) | data[i + 6], i + 9, marker
        if marker in (0xD9, 0xDA):
            raise ValueError("a JPEG without a frame header before its image data")
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    raise ValueError("a JPEG cut short before its frame header")


def frame_size(jpegs: Sequence[bytes]) -> tuple[int, int]:
    """``(height, width)`` of a clip's frames, read from their JPEG headers; ValueError naming the frame
    when one is not a sequential (baseline) JPEG, the sizes differ or a frame exceeds ``MAX_FRAME_PIXELS``."""
    sizes, first = [], None
    for i, data in enumerate(jpegs):
        if first is not None and data[:len(first)] == first:  # frame 0's bytes up to its frame header: its size
            sizes.append(sizes[0])
            continue
        try:
            w, h, end, marker = _frame_header(data)
        except ValueError as e:
            raise ValueError(f"frame {i} is {e}") from None
        if marker not in _SEQUENTIAL:  # progressive ones can hold thousands of scans, each decoded in full
            raise ValueError(f"frame {i} is not a sequential JPEG (frame marker 0x{marker:02X}; the packer writes "
                             "baseline JPEGs)")
        if i == 0:
            first = bytes(data[:end])
        if w * h > MAX_FRAME_PIXELS or w < 1 or h < 1:
            raise ValueError(f"frame {i} claims {w} x {h} pixels (at most {MAX_FRAME_PIXELS:,} per frame are read)")
        sizes.append((h, w))
    if len(set(sizes)) > 1:
        raise ValueError(f"frames of different sizes ({sorted({(h, w, 3) for h, w in sizes})})")
    return sizes[0]


# OpenCV >= 4.10 decodes straight to RGB; older versions decode BGR and convert. EXIF orientation is
# ignored, as torchvision's decode_jpeg does by default.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_IMREAD_FLAGS = (cv2.IMREAD_COLOR if _IMREAD_RGB is None else _IMREAD_RGB) | cv2.IMREAD_IGNORE_ORIENTATION


def decode_jpegs(data: Sequence[bytes], device: str | torch.device = "cpu", hwc: bool = False) -> list:
    """Decode JPEG files into RGB uint8 frames: the one place the JPEG backend is chosen.

    CPU: OpenCV's libjpeg-turbo (``cv2.imdecode``), one frame at a time. CUDA: one batched nvjpeg call
    (``torchvision.io.decode_jpeg``). Returns ``[3, H, W]`` tensors (on the CPU, channels-last views of
    the decoded ``[H, W, 3]`` arrays, no copy), or with ``hwc=True`` the ``[H, W, 3]`` frames: numpy
    arrays on the CPU, tensors on CUDA. Raises ``ValueError`` naming a frame that does not decode on
    the CPU (nvjpeg raises ``RuntimeError`` for the whole call).
    """
    device = torch.device(device)
    if device.type != "cpu":
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points at TorchCodec
            out = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        return [t.permute(1, 2, 0) for t in out] if hwc else out
    frames = [_decode_cpu(b, i) for i, b in enumerate(data)]
    return frames if hwc else [torch.from_numpy(a).permute(2, 0, 1) for a in frames]


def _decode_cpu(data: bytes, i: int) -> np.ndarray:
    """Frame ``i`` of a clip decoded on the CPU: RGB uint8 ``[H, W, 3]``; ValueError when it does not decode."""
    try:
        a = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_FLAGS)
    except cv2.error as e:  # e.g. an empty member
        raise ValueError(f"frame {i} is not a decodable JPEG ({e.err})") from None
    if a is None:
        raise ValueError(f"frame {i} is not a decodable JPEG")
    return cv2.cvtColor(a, cv2.COLOR_BGR2RGB) if _IMREAD_RGB is None else a


@dataclass(frozen=True)
class ClipTransform:
    """Crop, resize and flip a clip ``[T, 3, H, W]`` (uint8) the same way for all its frames.

    ``crop="random"`` (the default; torchvision's video classification recipe, 112-pixel crops of
    128-pixel frames): training takes a random square of 7/8 of the short side, evaluation the centre
    one, resized to ``size``. With frames packed at ``size * 8 / 7`` (the defaults: 128 and 112) the
    square is ``size`` already: a plain crop, no resize.
    ``crop="resized"``: training takes a random resized crop (torchvision's RandomResizedCrop
    parameters, area ``crop_scale..1``, aspect ``ratio``) resized bilinearly (half-pixel centres, no
    anti-aliasing); evaluation resizes the short side to ``size`` with torchvision's anti-aliased
    ``resize``, then takes the centre crop (the resize ``SpatialViews`` uses). Both: a random flip,
    all drawn from ``seed`` alone (``draw``); resizing is ``cv2.resize`` on the CPU, ``roi_align`` on CUDA.
    """

    size: int
    train: bool
    crop_scale: float = 0.5
    hflip: bool = True
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop: str = "random"

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")

    def _resized_box(self, h: int, w: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """``crop="resized"``: torchvision's RandomResizedCrop.get_params, drawing from ``gen``."""
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            r = torch.rand(3, generator=gen).tolist()
            target = area * (self.crop_scale + (1.0 - self.crop_scale) * r[0])
            aspect = math.exp(log_lo + (log_hi - log_lo) * r[1])
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                return top, left, ch, cw
        s = min(h, w)
        return (h - s) // 2, (w - s) // 2, s, s

    def draw(self, h: int, w: int, seed: int) -> tuple[int, int, int, int, bool]:
        """The training crop ``(top, left, height, width)`` and flip for ``h x w`` frames, from ``seed`` alone.

        ``crop="random"`` takes the corner and the flip straight from ``mix_seed(seed, i)`` (a
        torch.Generator and its calls cost 20 us a clip, a few % of a loader worker's time);
        ``"resized"`` draws from a torch.Generator, as torchvision does."""
        if self.crop == "random":
            side = self._random_side(h, w)
            top, left = mix_seed(seed, 1) % (h - side + 1), mix_seed(seed, 2) % (w - side + 1)
            return top, left, side, side, self.hflip and mix_seed(seed, 3) % 2 == 1
        gen = torch.Generator().manual_seed(int(seed))
        top, left, ch, cw = self._resized_box(h, w, gen)
        flip = self.hflip and float(torch.rand(1, generator=gen)) < 0.5
        return top, left, ch, cw, flip

    def transform_frames(self, frames: Sequence[np.ndarray] | np.ndarray, seed: int | None,
                         out: np.ndarray | None = None) -> np.ndarray:
        """Transform decoded ``[H, W, 3]`` uint8 frames (CPU) into ``out``, uint8 ``[T, S, S, 3]`` (new if None)."""
        s = self.size
        if out is None:
            out = np.empty((len(frames), s, s, 3), np.uint8)
        if not self.train:
            clip = torch.from_numpy(frames if isinstance(frames, np.ndarray) else np.stack(frames))
            torch.from_numpy(out).copy_(self._eval_crop(clip.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
            return out
        h, w = frames[0].shape[:2]
        box = self.draw(h, w, seed)
        for f, o in zip(frames, out):
            self._crop_into(f, o, box)
        return out

    def train_clip(self, jpegs: Sequence[bytes], h: int, w: int, seed: int,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Decode ``h x w`` JPEG frames one by one, each cropped and flipped into ``out`` (uint8 ``[T, S, S, 3]``)."""
        if out is None:
            out = np.empty((len(jpegs), self.size, self.size, 3), np.uint8)
        box = self.draw(h, w, seed)
        for i, (data, o) in enumerate(zip(jpegs, out)):
            self._crop_into(_decode_cpu(data, i), o, box)  # libjpeg decodes to the header's size
        return out

    def _crop_into(self, f: np.ndarray, o: np.ndarray, box: tuple[int, int, int, int, bool]) -> None:
        """Frame ``f``'s crop ``box`` (``draw``) into ``o``: copied (and flipped) at the stored scale, else resized."""
        top, left, ch, cw, flip = box
        s = self.size
        if (ch, cw) == (s, s):  # a crop at the stored scale: copied (and flipped) into place, no resize
            if flip:
                cv2.flip(f[top:top + s, left:left + s], 1, dst=o)
            else:
                o[...] = f[top:top + s, left:left + s]
            return
        r = cv2.resize(f[top:top + ch, left:left + cw], (s, s), dst=o, interpolation=cv2.INTER_LINEAR)
        if r is not o:  # OpenCV allocated its own output after all
            o[...] = r
        if flip:
            cv2.flip(o, 1, dst=o)

    def _random_side(self, h: int, w: int) -> int:
        """Side of the ``crop="random"`` square in ``h x w`` frames: 7/8 of the short side (``size`` at
        ``size * 8 / 7``), the same field of view for any ``size``."""
        return min(h, w, max(1, round(min(h, w) * self.size / round(self.size * 8 / 7))))

    def eval_scale(self, clip: torch.Tensor) -> torch.Tensor:
        """The frames at the scale evaluation crops ``size`` squares from: the short side at ``size * 8 / 7``
        (``crop="random"``, unchanged when already so) or at ``size`` (``crop="resized"``)."""
        short = round(self.size * 8 / 7) if self.crop == "random" else self.size
        return clip if min(clip.shape[-2:]) == short else TF.resize(clip, [short], antialias=True)

    def _eval_crop(self, clip: torch.Tensor) -> torch.Tensor:
        return TF.center_crop(self.eval_scale(clip), [self.size, self.size])

    def __call__(self, clip: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The transformed clip ``[T, 3, size, size]``; ``seed`` draws the training crop and flip."""
        if not self.train:
            return self._eval_crop(clip)
        if clip.device.type == "cpu":
            frames = clip.permute(0, 2, 3, 1)
            frames = frames.numpy() if frames.is_contiguous() else frames.contiguous().numpy()
            return torch.from_numpy(self.transform_frames(frames, seed)).permute(0, 3, 1, 2)
        return clip_batch(self, [clip], [seed])[0]


def _plain(transform: ClipTransform) -> bool:
    """True for a ClipTransform whose ``__call__`` is not overridden (its output is ``[T, 3, S, S]``)."""
    return isinstance(transform, ClipTransform) and type(transform).__call__ is ClipTransform.__call__


def clip_batch(transform: ClipTransform, clips: Sequence[Sequence[torch.Tensor] | torch.Tensor],
               seeds: Sequence[int | None]) -> torch.Tensor:
    """Transform decoded clips (each ``T`` frames ``[3, H, W]`` of one size, any device) in one batch.

    One call per frame size in the batch: ``roi_align`` (training: each clip's own crop, bilinear,
    then its flip) or ``resize`` + centre crop (evaluation). Returns uint8 ``[B, T, 3, S, S]``.
    """
    s, t = transform.size, len(clips[0])
    first = clips[0][0]
    out = torch.empty((len(clips), t, 3, s, s), dtype=torch.uint8, device=first.device)
    groups: dict[tuple, list[int]] = {}
    for j, clip in enumerate(clips):
        groups.setdefault(tuple(clip[0].shape), []).append(j)
    for (_, h, w), idx in groups.items():
        frames = torch.stack([f for j in idx for f in clips[j]])  # [len(idx) * T, 3, H, W]
        if not transform.train:
            out[idx] = transform._eval_crop(frames).reshape(len(idx), t, 3, s, s)
            continue
        boxes, flips = [], []
        for k, j in enumerate(idx):
            top, left, ch, cw, flip = transform.draw(h, w, seeds[j])
            boxes += [[k * t + i, left, top, left + cw, top + ch] for i in range(t)]
            flips += [flip] * t
        rois = torch.tensor(boxes, dtype=torch.float32, device=frames.device)
        res = roi_align(frames.float(), rois, (s, s), spatial_scale=1.0, sampling_ratio=1, aligned=True)
        flipped = torch.tensor(flips, device=frames.device)
        res = torch.where(flipped[:, None, None, None], res.flip(-1), res)
        out[idx] = res.round_().clamp_(0, 255).to(torch.uint8).reshape(len(idx), t, 3, s, s)
    return out


def make_clip(jpegs: Sequence[bytes], transform: ClipTransform, seed: int | None,
              device: str | torch.device = "cpu", out: np.ndarray | None = None) -> torch.Tensor:
    """Decode one sample's frames and transform them: uint8 ``[T, 3, size, size]``.

    On the CPU a plain ``ClipTransform`` writes the clip into ``out`` (uint8 ``[T, S, S, 3]``, e.g. a
    slot of a batch) when given; the result is then a view of it. Other transforms (e.g.
    ``evaluation.SpatialViews``) get the decoded clip as a ``[T, 3, H, W]`` tensor.
    """
    h, w = frame_size(jpegs)
    device = torch.device(device)
    if device.type != "cpu":
        return transform(torch.stack(decode_jpegs(jpegs, device)), seed)
    if _plain(transform) and transform.train:
        return torch.from_numpy(transform.train_clip(jpegs, h, w, seed, out)).permute(0, 3, 1, 2)
    frames = decode_jpegs(jpegs, hwc=True)
    if _plain(transform):
        return torch.from_numpy(transform.transform_frames(frames, seed, out)).permute(0, 3, 1, 2)
    return transform(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), seed)


def to_model_input(video: torch.Tensor, layout: str, stats: tuple) -> torch.Tensor:
    """uint8 ``[B, T, 3, H, W]`` -> normalized float in the model's layout (``BTCHW`` or ``BCTHW``).

    One pass (``addcmul`` converts and scales together); the memory layout of ``video`` is kept, so
    the channels-last clips of the CPU path stay channels-last (what the convolutions want).
    """
    mean = torch.tensor(stats[0], dtype=torch.float32, device=video.device).view(1, 1, 3, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float32, device=video.device).view(1, 1, 3, 1, 1)
    x = torch.addcmul(-mean / std, video, 1.0 / (255.0 * std))  # (v / 255 - mean) / std
    return x.permute(0, 2, 1, 3, 4) if layout == "BCTHW" else x


def normalization(model_name: str) -> tuple:
    """Mean/std matching the model family's pretrained weights."""
    return IMAGENET_STATS if model_name == "cnn_rnn" else KINETICS_STATS

