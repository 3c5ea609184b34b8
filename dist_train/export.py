"""Export a trained model to TorchScript or ONNX and check it against the eager model.

    python -m dist_train.export --checkpoint RUN/best.pt --format torchscript|onnx --out FILE

The exported model takes one float32 input ``clips``, normalised with the training mean/std, in the
model's layout: ``[B, T, 3, H, W]`` for ``cnn_rnn``, ``[B, 3, T, H, W]`` for the 3D CNNs, with ``T``
and ``H = W`` fixed at export (``--frames``, ``--size``; default 16 and the training ``--img-size``)
and the batch size free. It returns logits ``[B, num_classes]``. ``FILE.json`` beside the model holds
the layout, shape, normalisation and class names. ONNX needs the optional extra ``onnx`` (packages
``onnx`` and ``onnxruntime``, used to check the file).

The file is written under a temporary name (unique per process, in the same folder), loaded back and
compared with the eager model; only when it agrees within the tolerance is it renamed to ``FILE``, so
a failed check leaves no file (and any previous ``FILE`` untouched). ``--out`` may not name the
checkpoint being read (also through a hard or symbolic link) nor a ``.pt`` file of a run folder (a
folder with a run's config.json, last.pt, best.pt or checkpoints/step-*.pt): those are checkpoints.

Exit status: 0 exported and checked, 1 the check failed (nothing written), 2 bad arguments or checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dist_train import checkpoint as ckpt_io
from dist_train.data import normalization
from dist_train.evaluation import UnusableCheckpoint, load_trained_model
from dist_train.models import input_layout, unwrap

FORMATS = ("torchscript", "onnx")
INPUT, OUTPUT = "clips", "logits"
ONNX_OPSET = 17


RUN_FILES = ("config.json", ckpt_io.LAST, ckpt_io.BEST)  # what makes a folder a run folder (with step checkpoints)


class MissingExtra(ImportError):
    """An optional dependency needed for the requested export format is not installed."""


class ParityError(RuntimeError):
    """The exported model does not compute what the eager model does; no file was kept."""


class Parity(NamedTuple):
    """Largest absolute logit difference exported vs eager, and the tolerance it was held to."""

    diff: float
    tol: float


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise MissingExtra(
            f"ONNX export needs the optional packages onnx and onnxruntime ({e}). Install them with "
            "pip install 'vidshard[onnx]' (or: pip install onnx onnxruntime), or use --format torchscript."
        ) from e


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation notices of torch.jit and the TorchScript-based ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*legacy TorchScript-based ONNX")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r"The feature will be removed")
        # nn.LSTM's own shape checks and generic LSTM advice; the batch dimension is checked on a
        # second batch size instead.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, message=r"Exporting a model to ONNX with a batch_size")
        yield


def _other_batch(example: Tensor) -> Tensor:
    # A second sample with another batch size proves the batch dimension really is free.
    g = torch.Generator().manual_seed(1)
    shape = (example.shape[0] + 1, *example.shape[1:])
    return torch.randn(shape, generator=g, dtype=example.dtype)


def _run_exported(fmt: str, out: Path, x: Tensor) -> Tensor:
    if fmt == "torchscript":
        with _quiet(), torch.no_grad():
            loaded = torch.jit.load(str(out), map_location="cpu")
            return loaded(x)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run([OUTPUT], {INPUT: x.numpy()})[0])


def _tmp_path(path: Path) -> Path:
    """A temporary name beside ``path``, unique per writer (process id and a random part)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def _save(model: nn.Module, example: Tensor, fmt: str, path: Path) -> None:
    with _quiet(), torch.no_grad():
        if fmt == "torchscript":
            # trace, not script: the forward is plain tensor code, and tracing records the batch
            # size symbolically (checked on a second batch size).
            torch.jit.save(torch.jit.trace(model, example, check_trace=False), str(path))
        else:
            torch.onnx.export(
                model, (example,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )


def export(model: nn.Module, layout: str, example: Tensor, fmt: str, out: Path, atol: float = 1e-4,
           rtol: float = 1e-4) -> Parity:
    """Write ``model`` (input ``example`` in ``layout``) to ``out`` as ``fmt``, checked against the eager model.

    The file is written under a temporary name, loaded back (``torch.jit.load`` / onnxruntime) and run
    on ``example`` and on a sample with another batch size. It becomes ``out`` (atomic rename) only when
    the largest absolute logit difference is within ``atol + rtol * max |eager logit|``; otherwise it is
    deleted and ``ParityError`` raised.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; valid choices: {', '.join(FORMATS)}")
    channel_dim = {"BTCHW": 2, "BCTHW": 1}.get(layout)
    if channel_dim is None or example.dim() != 5 or example.shape[channel_dim] != 3:
        raise ValueError(f"example must be a 5-D RGB clip batch in layout BTCHW or BCTHW; got layout {layout!r}, "
                         f"shape {tuple(example.shape)}")
    if fmt == "onnx":
        _require_onnx()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export what inference runs: eval mode (dropout off, BatchNorm running stats), fp32, CPU, plain layout.
    # (on a copy: the caller's model keeps its mode, device and memory format)
    model = copy.deepcopy(unwrap(model)).cpu().float().eval().to(memory_format=torch.contiguous_format)
    example = example.detach().cpu().float().contiguous()
    tmp = _tmp_path(out)
    try:
        _save(model, example, fmt, tmp)
        diff = scale = 0.0
        for x in (example, _other_batch(example)):
            with torch.no_grad():
                ref = model(x)
            got = _run_exported(fmt, tmp, x)
            if got.shape != ref.shape:
                raise ParityError(f"{out}: the exported model returned shape {tuple(got.shape)}, the eager model "
                                  f"{tuple(ref.shape)}; nothing was written")
            diff, scale = max(diff, (got - ref).abs().max().item()), max(scale, ref.abs().max().item())
        tol = atol + rtol * scale
        if not diff <= tol:
            raise ParityError(
                f"{out}: the exported {fmt} model differs from the eager model by {diff:.3g} (max |logit "
                f"difference|), beyond the tolerance {tol:.3g}; nothing was written. Try the other --format, or "
                "raise --atol/--rtol if a difference this size is acceptable.")
        os.replace(tmp, out)
        return Parity(diff, tol)
    finally:
        tmp.unlink(missing_ok=True)


def _run_folder(folder: Path) -> Path | None:
    """The run folder that ``folder`` is, or whose checkpoints/ folder it is; None for any other folder."""
    for d in (folder, folder.parent) if folder.name == ckpt_io.STEP_DIR else (folder,):
        if any((d / name).is_file() for name in RUN_FILES) or any((d / ckpt_io.STEP_DIR).glob("step-*.pt")):
            return d
    return None


def overwrite_problem(out: Path, checkpoint: Path) -> str | None:
    """Why writing ``out`` (and ``out.json``) could destroy a checkpoint, or None when it cannot."""
    out, checkpoint = Path(out), Path(checkpoint)
    run = _run_folder(out.parent.resolve())
    if run is not None and (out.suffix == ".pt" or out.parent.resolve().name == ckpt_io.STEP_DIR):
        return (f"--out {out} is in run folder {run}, whose .pt files are its training checkpoints; write the "
                f"export elsewhere, e.g. --out {run / 'export' / out.name}")
    ckpt_run = _run_folder(checkpoint.parent.resolve())
    protected = [checkpoint]
    if ckpt_run is not None:
        protected += sorted(ckpt_run.glob("*.pt")) + sorted((ckpt_run / ckpt_io.STEP_DIR).glob("*.pt"))
    for target in (out, out.with_name(out.name + ".json")):
        for c in protected:
            if target.exists() and c.exists() and os.path.samefile(target, c):
                how = "" if os.path.abspath(target) == os.path.abspath(c) else ", through a link"
                return f"--out {out} would replace {target}, which is the checkpoint {c} (the same file{how}); " \
                       "choose another --out"
    return None


def sample_input(model_name: str, batch: int, frames: int, size: int, seed: int = 0) -> Tensor:
    """A reproducible random clip batch in ``model_name``'s layout (normalised-data scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 3, size, size, generator=g)
    return x.permute(0, 2, 1, 3, 4).contiguous() if input_layout(model_name) == "BCTHW" else x


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="training checkpoint, e.g. runs/exp1/best.pt")
    p.add_argument("--format", required=True, choices=FORMATS, help="torchscript (.pt) or onnx (.onnx)")
    p.add_argument("--out", required=True, help="file to write; its metadata goes to FILE.json")
    p.add_argument("--frames", type=int, default=16, help="frames per clip the exported model takes (default 16)")
    p.add_argument("--size", type=int, default=None, help="frame height = width (default: the training --img-size)")
    p.add_argument("--batch", type=int, default=1, help="batch size of the check sample (the exported batch is free)")
    p.add_argument("--atol", type=float, default=1e-4, help="tolerated max |exported - eager| logit difference "
                                                           "(plus --rtol x the largest eager logit)")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative part of the tolerance")
    return p


