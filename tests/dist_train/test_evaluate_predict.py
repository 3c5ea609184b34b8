"""What a user does with a trained model: evaluate (1 and 2 processes) and predict on raw videos."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.dist_train.dt_helpers import BIN, check, results

pytestmark = pytest.mark.slow


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _evaluate(learned, out, nproc=None, *extra):
    args = ["--checkpoint", str(learned["out"] / "best.pt"), "--shards", str(learned["shards"]), "--out", str(out),
            "--workers", "1", "--batch-size", "4", *extra]
    if nproc:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", "-m", "dist_train.evaluate", *args]
    else:
        cmd = [sys.executable, "-m", "dist_train.evaluate", *args]
    return check(subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=_env()))


def _predict(learned, *args):
    cmd = [sys.executable, "-m", "dist_train.predict", "--checkpoint", str(learned["out"] / "best.pt"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO, env=_env())


@pytest.fixture(scope="module")
def report(learned, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = _evaluate(learned, out)
    return {"out": out, "stdout": proc.stdout, "json": json.loads((out / "report.json").read_text())}


def test_evaluate_equals_the_trainers_final_evaluation(learned, report):
    train, r = results(learned["out"]), report["json"]
    assert r["n_samples"] == train["n_samples"] == 15 and r["unreadable"] == 0
    assert r["top1"] == pytest.approx(train["top1"])
    assert r["top5"] == pytest.approx(train["top5"])
    assert r["loss"] == pytest.approx(train["loss"], rel=1e-5)
    assert r["per_class"] == pytest.approx(train["per_class"])
    assert r["confusion"] == train["confusion"]


def test_report_files_and_content(report):
    r, out = report["json"], report["out"]
    assert set(r["per_class"]) == {"grow", "shrink"}
    assert r["mean_class_accuracy"] == pytest.approx(sum(r["per_class"].values()) / 2)
    assert sum(r["per_class_count"].values()) == 15
    wrong = 15 - sum(r["confusion"][i][i] for i in range(2))
    assert sum(c["count"] for c in r["most_confused"]) == wrong
    md = (out / "report.md").read_text()
    assert "| top-1 |" in md and "| grow |" in md and "Most confused pairs" in md
    assert "1 temporal x 1 spatial views" in md and md.strip() in report["stdout"]
    assert r["view_top1"] == r["top1"]  # one view: the clip-level and video-level accuracy are one
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 15 and all(p["path"].endswith(".avi") for p in preds)
    assert sum(p["top"][0] == ["grow", "shrink"][p["label"]] for p in preds) == round(r["top1"] * 15)


def test_evaluate_under_two_processes_counts_exactly_and_agrees(learned, report, tmp_path):
    _evaluate(learned, tmp_path, 2)
    r2 = json.loads((tmp_path / "report.json").read_text())
    assert r2["world_size"] == 2 and r2["n_samples"] == 15
    assert r2["confusion"] == report["json"]["confusion"]
    assert r2["loss"] == pytest.approx(report["json"]["loss"], rel=1e-5)


def test_three_spatial_views(learned, tmp_path):
    _evaluate(learned, tmp_path, None, "--views", "3")
    r = json.loads((tmp_path / "report.json").read_text())
    assert r["views"] == 3 and r["n_samples"] == 15 and "3 spatial" in r["views_note"]


def test_predict_on_raw_videos_agrees_with_evaluation(learned, report):
    preds = [json.loads(line) for line in (report["out"] / "predictions.jsonl").read_text().splitlines()]
    videos = learned["videos"]
    proc = _predict(learned, "--json", "--topk", "2", *[str(videos / p["path"]) for p in preds])
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(got) == 15
    for g, p in zip(got, preds):
        assert g["error"] is None and g["path"].endswith(p["path"])
        assert g["top"][0]["class"] == p["top"][0]
        assert g["top"][0]["prob"] == pytest.approx(p["probs"][0], abs=1e-4)
        assert sum(t["prob"] for t in g["top"]) == pytest.approx(1.0, abs=1e-4)


def test_predict_reports_broken_files_and_still_predicts_the_rest(learned, tmp_path):
    good = sorted((learned["videos"] / "grow").glob("*.avi"))[0]
    shutil.copy(good, tmp_path / "good.avi")
    (tmp_path / "corrupt.avi").write_bytes(os.urandom(4000))
    from preprocess.synth import write_avi
    from tests.preprocess.videotools import solid_frames

    write_avi(tmp_path / "short.avi", solid_frames(1), fps=25.0)
    missing = tmp_path / "missing.avi"
    files = [missing, tmp_path / "corrupt.avi", tmp_path / "good.avi"]
    proc = _predict(learned, *map(str, files))
    assert proc.returncode == 1
    assert f"{missing}: error: file not found" in proc.stderr
    assert f"{tmp_path / 'corrupt.avi'}: error:" in proc.stderr
    assert "2 of 3 video(s) could not be classified" in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == str(tmp_path / "good.avi") and len(lines) == 3  # path + 2 classes
    ok = _predict(learned, str(tmp_path / "short.avi"), "--topk", "1")
    assert ok.returncode == 0 and len(ok.stdout.splitlines()) == 2  # 1 frame: repeated, as in packing


def test_predict_and_evaluate_refuse_a_bad_checkpoint(learned, tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cmd = [sys.executable, "-m", "dist_train.predict", "--checkpoint", str(tmp_path / "bad.pt"), "x.avi"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=_env())
    assert proc.returncode == 2 and "bad.pt" in proc.stderr
    cmd = [sys.executable, "-m", "dist_train.evaluate", "--checkpoint", str(learned["out"] / "best.pt"),
           "--shards", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO, env=_env())
    assert proc.returncode == 2 and "manifest.json" in proc.stderr
