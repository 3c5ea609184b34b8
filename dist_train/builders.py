"""What a training run is built from, each piece constructible on its own: the model (restored from a
checkpoint or fresh), its DDP wrapper, the optimizer, the LR schedule, the data plan, the sample specs and
the step runner.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train import checkpoint as ckpt_io
from dist_train import data, evaluation
from dist_train.config import TrainConfig
from dist_train.distributed import DistInfo, all_gather_object
from dist_train.faults import ConfigError
from dist_train.models import build_model, input_layout, trunk_parameters
from dist_train.step import Stepper

log = logging.getLogger("dist_train")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA GPUs with bf16, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def make_model(cfg: TrainConfig, classes: list[str], ckpt: dict | None = None, source: Path | None = None) -> nn.Module:
    """The model of ``cfg``: a checkpoint's weights (after checking they fit), else ``--pretrained`` or random."""
    model = build_model(cfg.model, len(classes), pretrained=None if ckpt else cfg.pretrained, rnn=cfg.rnn,
                        hidden=cfg.hidden_size, layers=cfg.rnn_layers, bidirectional=cfg.bidirectional,
                        dropout=cfg.dropout, head=cfg.head, freeze_trunk=cfg.freeze_trunk)
    if ckpt:
        ckpt_io.check_compatible(ckpt, cfg.to_dict(), classes, model, str(source))
        model.load_state_dict(ckpt["model"])
    return model


def place_model(model: nn.Module, cfg: TrainConfig, info: DistInfo):
    """Move the model to this rank's device (channels-last if asked); returns ``(model, ddp or None, forward)``."""
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last if input_layout(cfg.model) == "BTCHW" else torch.channels_last_3d)
    model = model.to(info.device)
    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
        if info.world_size > 1 else None
    forward = ddp or model
    return model, ddp, torch.compile(forward) if cfg.compile else forward


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD; the trunk at ``lr * trunk_lr_scale``; no weight decay on biases and norms."""
    trunk = {id(p) for p in trunk_parameters(model)}
    groups: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            scale = cfg.trunk_lr_scale if id(p) in trunk else 1.0
            groups.setdefault((scale, p.ndim > 1), []).append(p)
    params = [{"params": ps, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if decay else 0.0}
              for (scale, decay), ps in sorted(groups.items())]
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, **fused)
    return torch.optim.AdamW(params, lr=cfg.lr, **fused)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """Per-step warmup + cosine / constant (LambdaLR), or per-epoch ReduceLROnPlateau."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.plateau_factor,
                                                          patience=cfg.plateau_patience)
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_plan(cfg: TrainConfig, manifest, info: DistInfo, global_batch: int | None, fixed: bool) -> data.DataPlan:
    """The data plan (``fixed``: a resume keeps ``global_batch``); ``--verify-shards`` first finds the bad
    shards, each rank checking its share on its own node's copy."""
    try:
        layout = data.resolve_layout(info.world_size, cfg.batch_size, cfg.accum_steps, global_batch, fixed=fixed)
    except ValueError as e:  # a global batch that does not split over these processes: the flags' doing
        raise ConfigError(str(e)) from e
    bad_shards = {}
    if cfg.verify_shards:
        found = all_gather_object(data.verify_shards(manifest, part=(info.rank, info.world_size)))
        bad_shards = {name: reason for part in found for name, reason in part.items()}
        for name, reason in sorted(bad_shards.items()):
            data.bad_record(cfg.on_bad_sample, name, None, reason)  # raises under --on-bad-sample error
            if info.is_main:
                log.info(f"--verify-shards: skipping shard {name}: {reason}")
    note = data.cache_note(manifest, cfg.shuffle_window)
    if note and info.is_main:
        log.warning(note)
    try:
        return data.make_plan(manifest, layout, data.resolve_workers(cfg.workers), cfg.seed, cfg.val_fraction,
                              cfg.shuffle_window, bad_shards)
    except ValueError as e:  # a step needs more clips than the split has: --batch-size, --val-fraction, ...
        raise ConfigError(str(e)) from e


def sample_specs(cfg: TrainConfig, n_frames: int, n_classes: int,
                 temporal_views: int = 1) -> tuple[data.SampleSpec, data.SampleSpec]:
    """How training samples (random crop and flip, a random frame of each segment) and evaluation samples
    (centre crop, every temporal view) become clips; ``n_frames`` and ``temporal_views`` are the manifest's."""
    train = data.SampleSpec(n_frames, n_classes, data.ClipTransform(cfg.img_size, True, cfg.crop_scale, cfg.hflip,
                                                                    crop=cfg.train_crop), cfg.on_bad_sample, cfg.decode,
                            temporal_views, "jitter" if cfg.temporal_jitter else "centre")
    return train, evaluation.eval_spec(n_frames, n_classes, cfg.img_size, cfg.train_crop, cfg.on_bad_sample,
                                       cfg.decode, temporal_views=temporal_views)


def make_stepper(cfg: TrainConfig, info: DistInfo, model: nn.Module, steps_per_epoch: int,
                 spec: data.SampleSpec) -> Stepper:
    """The step runner: the model placed (``place_model``), its optimizer, LR schedule, grad scaler and loss."""
    model, ddp, forward = place_model(model, cfg, info)
    optimizer = build_optimizer(cfg, model)
    return Stepper(model=model, forward=forward, ddp=ddp, optimizer=optimizer,
                   scheduler=build_scheduler(cfg, optimizer, steps_per_epoch),
                   scaler=torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16"),
                   criterion=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), spec=spec,
                   layout=input_layout(cfg.model), stats=data.normalization(cfg.model), device=info.device,
                   precision=cfg.precision, grad_clip=cfg.grad_clip, per_step_scheduler=cfg.scheduler != "plateau")
