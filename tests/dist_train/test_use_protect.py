"""Using a model safely: predict and evaluate on bad inputs, per-checkpoint reports, inert fault hooks.

Fast: a checkpoint written directly (an untrained model, no training run), real encoded videos and
the session's packed sample shards; evaluate and predict run in this process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
import torch

from dist_train import checkpoint as ckpt_io
from dist_train import evaluate, faults, predict
from dist_train.config import TrainConfig
from dist_train.models import build_model
from preprocess.frames import VideoError, read_clip_jpegs
from preprocess.synth import write_avi
from tests.conftest import REPO
from tests.preprocess.videotools import solid_frames

CLASSES = ["grow", "shrink"]  # those of the sample shards
PACKING = {"frames": 8, "short_side": 48, "quality": 90, "min_frames": 1}


def write_ckpt(path, seed=0, edit=None, **cfg_kw):
    """A checkpoint as the trainer writes it (untrained cnn_rnn); ``edit(state)`` damages it first."""
    cfg = TrainConfig(out=str(path.parent), img_size=32, hidden_size=8, **cfg_kw)
    torch.manual_seed(seed)
    model = build_model(cfg.model, len(CLASSES), rnn=cfg.rnn, hidden=cfg.hidden_size, layers=cfg.rnn_layers,
                        bidirectional=cfg.bidirectional, dropout=cfg.dropout, head=cfg.head)
    state = {"format_version": ckpt_io.FORMAT_VERSION, "model": model.state_dict(), "optimizer": {}, "epoch": 1,
             "step": 10, "step_in_epoch": 0, "config": cfg.to_dict(), "classes": list(CLASSES),
             "packing": dict(PACKING), "world_size": 1, "wandb_run_id": None}
    if edit:
        edit(state)
    ckpt_io.atomic_save(state, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_ckpt(tmp_path_factory.mktemp("use_run") / "best.pt")


def two_size_mjpeg(path, n=6):
    """A real MJPEG stream whose resolution changes mid-stream: n frames of 64x48, then n of 48x64."""
    with open(path, "wb") as f:
        for w, h in ((64, 48), (48, 64)):
            for i in range(n):
                frame = np.full((h, w, 3), 20 * i, np.uint8)
                frame[:, : w // 2] = 200
                f.write(cv2.imencode(".jpg", frame)[1].tobytes())
    return path


def two_size_avi(path):
    """An MJPEG AVI whose resolution changes mid-stream: two AVIs of other sizes joined by ffmpeg (stream copy)."""
    for i, size in enumerate([(64, 48), (48, 64)]):
        write_avi(path.with_name(f"part{i}.avi"), solid_frames(6, size=size), fps=25.0)
    parts = path.with_name("parts.txt")
    parts.write_text("".join(f"file '{path.with_name(f'part{i}.avi')}'\n" for i in range(2)))
    subprocess.run(["ffmpeg", "-loglevel", "error", "-f", "concat", "-safe", "0", "-i", str(parts), "-c", "copy",
                    str(path)], check=True, timeout=60)
    return path


RESIZED = ["resize.mjpeg"] + (["resize.avi"] if shutil.which("ffmpeg") else [])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("use_videos")
    write_avi(d / "good1.avi", solid_frames(10), fps=25.0)
    write_avi(d / "good2.avi", solid_frames(12, size=(48, 64)), fps=25.0)
    two_size_mjpeg(d / "resize.mjpeg")
    if "resize.avi" in RESIZED:
        two_size_avi(d / "resize.avi")
    writer = cv2.VideoWriter(str(d / "zero.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (64, 48))
    writer.release()  # a valid AVI header, no frames
    (d / "corrupt.avi").write_bytes(os.urandom(4000))
    (d / "folder.avi").mkdir()
    return d


# ------------------------------------------------------------------------------------------------ predict
def test_predict_reports_each_failed_file_classifies_the_rest_and_exits_1(ckpt, videos, capsys):
    names = ["good1.avi", *RESIZED, "zero.avi", "corrupt.avi", "missing.avi", "folder.avi", "good2.avi"]
    assert predict.main(["--checkpoint", str(ckpt), "--topk", "1", *[str(videos / n) for n in names]]) == 1
    out, err = capsys.readouterr()
    # A resolution change is treated as the packer treats it: OpenCV's reader either scales the frames to
    # one size (then the video is classified; OpenCV 5.0 does) or passes the new size through (an error line).
    one_size = {n for n in RESIZED if len({cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR).shape
                                           for j in read_clip_jpegs(videos / n, 8, 48)[1]}) == 1}
    classified = {"good1.avi", "good2.avi", *one_size}
    assert [line for line in out.splitlines() if not line.startswith(" ")] == [
        str(videos / n) for n in names if n in classified]
    for n, words in [("zero.avi", "no frame decodes"), ("corrupt.avi", ""), ("missing.avi", "file not found"),
                     ("folder.avi", "not a regular file")] + [(n, "one clip") for n in RESIZED if n not in one_size]:
        assert f"{videos / n}: error: {words}" in err
    assert f"{len(names) - len(classified)} of {len(names)} video(s) could not be classified" in err

    assert predict.main(["--checkpoint", str(ckpt), "--json", str(videos / "zero.avi"), str(videos / "good1.avi")]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows[0]["error"].startswith("no frame decodes") and rows[0]["top"] == []
    assert rows[1]["error"] is None and {t["class"] for t in rows[1]["top"]} == set(CLASSES)

    assert predict.main(["--checkpoint", str(ckpt), str(videos / "good1.avi"), str(videos / "good2.avi")]) == 0
    assert "exit status: 0 every video was classified; 1 some video" in predict._parser().format_help()


def test_frames_of_different_sizes_are_an_error_for_that_video(ckpt, videos):
    """What a reader that passes a resolution change through yields: real packed frames of two sizes."""
    p = predict.Predictor(str(ckpt), torch.device("cpu"))
    _, wide = read_clip_jpegs(videos / "good1.avi", 8, 48)  # 64x48 -> 64x48
    _, tall = read_clip_jpegs(videos / "good2.avi", 8, 48)  # 48x64 -> 48x64
    assert p.clip(wide).shape == (8, 3, 32, 32)
    with pytest.raises(VideoError, match=r"frames cannot form one clip \(frames of different sizes.*re-encode"):
        p.clip(wide[:4] + tall[4:])


def _drop(key):
    return lambda s: s.pop(key)


def _drop_weight(s):
    s["model"].pop(sorted(s["model"])[0])


def _reshape_head(s):
    head = [k for k in s["model"] if k.endswith("weight")][-1]
    s["model"][head] = torch.zeros(5, *s["model"][head].shape[1:])  # a head for 5 classes, not 2


BAD = {
    "not-a-checkpoint": ("random bytes", "not a loadable checkpoint"),
    "foreign": ("a dict of other keys", "not a dist_train checkpoint"),
    "wrong-shape": (_reshape_head, "weights do not fit"),
    "missing-weight": (_drop_weight, "weights do not fit"),
    "config-without-hidden-size": (lambda s: s["config"].pop("hidden_size"), "config lacks 'hidden_size'"),
    "config-without-train-crop": (lambda s: s["config"].pop("train_crop"), "lacks"),
}


def _bad_ckpt(tmp_path, case):
    path = tmp_path / f"{case}.pt"
    how = BAD[case][0]
    if how == "random bytes":
        path.write_bytes(os.urandom(3000))
    elif how == "a dict of other keys":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        write_ckpt(path, edit=how)
    return path


@pytest.mark.parametrize("tool", ["predict", "evaluate"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_a_checkpoint_that_does_not_fit_exits_2_naming_it(tmp_path, capsys, videos, tool, case):
    path = _bad_ckpt(tmp_path, case)
    if tool == "predict":
        code = predict.main(["--checkpoint", str(path), str(videos / "good1.avi")])
    else:
        code = evaluate.main(["--checkpoint", str(path), "--shards", str(tmp_path / "no-shards"), "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert str(path) in err and BAD[case][1] in err and "retrain" in err, err
    assert "weights_only" not in err and len(err) < 600, err  # not torch.load's advice to load untrusted pickles


def test_predict_refuses_a_checkpoint_without_packing_record(tmp_path, capsys, videos):
    path = write_ckpt(tmp_path / "old.pt", edit=_drop("packing"))
    assert predict.main(["--checkpoint", str(path), str(videos / "good1.avi")]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "evaluate it on shards" in err


# ------------------------------------------------------------------------------------------------ evaluate
def test_default_report_folder_is_one_per_checkpoint(sample_shards, tmp_path, capsys):
    run = tmp_path / "run"
    best, last = write_ckpt(run / "best.pt", seed=1), write_ckpt(run / "last.pt", seed=2)
    for path in (best, last):
        assert evaluate.main(["--checkpoint", str(path), "--shards", str(sample_shards), "--workers", "0"]) == 0
    capsys.readouterr()
    reports = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("eval-*/report.json"))}
    assert set(reports) == {"eval-best-test", "eval-last-test"}
    assert reports["eval-best-test"]["checkpoint"] == str(best) and reports["eval-last-test"]["checkpoint"] == str(last)
    assert reports["eval-best-test"]["loss"] != reports["eval-last-test"]["loss"]  # two models, two reports


def _edit_meta(tar, edit):
    """Rewrite the first sample's metadata member of a packed shard in place (same length, so the index holds)."""
    data = bytearray(tar.read_bytes())
    start = data.index(b'{"class": ')
    end = data.index(b"}", start) + 1
    new = edit(bytes(data[start:end]))
    assert len(new) == end - start
    data[start:end] = new
    tar.write_bytes(bytes(data))
    return json.loads(new)


