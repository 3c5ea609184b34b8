"""Shared fixtures: real sample videos and shards made once per test session in a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from preprocess.shard import PackConfig, pack
from preprocess.synth import generate

# Tests share 2 cores with torchrun workers and DataLoader processes; one thread each avoids thrashing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_ERROR_REPORTING", "false")

REPO = Path(__file__).resolve().parents[1]


def make_videos(root: Path, classes: int = 2, clips: int = 12, size=(64, 48), seed: int = 0, **kw) -> Path:
    """Write HMDB-style sample videos under ``root`` and return it."""
    generate(root, num_classes=classes, clips=clips, seed=seed, size=size, **kw)
    return root


def make_shards(videos: Path, out: Path, **kw) -> Path:
    """Pack ``videos`` into ``out`` (single worker, no progress bar) and return ``out``."""
    kw.setdefault("short_side", 48)
    kw.setdefault("workers", 1)
    pack(PackConfig(str(videos), str(out), progress=False, **kw))
    return out


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    """2 classes (grow / shrink) x 12 clips of 64x48 XVID AVIs; read-only for tests."""
    return make_videos(tmp_path_factory.mktemp("videos") / "data")


@pytest.fixture(scope="session")
def sample_shards(sample_videos, tmp_path_factory) -> Path:
    """``sample_videos`` packed with short side 48, 4 samples per shard; read-only for tests."""
    return make_shards(sample_videos, tmp_path_factory.mktemp("shards"), shard_size=4)
