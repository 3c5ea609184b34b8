"""``python -m dist_train.protocol`` on a small HMDB51-shaped tree (class folders with HMDB-style names, a
hand-made testTrainMulti_7030_splits folder of 1/2/0 lines) through the real torchrun: three splits, the
summary computed from the per-split reports, and a kill during split 2 that a rerun finishes without redoing
split 1."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_train import protocol
from tests.conftest import REPO, make_videos
from tests.dist_train.dt_helpers import TINY, trainer_command
from tests.dist_train.test_faults import kill_tree

pytestmark = pytest.mark.slow

CLASSES = {"grow": "brush_hair", "shrink": "climb_stairs"}  # synth's classes under HMDB51 names


def hmdb_tree(root: Path) -> tuple[Path, Path]:
    """Videos in HMDB-style class folders, and split files: clip i of a class is test (2) in split s when
    ``(i + s) % 3 == 0``, else train (1), except clip 5, unused (0) in split 2."""
    videos = make_videos(root / "synth", clips=6)
    data, splits = root / "data", root / "testTrainMulti_7030_splits"
    data.mkdir()
    splits.mkdir()
    for synth, hmdb in CLASSES.items():
        (videos / synth).rename(data / hmdb)
        names = sorted(p.name for p in (data / hmdb).iterdir())
        for s in (1, 2, 3):
            lines = [f"{n} {0 if (s, i) == (2, 5) else 2 if (i + s) % 3 == 0 else 1}" for i, n in enumerate(names)]
            (splits / f"{hmdb}_test_split{s}.txt").write_text("\n".join(lines) + "\n")
    return data, splits


def command(data: Path, splits: Path, out: Path) -> list[str]:
    train = [*TINY, "--epochs", "2", "--workers", "1", "--val-fraction", "0", "--log-every", "1"]
    _, env = trainer_command([])
    return [sys.executable, "-m", "dist_train.protocol", "--videos", str(data), "--splits-dir", str(splits), "--out",
            str(out), "--nproc-per-node", "2", "--temporal-views", "3", "--frames", "8", *train], env


def test_three_splits_then_a_kill_during_split_2_and_a_rerun_that_keeps_split_1(tmp_path):
    data, splits = hmdb_tree(tmp_path)
    out = tmp_path / "hmdb51"
    cmd, env = command(data, splits, out)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    try:  # kill everything once split 2 has trained a step (its run folder holds a checkpoint)
        deadline = time.monotonic() + 300
        while not list((out / "split2").glob("checkpoints/step-*.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        kill_tree(proc)
    first = (out / "split1" / "eval-multi" / "report.json").stat().st_mtime_ns
    assert not (out / "split2" / "eval-single").exists()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert (out / "split1" / "eval-multi" / "report.json").stat().st_mtime_ns == first  # split 1 not redone
    assert "split 1: reusing the pack" in rerun.stderr and "training " + str(out / "split1") not in rerun.stderr
    assert f"resumed from {out / 'split2'}" in rerun.stderr and "fresh start" in rerun.stderr  # split 2, then 3

    s = json.loads((out / "protocol.json").read_text())
    assert s["complete"] and sorted(s["splits"]) == ["1", "2", "3"]
    for view in ("single", "multi"):
        for metric in ("top1", "top5", "mean_class_accuracy"):
            got = [json.loads((out / f"split{k}" / f"eval-{view}" / "report.json").read_text())[metric]
                   for k in (1, 2, 3)]
            assert s["mean"][f"{view}/{metric}"]["mean"] == pytest.approx(statistics.fmean(got))
            assert s["mean"][f"{view}/{metric}"]["std"] == pytest.approx(statistics.stdev(got))
    assert s["splits"]["1"]["multi"]["views_note"].startswith("3 temporal x 3 spatial views")
    assert s["splits"]["1"]["single"]["views_note"].startswith("1 temporal x 1 spatial views")
    assert [s["splits"][k]["single"]["n_samples"] for k in "123"] == [4, 4, 4]  # 2 test clips a class
    md = (out / "protocol.md").read_text()
    assert "| mean +- std | multi |" in md and md in rerun.stdout


def test_protocol_flags_it_sets_itself_are_refused(monkeypatch):
    for bad in (["--shards", "x"], ["--shards=x"], ["--resume", "never"]):
        with pytest.raises(ValueError, match="is the protocol's to set"):
            protocol.parse(["--videos", "v", "--splits-dir", "s", "--out", "o", *bad])
    with pytest.raises(ValueError, match="--splits"):
        protocol.parse(["--videos", "v", "--splits-dir", "s", "--out", "o", "--splits", "4"])
    monkeypatch.setenv("WORLD_SIZE", "4")  # under torchrun: its processes train
    with pytest.raises(ValueError, match="--nproc-per-node is for the protocol run as one process"):
        protocol.parse(["--videos", "v", "--splits-dir", "s", "--out", "o", "--nproc-per-node", "2"])
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    with pytest.raises(ValueError, match="unset TORCH_DISABLE_SHARE_RDZV_TCP_STORE"):
        protocol.parse(["--videos", "v", "--splits-dir", "s", "--out", "o"])


def test_launched_under_torchrun_every_process_trains_and_evaluates_together(tmp_path):
    data, splits = hmdb_tree(tmp_path)
    out = tmp_path / "hmdb51"
    args = ["--videos", str(data), "--splits-dir", str(splits), "--out", str(out), "--splits", "3", "--frames", "8",
            *TINY, "--epochs", "1", "--workers", "0", "--val-fraction", "0"]
    cmd, env = trainer_command(args, nproc=2)
    cmd[cmd.index("dist_train")] = "dist_train.protocol"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert json.loads((out / "split3" / "results.json").read_text())["world_size"] == 2
    report = json.loads((out / "split3" / "eval-multi" / "report.json").read_text())
    assert report["world_size"] == 2 and report["n_samples"] == 4
    s = json.loads((out / "protocol.json").read_text())
    assert s["complete"] and s["splits"]["3"]["multi"]["top1"] == report["top1"]
    assert proc.stderr.count("packing into") == 1  # the first process packed, the other waited
