"""Evaluation of a model over shards: every sample exactly once across ranks, counts checked.

The trainer's per-epoch and final evaluations and ``python -m dist_train.evaluate`` all go through
``evaluate_samples``, so their numbers agree by construction.

Views: one view is the centre crop the trainer evaluates on. ``views=3`` adds the two ends of the
long side (three spatial crops of the same frames). Shards packed with ``--temporal-views K`` hold K
frames per segment, and every temporal view is evaluated (``SampleSpec.temporal == "all"``; view k
takes offset k of every segment). The class probabilities of all the views, temporal x spatial, are
averaged (``averaged``); ``view_top1`` is the mean top-1 of the single views, and ``views_note`` says which.

``load_trained_model`` is how evaluate, predict and export open a checkpoint: every way a file can
fail to be a usable model (missing, not a checkpoint, another format version, weights or config that
do not fit the model) is one ``UnusableCheckpoint`` naming the file and saying what to do.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from dist_train import checkpoint as ckpt_io
from dist_train import data
from dist_train.distributed import all_gather_object, all_reduce

USE_HINT = "pass a best.pt or last.pt written by `python -m dist_train` (this version), or retrain"


class UnusableCheckpoint(ValueError):
    """A file that cannot be used as a trained model; the message names it and says what to do."""


def load_trained_model(path) -> tuple[torch.nn.Module, dict]:
    """``checkpoint.load_model(path)``: the model (eval mode, CPU) and the checkpoint; else ``UnusableCheckpoint``."""
    try:
        return ckpt_io.load_model(path)
    except FileNotFoundError:
        raise UnusableCheckpoint(f"checkpoint {path} not found; {USE_HINT}") from None
    except ckpt_io.CheckpointVersionError as e:  # already says what to do
        raise UnusableCheckpoint(str(e)) from None
    except ValueError as e:  # not a loadable file, or not one of ours
        # torch.load's own text (the cause) is long and suggests weights_only=False: no advice for a user
        reason = (f"{path} is not a loadable checkpoint ({type(e.__cause__).__name__}: not written by torch.save, "
                  "cut short or damaged)") if e.__cause__ is not None else str(e)
        raise UnusableCheckpoint(f"{reason}; {USE_HINT}") from None
    except KeyError as e:
        raise UnusableCheckpoint(f"cannot use checkpoint {path}: its config lacks {e} (an older or foreign "
                                 f"checkpoint); {USE_HINT}") from None
    except RuntimeError as e:  # load_state_dict: missing or unexpected parameters, other shapes
        detail = "; ".join(line.strip() for line in str(e).splitlines()[:3])
        raise UnusableCheckpoint(f"cannot use checkpoint {path}: its weights do not fit the model its config "
                                 f"describes ({detail[:400]}); {USE_HINT}") from None


@dataclass(frozen=True)
class SpatialViews(data.ClipTransform):
    """The evaluation scale (``eval_scale``), then ``views`` squares along the long side: ``[V, T, 3, S, S]``."""

    views: int = 3

    def __call__(self, clip: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        clip = self.eval_scale(clip)
        h, w = clip.shape[-2:]
        s = self.size
        if self.views == 1:
            return TF.center_crop(clip, [s, s])[None]
        crops = []
        for v in range(self.views):
            top = (h - s) * v // (self.views - 1) if h > w else (h - s) // 2
            left = (w - s) * v // (self.views - 1) if w >= h else (w - s) // 2
            crops.append(clip[..., top:top + s, left:left + s])
        return torch.stack(crops)


def eval_spec(n_frames: int, num_classes: int, img_size: int, crop: str, on_bad: str, decode: str = "cpu",
              views: int = 1, temporal_views: int = 1, all_temporal: bool = True) -> data.SampleSpec:
    """How evaluation turns samples into clips: the centre crop, or ``views`` spatial crops, at the scale
    of training mode ``crop`` (``TrainConfig.train_crop``); of shards of ``temporal_views`` frames per
    segment, every temporal view (``all_temporal``; the centre one with ``--decode gpu``) or the centre one."""
    transform = (data.ClipTransform(img_size, False, crop=crop) if views == 1
                 else SpatialViews(img_size, False, crop=crop, views=views))
    temporal = "all" if all_temporal and decode != "gpu" else "centre"
    return data.SampleSpec(n_frames, num_classes, transform, on_bad, decode, temporal_views, temporal)


def view_logits(model: torch.nn.Module, video: torch.Tensor, layout: str, stats: tuple, autocast=None) -> torch.Tensor:
    """Logits ``[B, V, C]`` of uint8 clips ``[B, V, T, 3, H, W]`` (views: temporal x spatial), or ``[B, 1, C]``
    of ``[B, T, 3, H, W]``."""
    video = video if video.dim() == 6 else video[:, None]
    with autocast or nullcontext():
        logits = model(data.to_model_input(video.flatten(0, 1), layout, stats)).float()
    return logits.view(video.shape[0], video.shape[1], -1)


def averaged(logits: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` scores of view logits ``[B, V, C]``: the log of the view-averaged probabilities (so softmax and
    argmax read the same way), or the logits themselves for one view."""
    return logits[:, 0] if logits.shape[1] == 1 else logits.softmax(-1).mean(1).log()


