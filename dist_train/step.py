"""One optimizer step: its micro-batches (forward, loss, backward with DDP's gradient all-reduce on the last
one), gradient clipping, the optimizer and scheduler step, and the named sums it adds to the metrics.

``Sums`` are the metrics' one home: the training loop keeps one for the log window and one for the
epoch, adds every micro-batch to both, and reduces them over the ranks in one all-reduce when it
reports. The values stay on the device between reports, so a step never waits for the host.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, fields

import torch
import torch.distributed
from torch import nn

from dist_train import data
from dist_train.distributed import all_reduce


@dataclass
class Sums:
    """Sums over trained clips (and this rank's data wait); floats, or 0-d float64 tensors on the device."""

    loss: torch.Tensor | float = 0.0  # loss x clips
    top1: torch.Tensor | float = 0.0  # clips whose top class is right
    top5: torch.Tensor | float = 0.0  # clips whose label is among the top 5
    clips: torch.Tensor | float = 0.0
    bad: torch.Tensor | float = 0.0  # unreadable samples skipped
    wait: torch.Tensor | float = 0.0  # seconds spent waiting for the next batch

    def __iadd__(self, other: Sums) -> Sums:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def reduced(self, device: torch.device) -> Sums:
        """The sums over all ranks, as floats (one all-reduce)."""
        values = torch.stack([torch.as_tensor(getattr(self, f.name), dtype=torch.float64, device=device)
                              for f in fields(self)])
        return Sums(*all_reduce(values).tolist())

    def mean(self, name: str) -> float:
        """A per-clip mean (``loss``, ``top1``, ``top5``); a window of unreadable batches only counts as 1 clip."""
        return float(getattr(self, name)) / max(float(self.clips), 1.0)

    def epoch_record(self) -> list[float]:
        """What a checkpoint keeps of the epoch so far (loss, top-1, top-5, clips: already reduced)."""
        return [float(self.loss), float(self.top1), float(self.top5), float(self.clips)]

    @classmethod
    def from_epoch_record(cls, values: list[float]) -> Sums:
        loss, top1, top5, clips = values
        return cls(loss, top1, top5, clips)


def batch_sums(logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> Sums:
    """The sums of one micro-batch (tensors on its device: no host sync)."""
    k = min(5, logits.shape[1])
    n = labels.numel()
    return Sums(loss=loss.double() * n, top1=(logits.argmax(1) == labels).sum().double(),
                top5=logits.topk(k, 1).indices.eq(labels[:, None]).any(1).sum().double(),
                clips=torch.tensor(float(n), dtype=torch.float64, device=labels.device))


class Stepper:
    """Runs optimizer steps of one rank: what a step needs, built once by the trainer."""

    def __init__(self, *, model: nn.Module, forward, ddp, optimizer, scheduler, scaler, criterion,
                 spec: data.SampleSpec, layout: str, stats: tuple, device: torch.device, precision: str,
                 grad_clip: float, per_step_scheduler: bool):
        self.model, self.forward, self.ddp = model, forward, ddp
        self.optimizer, self.scheduler, self.scaler, self.criterion = optimizer, scheduler, scaler, criterion
        self.spec, self.layout, self.stats, self.device = spec, layout, stats, device
        self.precision, self.grad_clip, self.per_step_scheduler = precision, grad_clip, per_step_scheduler

    def autocast(self):
        """The autocast context of ``--precision`` (none for fp32)."""
        if self.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self, batches, accum: int, totals: tuple[Sums, ...]) -> tuple[list[str], list[dict]]:
        """Train on the next ``accum`` micro-batches and step the optimizer; each micro-batch's sums are added
        to every one of ``totals``. Returns the keys trained on and the bad-sample records."""
        keys, bad = [], []
        for micro in range(accum):
            sums = self._micro_batch(batches, accum, sync=self.ddp is None or micro == accum - 1, keys=keys, bad=bad)
            for total in totals:
                total += sums
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_scheduler:
            self.scheduler.step()
        return keys, bad

    def _micro_batch(self, batches, accum: int, sync: bool, keys: list, bad: list) -> Sums:
        t0 = time.perf_counter()
        batch = next(batches)
        waited = time.perf_counter() - t0
        clips = data.materialize(batch, self.spec, self.device)
        bad += clips.bad
        keys += clips.keys
        skipped = float(sum(b["count"] for b in clips.bad))
        with (nullcontext() if sync else self.ddp.no_sync()):
            if clips.label.numel() == 0:  # every sample unreadable (and skipped)
                self._zero_contribution(accum)
                return Sums(bad=skipped, wait=waited)
            x = data.to_model_input(clips.video, self.layout, self.stats)
            with self.autocast():
                logits = self.forward(x)
            loss = self.criterion(logits.float(), clips.label)
            self.scaler.scale(loss / accum).backward()
        sums = batch_sums(logits.detach(), clips.label, loss.detach())
        sums.bad, sums.wait = skipped, waited
        return sums

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does at the start of each forward.

        After an epoch's last step each rank still holds the statistics of its own last batches, so the
        end-of-epoch evaluation (each rank evaluates its own block of clips) would mix models, and differ
        from a run resumed at that step, where every rank loads rank 0's checkpoint.
        """
        if self.ddp is not None:
            for buffer in self.model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def _zero_contribution(self, accum: int) -> None:
        """A micro-batch whose samples were all unreadable: a backward pass that adds nothing to the gradient,
        so this rank still takes part in the DDP gradient all-reduce (the other ranks would wait for it).
        BatchNorm layers run in eval mode meanwhile, so their statistics see no made-up data (the rest stays
        in training mode: cuDNN's LSTM has no backward pass in eval mode)."""
        s = self.spec.transform.size
        video = torch.zeros((1, self.spec.frames, 3, s, s), dtype=torch.uint8, device=self.device)
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.eval()
        try:
            with self.autocast():
                logits = self.forward(data.to_model_input(video, self.layout, self.stats))
            self.scaler.scale(logits.float().sum() * 0.0 / accum).backward()
        finally:
            for m in norms:
                m.train()
