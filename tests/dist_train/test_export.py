"""Export: TorchScript and ONNX files that match the eager model, and the checkpoint -> file command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train import checkpoint as ckpt_io
from dist_train.checkpoint import load_model
from dist_train.config import TrainConfig
from dist_train.export import INPUT, MissingExtra, ParityError, export, main, sample_input
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
    check = export(model, input_layout(name), x, fmt, out)
    assert check.diff < 1e-4 and check.tol >= 1e-4
    assert [f.name for f in tmp_path.iterdir()] == [out.name]  # no temporary file left
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


class BatchDependent(torch.nn.Module):
    """Real code that tracing cannot capture: a Python branch on the batch size, frozen at trace time."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)

    def forward(self, x):
        y = self.fc(x.mean((1, 3, 4)))
        return y if x.shape[0] == 1 else -y


def test_a_failed_parity_check_keeps_no_file(tmp_path):
    out = tmp_path / "m.pt"
    out.write_bytes(b"the previous export")
    with pytest.raises(ParityError, match=r"m\.pt: the exported torchscript model differs .* nothing was written"):
        export(BatchDependent(), "BTCHW", sample_input("cnn_rnn", 1, 2, 8), "torchscript", out)
    assert out.read_bytes() == b"the previous export" and list(tmp_path.iterdir()) == [out]


def test_export_replaces_out_without_touching_its_other_links(tmp_path):
    other = tmp_path / "other.bin"
    other.write_bytes(b"another name of the same file")
    out = tmp_path / "m.pt"
    os.link(other, out)
    export(build_model("cnn_rnn", 3, hidden=8), "BTCHW", sample_input("cnn_rnn", 1, 2, 32), "torchscript", out)
    assert other.read_bytes() == b"another name of the same file" and not os.path.samefile(other, out)
    torch.jit.load(str(out))


def test_cli_failed_check_exits_1_and_writes_nothing(tmp_path, capsys):
    needs_onnx("onnx")  # onnxruntime's float arithmetic is not torch's: a zero tolerance fails
    path, _, _ = write_checkpoint(tmp_path, hidden_size=8)
    out = tmp_path / "export" / "m.onnx"
    assert main(["--checkpoint", str(path), "--format", "onnx", "--out", str(out), "--frames", "2",
                 "--atol", "0", "--rtol", "0"]) == 1
    err = capsys.readouterr().err
    assert f"export: check failed: {out}: the exported onnx model differs" in err and "nothing was written" in err
    assert list(out.parent.iterdir()) == []


def _run_folder(tmp_path) -> Path:
    """A run folder as the trainer leaves it: best.pt, and last.pt hard-linked to the step checkpoint."""
    best, _, _ = write_checkpoint(tmp_path, hidden_size=8)
    ckpt_io.save_last(ckpt_io.load_checkpoint(best), best.parent, keep_last=2)
    return best.parent


def _files(root: Path) -> dict:
    """Every name under ``root`` with its inode, size and modification time: a replaced or rewritten file shows."""
    return {p: (s.st_ino, s.st_size, s.st_mtime_ns) for p in sorted(root.rglob("*")) for s in [p.lstat()]}


STEP = f"{ckpt_io.STEP_DIR}/step-00000010.pt"


@pytest.fixture(scope="module")
def links(tmp_path_factory) -> Path:
    """A run folder, a folder with a checkpoint that is no run folder, and links to their checkpoints."""
    tmp = tmp_path_factory.mktemp("links")
    run = _run_folder(tmp)
    (tmp / "plain").mkdir()
    os.link(run / "best.pt", tmp / "plain" / "model.pt")
    os.link(run / "best.pt", tmp / "plain" / "hardlink.json")  # what --out plain/hardlink writes as metadata
    (tmp / "elsewhere").mkdir()
    os.link(run / STEP, tmp / "elsewhere" / "hardlink.pt")
    os.symlink(run / "best.pt", tmp / "elsewhere" / "symlink.pt")
    return tmp


@pytest.mark.parametrize("checkpoint, out, why", [
    ("run/best.pt", "run/last.pt", "in run folder"),  # last.pt is a hard link of the step checkpoint
    ("run/last.pt", "run/last.pt", "in run folder"),
    ("run/best.pt", f"run/{STEP}", "in run folder"),
    ("run/best.pt", "run/model.pt", "in run folder"),
    ("run/best.pt", "elsewhere/hardlink.pt", "which is the checkpoint {tmp}/run/last.pt (the same file, through"),
    ("run/best.pt", "elsewhere/symlink.pt", "which is the checkpoint {tmp}/run/best.pt (the same file, through"),
    ("plain/model.pt", "plain/model.pt", "which is the checkpoint {tmp}/plain/model.pt (the same file)"),
    ("plain/model.pt", "plain/hardlink", "which is the checkpoint {tmp}/plain/model.pt (the same file, through"),
], ids=["last.pt", "the-checkpoint", "a-step-checkpoint", "a-new-pt", "hard-link", "symlink", "outside-runs",
        "its-json-is-a-link"])
def test_export_refuses_to_overwrite_a_checkpoint(links, capsys, checkpoint, out, why):
    tmp_path = links
    before = _files(tmp_path)
    code = main(["--checkpoint", str(tmp_path / checkpoint), "--format", "torchscript", "--out", str(tmp_path / out),
                 "--frames", "2"])
    err = capsys.readouterr().err
    assert code == 2 and f"export: refused: --out {tmp_path / out}" in err and why.format(tmp=tmp_path) in err, err
    assert _files(tmp_path) == before


def test_the_suggested_place_in_a_run_folder_is_allowed(tmp_path, capsys):
    run = _run_folder(tmp_path)
    args = ["--checkpoint", str(run / "last.pt"), "--format", "torchscript", "--frames", "2"]
    assert main([*args, "--out", str(run / "model.pt")]) == 2
    suggested = run / "export" / "model.pt"
    assert f"e.g. --out {suggested}" in capsys.readouterr().err
    assert main([*args, "--out", str(suggested)]) == 0 and suggested.is_file()


@pytest.mark.slow
def test_export_a_real_training_run(learned, tmp_path):
    out = learned["out"]  # the session's 2-process training run
    for fmt in ("torchscript", "onnx"):
        needs_onnx(fmt)
        p = subprocess.run([sys.executable, "-m", "dist_train.export", "--checkpoint", str(out / "best.pt"),
                            "--format", fmt, "--out", str(tmp_path / f"m.{fmt}"), "--batch", "2"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "OK" in p.stdout
