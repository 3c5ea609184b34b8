"""Contact sheet of packed samples: one row per video, its frames in time order, labelled.

    python -m preprocess.preview shards/ --out preview.png [--split train] [--samples 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

from dist_train.locations import add_cache_flags, public
from preprocess import shard_format as fmt

LABEL_WIDTH = 220


def read_samples(manifest: fmt.Manifest, split: str, n: int) -> list[tuple[list[np.ndarray], int, dict]]:
    """The first ``n`` readable samples of ``split`` as (BGR frames, label, metadata), read by the trainer's reader."""
    from dist_train.data import read_split

    return [_decode(sample, manifest.n_frames) for sample in read_split(manifest, split, limit=n, skip_bad=True)]


def _decode(sample: dict, n_frames: int):
    frames, label, meta = fmt.split_sample(sample, n_frames)
    return [cv2.imdecode(np.frombuffer(f, np.uint8), cv2.IMREAD_COLOR) for f in frames], label, meta


def contact_sheet(samples, classes: list[str], thumb: int = 64) -> np.ndarray:
    """One row per sample: label text, then its frames scaled to ``thumb`` pixels high."""
    rows = []
    for frames, label, meta in samples:
        scaled = [cv2.resize(f, (max(1, round(f.shape[1] * thumb / f.shape[0])), thumb)) for f in frames]
        strip = np.concatenate(scaled, axis=1)
        text = np.full((thumb, LABEL_WIDTH, 3), 255, np.uint8)
        cv2.putText(text, f"{label}: {classes[label]}", (4, thumb // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        cv2.putText(text, Path(meta.get("path", "")).name[:30], (4, thumb - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
                    (90, 90, 90), 1)
        rows.append(np.concatenate([text, strip], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocess.preview", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("shards", help="shard folder (with manifest.json), or its URL (s3://, gs://, http(s)://)")
    p.add_argument("--out", type=Path, default=Path("preview.png"), help="PNG file to write")
    p.add_argument("--split", choices=fmt.SPLITS, default="train")
    p.add_argument("--samples", type=int, default=8, help="rows (videos) in the sheet")
    p.add_argument("--thumb", type=int, default=64, help="thumbnail height in pixels")
    add_cache_flags(p)
    a = p.parse_args(argv)
    from dist_train.data import open_manifest

    try:
        manifest = open_manifest(a.shards, a.cache_dir, a.cache_size)
        samples = read_samples(manifest, a.split, a.samples)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not samples:
        print(f"error: split {a.split!r} of {public(a.shards)} holds no samples", file=sys.stderr)
        return 1
    sheet = contact_sheet(samples, manifest.classes, a.thumb)
    if not cv2.imwrite(str(a.out), sheet):
        print(f"error: cannot write {a.out}", file=sys.stderr)
        return 1
    print(f"wrote {a.out} ({len(samples)} samples of {a.split})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
