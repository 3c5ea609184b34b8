"""End-to-end through the real ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, tiny images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train import checkpoint as ckpt_io
from dist_train import data
from dist_train.distributed import seed_everything
from dist_train.models import build_model, input_layout
from preprocess.shard_format import load_manifest
from tests.conftest import make_shards
from tests.dist_train.conftest import EPOCHS
from tests.dist_train.dt_helpers import TINY, check, results, run_trainer, wandb_run_contents

pytestmark = pytest.mark.slow


def test_learns_temporal_order_above_chance_while_loss_falls(learned):
    res = results(learned["out"])
    assert res["n_samples"] == 15 and res["unreadable"] == 0
    # 2 balanced classes: chance is 0.5; 12 of 15 or better happens by chance with p < 2%, and the
    # run reached 15/15 (last/first epoch loss about 0.37) on every seed tried (0-3).
    assert res["top1"] >= 0.8, res
    history = torch.load(learned["out"] / "last.pt", weights_only=True)["state"]["history"]
    losses = [h["train/loss"] for h in history]
    assert len(losses) == EPOCHS
    assert losses[-1] < 0.75 * losses[0], losses
    assert history[-1]["val/top1"] >= 0.8 and res["selected_on"] == "val"


def test_replicas_identical_and_every_rank_ran_the_same_steps(learned):
    res = results(learned["out"])
    assert res["world_size"] == 2 and res["global_batch"] == 4
    steps = EPOCHS * (27 // 4)
    assert res["steps_per_rank"] == [steps, steps] and res["steps"] == steps
    assert res["replica_max_abs_diff"] == 0.0  # measured across both ranks at the end of training


def test_checkpoint_contents(learned):
    out = learned["out"]
    config = json.loads((out / "config.json").read_text())
    for name in ("last.pt", "best.pt"):
        ck = torch.load(out / name, map_location="cpu", weights_only=True)
        for key in ("format_version", "model", "optimizer", "scheduler", "scaler", "epoch", "step",
                    "step_in_epoch", "rng", "data", "state", "config", "classes", "world_size", "wandb_run_id"):
            assert key in ck, (name, key)
        assert ck["format_version"] == ckpt_io.FORMAT_VERSION
        assert not [k for k in ck["model"] if k.startswith(("module.", "_orig_mod."))]
        expected = build_model("cnn_rnn", 2, hidden=32).state_dict()
        assert set(ck["model"]) == set(expected)
        assert all(ck["model"][k].shape == v.shape for k, v in expected.items())
        assert ck["config"] == config and config["precision"] == "fp32"  # resolved, not "auto"
        assert ck["classes"] == ["grow", "shrink"] and ck["world_size"] == 2
        assert len(ck["rng"]) == 2 and all("torch" in r for r in ck["rng"])
        assert ck["optimizer"]["state"] and ck["wandb_run_id"]
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["step"] == EPOCHS * 6 and last["epoch"] == EPOCHS and last["step_in_epoch"] == 0
    assert (out / "checkpoints" / f"step-{last['step']:08d}.pt").is_file()


def test_model_rebuilt_from_best_pt_reproduces_logged_test_top1(learned):
    ck = torch.load(learned["out"] / "best.pt", map_location="cpu", weights_only=True)
    cfg = ck["config"]
    model = build_model(cfg["model"], len(ck["classes"]), rnn=cfg["rnn"], hidden=cfg["hidden_size"],
                        layers=cfg["rnn_layers"], bidirectional=cfg["bidirectional"], head=cfg["head"])
    model.load_state_dict(ck["model"])
    model.eval()
    m = load_manifest(learned["shards"])
    spec = data.SampleSpec(m.n_frames, m.num_classes, data.ClipTransform(cfg["img_size"], train=False,
                                                                       crop=cfg["train_crop"]), "error")
    test = data.Samples.of(m, "test")
    correct = n = 0
    with torch.no_grad():
        for batch in data.eval_loader(test, np.arange(len(test)), spec, 0, 1, batch_size=5, workers=0):
            x = data.to_model_input(batch.video, input_layout(cfg["model"]), data.normalization(cfg["model"]))
            correct += int((model(x).argmax(1) == batch.label).sum())
            n += len(batch.label)
    res = results(learned["out"])
    assert n == res["n_samples"] == 15
    assert correct / n == pytest.approx(res["top1"])


def test_wandb_offline_run_holds_config_and_metrics(learned):
    runs = list(Path(learned["wandb_dir"]).rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    run_id, config, history = wandb_run_contents(runs[0])
    ck = torch.load(learned["out"] / "last.pt", weights_only=True)
    assert run_id == ck["wandb_run_id"]
    assert config["model"] == "cnn_rnn" and config["batch_size"] == 2 and config["epochs"] == EPOCHS
    assert config["classes"] == ["grow", "shrink"] and config["world_size"] == 2
    keys = set().union(*history)
    for key in ("train/loss", "train/top1", "lr", "perf/clips_per_s", "perf/data_wait_frac", "val/top1",
                "test/top1", "test/class_acc/grow", "epoch/train/loss", "final/test_top1"):
        assert key in keys, key
    final = [h["final/test_top1"] for h in history if "final/test_top1" in h]
    assert final == [pytest.approx(results(learned["out"])["top1"])]
    losses = [h["train/loss"] for h in history if "train/loss" in h]
    assert len(losses) == EPOCHS * 6 // 2  # --log-every 2


def test_run_folder_holds_metrics_plots_status(learned):
    out = learned["out"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in rows) and any("val/top1" in r for r in rows)
    for png in ("curves.png", "confusion_test.png", "confusion_val.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert json.loads((out / "status.json").read_text())["state"] == "completed"
    res = results(out)
    assert set(res["per_class"]) == {"grow", "shrink"} and res["epochs"] == EPOCHS
    assert sum(map(sum, res["confusion"])) == res["n_samples"]


def test_refusals_exit_2_with_a_clear_message(learned):
    base = ["--shards", str(learned["shards"]), "--out", str(learned["out"]), *TINY, "--workers", "0"]
    proc = check(run_trainer([*base, "--resume", "never"], nproc=None, timeout=120), 2)
    assert "already holds checkpoints" in proc.stderr and "--overwrite" in proc.stderr
    proc = check(run_trainer([*base[:-6], "--hidden-size", "64", "--no-progress"], nproc=None, timeout=120), 2)
    assert "hidden_size: checkpoint 32, this run 64" in proc.stderr
    proc = check(run_trainer(["--shards", str(learned["shards"])], nproc=None, timeout=60), 2)
    assert "--out is required" in proc.stderr


def test_two_processes_match_one_process_with_the_same_global_batch(sample_shards, tmp_path):
    """2 ranks x batch 2 vs 1 rank x batch 2 x 2 accumulation steps: same clips per step, same weights."""
    # SGD: its update is linear in the gradient, so float reassociation between the runs stays tiny
    # (Adam's g / sqrt(v) amplifies it for near-zero gradients).
    common = ["--shards", str(sample_shards), *TINY, "--epochs", "1", "--val-fraction", "0", "--test-every", "0",
              "--optimizer", "sgd", "--lr", "0.05", "--warmup-epochs", "0"]
    # The global order and the crops depend on the global batch only: step k trains on the same 4 clips.
    check(run_trainer([*common, "--out", str(tmp_path / "two"), "--workers", "1"], nproc=2))
    check(run_trainer([*common, "--out", str(tmp_path / "one"), "--workers", "2", "--accum-steps", "2"], nproc=None))
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=True)
    one = torch.load(tmp_path / "one" / "last.pt", weights_only=True)
    assert two["step"] == one["step"] == 16 // 4
    seed_everything(0, 0)
    init = dict(build_model("cnn_rnn", 2, hidden=32).named_parameters())
    moved = max((two["model"][k] - p.detach()).abs().max().item() for k, p in init.items())
    assert moved > 1e-3  # training really changed the weights
    diff = max((two["model"][k] - one["model"][k]).abs().max().item() for k in init)  # parameters, not BN stats
    assert diff < 1e-5, diff


@pytest.fixture(scope="module")
def uneven(sample_videos, tmp_path_factory) -> dict[int, Path]:
    """16 train clips in 1, 2 or 3 train shards (16 | 8+8 | 6+6+4), 8 test clips."""
    return {n: make_shards(sample_videos, tmp_path_factory.mktemp(f"uneven{n}"), shard_size=size)
            for n, size in ((1, 16), (2, 8), (3, 6))}


@pytest.mark.parametrize("n_shards", [1, 2, 3])
def test_uneven_shards_finish_with_equal_steps_and_exact_eval(uneven, n_shards, tmp_path):
    shards = uneven[n_shards]
    m = load_manifest(shards)
    assert len(m.shards["train"]) == n_shards  # fewer shards than 2 ranks x 2 workers, uneven sizes
    out = tmp_path / "run"
    check(run_trainer(["--shards", str(shards), "--out", str(out), *TINY, "--workers", "2", "--epochs", "1",
                       "--val-fraction", "0", "--test-every", "0"], nproc=2, timeout=180))
    res = results(out)
    steps = m.count("train") // 4  # floor(16 clips / (2 ranks x batch 2))
    assert res["steps_per_rank"] == [steps, steps]
    assert res["n_samples"] == m.count("test") and res["unreadable"] == 0
