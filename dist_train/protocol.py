"""The HMDB51 protocol in one command: pack each official split, train on it, evaluate it, summarise.

    python -m dist_train.protocol --videos data/ --splits-dir testTrainMulti_7030_splits --out runs/hmdb51 \\
        [--splits 1,2,3] [--nproc-per-node N] [--temporal-views K] [--views 3] [any trainer flag ...]

For each split ``s``: the videos are packed with ``--split official --split-number s`` into
``OUT/shards/split<s>`` (a complete pack with the same arguments is reused), trained into
``OUT/split<s>`` (``python -m dist_train``, or ``torchrun --standalone --nproc_per_node N`` with
``--nproc-per-node N``; launched under torchrun itself, e.g. ``torchrun --nnodes 2 ... -m
dist_train.protocol``, every process runs the protocol: the first packs while the others wait, and all
train and evaluate together; every flag this command does not know goes to the trainer) and its ``best.pt``
evaluated twice: one view (the centre crop of the middle frame of each segment) and several views
(every temporal view the shards hold x ``--views`` spatial crops), into ``OUT/split<s>/eval-single``
and ``OUT/split<s>/eval-multi``. ``OUT/protocol.json`` and ``OUT/protocol.md`` give, per split and as
mean +- standard deviation over the splits, top-1, top-5 and mean class accuracy of both, with the
command's arguments and the code version; they are rewritten after each split.

Resumable at any point: rerunning the same command skips what is done (a split whose evaluation
reports exist) and resumes the split that was running from its last checkpoint (the trainer's
``--resume auto``). Exit status: 0 all splits done; 75 training stopped by a signal after saving
(rerun to resume); 2 bad arguments; 1 a step failed (its output says which; rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from preprocess import shard_format as fmt
from preprocess.shard import PackConfig, PackError, pack

METRICS = ("top1", "top5", "mean_class_accuracy")
VIEWS = ("single", "multi")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # passed on to the trainer (it saves and stops)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_train.protocol", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Any other flag goes to the trainer (python -m dist_train --help).")
    p.add_argument("--videos", required=True, help="folder of class sub-folders of videos (HMDB51's data/)")
    p.add_argument("--splits-dir", required=True, help="HMDB51's testTrainMulti_7030_splits folder")
    p.add_argument("--out", required=True, help="folder for the packs, the runs and protocol.json / protocol.md")
    p.add_argument("--splits", default="1,2,3", help="official splits to run, e.g. 1 or 1,2,3")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="training processes (1: python -m dist_train; N > 1: torchrun --standalone)")
    p.add_argument("--frames", type=int, default=16, help="packing: segments (frames) per clip")
    p.add_argument("--temporal-views", type=int, default=1, help="packing: frames stored per segment")
    p.add_argument("--views", type=int, default=3, choices=(1, 3), help="spatial crops of the multi-view test")
    return p


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The protocol's arguments and the trainer's; ValueError for bad ones."""
    a, trainer = build_parser().parse_known_args(argv)
    if _under_torchrun() and a.nproc_per_node != 1:
        raise ValueError("--nproc-per-node is for the protocol run as one process; under torchrun, torchrun's "
                         "processes train each split")
    if _under_torchrun() and os.environ.get("TORCH_DISABLE_SHARE_RDZV_TCP_STORE") == "1":
        raise ValueError("under torchrun the protocol makes a process group for each step, which needs torchrun's "
                         "shared store: unset TORCH_DISABLE_SHARE_RDZV_TCP_STORE, or run the protocol as one "
                         "process with --nproc-per-node N")
    for flag in ("--shards", "--out", "--resume"):
        if any(t == flag or t.startswith(flag + "=") for t in trainer):
            raise ValueError(f"{flag} is the protocol's to set (each split has its own); drop it")
    try:
        a.splits = sorted({int(s) for s in a.splits.split(",")})
    except ValueError:
        raise ValueError(f"--splits must be split numbers such as 1,2,3, got {a.splits!r}") from None
    if not a.splits or not set(a.splits) <= {1, 2, 3} or a.nproc_per_node < 1:
        raise ValueError("--splits takes 1, 2 and 3 (HMDB51's splits); --nproc-per-node must be >= 1")
    return a, trainer


def pack_split(a: argparse.Namespace, split: int) -> Path:
    """The split's shard folder, packed unless a complete pack with the same arguments is there."""
    cfg = PackConfig(a.videos, str(Path(a.out) / "shards" / f"split{split}"), frames=a.frames,
                     temporal_views=a.temporal_views, split="official", official_dir=a.splits_dir,
                     split_number=split, progress=False)
    out = Path(cfg.output)
    if _packed(cfg):
        print(f"[protocol] split {split}: reusing the pack in {out}", file=sys.stderr)
        return out
    failed = out.with_name(out.name + ".failed")
    if _rank() > 0:  # under torchrun: the first process packs, the others wait for its manifest
        while not _packed(cfg):
            if failed.exists():
                raise PackError(f"the first process could not pack {out}: {failed.read_text().strip()}")
            time.sleep(2)
        return out
    print(f"[protocol] split {split}: packing into {out}", file=sys.stderr)
    failed.unlink(missing_ok=True)
    try:
        pack(cfg)
    except Exception as e:
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(f"{type(e).__name__}: {e}\n")
        raise
    return out


def _packed(cfg: PackConfig) -> bool:
    """Whether ``cfg.output`` holds a complete pack made with ``cfg``'s arguments."""
    manifest = Path(cfg.output) / fmt.MANIFEST_NAME
    return manifest.is_file() and fmt.load_manifest(cfg.output).args == cfg.recorded()