def test_metadata_without_a_path_keeps_the_evaluation(sample_shards, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    no_path = _edit_meta(shards / "test-000000.tar", lambda b: b.replace(b'"path": ', b'"pxth": '))
    as_list = _edit_meta(shards / "test-000001.tar",  # valid JSON, but not an object
                         lambda b: b"[" + b[1:-1].replace(b'": ', b'", ') + b"]")
    assert "path" not in no_path and isinstance(as_list, list)
    out = tmp_path / "eval"
    assert evaluate.main(["--checkpoint", str(write_ckpt(tmp_path / "best.pt")), "--shards", str(shards),
                          "--out", str(out), "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"warning: 2 sample(s) of test in {shards} have no source \"path\"" in err
    report = json.loads((out / "report.json").read_text())
    assert report["n_samples"] == 8 and report["unreadable"] == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and sum(p["path"] is None for p in preds) == 2
    assert all(p["path"].endswith(".avi") for p in preds if p["path"] is not None)


# --------------------------------------------------------------------------------------------- fault hooks
HOOKS = {"DIST_TRAIN_TEST_STOP_AT_STEP": "3", "DIST_TRAIN_TEST_STEP_DELAY": "2"}


def test_fault_hooks_act_only_with_the_opt_in(monkeypatch, caplog):
    monkeypatch.setattr(faults.log, "propagate", True)  # to caplog, also after a trainer set up its handler
    caplog.set_level(logging.WARNING, logger="dist_train")
    monkeypatch.setattr(faults, "_announced", set())
    for name, value in HOOKS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(faults.FAULT_INJECTION, raising=False)
    stop, t0 = faults.StopRequest(), time.monotonic()
    faults.after_step_hooks(3, 0, stop)
    assert not stop.requested and time.monotonic() - t0 < 1.0
    assert "DIST_TRAIN_TEST_STOP_AT_STEP=3 is ignored: fault-injection hooks act only with " \
           "DIST_TRAIN_FAULT_INJECTION=1" in caplog.text

    monkeypatch.setattr(faults, "_announced", set())
    monkeypatch.setenv(faults.FAULT_INJECTION, "1")
    monkeypatch.setenv("DIST_TRAIN_TEST_STEP_DELAY", "0.2")
    caplog.clear()
    stop, t0 = faults.StopRequest(), time.monotonic()
    faults.after_step_hooks(3, 0, stop)
    assert stop.requested and time.monotonic() - t0 >= 0.2
    assert "FAULT INJECTION ACTIVE (tests only): DIST_TRAIN_TEST_STOP_AT_STEP=3" in caplog.text


@pytest.mark.parametrize("opt_in", [False, True])
def test_kill_hook_is_inert_without_the_opt_in(opt_in):
    env = {k: v for k, v in os.environ.items() if k != faults.FAULT_INJECTION}
    env.update({"DIST_TRAIN_TEST_KILL_AT_STEP": "5", "PYTHONPATH": str(REPO)}, **({faults.FAULT_INJECTION: "1"}
                                                                                if opt_in else {}))
    code = "from dist_train import faults; faults.after_step_hooks(5, 0, faults.StopRequest()); print('alive')"
    p = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    if opt_in:
        assert p.returncode == -9 and "FAULT INJECTION ACTIVE" in p.stderr, p.stderr
    else:
        assert p.returncode == 0 and p.stdout == "alive\n", p.stderr
        assert "DIST_TRAIN_TEST_KILL_AT_STEP=5 is ignored" in p.stderr
