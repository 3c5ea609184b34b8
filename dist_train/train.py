"""The training loop: set-up, epochs of DDP steps, evaluation, checkpoints and the final results.

Read top to bottom: ``run`` wraps ``Trainer`` in the process group; ``Trainer.__init__`` builds the
data plan, model, optimizer and restores a checkpoint; ``fit`` runs the epochs; ``train_epoch`` holds
the step; ``evaluate`` counts every sample of a split once over all ranks.

Model selection: ``best.pt`` is the model with the highest *validation* top-1, validation being
``--val-fraction`` of the training clips held out (``dist_train.data.hold_out``; listed in
``OUT/validation.json``). The test split is never used to choose anything. With ``--val-fraction 0``
there is no validation set and ``best.pt`` is the final model (``results.json`` says
``"selected_on": "final"``).

Resume: ``--resume auto`` continues from the newest loadable checkpoint in ``--out``; a resumed run
continues at the saved step (mid-epoch included: the data order of ``dist_train.data.plan`` goes on
from the same global position, at any number of processes that divides the global batch, which a
resume keeps) with the same optimizer, scheduler, scaler, metrics history and W&B run id (and the
same RNG states when the number of processes is the same).
Rank 0 picks the file and every rank reads it, so with several nodes ``--out`` must be on a shared
file system. ``--resume PATH`` from another run folder links that folder's best.pt into ``--out``
(``checkpoint.adopt_best``). Stops, exit statuses and test hooks: see ``dist_train.faults``.

``results.json`` (written at the end): test ``top1``, ``top5``, ``loss``, ``per_class``, ``confusion``,
``n_samples``, ``unreadable`` of best.pt, plus ``epochs``, ``steps`` (global optimizer steps),
``world_size``, ``global_batch``, ``micro_batch``, ``accum_steps``, ``n_train``, ``n_val``, ``selected_on``,
``best_epoch``, ``steps_per_rank`` (optimizer steps each rank ran in this process, i.e. since its last
resume) and ``replica_max_abs_diff`` (largest parameter difference between DDP replicas at the end;
0.0 expected).

``--trace-samples`` writes ``OUT/samples.jsonl``: one line per rank per optimizer step,
``{"epoch", "step", "rank", "keys"}`` (the keys that rank trained on in that step, accumulation
micro-batches included); a resumed run first drops the lines of steps after its checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train import checkpoint as ckpt_io
from dist_train import data, evaluation
from dist_train.config import TrainConfig
from dist_train.distributed import (
    DistInfo,
    all_gather_object,
    all_reduce,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    max_replica_difference,
    seed_everything,
)
from dist_train.faults import EXIT_OK, EXIT_STOPPED, ConfigError, StopRequest, after_step_hooks, write_status
from dist_train.metrics import CONFIG_FILE, METRICS_FILE, RESULTS_FILE, make_logger, resolve_wandb_mode
from dist_train.models import build_model, input_layout, trunk_parameters, unwrap
from preprocess.shard_format import load_manifest, write_bytes_atomic, write_json_atomic

SAMPLES_FILE = "samples.jsonl"
VALIDATION_FILE = "validation.json"


@dataclass
class TrainState:
    """Where the run is; saved in every checkpoint."""

    epoch: int = 0  # the epoch being trained (== epochs when training is done)
    step: int = 0  # optimizer steps done in total
    step_in_epoch: int = 0  # optimizer steps done in ``epoch``
    best_top1: float = -1.0
    best_loss: float = float("inf")  # validation loss of the best epoch: breaks top-1 ties
    best_epoch: int = -1
    skipped: int = 0  # bad training samples skipped so far (all ranks)
    history: list = field(default_factory=list)  # one dict of metrics per finished epoch
    epoch_sums: list = field(default_factory=lambda: [0.0] * 4)  # loss*n, top1, top5, n of the epoch so far


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA GPUs with bf16, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


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


class Trainer:
    """One training run on this process (rank)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.info, self.out = info, Path(cfg.out)
        try:
            manifest = load_manifest(cfg.shards)
            self.classes = manifest.classes
            # How the frames were packed: predict.py prepares raw videos exactly the same way.
            self.packing = {"frames": manifest.n_frames,
                            **{k: manifest.args.get(k) for k in ("short_side", "quality", "min_frames")}}
            cfg = replace(cfg, precision=resolve_precision(cfg.precision, info.device),
                          wandb=resolve_wandb_mode(cfg.wandb))
            self.cfg = cfg
            resume_from = self._resume_path()
            ckpt = ckpt_io.load_checkpoint(resume_from) if resume_from else None
            seed_everything(cfg.seed, info.rank)
            model = build_model(cfg.model, len(self.classes), pretrained=None if ckpt else cfg.pretrained,
                                rnn=cfg.rnn, hidden=cfg.hidden_size, layers=cfg.rnn_layers,
                                bidirectional=cfg.bidirectional, dropout=cfg.dropout, head=cfg.head,
                                freeze_trunk=cfg.freeze_trunk)
            if ckpt:
                ckpt_io.check_compatible(ckpt, cfg.to_dict(), self.classes, model, str(resume_from))
                model.load_state_dict(ckpt["model"])
            self.plan = self._plan(manifest, ckpt)  # after the model: a checkpoint that does not fit says so first
            cfg = self.cfg
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from e
        self.layout = input_layout(cfg.model)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last if self.layout == "BTCHW" else torch.channels_last_3d)
        self.model = model.to(info.device)
        self.ddp = DDP(self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None) \
            if info.world_size > 1 else None
        forward = self.ddp or self.model
        self.forward = torch.compile(forward) if cfg.compile else forward
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plan.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=cfg.precision == "fp16")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.stats = data.normalization(cfg.model)
        n_frames = manifest.n_frames
        self.train_spec = data.SampleSpec(n_frames, len(self.classes), data.ClipTransform(
            cfg.img_size, True, cfg.crop_scale, cfg.hflip, crop=cfg.train_crop), cfg.on_bad_sample, cfg.decode)
        self.eval_spec = evaluation.eval_spec(n_frames, len(self.classes), cfg.img_size, cfg.train_crop,
                                              cfg.on_bad_sample, cfg.decode)
        self.state = TrainState()
        self.epoch_sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss*n, top1, top5, n (local)
        self.steps_run = 0
        self.last_save = time.monotonic()
        run_id = None
        if ckpt:
            run_id = ckpt.get("wandb_run_id")
            self._restore(ckpt, resume_from)
        self.log = make_logger(info.is_main, self.out, {**cfg.to_dict(), "classes": self.classes,
                                                        "world_size": info.world_size}, cfg.wandb, run_id,
                               progress=cfg.progress, project=cfg.wandb_project, entity=cfg.wandb_entity,
                               run_name=cfg.run_name, init_timeout=cfg.wandb_init_timeout)
        if info.is_main:
            write_json_atomic(self.out / CONFIG_FILE, cfg.to_dict())
            write_status(self.out, "running", epoch=self.state.epoch, step=self.state.step)
            self._write_validation(manifest)
            if cfg.trace_samples:
                self._trim_trace()
            plan, lay = self.plan, self.plan.layout
            where = f"resumed from {resume_from} at epoch {self.state.epoch + 1} step {self.state.step}" \
                if ckpt else "fresh start"
            self.log.info(
                f"{where}; {info.world_size} process(es) on {info.device.type} ({info.backend or 'no process group'}), "
                f"{plan.n_train} train / {len(plan.val_ids)} val / {len(plan.test)} test clips, "
                f"{plan.steps_per_epoch} steps per epoch of {lay.global_batch} clips ({lay.world_size} x "
                f"{lay.micro_batch} x {lay.accum_steps} accumulation), {plan.workers} loader worker(s) per process, "
                f"precision {cfg.precision}")
            for note in (data.validation_note(plan, cfg.val_fraction, len(self.classes)), self._layout_note()):
                if note:
                    self.log.info(f"warning: {note}")

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self) -> Path | None:
        """Rank 0 picks the checkpoint (or refuses); every rank gets the same answer."""
        cfg, answer = self.cfg, None
        if self.info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt_io.clean_tmp(self.out)
            existing = ckpt_io.checkpoint_candidates(self.out)
            if cfg.resume == "auto":
                try:
                    path, problems = ckpt_io.find_resume(self.out)
                except ckpt_io.CheckpointVersionError as e:  # every rank must hear of it, or they would wait
                    path, problems, answer = None, [], ("error", str(e))
                for p in problems:
                    print(f"[dist_train] passing over unloadable checkpoint {p}", flush=True)
                answer = answer or ("ok", str(path) if path else None)
            elif cfg.resume == "never":
                if existing and not cfg.overwrite:
                    answer = ("error", f"{self.out} already holds checkpoints ({existing[0].name}, ...): pass "
                                       "--resume auto to continue that run, or --overwrite to start over")
                else:
                    shutil.rmtree(self.out / ckpt_io.STEP_DIR, ignore_errors=True)
                    for name in (ckpt_io.LAST, ckpt_io.BEST, METRICS_FILE, RESULTS_FILE, SAMPLES_FILE):
                        (self.out / name).unlink(missing_ok=True)
                    answer = ("ok", None)
            else:
                answer = ("ok", cfg.resume) if Path(cfg.resume).is_file() else \
                    ("error", f"--resume {cfg.resume}: no such checkpoint file (use auto, never or a path)")
        kind, value = broadcast_object(answer)
        if kind == "error":
            raise ValueError(value)
        return Path(value) if value else None

    def _plan(self, manifest, ckpt: dict | None) -> data.DataPlan:
        """The data plan: the layout keeps the checkpoint's global batch, ``--verify-shards`` finds bad shards."""
        cfg, info = self.cfg, self.info
        global_batch = cfg.global_batch
        self.data_digest = data.data_digest(manifest)
        if ckpt is not None:
            theirs = ckpt["config"]["global_batch"]
            if global_batch is not None and global_batch != theirs:
                raise ValueError(f"the checkpoint was trained with --global-batch {theirs}, this run asks for "
                                 f"{global_batch}: pass --global-batch {theirs} to continue it (the same samples in "
                                 "the same order), or start a new run in another --out")
            global_batch = theirs
            # The order, the validation set and the position in them depend on these: a resume keeps them.
            changed = [f"--{k.replace('_', '-')} {ckpt['config'][k]} (this run: {getattr(cfg, k)})"
                       for k in ("seed", "val_fraction", "shuffle_window") if ckpt["config"][k] != getattr(cfg, k)]
            if changed:
                raise ValueError(f"the checkpoint was trained with {', '.join(changed)}: pass the same values to "
                                 "continue it (its data order and validation set depend on them), or start a new "
                                 "run in another --out")
            if ckpt["data"].get("digest") != self.data_digest:
                raise ValueError(f"{cfg.shards} is not the shard set the checkpoint was trained on (its manifest's "
                                 "training shards differ: re-packed?): resume on those shards, or start a new run "
                                 "in another --out")
        layout = data.resolve_layout(info.world_size, cfg.batch_size, cfg.accum_steps, global_batch,
                                     fixed=ckpt is not None)
        workers = data.resolve_workers(cfg.workers)
        bad_shards = {}
        if cfg.verify_shards:  # every rank checks its share of the shards, on its own node's copy
            found = all_gather_object(data.verify_shards(manifest, part=(info.rank, info.world_size)))
            bad_shards = {name: reason for part in found for name, reason in part.items()}
            for name, reason in sorted(bad_shards.items()):
                data.bad_record(cfg.on_bad_sample, name, None, reason)  # raises under --on-bad-sample error
                if info.is_main:
                    print(f"[dist_train] --verify-shards: skipping shard {name}: {reason}", flush=True)
        self.cfg = replace(cfg, global_batch=layout.global_batch)
        return data.make_plan(manifest, layout, workers, cfg.seed, cfg.val_fraction, cfg.shuffle_window, bad_shards)

    def _layout_note(self) -> str | None:
        """A warning when the global batch overrides --accum-steps or forces micro-batches below --batch-size."""
        lay, cfg = self.plan.layout, self.cfg
        if lay.micro_batch * lay.accum_steps * lay.world_size == cfg.batch_size * cfg.accum_steps * lay.world_size:
            return None
        share = lay.global_batch // lay.world_size
        note = (f"the global batch {lay.global_batch} over {lay.world_size} process(es) runs as micro-batches of "
                f"{lay.micro_batch} x {lay.accum_steps} accumulation steps per process (--batch-size "
                f"{cfg.batch_size} and --accum-steps {cfg.accum_steps} give way to it)")
        if lay.micro_batch < cfg.batch_size and share > lay.micro_batch:
            note += (f"; {lay.micro_batch} is the largest divisor of {share} up to --batch-size: a global batch that "
                     f"is a multiple of {lay.world_size * cfg.batch_size} keeps micro-batches of {cfg.batch_size}")
        return note

    def _write_validation(self, manifest) -> None:
        """``OUT/validation.json``: which training clips validate, and how they were chosen (rank 0)."""
        plan = self.plan
        keys = [plan.train.keys[i] for i in plan.val_ids]
        counts = {c: 0 for c in self.classes}
        for i in plan.val_ids:
            counts[self.classes[plan.train.labels[i]]] += 1
        by = "source film" if manifest.args.get("split") in ("group", "official") else "class"
        write_json_atomic(self.out / VALIDATION_FILE, {
            "fraction": self.cfg.val_fraction, "held_out_by": by, "seed": self.cfg.seed, "count": len(keys),
            "of": len(plan.train), "per_class": counts, "keys": keys})

    def _restore(self, ckpt: dict, source: Path) -> None:
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as e:
            raise ConfigError(f"the checkpoint's optimizer state does not fit ({e}): did --optimizer, "
                              "--freeze-trunk or --trunk-lr-scale change?") from e
        if ckpt["config"].get("scheduler") == self.cfg.scheduler and ckpt.get("scheduler"):
            self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        known = {f for f in TrainState.__dataclass_fields__}
        self.state = TrainState(**{k: v for k, v in ckpt["state"].items() if k in known})
        if self.state.best_epoch >= 0 and not broadcast_object(
                ckpt_io.adopt_best(source, ckpt, self.out) if self.info.is_main else None):
            if self.info.is_main:
                print(f"[dist_train] no best.pt for the checkpoint's best epoch {self.state.best_epoch} next to {source} "
                      f"or in {self.out}: best.pt will be selected from the epochs still to train", flush=True)
            self.state.best_top1, self.state.best_loss, self.state.best_epoch = -1.0, float("inf"), -1
        if self.info.rank == 0:  # rank 0 carries the epoch's all-reduced sums so far
            self.epoch_sums = torch.tensor(self.state.epoch_sums, dtype=torch.float64, device=self.info.device)
        if ckpt["world_size"] == self.info.world_size:
            ckpt_io.set_rng_state(ckpt["rng"][self.info.rank])
        elif self.info.is_main:
            print(f"[dist_train] resuming with {self.info.world_size} process(es), the checkpoint had "
                  f"{ckpt['world_size']}: the data order goes on from the same position (global batch "
                  f"{self.plan.global_batch}); per-process random streams (dropout) start again from the seed",
                  flush=True)
        self.state.step_in_epoch = min(self.state.step_in_epoch, self.plan.steps_per_epoch)

    # ------------------------------------------------------------------ the sample trace
    def _trim_trace(self) -> None:
        """Keep only the ``samples.jsonl`` lines of steps this run's checkpoint holds (rank 0)."""
        path = self.out / SAMPLES_FILE
        if not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= self.state.step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):  # a line cut short by a kill: its step was not saved
                continue
        write_bytes_atomic(path, "".join(kept).encode("utf-8"))

    def _trace(self, keys: list[str]) -> None:
        """Append this step's keys of every rank to ``samples.jsonl`` (all ranks call it)."""
        per_rank = all_gather_object(keys)
        if self.info.is_main:
            lines = "".join(json.dumps({"epoch": self.state.epoch, "step": self.state.step, "rank": rank, "keys": ks})
                            + "\n" for rank, ks in enumerate(per_rank))
            fd = os.open(self.out / SAMPLES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, lines.encode("utf-8"))  # one write a step: a kill leaves at most one torn line
            finally:
                os.close(fd)

    def save(self, best: bool = False, stopped_by: str | None = None) -> None:
        """All ranks: gather RNG and data positions; rank 0 writes last.pt (and best.pt) and status; then barrier."""
        per_rank = all_gather_object(ckpt_io.rng_state())
        sums = all_reduce(self.epoch_sums.clone())
        if self.info.is_main:
            state = {
                "format_version": ckpt_io.FORMAT_VERSION,
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "epoch": self.state.epoch, "step": self.state.step, "step_in_epoch": self.state.step_in_epoch,
                "state": {**asdict(self.state), "epoch_sums": sums.tolist()},
                "data": {"epoch": self.state.epoch, "global_batch": self.plan.global_batch, "digest": self.data_digest,
                         "samples_consumed": self.state.step_in_epoch * self.plan.global_batch},
                "rng": per_rank,
                "config": self.cfg.to_dict(), "classes": list(self.classes), "packing": self.packing,
                "world_size": self.info.world_size,
                "wandb_run_id": self.log.run_id, "time": time.time(),
            }
            path = ckpt_io.save_last(state, self.out, self.cfg.keep_last)
            if best:
                ckpt_io.save_best(state, self.out)
            info = dict(epoch=self.state.epoch, step=self.state.step, checkpoint=str(path))
            if stopped_by:
                write_status(self.out, "stopped", exit_code=EXIT_STOPPED, signal=stopped_by, **info)
            else:
                write_status(self.out, "running", **info)
        self.last_save = time.monotonic()
        barrier(self.info)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop: StopRequest) -> int:
        """Train the remaining epochs, then evaluate best.pt on the test split; returns the exit status."""
        while self.state.epoch < self.cfg.epochs:
            if not self.train_epoch(stop):
                return self._stopped(stop)
            self.end_epoch()
            if self._agree(stop.requested):
                return self._stopped(stop)
        self.finish()
        return EXIT_OK

    def _agree(self, flag: bool) -> bool:
        return bool(all_reduce(torch.tensor([float(flag)], device=self.info.device), "max").item())

    def _stopped(self, stop: StopRequest) -> int:
        self.save(stopped_by=stop.signal or "another rank")
        if self.info.is_main:
            self.log.info(f"stopped by {stop.signal or 'another rank'} at step {self.state.step}: checkpoint saved, "
                          f"exit status {EXIT_STOPPED}; run the same command again to resume")
        return EXIT_STOPPED

    def _autocast(self):
        if self.cfg.precision == "fp32":
            return nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16" else torch.float16
        return torch.autocast(self.info.device.type, dtype=dtype)

    def train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of ``state.epoch``; False when a stop was agreed (state saved by the caller)."""
        cfg, plan, dev, st = self.cfg, self.plan, self.info.device, self.state
        accum, spe = plan.layout.accum_steps, plan.steps_per_epoch
        loader = data.train_loader(plan, self.train_spec, self.info.rank, st.epoch, start_step=st.step_in_epoch,
                                   pin=dev.type == "cuda")
        batches = iter(loader)
        window = torch.zeros(6, dtype=torch.float64, device=dev)  # loss*n, top1, top5, n, wait s, bad count
        bad: list[dict] = []
        bar = self.log.progress(spe, st.step_in_epoch, f"epoch {st.epoch + 1}/{cfg.epochs}")
        self.model.train()
        t_window = time.perf_counter()
        for _ in range(st.step_in_epoch, spe):
            keys: list[str] = []
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(batches)
                window[4] += time.perf_counter() - t0
                clips = data.materialize(batch, self.train_spec, dev)
                bad += clips.bad
                window[5] += sum(b["count"] for b in clips.bad)
                keys += clips.keys
                sync = self.ddp is None or micro == accum - 1
                with (nullcontext() if sync else self.ddp.no_sync()):
                    if clips.label.numel() == 0:  # every sample unreadable (and skipped)
                        self._zero_contribution(accum)
                        continue
                    x = data.to_model_input(clips.video, self.layout, self.stats)
                    with self._autocast():
                        logits = self.forward(x)
                    loss = self.criterion(logits.float(), clips.label)
                    self.scaler.scale(loss / accum).backward()
                stats = self._batch_stats(logits.detach(), clips.label, loss.detach())
                window[:4] += stats
                self.epoch_sums += stats
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.scheduler != "plateau":
                self.scheduler.step()
            st.step += 1
            st.step_in_epoch += 1
            self.steps_run += 1
            if cfg.trace_samples:
                self._trace(keys)
            bar.update(1)
            after_step_hooks(st.step, self.info.rank, stop)
            due = self.info.is_main and (
                (cfg.ckpt_every_steps and st.step % cfg.ckpt_every_steps == 0)
                or (cfg.ckpt_every_minutes and time.monotonic() - self.last_save >= 60 * cfg.ckpt_every_minutes))
            flags = all_reduce(torch.tensor([float(stop.requested), float(bool(due))], device=dev), "max")
            if st.step % cfg.log_every == 0 or st.step_in_epoch == spe or flags[0]:
                self._log_window(window, bad, time.perf_counter() - t_window, bar)
                window.zero_()
                bad.clear()
                t_window = time.perf_counter()
            if flags[0]:
                self.log.end_progress()
                return False
            if flags[1] and st.step_in_epoch < spe:
                self.save()
        self.log.end_progress()
        self._sync_buffers()
        return True

    def _zero_contribution(self, accum: int) -> None:
        """A micro-batch whose samples were all unreadable: a backward pass that adds nothing to the gradient,
        so this rank still takes part in the DDP gradient all-reduce (the other ranks would wait for it).
        BatchNorm layers run in eval mode meanwhile, so their statistics see no made-up data (the rest stays
        in training mode: cuDNN's LSTM has no backward pass in eval mode)."""
        spec = self.train_spec
        s = spec.transform.size
        video = torch.zeros((1, spec.n_frames, 3, s, s), dtype=torch.uint8, device=self.info.device)
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.eval()
        try:
            with self._autocast():
                logits = self.forward(data.to_model_input(video, self.layout, self.stats))
            self.scaler.scale(logits.float().sum() * 0.0 / accum).backward()
        finally:
            for m in norms:
                m.train()

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP does at the start of each forward.

        After an epoch's last step each rank still holds the statistics of its own last batches, so the
        end-of-epoch evaluation (each rank evaluates its own block of clips) would mix models, and differ
        from a run resumed at that step, where every rank loads rank 0's checkpoint.
        """
        if self.ddp is not None:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    def _batch_stats(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        k = min(5, logits.shape[1])
        top1 = (logits.argmax(1) == labels).sum()
        top5 = logits.topk(k, 1).indices.eq(labels[:, None]).any(1).sum()
        n = labels.numel()
        return torch.stack([loss.double() * n, top1.double(), top5.double(), torch.tensor(float(n), device=labels.device,
                                                                                            dtype=torch.float64)])

    def _log_window(self, window: torch.Tensor, bad: list[dict], seconds: float, bar) -> None:
        """All-reduce the window's sums, then log loss, accuracy, lr, clips/s, data wait, skips."""
        local_wait = float(window[4]) / max(seconds, 1e-9)
        totals = all_reduce(torch.cat([window[[0, 1, 2, 3, 5]], window.new_tensor([local_wait, seconds])]))
        loss_sum, top1, top5, n, n_bad, wait_frac, secs = totals.tolist()
        world = self.info.world_size
        per_shard: dict[str, int] = {}
        if n_bad:
            records = [r for rank_records in all_gather_object(bad) for r in rank_records]
            self.state.skipped += int(n_bad)
            for r in records[:20]:
                self.log.info(f"skipped bad data: shard {r['shard']} sample {r['key']}: {r['reason']}")
            for r in records:  # by shard name in metrics.jsonl and W&B, so a damaged file can be found
                per_shard[r["shard"]] = per_shard.get(r["shard"], 0) + r.get("count", 1)
        per = max(n, 1.0)  # a window of unreadable micro-batches only trained on nothing
        metrics = {
            "train/loss": loss_sum / per, "train/top1": top1 / per, "train/top5": top5 / per,
            "lr": max(g["lr"] for g in self.optimizer.param_groups), "epoch": self.state.epoch + 1,
            "perf/clips_per_s": n / (secs / world), "perf/data_wait_frac": wait_frac / world,
            "data/skipped_total": self.state.skipped,
            **{f"data/skipped/{shard}": count for shard, count in per_shard.items()},
        }
        if self.info.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
        self.log.log(metrics, self.state.step)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", clips_s=f"{metrics['perf/clips_per_s']:.1f}")

    def end_epoch(self) -> None:
        """Evaluate, step the plateau scheduler, record history, save last.pt (and best.pt)."""
        cfg, st = self.cfg, self.state
        epoch = st.epoch + 1
        loss_sum, top1, top5, n = all_reduce(self.epoch_sums.clone()).tolist()
        if n == 0:
            raise data.BadDataError(f"no training sample of epoch {epoch} could be read (all {self.plan.n_train} "
                                    "skipped as bad data; see the log): check the shards, e.g. with --verify-shards")
        record = {"epoch": epoch, "step": st.step, "lr": max(g["lr"] for g in self.optimizer.param_groups),
                  "train/loss": loss_sum / n, "train/top1": top1 / n, "train/top5": top5 / n}
        results = {}
        if len(self.plan.val_ids):
            results["val"] = self.evaluate("val")
        if cfg.test_every and (epoch % cfg.test_every == 0 or epoch == cfg.epochs):
            results["test"] = self.evaluate("test")
        if cfg.scheduler == "plateau":
            self.scheduler.step(results["val"]["loss"] if "val" in results else record["train/loss"])
        for split, r in results.items():
            record.update({f"{split}/{k}": r[k] for k in ("loss", "top1", "top5")})
        val = results.get("val")
        # Top-1 saturates early on small validation sets; among equal top-1, keep the lower loss.
        improved = val is not None and (val["top1"], -val["loss"]) > (st.best_top1, -st.best_loss)
        if improved:
            st.best_top1, st.best_loss, st.best_epoch = val["top1"], val["loss"], epoch
        improved |= not len(self.plan.val_ids) and epoch == cfg.epochs  # no validation data: keep the final model
        st.history.append(record)
        self.log.log({f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, st.step)
        self.log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        st.epoch, st.step_in_epoch = epoch, 0
        self.epoch_sums.zero_()
        self.save(best=improved)
        plots = self.log.plot(st.history, {s: r["confusion"] for s, r in results.items()}, self.classes)
        for key, path in plots.items():
            self.log.log_image(f"plots/{key}", path, st.step)

    def evaluate(self, split: str) -> dict:
        """Loss, top-1/5, per-class accuracy and confusion matrix of ``split``, each sample once over all ranks."""
        samples, ids = self.plan.eval_set(split)
        result = evaluation.evaluate_samples(
            self.model, samples, ids, self.eval_spec, classes=self.classes, layout=self.layout, stats=self.stats,
            device=self.info.device, rank=self.info.rank, world_size=self.info.world_size,
            batch_size=self.cfg.batch_size, workers=self.plan.workers, autocast=self._autocast(),
            split=split, bad_shards=self.plan.bad_shards)
        for r in result.pop("bad")[:20]:
            self.log.info(f"{split}: unreadable data: shard {r['shard']} sample {r['key']}: {r['reason']}")
        scalars = {f"{split}/{k}": result[k] for k in ("loss", "top1", "top5", "n_samples", "unreadable")}
        scalars.update({f"{split}/class_acc/{name}": acc for name, acc in result["per_class"].items()})
        self.log.log(scalars, self.state.step)
        return result

    def finish(self) -> None:
        """Check replicas, evaluate best.pt on the test split, write results.json."""
        cfg = self.cfg
        replica_diff = max_replica_difference(self.model)
        steps_per_rank = all_gather_object(self.steps_run)
        best_path = self.out / ckpt_io.BEST
        selected_on = "val" if len(self.plan.val_ids) else "final"
        best = ckpt_io.load_checkpoint(best_path)
        self.model.load_state_dict(best["model"])
        test = self.evaluate("test")
        results = {
            "top1": test["top1"], "top5": test["top5"], "loss": test["loss"], "per_class": test["per_class"],
            "n_samples": test["n_samples"], "unreadable": test["unreadable"], "confusion": test["confusion"],
            "classes": self.classes, "epochs": cfg.epochs, "steps": self.state.step, "world_size": self.info.world_size,
            "global_batch": self.plan.global_batch, "micro_batch": self.plan.layout.micro_batch,
            "accum_steps": self.plan.layout.accum_steps, "n_train": self.plan.n_train,
            "n_val": len(self.plan.val_ids), "workers": self.plan.workers, "selected_on": selected_on,
            "best_epoch": best["state"]["best_epoch"] if selected_on == "val" else cfg.epochs,
            "best_val_top1": best["state"]["best_top1"] if selected_on == "val" else None,
            "checkpoint": str(best_path), "steps_per_rank": steps_per_rank, "replica_max_abs_diff": replica_diff,
            "skipped_train_samples": self.state.skipped,
        }
        self.log.log({f"final/test_{k}": test[k] for k in ("top1", "top5", "loss")}, self.state.step)
        self.log.plot(self.state.history, {"test": test["confusion"]}, self.classes)
        self.log.results(results)
        if self.info.is_main:
            write_status(self.out, "completed", exit_code=EXIT_OK, epoch=self.state.epoch, step=self.state.step)
            self.log.info(f"done: test top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} on {test['n_samples']} clips "
                          f"(best.pt selected on {selected_on}); results in {self.out / 'results.json'}")

    def close(self, exit_code: int) -> None:
        """Finish logging."""
        self.log.close(exit_code)


def run(cfg: TrainConfig) -> int:
    """Train in this process (under torchrun or alone); returns the exit status. Tears the process group down."""
    info = init_distributed(cfg.dist_timeout)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes
        torch.set_float32_matmul_precision("high")
    trainer, code = None, 1
    # Installed for the rest of the process's life, teardown included: when one rank exits, torchrun
    # SIGTERMs the others, which must still finish their own clean exit.
    stop = StopRequest().install()
    try:
        trainer = Trainer(cfg, info)
        code = trainer.fit(stop)
        return code
    except BaseException as e:
        if info.is_main and Path(cfg.out).is_dir():
            state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            write_status(Path(cfg.out), state, error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if trainer is not None:
            trainer.close(code)
        cleanup()
