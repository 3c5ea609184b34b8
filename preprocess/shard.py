"""Pack a folder of labelled videos into WebDataset shards.

    python -m preprocess.shard data/ shards/ [--frames 16] [--short-side 128] [--split stratified]

``data/<class>/**/<video>`` -> ``shards/{train,test}-NNNNNN.tar`` + ``shards/manifest.json``.
Classes are the sorted names of the non-hidden sub-folders; a video that cannot be used is skipped
with its reason (listed in the manifest and the summary) and packing goes on. Same inputs and
arguments give byte-identical output, whatever ``--workers`` is.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

from preprocess import shard_format as fmt
from preprocess import splits
from preprocess.frames import VideoError, is_video_name, read_clip_jpegs


@dataclass
class PackConfig:
    """Arguments of a packing run; all but ``workers`` and ``progress`` are recorded in the manifest."""

    input: str
    output: str
    frames: int = 16
    short_side: int = 128
    quality: int = 90
    min_frames: int = 1
    split: str = "stratified"
    test_size: float = 0.3
    seed: int = 0
    official_dir: str | None = None
    split_number: int = 1
    shard_size: int = 100
    strict: bool = False
    workers: int = 0
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.frames >= 1, f"--frames must be >= 1, got {self.frames}"),
            (self.short_side >= 8, f"--short-side must be >= 8, got {self.short_side}"),
            (1 <= self.quality <= 100, f"--quality must be 1..100, got {self.quality}"),
            (self.min_frames >= 1, f"--min-frames must be >= 1, got {self.min_frames}"),
            (self.split in splits.SPLIT_MODES, f"--split must be one of {splits.SPLIT_MODES}, got {self.split!r}"),
            (0.0 < self.test_size < 1.0, f"--test-size must be between 0 and 1, got {self.test_size}"),
            (self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}"),
            (self.split != "official" or self.official_dir,
             "--split official needs --official-dir pointing at testTrainMulti_7030_splits/"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.workers <= 0:
            self.workers = os.cpu_count() or 1

    def recorded(self) -> dict:
        d = asdict(self)
        for k in ("workers", "progress", "output"):
            d.pop(k)
        return d


class PackError(Exception):
    """Packing cannot go on; the message says why and what to do."""


@dataclass
class Item:
    video_id: int
    rel: str
    cls: str
    label: int


def scan(root: Path) -> tuple[list[str], list[Item], list[dict]]:
    """Classes, candidate videos (sorted, so ids and labels agree across machines) and ignored files."""
    if not root.is_dir():
        raise PackError(f"input folder {root} does not exist or is not a folder")
    skipped: list[dict] = []
    found: dict[str, list[str]] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            skipped.append({"path": entry.name, "reason": "not inside a class folder"})
            continue
        videos = []
        for path in sorted(entry.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
            rel = path.relative_to(root).as_posix()
            if any(part.startswith(".") for part in path.relative_to(entry).parts) or path.is_dir():
                continue
            if is_video_name(path.name):
                videos.append(rel)
            else:
                skipped.append({"path": rel, "reason": f"not a video file name (extension {path.suffix or 'none'!r})"})
        if videos:
            found[entry.name] = videos
    classes = sorted(found)
    items = []
    for label, cls in enumerate(classes):
        for rel in found[cls]:
            items.append(Item(len(items), rel, cls, label))
    return classes, items, skipped


def assign_splits(cfg: PackConfig, classes: list[str], items: list[Item]) -> tuple[list[str | None], list[dict]]:
    """Side of each item ('train', 'test' or None for unused) and the skips that causes."""
    labels = [it.label for it in items]
    if cfg.split == "stratified":
        sides = splits.stratified(labels, cfg.test_size, cfg.seed)
    elif cfg.split == "group":
        # Group on the source film alone, so a film that appears in two classes stays on one side.
        groups = [splits.source_of(it.rel, it.cls) for it in items]
        sides = splits.grouped(labels, groups, cfg.test_size, cfg.seed)
    else:
        table = splits.read_official(Path(cfg.official_dir), cfg.split_number, classes)
        sides = splits.official([it.rel for it in items], [it.cls for it in items], table)
    skipped = [
        {"path": it.rel, "reason": f"not in train or test of official split {cfg.split_number}"}
        for it, side in zip(items, sides) if side is None
    ]
    return sides, skipped


def encode_item(item: Item, frames: int, short_side: int, quality: int, min_frames: int):
    """Decode one video into JPEG frames + metadata, or return the reason it is skipped."""
    try:
        clip, jpegs = read_clip_jpegs(Path(_ROOT) / item.rel, frames, short_side, quality, min_frames)
    except VideoError as e:
        return str(e)
    except Exception as e:  # a decoder crash on one file must not stop the whole run
        return f"unexpected error while decoding: {type(e).__name__}: {e}"
    h, w = clip.frames[0].shape[:2]
    meta = {
        "path": item.rel,
        "class": item.cls,
        "label": item.label,
        "indices": clip.indices,
        "n_decoded": clip.n_decoded,
        "header_frames": clip.header_frames,
        "repeated": clip.repeated,
        "fps": round(clip.fps, 3),
        "orig_size": list(clip.size),
        "size": [w, h],
    }
    return jpegs, meta


_ROOT = "."


def _init_worker(root: str) -> None:
    global _ROOT
    _ROOT = root
    import cv2

    cv2.setNumThreads(1)


def _encode_all(cfg: PackConfig, todo: list[Item]) -> Iterator:
    """Results of ``encode_item`` in input order, at most a few per worker held in memory."""
    args = (cfg.frames, cfg.short_side, cfg.quality, cfg.min_frames)
    if cfg.workers == 1:
        _init_worker(cfg.input)
        for it in todo:
            yield encode_item(it, *args)
        return
    ctx = get_context("spawn")
    with ProcessPoolExecutor(cfg.workers, mp_context=ctx, initializer=_init_worker, initargs=(cfg.input,)) as ex:
        window: deque = deque()
        items = iter(todo)
        try:
            for it in items:
                window.append(ex.submit(encode_item, it, *args))
                if len(window) >= 4 * cfg.workers:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:
                f.cancel()


def _clean_output(out: Path) -> None:
    """Drop the manifest and temp files of earlier runs: until this run ends, the folder is not complete."""
    (out / fmt.MANIFEST_NAME).unlink(missing_ok=True)
    for p in out.iterdir():
        if p.name.endswith(fmt.TMP_SUFFIX):
            p.unlink()


def pack(cfg: PackConfig) -> dict:
    """Run a packing job; returns the manifest dict (also written to OUTPUT/manifest.json)."""
    start = time.monotonic()
    root, out = Path(cfg.input), Path(cfg.output)
    classes, items, skipped = scan(root)
    if not items:
        raise PackError(
            f"no videos found in {root}: expected class folders holding video files "
            f"({root}/<class>/<video>.avi, ...)"
        )
    try:
        sides, unused = assign_splits(cfg, classes, items)
    except splits.SplitError as e:
        raise PackError(str(e)) from e
    skipped += unused
    order = {}
    for split in fmt.SPLITS:
        members = [it for it, side in zip(items, sides) if side == split]
        random.Random(f"{cfg.seed}-{split}").shuffle(members)  # mix classes within each shard
        order[split] = members
    todo = order["train"] + order["test"]
    side_of = {it.video_id: side for it, side in zip(items, sides)}

    out.mkdir(parents=True, exist_ok=True)
    _clean_output(out)
    shards: dict[str, list[dict]] = {s: [] for s in fmt.SPLITS}
    per_class = {s: {c: 0 for c in classes} for s in fmt.SPLITS}
    writers: dict[str, fmt.ShardWriter] = {}
    bar = _progress(len(todo), cfg.progress)
    try:
        for it, result in zip(todo, _encode_all(cfg, todo)):
            bar.update(1)
            if isinstance(result, str):
                skipped.append({"path": it.rel, "reason": result})
                continue
            split = side_of[it.video_id]
            w = writers.get(split)
            if w is None:
                w = writers[split] = fmt.ShardWriter(out / fmt.shard_name(split, len(shards[split])))
            jpegs, meta = result
            w.write(fmt.sample_key(it.video_id), jpegs, it.label, meta, group=splits.source_of(it.rel, it.cls))
            per_class[split][it.cls] += 1
            if w.count >= cfg.shard_size:
                shards[split].append(writers.pop(split).close())
        for split, w in writers.items():
            shards[split].append(w.close())
        writers = {}
    finally:
        for w in writers.values():
            w.abort()
        bar.close()

    keep = {s["name"] for ss in shards.values() for s in ss}
    indexes = {fmt.index_name(n) for n in keep}
    for p in out.iterdir():
        stale_index = p.name.endswith(fmt.INDEX_SUFFIX) and fmt.is_shard_name(p.name[:-len(fmt.INDEX_SUFFIX)] + ".tar")
        if (fmt.is_shard_name(p.name) and p.name not in keep) or (stale_index and p.name not in indexes):
            p.unlink()  # left from an earlier, larger run
    skipped.sort(key=lambda s: s["path"])
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "classes": classes,
        "n_frames": cfg.frames,
        "args": cfg.recorded(),
        "splits": {
            s: {"count": sum(x["count"] for x in shards[s]), "per_class": per_class[s], "shards": shards[s]}
            for s in fmt.SPLITS
        },
        "skipped": skipped,
    }
    n_packed = sum(manifest["splits"][s]["count"] for s in fmt.SPLITS)
    if n_packed == 0:
        _remove(out, keep | indexes)
        raise PackError(f"none of the {len(items)} videos in {root} could be used:\n" + _skip_lines(skipped))
    if cfg.strict and skipped:
        _remove(out, keep | indexes)
        raise PackError(f"--strict: {len(skipped)} input(s) skipped, no shards kept:\n" + _skip_lines(skipped))
    fmt.write_manifest(out, manifest)
    _summary(manifest, out, keep, time.monotonic() - start)
    return manifest


def _remove(out: Path, names) -> None:
    for n in names:
        (out / n).unlink(missing_ok=True)


def _skip_lines(skipped: list[dict], limit: int = 50) -> str:
    lines = [f"  {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more (all listed in manifest.json)")
    return "\n".join(lines)


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="video", desc="packing", disable=not enabled, file=sys.stderr, smoothing=0.1)


def _summary(manifest: dict, out: Path, names, seconds: float) -> None:
    size = sum((out / n).stat().st_size for n in names)
    s = manifest["splits"]
    n = s["train"]["count"] + s["test"]["count"]
    lines = [
        f"packed {n} videos ({s['train']['count']} train, {s['test']['count']} test) of "
        f"{len(manifest['classes'])} classes into {len(names)} shards in {out}",
        f"time {seconds:.1f}s ({n / max(seconds, 1e-9):.1f} videos/s), output {size / 1e6:.1f} MB",
        f"skipped {len(manifest['skipped'])}" + (":" if manifest["skipped"] else ""),
    ]
    print("\n".join(lines), file=sys.stderr)
    if manifest["skipped"]:
        print(_skip_lines(manifest["skipped"]), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.shard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = PackConfig("", "")
    p.add_argument("input", help="folder of class sub-folders holding videos")
    p.add_argument("output", help="folder for the shards and manifest.json")
    p.add_argument("--frames", type=int, default=d.frames, help="frames per video, equally spaced over the decodable frames")
    p.add_argument("--short-side", type=int, default=d.short_side, help="resize frames so the short side is this many pixels")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality 1..100")
    p.add_argument("--min-frames", type=int, default=d.min_frames,
                   help="skip videos with fewer decodable frames (shorter ones repeat frames evenly)")
    p.add_argument("--split", choices=splits.SPLIT_MODES, default=d.split,
                   help="stratified: class-balanced random; group: no source film on both sides; official: HMDB51 split files")
    p.add_argument("--test-size", type=float, default=d.test_size, help="test fraction (stratified, group)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the sample order")
    p.add_argument("--official-dir", default=None, help="HMDB51 testTrainMulti_7030_splits folder (--split official)")
    p.add_argument("--split-number", type=int, default=d.split_number, help="official split 1, 2 or 3")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    p.add_argument("--strict", action="store_true", help="fail (and keep no shards) if any input is skipped")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = PackConfig(**vars(args))
        pack(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no manifest written; rerun the same command to pack again", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