def _write_atomic(path: Path, text: str) -> None:
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """Export, check against eager, print the difference; exit 0 within tolerance, 1 beyond, 2 on errors."""
    a = _build_parser().parse_args(argv)
    if a.frames < 1 or (a.size is not None and a.size < 8) or a.batch < 1:
        print("export: --frames and --batch must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    out = Path(a.out)
    problem = overwrite_problem(out, Path(a.checkpoint))
    if problem:
        print(f"export: refused: {problem}", file=sys.stderr)
        return 2
    try:
        if a.format == "onnx":
            _require_onnx()
        model, ckpt = load_trained_model(a.checkpoint)
    except (MissingExtra, UnusableCheckpoint) as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    cfg = ckpt["config"]
    name, size = cfg["model"], a.size or cfg["img_size"]
    layout = input_layout(name)
    example = sample_input(name, a.batch, a.frames, size)
    try:
        diff, tol = export(model, layout, example, a.format, out, a.atol, a.rtol)
    except ParityError as e:
        print(f"export: check failed: {e}", file=sys.stderr)
        return 1
    mean, std = normalization(name)
    shape = ["B", a.frames, 3, size, size] if layout == "BTCHW" else ["B", 3, a.frames, size, size]
    meta = {
        "format": a.format, "model": name, "checkpoint": str(a.checkpoint), "input": INPUT, "output": OUTPUT,
        "layout": layout, "input_shape": shape, "dtype": "float32",
        "normalization": {"mean": list(mean), "std": list(std), "note": "x = (uint8 / 255 - mean) / std"},
        "classes": list(ckpt["classes"]), "max_abs_diff_vs_eager": diff, "tolerance": tol,
    }
    meta_path = out.with_name(out.name + ".json")
    _write_atomic(meta_path, json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out} ({a.format}, {out.stat().st_size / 1e6:.1f} MB) and {meta_path}")
    print(f"input {INPUT}: float32 {layout} {shape} (batch free), output {OUTPUT}: [B, {len(ckpt['classes'])}]")
    print(f"max |exported - eager| = {diff:.3g} on {a.batch} and {a.batch + 1} clip(s) (tolerance {tol:.3g}): OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
