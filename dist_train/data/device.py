"""Batches on the training device: a loader batch copied out of its worker's buffer (which goes back
to the worker), or, with ``--decode gpu``, its JPEG frames decoded there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dist_train.data.batches import Batch, SampleSpec
from dist_train.data.clips import _plain, clip_batch, decode_jpegs, make_clip
from dist_train.data.reader import bad_record


class Clips(NamedTuple):
    """A batch on the training device: ``video`` uint8 ``[B, T, 3, S, S]`` (or ``[B, V, ...]``), labels,
    the keys of its samples and the bad-sample records that came with it."""

    video: torch.Tensor
    label: torch.Tensor
    keys: list[str]
    bad: list[dict]


def _decode_batch(flat: list[bytes], device: torch.device) -> list[torch.Tensor] | None:
    """All frames of a batch decoded in one call on ``device`` (CUDA), or None: off CUDA, or when one bad
    JPEG fails the batched call (the caller then makes the clips on the CPU, sample by sample)."""
    if device.type != "cuda":
        return None
    try:
        return decode_jpegs(flat, device)
    except RuntimeError:
        return None


def materialize(batch: Batch, spec: SampleSpec, device: torch.device) -> Clips:
    """The batch on ``device``; decodes here when decode=gpu (then a clip that fails is dropped).

    decode=gpu on CUDA: one batched decode, then ``clip_batch`` (one crop+resize call per frame size);
    a transform that overrides ``__call__`` (e.g. ``evaluation.SpatialViews``) runs per clip. When the
    batched decode fails (one bad JPEG fails it all), or off CUDA, clips are made on the CPU one by one.
    """
    bad, keys = list(batch.bad), list(batch.keys)
    if batch.video is not None:
        video, labels = batch.video, batch.label
        if batch.lease is None:  # pinned already, or a private buffer
            return Clips(video.to(device, non_blocking=True), labels.to(device, non_blocking=True), keys, bad)
        # A worker's lent buffer: copy out (synchronously), then hand it back for the next batch.
        if device.type == "cpu":
            video, labels = video.clone(), labels.clone()
        else:
            video, labels = video.to(device), labels.to(device)
        batch.release()
        return Clips(video, labels, keys, bad)
    if batch.jpegs is None:
        return Clips(torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device), [], bad)
    return _materialize_jpegs(batch, spec, device, keys, bad)


def _materialize_jpegs(batch: Batch, spec: SampleSpec, device: torch.device, keys: list[str], bad: list[dict]) -> Clips:
    seeds = [s if spec.transform.train else None for s in batch.seeds.tolist()]
    decoded = _decode_batch([f for frames in batch.jpegs for f in frames], device)
    t = spec.frames
    clips: dict[int, torch.Tensor] = {}
    if decoded is not None:
        groups = {}
        for j in range(len(batch.jpegs)):
            frames = decoded[j * t:(j + 1) * t]
            if all(f.shape == frames[0].shape for f in frames):
                groups[j] = frames
            else:
                bad.append(bad_record(spec.on_bad, "?", keys[j],
                                      "decode in the training process: frames of different sizes"))
        if groups and _plain(spec.transform):
            idx = list(groups)
            video = clip_batch(spec.transform, [groups[j] for j in idx], [seeds[j] for j in idx])
            if len(idx) == len(batch.jpegs):
                return Clips(video, batch.label.to(device), keys, bad)
            clips = dict(zip(idx, video))
        else:
            clips = {j: spec.transform(torch.stack(frames), seeds[j]) for j, frames in groups.items()}
    else:
        for j, frames in enumerate(batch.jpegs):
            try:
                clips[j] = make_clip(frames, spec.transform, seeds[j]).to(device)
            except Exception as e:
                bad.append(bad_record(spec.on_bad, "?", keys[j], f"decode failed in the training process: {e}"))
    keep = sorted(clips)
    labels = batch.label[keep].to(device)
    video = torch.stack([clips[j] for j in keep]) if keep else torch.empty(0, device=device)
    return Clips(video, labels, [keys[j] for j in keep], bad)
