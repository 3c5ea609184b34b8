"""Export a trained model to TorchScript or ONNX and check it against the eager model.

    python -m dist_train.export --checkpoint RUN/best.pt --format torchscript|onnx --out FILE

The exported model takes one float32 input ``clips``, normalised with the training mean/std, in the
model's layout: ``[B, T, 3, H, W]`` for ``cnn_rnn``, ``[B, 3, T, H, W]`` for the 3D CNNs, with ``T``
and ``H = W`` fixed at export (``--frames``, ``--size``; default 16 and the training ``--img-size``)
and the batch size free. It returns logits ``[B, num_classes]``. ``FILE.json`` beside the model holds
the layout, shape, normalisation and class names. ONNX needs the optional extra ``onnx`` (packages
``onnx`` and ``onnxruntime``, used to check the file).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from dist_train import checkpoint as ckpt_io
from dist_train.data import normalization
from dist_train.models import input_layout, unwrap

FORMATS = ("torchscript", "onnx")
INPUT, OUTPUT = "clips", "logits"
ONNX_OPSET = 17


class MissingExtra(ImportError):
    """An optional dependency needed for the requested export format is not installed."""


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


def export(model: nn.Module, layout: str, example: Tensor, fmt: str, out: Path) -> float:
    """Write ``model`` (input ``example`` in ``layout``) to ``out`` as ``fmt``; return max |exported - eager|.

    The file is loaded back (``torch.jit.load`` / onnxruntime) and run on ``example`` and on a sample
    with another batch size; the largest absolute logit difference to the eager model is returned.
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
    with _quiet(), torch.no_grad():
        if fmt == "torchscript":
            # trace, not script: the forward is plain tensor code, and tracing records the batch
            # size symbolically (checked below on a second batch size).
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(out))
        else:
            torch.onnx.export(
                model, (example,), str(out), dynamo=False, opset_version=ONNX_OPSET,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
    diff = 0.0
    for x in (example, _other_batch(example)):
        with torch.no_grad():
            ref = model(x)
        got = _run_exported(fmt, out, x)
        if got.shape != ref.shape:
            raise RuntimeError(f"exported model returned shape {tuple(got.shape)}, eager {tuple(ref.shape)}")
        diff = max(diff, (got - ref).abs().max().item())
    return diff


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


def main(argv: list[str] | None = None) -> int:
    """Export, check against eager, print the difference; exit 0 within tolerance, 1 beyond, 2 on errors."""
    a = _build_parser().parse_args(argv)
    if a.frames < 1 or (a.size is not None and a.size < 8) or a.batch < 1:
        print("export: --frames and --batch must be >= 1 and --size >= 8", file=sys.stderr)
        return 2
    try:
        if a.format == "onnx":
            _require_onnx()
        model, ckpt = ckpt_io.load_model(a.checkpoint)
    except (MissingExtra, FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"export: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    cfg = ckpt["config"]
    name, size = cfg["model"], a.size or cfg["img_size"]
    layout = input_layout(name)
    example = sample_input(name, a.batch, a.frames, size)
    out = Path(a.out)
    diff = export(model, layout, example, a.format, out)
    with torch.no_grad():
        scale = model(example).abs().max().item()
    tol = a.atol + a.rtol * scale
    mean, std = normalization(name)
    shape = ["B", a.frames, 3, size, size] if layout == "BTCHW" else ["B", 3, a.frames, size, size]
    meta = {
        "format": a.format, "model": name, "checkpoint": str(a.checkpoint), "input": INPUT, "output": OUTPUT,
        "layout": layout, "input_shape": shape, "dtype": "float32",
        "normalization": {"mean": list(mean), "std": list(std), "note": "x = (uint8 / 255 - mean) / std"},
        "classes": list(ckpt["classes"]), "max_abs_diff_vs_eager": diff, "tolerance": tol,
    }
    meta_path = out.with_name(out.name + ".json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    ok = diff <= tol
    print(f"wrote {out} ({a.format}, {out.stat().st_size / 1e6:.1f} MB) and {meta_path}")
    print(f"input {INPUT}: float32 {layout} {shape} (batch free), output {OUTPUT}: [B, {len(ckpt['classes'])}]")
    print(f"max |exported - eager| = {diff:.3g} on {a.batch} and {a.batch + 1} clip(s) "
          f"(tolerance {tol:.3g}): {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
