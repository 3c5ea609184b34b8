"""The training loop: set-up, epochs of DDP steps, evaluation, checkpoints and the final results.

Read top to bottom: ``run`` wraps ``Trainer`` in the process group; ``Trainer.__init__`` builds the run
from its parts (``dist_train.builders``) and restores a checkpoint (``dist_train.resume``); ``fit`` runs
the epochs; ``train_epoch`` runs the steps (``dist_train.step``) and logs; ``end_epoch`` evaluates,
selects and saves; ``finish`` tests best.pt and writes ``results.json`` (fields: ``report.final_results``).

Model selection: ``best.pt`` is the model with the highest *validation* top-1, validation being
``--val-fraction`` of the training clips held out (``dist_train.data.hold_out``; listed in
``OUT/validation.json``). The test split is never used to choose anything. With ``--val-fraction 0``
there is no validation set and ``best.pt`` is the final model (``results.json`` says
``"selected_on": "final"``).

Resume: ``--resume auto`` continues from the newest loadable checkpoint in ``--out``; a resumed run
continues at the saved step (mid-epoch included: the data order of ``dist_train.data.plan`` goes on
from the same global position, at any number of processes that divides the global batch, which a
resume keeps) with the same optimizer, scheduler, scaler, metrics history and W&B run id (and the
same RNG states when the number of processes is the same). Stops, exit statuses and test hooks: see
``dist_train.faults``; ``--trace-samples``: see ``dist_train.trace``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dist_train import builders, data, evaluation, report, resume, run_folder, trace
from dist_train import checkpoint as ckpt_io
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
from dist_train.faults import (
    EXIT_OK,
    EXIT_STOPPED,
    ConfigError,
    StopRequest,
    after_step_hooks,
    kill_workers,
    write_status,
)
from dist_train.locations import public
from dist_train.metrics import make_logger, resolve_wandb_mode, setup_logging
from dist_train.models import unwrap
from dist_train.resume import TrainState
from dist_train.step import Sums

log = logging.getLogger("dist_train")


class Trainer:
    """One training run on this process (rank)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.info, self.out = info, Path(cfg.out)
        # Configuration errors raise ConfigError (exit status 2) where they are found; any other error is a
        # data error or a bug (exit status 1).
        try:
            manifest = data.open_manifest(cfg.shards, cfg.cache_dir, cfg.cache_size, cfg.fetch_timeout,
                                          cfg.fetch_retries)
        except FileNotFoundError as e:  # --shards names no shard folder
            raise ConfigError(str(e)) from e
        cfg = replace(cfg, precision=builders.resolve_precision(cfg.precision, info.device),
                      wandb=resolve_wandb_mode(cfg.wandb))
        source = resume.choose_checkpoint(cfg, self.out, info)
        ckpt = resume.load(source) if source else None
        seed_everything(cfg.seed, info.rank)
        model = builders.make_model(cfg, manifest.classes, ckpt, source)
        # After the model: a checkpoint that does not fit says so before the data-plan checks.
        self.data_digest = data.data_digest(manifest)
        self.plan = builders.make_plan(cfg, manifest, info, resume.kept_global_batch(cfg, ckpt, self.data_digest),
                                       fixed=ckpt is not None)
        self.cfg = cfg = replace(cfg, global_batch=self.plan.global_batch)
        self.classes = manifest.classes
        # How the frames were packed: predict.py prepares raw videos exactly the same way.
        self.packing = {"frames": manifest.frames, "temporal_views": manifest.temporal_views,
                        **{k: manifest.args.get(k) for k in ("short_side", "quality", "min_frames")}}
        self.train_spec, self.eval_spec = builders.sample_specs(cfg, manifest.n_frames, len(self.classes),
                                                                manifest.temporal_views)
        self.stepper = builders.make_stepper(cfg, info, model, self.plan.steps_per_epoch, self.train_spec)
        self.model = self.stepper.model
        self.state, self.epoch_sums = TrainState(), Sums()  # epoch_sums: this rank's, since the epoch started
        self.steps_run, self.last_save = 0, time.monotonic()
        if ckpt:
            self._restore(ckpt, source)
        else:
            self.state.run_id = broadcast_object(uuid.uuid4().hex if info.is_main else None)
        # All checked: only now may --overwrite move the previous run's files aside (back if nothing is saved).
        self.replaced = run_folder.Replaced(self.out) if info.is_main and cfg.resume == "never" else None
        try:
            if self.replaced:
                self.replaced.move_aside()
            self._start_logging(manifest, ckpt, source)
        except BaseException:
            if self.replaced:
                self.replaced.put_back()
            raise

    def _start_logging(self, manifest, ckpt: dict | None, source: Path | None) -> None:
        """The run logger (W&B continues the checkpoint's run), then rank 0's files and start-up summary."""
        cfg, info = self.cfg, self.info
        self.log = make_logger(info.is_main, self.out, {**cfg.to_dict(), "classes": self.classes,
                                                        "world_size": info.world_size}, cfg.wandb,
                               ckpt.get("wandb_run_id") if ckpt else None, progress=cfg.progress,
                               project=cfg.wandb_project, entity=cfg.wandb_entity, run_name=cfg.run_name,
                               init_timeout=cfg.wandb_init_timeout)
        if info.is_main:
            st = self.state
            where = f"resumed from {source} at epoch {st.epoch + 1} step {st.step}" if ckpt else "fresh start"
            report.write_start(self.out, cfg, self.plan, self.classes, manifest.args.get("split"), st.epoch, st.step,
                               info, where)

    def _restore(self, ckpt: dict, source: Path) -> None:
        """Continue the checkpoint's run: optimizer, schedule, scaler, state, best.pt, epoch sums, RNG."""
        resume.restore_training(self.stepper, ckpt, self.cfg.scheduler)
        known = set(TrainState.__dataclass_fields__)
        self.state = TrainState(**{k: v for k, v in ckpt["state"].items() if k in known})
        resume.keep_best(self.state, ckpt, source, self.out, self.info)
        if self.info.rank == 0:  # the saved sums are over all ranks already: one rank carries them
            self.epoch_sums = Sums.from_epoch_record(ckpt["state"]["epoch_sums"])
        resume.restore_rng(ckpt, self.info, self.plan.global_batch)
        self.state.step_in_epoch = min(self.state.step_in_epoch, self.plan.steps_per_epoch)

    def save(self, best: bool = False, stopped_by: str | None = None) -> None:
        """All ranks: gather RNG states and the epoch sums; rank 0 writes last.pt (and best.pt) and status."""
        per_rank = all_gather_object(ckpt_io.rng_state())
        sums = self.epoch_sums.reduced(self.info.device)
        if self.info.is_main:
            st, sp = self.state, self.stepper
            state = {
                "format_version": ckpt_io.FORMAT_VERSION,
                "model": unwrap(self.model).state_dict(), "optimizer": sp.optimizer.state_dict(),
                "scheduler": sp.scheduler.state_dict(), "scaler": sp.scaler.state_dict(),
                "epoch": st.epoch, "step": st.step, "step_in_epoch": st.step_in_epoch,
                "state": {**asdict(st), "epoch_sums": sums.epoch_record()},
                "data": {"epoch": st.epoch, "global_batch": self.plan.global_batch, "digest": self.data_digest,
                         "samples_consumed": st.step_in_epoch * self.plan.global_batch},
                "rng": per_rank, "config": self.cfg.to_dict(), "classes": list(self.classes),
                "packing": self.packing, "world_size": self.info.world_size,
                "wandb_run_id": self.log.run_id, "time": time.time(),
            }
            path = ckpt_io.save_last(state, self.out, self.cfg.keep_last, best=best)
            where = dict(epoch=st.epoch, step=st.step, checkpoint=str(path))
            if stopped_by:
                write_status(self.out, "stopped", exit_code=EXIT_STOPPED, signal=stopped_by, **where)
            else:
                write_status(self.out, "running", **where)
            if self.replaced:
                self.replaced.drop()
                self.replaced = None
        self.last_save = time.monotonic()
        barrier(self.info)

    # ------------------------------------------------------------------ the loop
    def fit(self, stop: StopRequest) -> int:
        """Train the remaining epochs, then evaluate best.pt on the test split; returns the exit status."""
        while self.state.epoch < self.cfg.epochs:
            if not self.train_epoch(stop):
                return self._stopped(stop)
            self.end_epoch()
            if self._agree(stop.requested)[0]:
                return self._stopped(stop)
        self.finish()
        return EXIT_OK

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true on any rank (one all-reduce)."""
        t = all_reduce(torch.tensor([float(f) for f in flags], device=self.info.device), "max")
        return [bool(v) for v in t.tolist()]

    def _stopped(self, stop: StopRequest) -> int:
        self.save(stopped_by=stop.signal or "another rank")
        log.info(f"stopped by {stop.signal or 'another rank'} at step {self.state.step}: checkpoint saved, "
                 f"exit status {EXIT_STOPPED}; run the same command again to resume")
        return EXIT_STOPPED

    def train_epoch(self, stop: StopRequest) -> bool:
        """Train the rest of ``state.epoch``; False when a stop was agreed (state saved by the caller)."""
        cfg, plan, st = self.cfg, self.plan, self.state
        spe = plan.steps_per_epoch
        loader = data.train_loader(plan, self.train_spec, self.info.rank, st.epoch, start_step=st.step_in_epoch,
                                   pin=self.info.device.type == "cuda", timeout=cfg.data_timeout)
        batches = data.watched(loader, stop, cfg.data_timeout, public(cfg.shards))
        window, bad = Sums(), []
        bar = self.log.progress(spe, st.step_in_epoch, f"epoch {st.epoch + 1}/{cfg.epochs}")
        self.model.train()
        t_window = time.perf_counter()
        for _ in range(st.step_in_epoch, spe):
            keys, step_bad = self.stepper.step(batches, plan.layout.accum_steps, (window, self.epoch_sums))
            bad += step_bad
            st.step += 1
            st.step_in_epoch += 1
            self.steps_run += 1
            if cfg.trace_samples:
                per_rank = all_gather_object(keys)
                if self.info.is_main:
                    trace.append(self.out, st.epoch, st.step, per_rank)
            bar.update(1)
            after_step_hooks(st.step, self.info.rank, stop)
            stopping, due = self._agree(stop.requested, self._checkpoint_due())
            if st.step % cfg.log_every == 0 or st.step_in_epoch == spe or stopping:
                self._log_window(window, bad, time.perf_counter() - t_window, bar)
                window, bad, t_window = Sums(), [], time.perf_counter()
            if stopping:
                self.log.end_progress()
                return False
            if due and st.step_in_epoch < spe:
                self.save()
        self.log.end_progress()
        self.stepper.sync_buffers()
        return True

    def _checkpoint_due(self) -> bool:
        """Rank 0: --ckpt-every-steps or --ckpt-every-minutes says to save a step checkpoint now."""
        cfg = self.cfg
        return self.info.is_main and bool(
            (cfg.ckpt_every_steps and self.state.step % cfg.ckpt_every_steps == 0)
            or (cfg.ckpt_every_minutes and time.monotonic() - self.last_save >= 60 * cfg.ckpt_every_minutes))

    def _lr(self) -> float:
        return max(g["lr"] for g in self.stepper.optimizer.param_groups)

    def _log_window(self, window: Sums, bad: list[dict], seconds: float, bar) -> None:
        """Reduce the window's sums over the ranks, then log loss, accuracy, lr, clips/s, data wait, skips."""
        sums = window.reduced(self.info.device)
        per_shard = {}
        if sums.bad:
            records = [r for rank_records in all_gather_object(bad) for r in rank_records]
            self.state.skipped += int(sums.bad)
            for r in records[:20]:
                log.info(f"skipped bad data: shard {r['shard']} sample {r['key']}: {r['reason']}")
            per_shard = report.skipped_per_shard(records)
        metrics = report.window_metrics(sums, seconds, self.info.world_size, self._lr(), self.state.epoch + 1,
                                        self.state.skipped, per_shard)
        if self.info.device.type == "cuda":
            metrics["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.info.device) / 2**30
        self.log.log(metrics, self.state.step)
        bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", clips_s=f"{metrics['perf/clips_per_s']:.1f}")

    def end_epoch(self) -> None:
        """Evaluate, step the plateau scheduler, record history, select best.pt, save last.pt (and best.pt)."""
        cfg, st = self.cfg, self.state
        epoch = st.epoch + 1
        sums = self.epoch_sums.reduced(self.info.device)
        if sums.clips == 0:
            raise data.BadDataError(f"no training sample of epoch {epoch} could be read (all {self.plan.n_train} "
                                    "skipped as bad data; see the log): check the shards, e.g. with --verify-shards")
        lr = self._lr()
        results = {}
        if len(self.plan.val_ids):
            results["val"] = self.evaluate("val")
        if cfg.test_every and (epoch % cfg.test_every == 0 or epoch == cfg.epochs):
            results["test"] = self.evaluate("test")
        if cfg.scheduler == "plateau":
            self.stepper.scheduler.step(results["val"]["loss"] if "val" in results else sums.loss / sums.clips)
        record = report.epoch_record(epoch, st.step, lr, sums, results)
        val = results.get("val")
        # Top-1 saturates early on small validation sets; among equal top-1, keep the lower loss.
        improved = val is not None and (val["top1"], -val["loss"]) > (st.best_top1, -st.best_loss)
        if improved:
            st.best_top1, st.best_loss = val["top1"], val["loss"]
        improved |= not len(self.plan.val_ids) and epoch == cfg.epochs  # no validation data: keep the final model
        if improved:
            st.best_epoch, st.best_step = epoch, st.step
        st.history.append(record)
        self.log.log({f"epoch/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, st.step)
        log.info(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
        st.epoch, st.step_in_epoch = epoch, 0
        self.epoch_sums = Sums()
        self.save(best=improved)
        plots = self.log.plot(st.history, {s: r["confusion"] for s, r in results.items()}, self.classes)
        for key, path in plots.items():
            self.log.log_image(f"plots/{key}", path, st.step)

    def evaluate(self, split: str) -> dict:
        """Loss, top-1/5, per-class accuracy and confusion matrix of ``split``, each sample once over all ranks."""
        samples, ids = self.plan.eval_set(split)
        sp = self.stepper
        result = evaluation.evaluate_samples(
            self.model, samples, ids, self.eval_spec, classes=self.classes, layout=sp.layout, stats=sp.stats,
            device=self.info.device, rank=self.info.rank, world_size=self.info.world_size,
            batch_size=self.cfg.batch_size, workers=self.plan.workers, autocast=sp.autocast(),
            split=split, bad_shards=self.plan.bad_shards, data_timeout=self.cfg.data_timeout)
        for r in result.pop("bad")[:20]:
            log.info(f"{split}: unreadable data: shard {r['shard']} sample {r['key']}: {r['reason']}")
        scalars = {f"{split}/{k}": result[k] for k in ("loss", "top1", "top5", "n_samples", "unreadable")}
        scalars.update({f"{split}/class_acc/{name}": acc for name, acc in result["per_class"].items()})
        self.log.log(scalars, self.state.step)
        return result

    def finish(self) -> None:
        """Check replicas, evaluate best.pt on the test split, write results.json."""
        replica_diff = max_replica_difference(self.model)
        steps_per_rank = all_gather_object(self.steps_run)
        best_path = self.out / ckpt_io.BEST
        best = ckpt_io.load_checkpoint(best_path)
        if not ckpt_io.best_matches(best, {"state": asdict(self.state)}):
            raise RuntimeError(f"{best_path} is not the model this run selected (epoch {self.state.best_epoch}, step "
                               f"{self.state.best_step}): it holds epoch {best['state'].get('best_epoch')} step "
                               f"{best['step']} of run {best['state'].get('run_id')!r}; was it replaced?")
        self.model.load_state_dict(best["model"])
        test = self.evaluate("test")
        results = report.final_results(
            test, best, classes=self.classes, plan=self.plan, epochs=self.cfg.epochs, steps=self.state.step,
            world_size=self.info.world_size, checkpoint=str(best_path), steps_per_rank=steps_per_rank,
            replica_diff=replica_diff, skipped=self.state.skipped)
        self.log.log({f"final/test_{k}": test[k] for k in ("top1", "top5", "loss")}, self.state.step)
        self.log.plot(self.state.history, {"test": test["confusion"]}, self.classes)
        self.log.results(results)
        if self.info.is_main:
            write_status(self.out, "completed", exit_code=EXIT_OK, epoch=self.state.epoch, step=self.state.step)
        log.info(f"done: test top-1 {test['top1']:.4f} top-5 {test['top5']:.4f} on {test['n_samples']} clips "
                 f"(best.pt selected on {results['selected_on']}); results in {self.out / 'results.json'}")

    def close(self, exit_code: int) -> None:
        """Finish logging; give back the files --overwrite moved aside if this run saved nothing."""
        self.log.close(exit_code)
        if self.replaced:
            self.replaced.put_back()


def run(cfg: TrainConfig) -> int:
    """Train in this process (under torchrun or alone); returns the exit status. Tears the process group down."""
    info = init_distributed(cfg.dist_timeout)
    setup_logging(info.rank, cfg.log_level, cfg.log_level_others)
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes
        torch.set_float32_matmul_precision("high")
    trainer, code, lock = None, 1, None
    # Installed for the rest of the process's life, teardown included: when one rank exits, torchrun
    # SIGTERMs the others, which must still finish their own clean exit.
    stop = StopRequest(cfg.stop_timeout).install()
    try:
        lock = run_folder.claim(Path(cfg.out), info)
        stop.status_out = Path(cfg.out) if lock is not None else None
        trainer = Trainer(cfg, info)
        code = trainer.fit(stop)
        return code
    except BaseException as e:
        if lock is not None:  # the folder is this run's to write in
            state = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            write_status(Path(cfg.out), state, error=f"{type(e).__name__}: {e}")
        kill_workers()  # a loader worker stuck in a read would keep the exit waiting for it
        raise
    finally:
        if trainer is not None:
            trainer.close(code)
        if lock is not None:
            lock.release()
        cleanup()
