"""Evaluation report of a trained model on a split of the shards.

    python -m dist_train.evaluate --checkpoint runs/exp1/best.pt --shards shards/ [--split test] [--views 3]
    torchrun --nproc_per_node=4 -m dist_train.evaluate --checkpoint ... --shards ...   # same numbers, faster

Writes ``report.json``, ``report.md``, ``confusion.png`` and ``predictions.jsonl`` (per-video top-5)
to ``--out`` (default: ``<checkpoint folder>/eval-<split>``) and prints the Markdown report. Every
sample is evaluated exactly once over all processes and the count is checked against manifest.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dist_train import checkpoint as ckpt_io
from dist_train import data
from dist_train.distributed import cleanup, init_distributed
from dist_train.evaluation import eval_spec, evaluate_samples, most_confused
from dist_train.metrics import save_confusion_png
from dist_train.models import input_layout
from preprocess import shard_format as fmt
from preprocess.shard_format import write_json_atomic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_train.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="training checkpoint, e.g. runs/exp1/best.pt")
    p.add_argument("--shards", required=True, help="shard folder with manifest.json")
    p.add_argument("--split", default="test", choices=fmt.SPLITS, help="split to evaluate")
    p.add_argument("--out", default=None, help="report folder (default: <checkpoint folder>/eval-<split>)")
    p.add_argument("--views", type=int, default=1, choices=(1, 3),
                   help="spatial crops per video, probabilities averaged (1 = the trainer's centre crop)")
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
        f"| mean per-class accuracy | {r['mean_class_accuracy']:.4f} |", f"| loss | {r['loss']:.4f} |",
        f"| unreadable samples | {r['unreadable']} |", f"| views | {r['views_note']} |",
        "", "## Per-class accuracy", "", "| class | clips | accuracy |", "|---|---:|---:|",
    ]
    for name, acc in r["per_class"].items():
        lines.append(f"| {name} | {r['per_class_count'][name]} | {acc:.3f} |")
    lines += ["", "## Most confused pairs", "", "| true | predicted | clips | share of true class |", "|---|---|---:|---:|"]
    lines += [f"| {c['true']} | {c['predicted']} | {c['count']} | {c['fraction']:.3f} |" for c in r["most_confused"]]
    if not r["most_confused"]:
        lines.append("| (none) | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    info = init_distributed()
    try:
        try:
            model, ckpt = ckpt_io.load_model(a.checkpoint)
            manifest = fmt.load_manifest(a.shards)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        classes, cfg = ckpt["classes"], ckpt["config"]
        if manifest.classes != classes:
            print(f"error: {a.shards} has classes {manifest.classes}, but {a.checkpoint} was trained on {classes}",
                  file=sys.stderr)
            return 2
        samples = data.Samples.of(manifest, a.split)
        spec = eval_spec(manifest.n_frames, len(classes), cfg["img_size"], cfg["train_crop"], a.on_bad_sample, "cpu",
                         a.views)
        model.to(info.device)
        r = evaluate_samples(model, samples, np.arange(len(samples)), spec, classes=classes,
                             layout=input_layout(cfg["model"]), stats=data.normalization(cfg["model"]),
                             device=info.device, rank=info.rank, world_size=info.world_size, batch_size=a.batch_size,
                             workers=data.resolve_workers(a.workers), split=a.split, keep_predictions=True)
        if not info.is_main:
            return 0
        counts = [sum(row) for row in r["confusion"]]
        r.update(
            checkpoint=str(a.checkpoint), shards=str(a.shards), split=a.split, world_size=info.world_size,
            mean_class_accuracy=sum(r["per_class"].values()) / len(classes),
            per_class_count=dict(zip(classes, counts)),
            most_confused=most_confused(r["confusion"], classes),
            views=a.views,
            views_note=f"{a.views} spatial x 1 temporal (shards hold {manifest.n_frames} frames per video, "
                       f"the clip length the model was trained on, so one temporal view)",
        )
        out = Path(a.out) if a.out else Path(a.checkpoint).resolve().parent / f"eval-{a.split}"
        out.mkdir(parents=True, exist_ok=True)
        predictions, bad = r.pop("predictions"), r.pop("bad")
        key_paths = _key_paths(manifest, a.split)
        with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps({"path": key_paths.get(p["key"]), **p,
                                    "top": [classes[i] for i in p["top"]]}) + "\n")
        r["unreadable_samples"] = bad
        write_json_atomic(out / "report.json", r)
        md = report_markdown(r)
        (out / "report.md").write_text(md, encoding="utf-8")
        save_confusion_png(r["confusion"], classes, out / "confusion.png", a.split)
        print(md)
        print(f"report written to {out}/ (report.json, report.md, confusion.png, predictions.jsonl)", file=sys.stderr)
        return 0
    finally:
        cleanup()


def _key_paths(manifest: fmt.Manifest, split: str) -> dict[str, str]:
    """Sample key -> source video path, read from the samples' metadata members."""
    out = {}
    for sample in data.read_split(manifest, split, skip_bad=True, only=(fmt.META_FIELD,)):
        try:
            out[sample["__key__"]] = json.loads(sample[fmt.META_FIELD])["path"]
        except (ValueError, KeyError):
            continue  # an unreadable sample is already reported by the evaluation itself
    return out


if __name__ == "__main__":
    sys.exit(main())
