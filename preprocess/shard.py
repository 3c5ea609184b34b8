"""Pack a folder of labelled videos into WebDataset shards.

    python -m preprocess.shard data/ shards/ [--frames 16] [--temporal-views 1] [--short-side 128] [--split stratified]

``data/<class>/**/<video>`` -> ``shards/{train,test}-NNNNNN.tar`` + ``shards/manifest.json``.
Classes are the sorted names of the non-hidden sub-folders; a video that cannot be used is skipped
with its reason (listed in the manifest and the summary) and packing goes on: a video whose decoder
crashes or runs past ``--video-timeout`` too (``preprocess.workers``). Same inputs and arguments give
byte-identical output, whatever ``--workers`` is. The new set is built in a staging folder and swapped
in only when complete; one packer at a time per output folder, which must not overlap the input and
must hold nothing but a shard set (or be empty) unless ``--force`` (``preprocess.outdir``).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from preprocess import inputs, outdir, splits, workers
from preprocess import shard_format as fmt
from preprocess.frames import VideoError, read_clip_jpegs
from preprocess.inputs import Item, printable


@dataclass
class PackConfig:
    """Arguments of a packing run; all but ``workers`` and ``progress`` are recorded in the manifest."""

    input: str
    output: str
    frames: int = 16
    temporal_views: int = 1  # frames stored per segment: a sample holds frames * temporal_views
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
    video_timeout: float = 600.0
    max_pixels: int = 8192 * 4320  # 8K UHD; HMDB51 is 320x240, Kinetics at most 4K
    max_frames: int = 100_000  # about an hour at 30 fps; Kinetics clips are 10 s, HMDB51's a few
    force: bool = False
    workers: int = 0
    progress: bool = True

    def __post_init__(self):
        checks = [
            (self.frames >= 1, f"--frames must be >= 1, got {self.frames}"),
            (1 <= self.temporal_views <= fmt.MAX_TEMPORAL_VIEWS,
             f"--temporal-views must be 1..{fmt.MAX_TEMPORAL_VIEWS}, got {self.temporal_views}"),
            (self.frames * self.temporal_views <= fmt.MAX_STORED_FRAMES,
             f"--frames x --temporal-views must be at most {fmt.MAX_STORED_FRAMES} (frames stored per video), got "
             f"{self.frames} x {self.temporal_views}"),
            (self.short_side >= 8, f"--short-side must be >= 8, got {self.short_side}"),
            (1 <= self.quality <= 100, f"--quality must be 1..100, got {self.quality}"),
            (self.min_frames >= 1, f"--min-frames must be >= 1, got {self.min_frames}"),
            (self.split in splits.SPLIT_MODES, f"--split must be one of {splits.SPLIT_MODES}, got {self.split!r}"),
            (0.0 < self.test_size < 1.0, f"--test-size must be between 0 and 1, got {self.test_size}"),
            (self.shard_size >= 1, f"--shard-size must be >= 1, got {self.shard_size}"),
            (self.video_timeout > 0, f"--video-timeout must be > 0 seconds, got {self.video_timeout}"),
            (self.max_pixels >= 1, f"--max-pixels must be >= 1, got {self.max_pixels}"),
            (self.max_frames >= 1, f"--max-frames must be >= 1, got {self.max_frames}"),
            (self.split != "official" or self.official_dir,
             "--split official needs --official-dir pointing at testTrainMulti_7030_splits/"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.workers <= 0:
            self.workers = os.cpu_count() or 1

    @property
    def stored_frames(self) -> int:
        """Frames stored per sample: ``frames`` segments, ``temporal_views`` evenly spaced frames in each.

        Exactly ``select_indices(n, frames * temporal_views)``: the middles of that many equal sub-segments,
        sub-segment ``i * K + k`` being offset ``k`` of segment ``i``.
        """
        return self.frames * self.temporal_views

    def recorded(self) -> dict:
        d = asdict(self)
        for k in ("workers", "progress", "output", "force"):
            d.pop(k)
        for k in ("input", "official_dir"):  # any bytes may name a folder; the manifest is UTF-8
            d[k] = d[k] and printable(d[k])
        return d


class PackError(Exception):
    """Packing cannot go on; the message says why and what to do."""


def assign_splits(cfg: PackConfig, classes: list[str], items: list[Item]) -> tuple[list[str | None], list[dict]]:
    """Side of each item ('train', 'test' or None for unused) and the skips that causes."""
    labels = [it.label for it in items]
    if cfg.split == "stratified":
        sides = splits.stratified(labels, cfg.test_size, cfg.seed)
    elif cfg.split == "group":
        # Group on the source film alone, so a film that appears in two classes stays on one side.
        sides = splits.grouped(labels, [_group(it) for it in items], cfg.test_size, cfg.seed)
    else:
        table = splits.read_official(Path(cfg.official_dir), cfg.split_number, classes)
        sides = splits.official([it.rel for it in items], [it.cls for it in items], table)
    skipped = [
        {"path": it.path, "reason": f"not in train or test of official split {cfg.split_number}"}
        for it, side in zip(items, sides) if side is None
    ]
    return sides, skipped


def _group(it: Item) -> str:
    return splits.source_of(it.path, it.cls_name)


def encode_item(item: Item, frames: int, short_side: int, quality: int, min_frames: int, max_pixels: int,
                max_frames: int):
    """Decode one video into JPEG frames + metadata, or ``Failed`` with the reason it is skipped (in a worker)."""
    workers.apply_test_hooks(Path(item.rel).name)
    try:
        clip, jpegs = read_clip_jpegs(Path(_ROOT) / item.rel, frames, short_side, quality, min_frames,
                                      max_pixels, max_frames)
    except VideoError as e:
        return workers.Failed(str(e))
    except Exception as e:  # a decoder error on one file must not stop the whole run
        return workers.Failed(f"unexpected error while decoding: {type(e).__name__}: {e}")
    h, w = clip.frames[0].shape[:2]
    meta = {
        "path": item.path,
        "class": item.cls_name,
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


def _order(cfg: PackConfig, items: list[Item], sides: list[str | None]) -> list[tuple[Item, str]]:
    """The videos to encode with their split: train then test, each shuffled to mix classes within a shard."""
    todo = []
    for split in fmt.SPLITS:
        members = [it for it, side in zip(items, sides) if side == split]
        random.Random(f"{cfg.seed}-{split}").shuffle(members)
        todo += [(it, split) for it in members]
    return todo


def _write_shards(cfg: PackConfig, folder: Path, todo: list[tuple[Item, str]], classes: list[str]):
    """Encode and write every video of ``todo`` into shards in ``folder``: (shards, per-class counts, skips)."""
    shards: dict[str, list[dict]] = {s: [] for s in fmt.SPLITS}
    per_class = {s: {printable(c): 0 for c in classes} for s in fmt.SPLITS}
    skipped: list[dict] = []
    writers: dict[str, fmt.ShardWriter] = {}
    bar = _progress(len(todo), cfg.progress)
    args = (cfg.stored_frames, cfg.short_side, cfg.quality, cfg.min_frames, cfg.max_pixels, cfg.max_frames)
    # In worker processes, results in input order: a crash or a hang of the decoder is a Failed.
    results = workers.run_guarded(encode_item, [(it, *args) for it, _ in todo], cfg.workers, cfg.video_timeout,
                                  _init_worker, (cfg.input,))
    try:
        for (it, split), result in zip(todo, results):
            bar.update(1)
            if isinstance(result, workers.Failed):
                skipped.append({"path": it.path, "reason": result.reason})
                continue
            w = writers.get(split)
            if w is None:
                w = writers[split] = fmt.ShardWriter(folder / fmt.shard_name(split, len(shards[split])))
            jpegs, meta = result
            w.write(fmt.sample_key(it.video_id), jpegs, it.label, meta, group=_group(it))
            per_class[split][it.cls_name] += 1
            if w.count >= cfg.shard_size:
                shards[split].append(writers.pop(split).close())
        for split, w in writers.items():
            shards[split].append(w.close())
        writers = {}
    finally:
        results.close()  # stops the workers
        for w in writers.values():
            w.abort()
        bar.close()
    return shards, per_class, skipped


def pack(cfg: PackConfig) -> dict:
    """Run a packing job; returns the manifest dict (also written to OUTPUT/manifest.json)."""
    start = time.monotonic()
    root, out = Path(cfg.input), Path(cfg.output)
    try:
        outdir.check_apart(root, out)
        classes, items, skipped = inputs.scan(root)
    except (outdir.OutputError, inputs.ScanError) as e:
        raise PackError(str(e)) from e
    if not items:
        raise PackError(
            f"no videos found in {printable(str(root))}: expected class folders holding video files "
            f"({printable(str(root))}/<class>/<video>.avi, ...)"
        )
    try:
        sides, unused = assign_splits(cfg, classes, items)
    except splits.SplitError as e:
        raise PackError(str(e)) from e
    if out.exists() and not out.is_dir():
        raise PackError(f"output {printable(str(out))} exists and is not a folder; give a folder for the shards")
    out.mkdir(parents=True, exist_ok=True)
    try:
        outdir.check_ours(out, cfg.force)
        with outdir.PackLock(out):
            outdir.clean_leftovers(out)
            manifest, names = _pack_staged(cfg, out, classes, len(items), _order(cfg, items, sides),
                                           skipped + unused)
    except outdir.OutputError as e:
        raise PackError(str(e)) from e
    _summary(manifest, out, names, time.monotonic() - start)
    return manifest


def _pack_staged(cfg: PackConfig, out: Path, classes: list[str], n_items: int, todo, skipped: list[dict]):
    """Write the new set into a staging folder in ``out`` and swap it in when complete: (manifest, shard names)."""
    staging = outdir.make_staging(out)
    try:
        shards, per_class, failed = _write_shards(cfg, staging, todo, classes)
        skipped = sorted(skipped + failed, key=lambda s: s["path"])
        manifest = {
            "format_version": fmt.FORMAT_VERSION,
            "classes": [printable(c) for c in classes],
            "n_frames": cfg.stored_frames,  # per sample, what the member names depend on
            "frames": cfg.frames,  # the clip length a model sees
            "temporal_views": cfg.temporal_views,
            "args": cfg.recorded(),
            "splits": {
                s: {"count": sum(x["count"] for x in shards[s]), "per_class": per_class[s], "shards": shards[s]}
                for s in fmt.SPLITS
            },
            "skipped": skipped,
        }
        if sum(manifest["splits"][s]["count"] for s in fmt.SPLITS) == 0:
            raise PackError(f"none of the {n_items} videos in {printable(cfg.input)} could be used; "
                            f"{outdir.state_note(out)}:\n" + _skip_lines(skipped))
        if cfg.strict and skipped:
            raise PackError(f"--strict: {len(skipped)} input(s) skipped, the new shards were not kept; "
                            f"{outdir.state_note(out)}:\n" + _skip_lines(skipped))
        fmt.write_manifest(staging, manifest)
        return manifest, outdir.swap_in(staging, out)
    except PackError:
        raise
    except Exception:
        print(f"packing failed: {outdir.state_note(out)}", file=sys.stderr)
        raise
    finally:
        outdir.remove_staging(staging)


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
    p.add_argument("--frames", type=int, default=d.frames,
                   help="frames per video, equally spaced over the decodable frames")
    p.add_argument("--temporal-views", type=int, default=d.temporal_views,
                   help="frames stored per segment (1..16): each of the --frames equal segments of the video "
                        "stores this many evenly spaced frames (TSN-style), so a sample holds frames x K frames "
                        "and a reader can pick K different clips; storage grows K-fold")
    p.add_argument("--short-side", type=int, default=d.short_side,
                   help="resize frames so the short side is this many pixels")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality 1..100")
    p.add_argument("--min-frames", type=int, default=d.min_frames,
                   help="skip videos with fewer decodable frames (shorter ones repeat frames evenly)")
    p.add_argument("--split", choices=splits.SPLIT_MODES, default=d.split,
                   help="stratified: class-balanced random; group: no source film on both sides; "
                        "official: HMDB51 split files")
    p.add_argument("--test-size", type=float, default=d.test_size, help="test fraction (stratified, group)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the split and the sample order")
    p.add_argument("--official-dir", default=None, help="HMDB51 testTrainMulti_7030_splits folder (--split official)")
    p.add_argument("--split-number", type=int, default=d.split_number, help="official split 1, 2 or 3")
    p.add_argument("--shard-size", type=int, default=d.shard_size, help="samples per shard")
    p.add_argument("--video-timeout", type=float, default=d.video_timeout,
                   help="seconds one video may take to decode; a slower one is skipped and its worker stopped")
    p.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="skip videos whose frames have more pixels (width x height, from the container)")
    p.add_argument("--max-frames", type=int, default=d.max_frames,
                   help="skip videos with more decodable frames (decoding stops there)")
    p.add_argument("--workers", type=int, default=0, help="decoding processes (0 = all cores)")
    p.add_argument("--strict", action="store_true",
                   help="fail if any input is skipped (the new shards are not kept; a previous set stays)")
    p.add_argument("--force", action="store_true",
                   help="pack into a folder holding files preprocess.shard did not write (they are left untouched)")
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
        print(f"interrupted: {outdir.state_note(Path(args.output))}; rerun the same command to pack again",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    # Through the module, not __main__: what the worker processes are handed (encode_item, ...) is then named
    # preprocess.shard, which they have imported already, instead of a second copy of the main module.
    from preprocess import shard

    sys.exit(shard.main())
