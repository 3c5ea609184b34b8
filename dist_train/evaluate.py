"""Evaluation report of a trained model on a split of the shards.

    python -m dist_train.evaluate --checkpoint runs/exp1/best.pt --shards shards/ [--split test] [--views 3]
    torchrun --nproc_per_node=4 -m dist_train.evaluate --checkpoint ... --shards ...   # same numbers, faster

Writes ``report.json``, ``report.md``, ``confusion.png`` and ``predictions.jsonl`` (per-video top-5)
to ``--out`` (default: ``eval-<checkpoint stem>-<split>`` beside the checkpoint, e.g. ``runs/exp1/eval-best-test``
and ``runs/exp1/eval-last-test``) and prints the Markdown report. Every sample is evaluated exactly once
over all processes and the count is checked against manifest.json. The results (report.json) are
written first; a sample whose metadata lacks its source path gets ``"path": null`` in predictions.jsonl,
with a warning.

Exit status: 0 report written, 2 the checkpoint or shard folder cannot be used (nothing evaluated).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dist_train import data
from dist_train.distributed import cleanup, init_distributed
from dist_train.evaluation import (
    USE_HINT,
    UnusableCheckpoint,
    eval_spec,
    evaluate_samples,
    load_trained_model,
    most_confused,
)
from dist_train.locations import add_cache_flags, public
from dist_train.metrics import save_confusion_png
from dist_train.models import input_layout
from preprocess import shard_format as fmt
from preprocess.shard_format import write_bytes_atomic, write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint, e.g. runs/exp1/best.pt")
    p.add_argument("--shards", required=True, help="shard folder with manifest.json, or its URL (s3://, gs://, "
                                                  "http(s)://, as for training)")
    add_cache_flags(p)
    p.add_argument("--split", default="test", choices=fmt.SPLITS, help="split to evaluate")
    p.add_argument("--out", default=None,
                   help="report folder (default: eval-<checkpoint stem>-<split> beside the checkpoint)")
    p.add_argument("--views", type=int, default=1, choices=(1, 3),
                   help="spatial crops per video, probabilities averaged (1 = the trainer's centre crop)")
    p.add_argument("--temporal-views", default="all", choices=("all", "1"),
                   help="of shards packed with --temporal-views K: all = the K temporal views, probabilities "
                        "averaged; 1 = the middle frame of each segment only (for odd K, the frames a one-view "
                        "pack holds)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per process per batch")
    p.add_argument("--workers", default="auto", help="DataLoader workers per process (auto: from the CPUs this process "
                                                      "may use, as the trainer's --workers)")
    p.add_argument("--on-bad-sample", default="skip", choices=("skip", "error"),
                   help="unreadable samples: count and report them, or stop with an error")
    return p


def report_markdown(r: dict) -> str:
    """The report as Markdown: headline metrics, per-class table, most confused pairs."""
    lines = [
        f"# Evaluation: {r['checkpoint']} on {r['split']} ({r['n_samples']} clips)",
        "",
        "| metric | value |", "|---|---|",
        f"| top-1 | {r['top1']:.4f} |", f"| top-5 | {r['top5']:.4f} |",
        f"| top-1 of single views | {r['view_top1']:.4f} |",
        f"| mean per-class accuracy | {r['mean_class_accuracy']:.4f} |", f"| loss | {r['loss']:.4f} |",
        f"| unreadable samples | {r['unreadable']} |", f"| views | {r['views_note']} |",
        "", "## Per-class accuracy", "", "| class | clips | accuracy |", "|---|---:|---:|",
    ]
    for name, acc in r["per_class"].items():
        lines.append(f"| {name} | {r['per_class_count'][name]} | {acc:.3f} |")
    lines += ["", "## Most confused pairs", "", "| true | predicted | clips | share of true class |",
              "|---|---|---:|---:|"]
    lines += [f"| {c['true']} | {c['predicted']} | {c['count']} | {c['fraction']:.3f} |" for c in r["most_confused"]]
    if not r["most_confused"]:
        lines.append("| (none) | | | |")
    return "\n".join(lines) + "\n"


def default_out(checkpoint: str | Path, split: str) -> Path:
    """The default report folder: one per checkpoint and split, beside the checkpoint."""
    checkpoint = Path(checkpoint).resolve()
    return checkpoint.parent / f"eval-{checkpoint.stem}-{split}"


def _inputs(a: argparse.Namespace):
    """The model, checkpoint and manifest to evaluate; ``ValueError``/``FileNotFoundError`` saying what is wrong."""
    model, ckpt = load_trained_model(a.checkpoint)
    missing = [k for k in ("model", "img_size", "train_crop") if k not in ckpt["config"]]
    if missing:
        raise UnusableCheckpoint(f"cannot use checkpoint {a.checkpoint}: its config lacks {', '.join(missing)} "
                                 f"(an older version); {USE_HINT}")
    manifest = data.open_manifest(a.shards, a.cache_dir, a.cache_size)
    if manifest.classes != ckpt["classes"]:
        raise ValueError(f"{public(a.shards)} has classes {manifest.classes}, but {a.checkpoint} was trained on "
                         f"{ckpt['classes']}; evaluate it on shards of its own classes")
    return model, ckpt, manifest


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    info = init_distributed()
    try:
        try:
            model, ckpt, manifest = _inputs(a)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        classes, cfg = ckpt["classes"], ckpt["config"]
        samples = data.Samples.of(manifest, a.split)
        spec = eval_spec(manifest.n_frames, len(classes), cfg["img_size"], cfg["train_crop"], a.on_bad_sample, "cpu",
                         a.views, manifest.temporal_views, all_temporal=a.temporal_views == "all")
        model.to(info.device)
        r = evaluate_samples(model, samples, np.arange(len(samples)), spec, classes=classes,
                             layout=input_layout(cfg["model"]), stats=data.normalization(cfg["model"]),
                             device=info.device, rank=info.rank, world_size=info.world_size, batch_size=a.batch_size,
                             workers=data.resolve_workers(a.workers), split=a.split, keep_predictions=True)
        if info.is_main:
            _write_report(a, r, manifest, classes, info.world_size)
        return 0
    finally:
        cleanup()


def _write_report(a: argparse.Namespace, r: dict, manifest: fmt.Manifest, classes: list[str],
                  world_size: int) -> None:
    """report.json first (the finished evaluation), then report.md, confusion.png and predictions.jsonl."""
    counts = [sum(row) for row in r["confusion"]]
    r.update(
        checkpoint=str(a.checkpoint), shards=public(a.shards), split=a.split, world_size=world_size,
        mean_class_accuracy=sum(r["per_class"].values()) / len(classes),
        per_class_count=dict(zip(classes, counts)),
        most_confused=most_confused(r["confusion"], classes),
        views=a.views,
        views_note=f"{r['views_note']} (the shards hold {manifest.temporal_views} frame(s) in each of "
                   f"{manifest.frames} segments)",
    )
    out = Path(a.out) if a.out else default_out(a.checkpoint, a.split)
    out.mkdir(parents=True, exist_ok=True)
    predictions = r.pop("predictions")
    r["unreadable_samples"] = r.pop("bad")
    write_json_atomic(out / "report.json", r)
    md = report_markdown(r)
    (out / "report.md").write_text(md, encoding="utf-8")
    save_confusion_png(r["confusion"], classes, out / "confusion.png", a.split)
    key_paths = _key_paths(manifest, a.split)
    lines = [json.dumps({"path": key_paths.get(p["key"]), **p, "top": [classes[i] for i in p["top"]]})
             for p in predictions]
    write_bytes_atomic(out / "predictions.jsonl", "".join(line + "\n" for line in lines).encode("utf-8"))
    print(md)
    print(f"report written to {out}/ (report.json, report.md, confusion.png, predictions.jsonl)", file=sys.stderr)


def _key_paths(manifest: fmt.Manifest, split: str) -> dict[str, str | None]:
    """Sample key -> source video path, read from the samples' metadata members; None (with one warning)
    where the metadata lacks it."""
    out, lacking = {}, []
    for sample in data.read_split(manifest, split, skip_bad=True, only=(fmt.META_FIELD,)):
        key = sample["__key__"]
        try:
            meta = json.loads(sample[fmt.META_FIELD])
        except (ValueError, KeyError):
            continue  # an unreadable sample is already reported by the evaluation itself
        path = meta.get("path") if isinstance(meta, dict) else None
        out[key] = path if isinstance(path, str) else None
        if out[key] is None:
            lacking.append(key)
    if lacking:
        print(f"warning: {len(lacking)} sample(s) of {split} in {data.store_of(manifest).where} have no source "
              f"\"path\" in their metadata (e.g. {lacking[0]}); predictions.jsonl gives \"path\": null for them. "
              "Re-pack the videos with this version of preprocess.shard to record it.", file=sys.stderr)
    return out


if __name__ == "__main__":
    sys.exit(main())
