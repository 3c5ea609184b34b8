"""The seed's way of packing and loading, written faithfully so our code can be timed beside it.

Seed packing (its ``get_frames`` + ``store_frames``): per video, ``cv2.VideoCapture.read()`` of every
frame (decode + BGR->RGB of each), keep 16 equally spaced frames, convert them back to BGR and write
each one, full size, as its own JPEG file (``cv2.imwrite``, default quality 95) in a per-video folder.
One process. The seed's bugs that do not change the cost are fixed (16 frames, not 17; int indices,
not int16) so both sides produce the same number of frames.

Seed loading (its ``VideoDataset``): a map-style Dataset that opens the per-frame JPEG files of a clip
with PIL, applies torchvision transforms (Resize((112, 112)), ToTensor, Normalize) frame by frame and
stacks them to ``[T, 3, 112, 112]``; a DataLoader batches clips. The seed's random flip and affine
are left out (they would only slow the baseline down), and files are sorted (the seed's glob order
was a bug, not a cost).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

# torch / torchvision / PIL are imported where the loading side needs them, so that timing the
# packing side in a fresh process does not pay for importing torch.

MEAN = (0.43216, 0.394666, 0.37645)
STD = (0.22803, 0.22145, 0.216989)


def seed_get_frames(filename: str, n_frames: int = 16) -> tuple[list[np.ndarray], int]:
    """The seed's ``get_frames``: read every frame, keep ``n_frames`` equally spaced ones (RGB)."""
    frames = []
    v_cap = cv2.VideoCapture(filename)
    v_len = int(v_cap.get(cv2.CAP_PROP_FRAME_COUNT))
    frame_list = np.linspace(0, v_len - 1, n_frames, dtype=np.int64)
    for fn in range(v_len):
        success, frame = v_cap.read()
        if success is False:
            continue
        if fn in frame_list:
            frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            frames.append(frame)
    v_cap.release()
    return frames, v_len


def seed_store_frames(frames: list[np.ndarray], path2store: str) -> None:
    """The seed's ``store_frames``: one full-size JPEG file per frame."""
    for ii, frame in enumerate(frames):
        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
        path2img = os.path.join(path2store, "frame" + str(ii) + ".jpg")
        cv2.imwrite(path2img, frame)


def seed_pack(videos: list[Path], root: Path, out: Path, n_frames: int = 16) -> int:
    """The seed's preparation loop over ``videos`` (under ``root``) into ``out/<class>/<video>/``."""
    done = 0
    for v in videos:
        rel = Path(v).relative_to(root)
        folder = out / rel.parent / rel.stem
        os.makedirs(folder, exist_ok=True)
        frames, _ = seed_get_frames(str(v), n_frames)
        seed_store_frames(frames, str(folder))
        done += 1
    return done


class SeedVideoDataset:
    """The seed's ``VideoDataset``: per-frame JPEG files -> PIL -> transforms -> ``[T, 3, H, W]``.

    A map-style dataset (``__len__`` + ``__getitem__``), which is all ``torch.utils.data.Dataset`` adds.
    """

    def __init__(self, ids: list[str], labels: list[int], transform, timesteps: int = 16):
        self.ids, self.labels, self.transform, self.timesteps = ids, labels, transform, timesteps

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int):
        import torch
        from PIL import Image

        names = sorted(os.listdir(self.ids[idx]), key=lambda n: int(n[5:-4]))[: self.timesteps]
        frames = [Image.open(os.path.join(self.ids[idx], n)) for n in names]
        frames_tr = [self.transform(f) for f in frames]
        return torch.stack(frames_tr), self.labels[idx]


def seed_transform(size: int = 112):
    """Resize, to-tensor, normalize (the seed's train transform minus its random flip/affine)."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize((size, size)),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])


def seed_clip_folders(out: Path) -> tuple[list[str], list[int]]:
    """Clip folders written by ``seed_pack`` and their labels (sorted class folders)."""
    classes = sorted(p.name for p in out.iterdir() if p.is_dir())
    ids, labels = [], []
    for label, c in enumerate(classes):
        for d in sorted((out / c).iterdir()):
            if d.is_dir():
                ids.append(str(d))
                labels.append(label)
    return ids, labels


def seed_loader(out: Path, batch_size: int, workers: int, size: int = 112):
    """The seed's DataLoader over ``seed_pack`` output."""
    from torch.utils.data import DataLoader

    ids, labels = seed_clip_folders(out)
    ds = SeedVideoDataset(ids, labels, seed_transform(size))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                      persistent_workers=False, drop_last=False)
