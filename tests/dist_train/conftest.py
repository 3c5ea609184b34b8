"""Fixtures shared by the trainer, evaluation and prediction tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import make_shards, make_videos
from tests.dist_train.dt_helpers import TINY, check, run_trainer

EPOCHS = 4


@pytest.fixture(scope="session")
def learn_videos(tmp_path_factory) -> Path:
    """grow vs shrink (classes differ only in time), 24 clips each."""
    return make_videos(tmp_path_factory.mktemp("learn_videos") / "data", clips=24)


@pytest.fixture(scope="session")
def learn_shards(learn_videos, tmp_path_factory) -> Path:
    """``learn_videos`` packed: 27 train + 6 val / 15 test."""
    return make_shards(learn_videos, tmp_path_factory.mktemp("learn_shards"), shard_size=6)


@pytest.fixture(scope="session")
def learned(learn_videos, learn_shards, tmp_path_factory) -> dict:
    """One 2-process training run with W&B offline; several tests read what it left behind."""
    out = tmp_path_factory.mktemp("learn_run") / "run"
    wandb_dir = tmp_path_factory.mktemp("wandb")
    args = ["--shards", str(learn_shards), "--out", str(out), *TINY, "--epochs", str(EPOCHS), "--workers", "1",
            "--lr", "1e-3", "--val-fraction", "0.2", "--wandb", "offline", "--log-every", "2"]
    proc = check(run_trainer(args, env={"WANDB_DIR": str(wandb_dir), "WANDB_MODE": None, "WANDB_API_KEY": None}))
    return {"out": out, "videos": learn_videos, "shards": learn_shards, "wandb_dir": wandb_dir, "proc": proc}
