"""Export: TorchScript and ONNX files that match the eager model, and the checkpoint -> file command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train import checkpoint as ckpt_io
from dist_train.checkpoint import load_model
from dist_train.config import TrainConfig
from dist_train.export import INPUT, MissingExtra, export, main, sample_input
from dist_train.models import build_model, input_layout

REPO = Path(__file__).resolve().parents[2]


def ort():
    """onnxruntime, or skip (ONNX is an optional extra; its absence is tested separately)."""
    return pytest.importorskip("onnxruntime")


def needs_onnx(fmt: str) -> None:
    """Skip an ONNX case when the extra is not installed."""
    if fmt == "onnx":
        pytest.importorskip("onnx")
        ort()


@pytest.mark.parametrize(
    "name, fmt, kw",
    [
        ("cnn_rnn", "torchscript", dict(hidden=16)),
        ("cnn_rnn", "onnx", dict(hidden=16)),
        ("cnn_rnn", "onnx", dict(hidden=8, rnn="gru", bidirectional=True, layers=2, head="mean", dropout=0.3)),
        ("mc3_18", "onnx", {}),
        ("r2plus1d_18", "torchscript", {}),
    ],
)
def test_export_matches_eager(tmp_path, name, fmt, kw):
    needs_onnx(fmt)
    torch.manual_seed(0)
    model = build_model(name, 5, **kw).train()  # export must switch dropout/BatchNorm to eval itself
    x = sample_input(name, 2, 4, 32)
    out = tmp_path / f"model.{fmt}"
    diff = export(model, input_layout(name), x, fmt, out)
    assert diff < 1e-4
    assert model.training  # the caller's model is left as it was

    # Independently of export()'s own check: load the file and compare on a new batch size.
    model.eval()
    x3 = sample_input(name, 3, 4, 32, seed=5)
    with torch.no_grad():
        ref = model(x3)
    if fmt == "torchscript":
        with torch.no_grad():
            got = torch.jit.load(str(out))(x3)
    else:
        sess = ort().InferenceSession(str(out), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == [INPUT]
        got = torch.from_numpy(sess.run(None, {INPUT: x3.numpy()})[0])
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    # A different input gives different logits (the comparison is not vacuous).
    assert not torch.allclose(ref[:1], ref[1:2])


def test_export_rejects_bad_arguments(tmp_path):
    model = build_model("cnn_rnn", 3, hidden=8)
    x = sample_input("cnn_rnn", 1, 2, 32)
    with pytest.raises(ValueError, match="torchscript, onnx"):
        export(model, "BTCHW", x, "tflite", tmp_path / "m")
    with pytest.raises(ValueError, match="layout"):
        export(model, "BCTHW", x, "torchscript", tmp_path / "m")  # channels are at dim 2, not 1


def test_missing_onnx_gives_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when absent
    model = build_model("cnn_rnn", 3, hidden=8)
    with pytest.raises(MissingExtra, match=r"pip install 'vidshard\[onnx\]'"):
        export(model, "BTCHW", sample_input("cnn_rnn", 1, 2, 32), "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def write_checkpoint(tmp_path, **cfg_kw) -> tuple:
    """A best.pt with the trainer's keys (via dist_train.checkpoint) and the model it holds."""
    cfg = TrainConfig(out=str(tmp_path / "run"), img_size=32, **cfg_kw)
    classes = ["brush_hair", "cartwheel", "climb"]
    torch.manual_seed(3)
    model = build_model(cfg.model, len(classes), rnn=cfg.rnn, hidden=cfg.hidden_size, layers=cfg.rnn_layers,
                        bidirectional=cfg.bidirectional, dropout=cfg.dropout, head=cfg.head)
    opt = torch.optim.AdamW(model.parameters())
    state = {"format_version": ckpt_io.FORMAT_VERSION, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "epoch": 1, "step": 10, "step_in_epoch": 0, "config": cfg.to_dict(), "classes": classes,
             "world_size": 1, "wandb_run_id": None}
    return ckpt_io.save_best(state, cfg.out), model, classes


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_cli_exports_a_checkpoint(tmp_path, capsys, fmt):
    needs_onnx(fmt)
    path, model, classes = write_checkpoint(tmp_path, hidden_size=16)
    out = tmp_path / f"exported.{fmt}"
    assert main(["--checkpoint", str(path), "--format", fmt, "--out", str(out), "--frames", "4"]) == 0
    printed = capsys.readouterr().out
    assert "max |exported - eager| =" in printed and "OK" in printed
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["classes"] == classes and meta["layout"] == "BTCHW"
    assert meta["input_shape"] == ["B", 4, 3, 32, 32] and meta["max_abs_diff_vs_eager"] < 1e-4

    # The exported file computes the checkpoint's model (not a freshly initialised one).
    x = sample_input("cnn_rnn", 2, 4, 32, seed=9)
    with torch.no_grad():
        ref = model.eval()(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(out))(x)
        else:
            got = torch.from_numpy(ort().InferenceSession(str(out)).run(None, {INPUT: x.numpy()})[0])
    np.testing.assert_allclose(got.numpy(), ref.numpy(), atol=1e-4, rtol=1e-4)


def test_load_model_restores_weights(tmp_path):
    path, model, _ = write_checkpoint(tmp_path, model="r3d_18")
    loaded, ckpt = load_model(path)
    assert not loaded.training and ckpt["config"]["model"] == "r3d_18"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_cli_errors_are_clear(tmp_path, capsys, monkeypatch):
    assert main(["--checkpoint", str(tmp_path / "nope.pt"), "--format", "torchscript",
                 "--out", str(tmp_path / "m.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(1)}, junk)
    assert main(["--checkpoint", str(junk), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert "not a dist_train checkpoint" in capsys.readouterr().err
    path, _, _ = write_checkpoint(tmp_path, hidden_size=8)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["--checkpoint", str(path), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "onnx and onnxruntime" in capsys.readouterr().err


def test_module_runs_as_a_command(tmp_path):
    path, _, _ = write_checkpoint(tmp_path, hidden_size=8)
    out = tmp_path / "m.pt"
    p = subprocess.run([sys.executable, "-m", "dist_train.export", "--checkpoint", str(path), "--format",
                        "torchscript", "--out", str(out), "--frames", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "max |exported - eager|" in p.stdout and out.is_file()
    assert "Warning" not in p.stderr  # torch.jit's deprecation notices are kept out of the user's way


@pytest.mark.slow
def test_export_a_real_training_run(sample_shards, tmp_path):
    from tests.dist_train.dt_helpers import TINY, check, run_trainer

    out = tmp_path / "run"
    check(run_trainer(["--shards", str(sample_shards), "--out", str(out), "--epochs", "1", "--workers", "0",
                       "--val-fraction", "0", *TINY], nproc=None, timeout=400))
    for fmt in ("torchscript", "onnx"):
        needs_onnx(fmt)
        p = subprocess.run([sys.executable, "-m", "dist_train.export", "--checkpoint", str(out / "best.pt"),
                            "--format", fmt, "--out", str(tmp_path / f"m.{fmt}"), "--batch", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "OK" in p.stdout
