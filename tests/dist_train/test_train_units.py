"""The trainer's parts, each built and run alone in this process (no torchrun): the step, its sums,
the builders, the resume checks and the report fields."""

from __future__ import annotations

import pytest
import torch

from dist_train import builders, data, report, resume
from dist_train import checkpoint as ckpt_io
from dist_train.config import TrainConfig
from dist_train.distributed import DistInfo
from dist_train.step import Sums

SOLO = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None)
CLASSES = ["a", "b", "c"]


def tiny_cfg(tmp_path, **kw) -> TrainConfig:
    return TrainConfig(**{"out": str(tmp_path / "run"), "img_size": 16, "hidden_size": 8, "batch_size": 2,
                          "precision": "fp32", "channels_last": False, **kw})


def batch(n: int, frames: int = 4, size: int = 16, first_key: int = 0) -> data.Batch:
    g = torch.Generator().manual_seed(first_key)
    video = torch.randint(0, 256, (n, frames, 3, size, size), dtype=torch.uint8, generator=g)
    return data.Batch(video, torch.arange(n) % len(CLASSES), [f"k{first_key + i}" for i in range(n)])


def stepper_for(cfg: TrainConfig, frames: int = 4):
    spec, _ = builders.sample_specs(cfg, frames, len(CLASSES))
    return builders.make_stepper(cfg, SOLO, builders.make_model(cfg, CLASSES), 10, spec)


def test_sums_add_reduce_and_round_trip_through_a_checkpoint():
    a = Sums(loss=torch.tensor(2.0, dtype=torch.float64), top1=1.0, clips=2.0, wait=0.5)
    a += Sums(loss=1.0, top1=1.0, top5=2.0, clips=1.0, bad=3.0)
    r = a.reduced(torch.device("cpu"))  # one process: the sums themselves, as floats
    assert (r.loss, r.top1, r.top5, r.clips, r.bad, r.wait) == (3.0, 2.0, 2.0, 3.0, 3.0, 0.5)
    assert r.mean("loss") == 1.0 and Sums(bad=2.0).mean("top1") == 0.0  # no clip: no division by zero
    assert Sums.from_epoch_record(r.epoch_record()) == Sums(3.0, 2.0, 2.0, 3.0)


def test_a_step_trains_on_its_micro_batches_and_adds_them_to_every_total(tmp_path):
    stepper = stepper_for(tiny_cfg(tmp_path))
    before = [p.detach().clone() for p in stepper.model.parameters()]
    window, epoch = Sums(), Sums(loss=10.0, clips=5.0)  # the epoch already holds 5 clips
    keys, bad = stepper.step(iter([batch(2), batch(2, first_key=2)]), 2, (window, epoch))
    assert keys == ["k0", "k1", "k2", "k3"] and bad == []
    assert float(window.clips) == 4 and float(epoch.clips) == 9 and float(epoch.loss) == 10.0 + float(window.loss)
    assert any(not torch.equal(p, q) for p, q in zip(stepper.model.parameters(), before))
    assert stepper.scheduler.last_epoch == 1  # per-step schedule stepped once


def test_a_micro_batch_with_no_readable_clip_adds_a_zero_gradient(tmp_path):
    stepper = stepper_for(tiny_cfg(tmp_path, weight_decay=0.0))
    before = [p.detach().clone() for p in stepper.model.parameters()]
    empty = data.Batch(torch.zeros((0, 4, 3, 16, 16), dtype=torch.uint8), torch.zeros(0, dtype=torch.long), [],
                       [{"shard": "train-000000.tar", "key": "k9", "reason": "bad JPEG", "count": 1}])
    window = Sums()
    keys, bad = stepper.step(iter([empty]), 1, (window,))
    assert keys == [] and [r["key"] for r in bad] == ["k9"] and float(window.bad) == 1 and window.clips == 0
    grads = [p.grad for p in stepper.model.parameters()]
    assert all(g is None for g in grads)  # zeroed after the step
    assert all(torch.equal(p, q) for p, q in zip(stepper.model.parameters(), before))  # Adam: zero gradient, no move
    assert all(m.training for m in stepper.model.modules())  # BatchNorm back in training mode