def train_split(a: argparse.Namespace, trainer: list[str], shards: Path, run: Path) -> int:
    """Train (or resume) the split's run: 0 when it completed (now or before), 75 when it stopped after saving
    (a stop signal to this process goes on to the trainer, which saves and stops), else its exit status."""
    if _state(run) == "completed" and (run / "best.pt").is_file():
        return 0
    if _under_torchrun():  # every process of torchrun's trains, here (torchrun passes stop signals on itself)
        from dist_train.__main__ import main as train

        code = train(["--shards", str(shards), "--out", str(run), *trainer])
    else:
        launcher = [sys.executable, "-m", "dist_train"] if a.nproc_per_node == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc_per_node}",
             f"--signals-to-handle={','.join(s.name for s in STOP_SIGNALS)}", "-m", "dist_train"]
        print(f"[protocol] training {run}", file=sys.stderr, flush=True)
        child = subprocess.Popen([*launcher, "--shards", str(shards), "--out", str(run), *trainer])
        before = {sig: signal.signal(sig, lambda sig, _: child.send_signal(sig)) for sig in STOP_SIGNALS}
        try:
            code = child.wait()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
    # torchrun exits 1 for any stop by a signal: the run's status says whether the trainer saved and stopped
    return 0 if code == 0 else 75 if _state(run) == "stopped" else code


def evaluate_split(a: argparse.Namespace, shards: Path, run: Path) -> dict:
    """``{single: report, multi: report}`` of the split's best.pt (evaluated unless its report exists)."""
    from dist_train import evaluate

    reports = {}
    for view, flags in (("single", ["--views", "1", "--temporal-views", "1"]),
                        ("multi", ["--views", str(a.views), "--temporal-views", "all"])):
        out = run / f"eval-{view}"
        if not (out / "report.json").is_file():
            code = evaluate.main(["--checkpoint", str(run / "best.pt"), "--shards", str(shards), "--out", str(out),
                                  *flags])
            if code:
                raise RuntimeError(f"evaluating {run / 'best.pt'} ({view} view) failed with exit status {code}")
        if _rank() == 0:  # the first process writes the reports (and the summary)
            reports[view] = json.loads((out / "report.json").read_text())
    return reports


def summary(a: argparse.Namespace, trainer: list[str], done: dict[int, dict]) -> dict:
    """protocol.json: each finished split's numbers, their mean and standard deviation, how they were made."""
    splits = {str(s): {v: {m: r[v][m] for m in (*METRICS, "views_note", "n_samples")} for v in VIEWS}
              for s, r in sorted(done.items())}
    mean = {}
    for v in VIEWS:
        for m in METRICS:
            values = [done[s][v][m] for s in sorted(done)]
            mean[f"{v}/{m}"] = {"mean": statistics.fmean(values) if values else None,
                                "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}
    return {"splits": splits, "mean": mean, "splits_asked": a.splits, "complete": sorted(done) == a.splits,
            "config": {k: v for k, v in vars(a).items()}, "trainer_args": trainer, "code_version": _version()}


def markdown(s: dict) -> str:
    lines = ["# HMDB51 protocol", "", f"Splits done: {', '.join(s['splits']) or 'none'} of "
             f"{', '.join(map(str, s['splits_asked']))}; code {s['code_version']}", "",
             "| split | views | top-1 | top-5 | mean class acc. |", "|---|---|---:|---:|---:|"]
    for split, r in s["splits"].items():
        for v in VIEWS:
            lines.append(f"| {split} | {r[v]['views_note'].split(' (')[0]} | " +
                         " | ".join(f"{100 * r[v][m]:.2f}" for m in METRICS) + " |")
    for v in VIEWS:
        cells = [s["mean"][f"{v}/{m}"] for m in METRICS]
        if cells[0]["mean"] is not None:
            lines.append(f"| mean +- std | {v} | " + " | ".join(f"{100 * c['mean']:.2f} +- {100 * c['std']:.2f}"
                                                            for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _state(run: Path) -> str | None:
    try:
        return json.loads((run / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


def _version() -> str:
    try:
        version = metadata.version("vidshard")
    except metadata.PackageNotFoundError:
        version = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    return f"{version} ({commit})" if commit else version


def main(argv: list[str] | None = None) -> int:
    try:
        a, trainer = parse(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out, done = Path(a.out), {}
    out.mkdir(parents=True, exist_ok=True)
    for split in a.splits:
        run = out / f"split{split}"
        try:
            shards = pack_split(a, split)
        except (PackError, ValueError, OSError) as e:
            print(f"error: split {split}: packing failed: {e}", file=sys.stderr)
            return 1
        code = train_split(a, trainer, shards, run)
        if code:
            print(f"[protocol] split {split}: training ended with exit status {code}; see {run}. Rerun the same "
                  "command to resume", file=sys.stderr)
            return code if code in (2, 75) else 1
        done[split] = evaluate_split(a, shards, run)
        if _rank() > 0:
            continue
        s = summary(a, trainer, done)
        fmt.write_json_atomic(out / "protocol.json", s)
        (out / "protocol.md").write_text(markdown(s), encoding="utf-8")
        print(f"[protocol] split {split}: " + ", ".join(f"{v} top-1 {100 * done[split][v]['top1']:.2f}"
                                                         for v in VIEWS), file=sys.stderr, flush=True)
    if _rank() == 0:
        print(markdown(summary(a, trainer, done)))
    return 0


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


if __name__ == "__main__":
    sys.exit(main())