def views_of(spec: data.SampleSpec) -> str:
    """What each clip's score averages, e.g. "3 temporal x 1 spatial views"."""
    spatial = spec.transform.views if isinstance(spec.transform, SpatialViews) else 1
    return f"{spec.temporal_views if spec.multi_view else 1} temporal x {spatial} spatial views"


def class_scores(model: torch.nn.Module, video: torch.Tensor, layout: str, stats: tuple, autocast=None) -> torch.Tensor:
    """``averaged(view_logits(...))``: logits ``[B, C]`` of ``[B, T, 3, H, W]``, view-averaged log-probabilities
    of ``[B, V, T, 3, H, W]``."""
    return averaged(view_logits(model, video, layout, stats, autocast))


@torch.no_grad()
def evaluate_samples(model: torch.nn.Module, samples: data.Samples, ids, spec: data.SampleSpec, *, classes: list[str],
                     layout: str, stats: tuple, device: torch.device, rank: int = 0, world_size: int = 1,
                     batch_size: int = 8, workers: int = 0, autocast=None, split: str = "test",
                     keep_predictions: bool = False, bad_shards: dict[str, str] | None = None,
                     data_timeout: float = 0.0) -> dict:
    """Loss, top-1/5, per-class accuracy and confusion matrix of samples ``ids`` (all ranks call this), over
    the views each clip holds (``spec``: temporal x spatial) averaged per video; ``view_top1`` is the mean
    top-1 of the single views (the clip-level accuracy; equal to ``top1`` with one view).

    Each rank reads a disjoint block of the samples with the plain (unwrapped) model, so ranks may see
    different batch counts; one SUM all-reduce combines them. Raises ``RuntimeError`` unless
    evaluated + unreadable samples equal ``len(ids)``. ``bad`` lists unreadable samples (all ranks');
    ``predictions`` (with ``keep_predictions``) gives key, label, top-5 per sample.
    """
    c = len(classes)
    loader = data.eval_loader(samples, ids, spec, rank, world_size, batch_size, workers, pin=device.type == "cuda",
                              bad_shards=bad_shards, timeout=data_timeout)
    was_training = model.training
    model.eval()
    confusion = torch.zeros(c * c, dtype=torch.float64, device=device)
    extra = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-5 hits, unreadable, view hits
    bad: list[dict] = []
    predictions: list[dict] = []
    try:
        for batch in loader:
            video, labels, keys, bad_here = data.materialize(batch, spec, device)
            bad += bad_here
            extra[2] += sum(b["count"] for b in bad_here)
            if labels.numel() == 0:
                continue
            logits = view_logits(model, video, layout, stats, autocast)
            scores = averaged(logits)
            extra[3] += logits.argmax(-1).eq(labels[:, None]).double().mean(1).sum()
            extra[0] += F.cross_entropy(scores, labels, reduction="sum").double()
            top = scores.topk(min(5, c), 1)
            extra[1] += top.indices.eq(labels[:, None]).any(1).sum().double()
            confusion += torch.bincount(labels * c + scores.argmax(1), minlength=c * c).double()
            if keep_predictions:
                probs = scores.softmax(-1).gather(1, top.indices)
                for k, y, idx, p in zip(keys, labels.tolist(), top.indices.tolist(), probs.tolist()):
                    predictions.append({"key": k, "label": y, "top": idx, "probs": p})
    finally:
        model.train(was_training)
    totals = all_reduce(torch.cat([confusion, extra]))
    matrix = totals[: c * c].view(c, c).long().cpu()
    loss_sum, top5, unreadable, view_hits = totals[c * c:].tolist()
    n, expected = int(matrix.sum()), len(ids)
    if world_size > 1:
        bad = [r for records in all_gather_object(bad) for r in records]
        if keep_predictions:
            predictions = [p for preds in all_gather_object(predictions) for p in preds]
    if n + int(unreadable) != expected:
        raise RuntimeError(f"{split}: evaluated {n} clips and {int(unreadable)} were unreadable, but the split holds "
                           f"{expected}: the evaluation data plan lost or repeated samples")
    per_class = (matrix.diag().double() / matrix.sum(1).clamp(min=1).double()).tolist()
    result = {"loss": loss_sum / max(n, 1), "top1": float(matrix.diag().sum()) / max(n, 1),
              "top5": top5 / max(n, 1), "view_top1": view_hits / max(n, 1), "views_note": views_of(spec),
              "n_samples": n, "unreadable": int(unreadable), "per_class": dict(zip(classes, per_class)),
              "confusion": matrix.tolist(), "bad": bad}
    if keep_predictions:
        result["predictions"] = sorted(predictions, key=lambda p: p["key"])
    return result


def most_confused(confusion: list[list[int]], classes: list[str], k: int = 10) -> list[dict]:
    """The ``k`` largest off-diagonal cells: true class, predicted class, count, share of the true class."""
    cells = []
    for i, row in enumerate(confusion):
        total = sum(row)
        for j, count in enumerate(row):
            if i != j and count:
                cells.append({"true": classes[i], "predicted": classes[j], "count": int(count),
                              "fraction": count / total})
    return sorted(cells, key=lambda x: (-x["count"], x["true"], x["predicted"]))[:k]
