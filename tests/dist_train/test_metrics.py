"""Logging: rank-aware messages, W&B mode resolution and the offline fallback that never blocks without network."""

from __future__ import annotations

import json
import logging
import time

from dist_train.config import parse_config
from dist_train.metrics import NullLogger, RunLogger, resolve_wandb_mode, setup_logging
from tests.dist_train.dt_helpers import wandb_run_contents


def test_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    assert resolve_wandb_mode("disabled") == "disabled"


def test_online_without_network_falls_back_to_offline_quickly(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789" * 4)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    start = time.monotonic()
    log = RunLogger(tmp_path / "run", {"model": "cnn_rnn"}, "online", None, progress=False, init_timeout=3)
    assert time.monotonic() - start < 60
    assert log.run_id
    log.log({"train/loss": 0.5}, step=3)
    log.close(0)
    runs = list((tmp_path / "wb").rglob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    run_id, config, history = wandb_run_contents(runs[0])
    assert run_id == log.run_id and config["model"] == "cnn_rnn"
    assert [h["train/loss"] for h in history if "train/loss" in h] == [0.5]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[0]["train/loss"] == 0.5


def test_null_logger_does_nothing(tmp_path):
    log = NullLogger()
    log.log({"a": 1}, 1)
    log.info("x")
    assert log.plot([], {}, []) == {} and log.run_id is None
    log.close(0)
    assert not list(tmp_path.iterdir())


def test_messages_go_through_logging_rank_aware(capsys):
    log = logging.getLogger("dist_train")
    try:
        setup_logging(rank=0)
        log.info("epoch 1: loss 0.5")
        log.warning("few clips")
        setup_logging(rank=1)  # replaces the handler: one line per message
        log.info("not shown on other ranks")
        log.warning("shard x is slow")
        setup_logging(rank=0, level="warning")
        log.info("hidden at --log-level warning")
        setup_logging(rank=3, others="info")
        log.info("shown with --log-level-others info")
    finally:
        setup_logging(rank=0)
    assert capsys.readouterr().err.splitlines() == [
        "[dist_train] epoch 1: loss 0.5", "[dist_train] warning: few clips",
        "[dist_train rank 1] warning: shard x is slow", "[dist_train rank 3] shown with --log-level-others info"]


def test_log_level_flags():
    cfg = parse_config(["--out", "x", "--log-level", "debug", "--log-level-others", "error"])
    assert (cfg.log_level, cfg.log_level_others) == ("debug", "error")
    assert parse_config(["--out", "x"]).log_level_others == "warning"