def test_optimizer_groups_and_schedule(tmp_path):
    cfg = tiny_cfg(tmp_path, warmup_epochs=1.0, epochs=2, trunk_lr_scale=0.1)
    model = builders.make_model(cfg, CLASSES)
    opt = builders.build_optimizer(cfg, model)
    decays = {(g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert decays == {(cfg.lr * 0.1, 0.0), (cfg.lr * 0.1, cfg.weight_decay), (cfg.lr, 0.0), (cfg.lr, cfg.weight_decay)}
    sched = builders.build_scheduler(cfg, opt, steps_per_epoch=4)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[-1]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([cfg.lr * k / 4 for k in (1, 2, 3, 4)])  # warmup over the first epoch
    assert lrs[4] > lrs[5] > lrs[6] > lrs[7] >= cfg.lr * cfg.min_lr_ratio  # then cosine down


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ckpt = {"classes": CLASSES, "config": cfg.to_dict(), "model": builders.make_model(cfg, CLASSES).state_dict()}
    builders.make_model(cfg, CLASSES, ckpt, tmp_path / "x.pt")  # fits
    with pytest.raises(ckpt_io.CheckpointMismatch, match="hidden_size: checkpoint 8, this run 16"):
        builders.make_model(tiny_cfg(tmp_path, hidden_size=16), CLASSES, ckpt, tmp_path / "x.pt")


def test_resume_keeps_the_global_batch_and_refuses_what_changes_the_order(tmp_path):
    cfg = tiny_cfg(tmp_path)
    ckpt = {"config": {**cfg.to_dict(), "global_batch": 6}, "data": {"digest": "d1"}}
    assert resume.kept_global_batch(cfg, None, "d1") is None  # fresh start: --global-batch (unset)
    assert resume.kept_global_batch(cfg, ckpt, "d1") == 6
    with pytest.raises(ValueError, match="pass --global-batch 6"):
        resume.kept_global_batch(tiny_cfg(tmp_path, global_batch=4), ckpt, "d1")
    with pytest.raises(ValueError, match=r"--shuffle-window 16 \(this run: 4\)"):
        resume.kept_global_batch(tiny_cfg(tmp_path, shuffle_window=4), ckpt, "d1")
    with pytest.raises(ValueError, match="not the shard set"):
        resume.kept_global_batch(cfg, ckpt, "d2")


def test_choosing_the_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path)
    out = tmp_path / "run"
    assert resume.choose_checkpoint(cfg, out, SOLO) is None  # empty folder: fresh start
    (out / ckpt_io.STEP_DIR).mkdir()
    (out / ckpt_io.STEP_DIR / "step-00000004.pt").write_bytes(b"torn")
    assert resume.choose_checkpoint(cfg, out, SOLO) is None  # passed over (logged), nothing else to resume
    never = tiny_cfg(tmp_path, resume="never")
    with pytest.raises(ValueError, match="already holds checkpoints .*--overwrite to start over"):
        resume.choose_checkpoint(never, out, SOLO)
    with pytest.raises(ValueError, match="no such checkpoint file"):
        resume.choose_checkpoint(tiny_cfg(tmp_path, resume=str(tmp_path / "nope.pt")), out, SOLO)


def test_report_fields():
    lay = data.Layout(world_size=2, micro_batch=2, accum_steps=3, global_batch=12)
    assert report.layout_note(lay, 2, 3) is None
    assert "micro-batches of 2 x 3 accumulation steps" in report.layout_note(lay, 4, 1)
    sums = Sums(loss=8.0, top1=3.0, top5=4.0, clips=4.0, wait=1.0)
    m = report.window_metrics(sums, 2.0, 2, 1e-3, 1, 0, {"train-000001.tar": 2})
    assert (m["train/loss"], m["train/top1"], m["perf/clips_per_s"], m["perf/data_wait_frac"]) == (2.0, 0.75, 2.0, 0.25)
    assert m["data/skipped/train-000001.tar"] == 2
    rec = report.epoch_record(1, 5, 1e-3, sums, {"val": {"loss": 1.0, "top1": 0.5, "top5": 1.0}})
    assert rec == {"epoch": 1, "step": 5, "lr": 1e-3, "train/loss": 2.0, "train/top1": 0.75, "train/top5": 1.0,
                   "val/loss": 1.0, "val/top1": 0.5, "val/top5": 1.0}
