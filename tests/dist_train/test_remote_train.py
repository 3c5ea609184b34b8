"""Training from object storage through the real torchrun (2 processes, CPU): the same shards in a local folder,
on a real S3 server (SeaweedFS) and on an HTTP server give the same run (samples.jsonl, losses), also through a
cache smaller than the data, connections cut mid-shard and the server stopped mid-epoch; a missing shard is
skipped and counted; no file a run writes holds the secrets it was given."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from preprocess.shard_format import load_manifest
from tests.dist_train.dt_helpers import TINY, check, results, run_trainer
from tests.remote_servers import RangeHTTPServer, S3Server

pytestmark = pytest.mark.slow

TOKEN = "tok-9f3c2e71d0"  # the HTTP server's token: in the URL's query string only
FLAGS = [*TINY, "--epochs", "2", "--seed", "5", "--workers", "2", "--shuffle-window", "1", "--trace-samples",
         "--log-every", "1", "--test-every", "1"]


@pytest.fixture(scope="module")
def s3(sample_shards, tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        server.url = server.upload(sample_shards, "vidshard", "hmdb/shards")
        yield server


@pytest.fixture(scope="module")
def local_run(sample_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "run"
    check(run_trainer(["--shards", str(sample_shards), "--out", str(out), *FLAGS]))
    return out


def losses(out: Path) -> list[tuple]:
    """Every step's training loss and every evaluation's numbers, as metrics.jsonl has them."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [tuple(sorted((k, v) for k, v in r.items() if k.split("/")[0] in ("train", "val", "test") and
                         ("loss" in k or "top1" in k))) for r in rows]


def same_run(out: Path, local: Path) -> None:
    assert (out / "samples.jsonl").read_text() == (local / "samples.jsonl").read_text()
    assert losses(out) == losses(local) and losses(out)
    mine, theirs = results(out), results(local)
    assert [mine[k] for k in ("loss", "top1", "confusion", "best_step")] == \
        [theirs[k] for k in ("loss", "top1", "confusion", "best_step")]


def secrets_in(paths: list[Path], texts: list[str], secrets: list[str]) -> list[str]:
    """``path: secret`` for each file under ``paths`` (names and bytes) or text holding one of ``secrets``."""
    found = []
    for root in paths:
        for p in [root, *root.rglob("*")]:
            blob = p.name.encode() + (p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
            found += [f"{p}: {s}" for s in secrets if s.encode() in blob]
    return found + [f"output: {s}" for t in texts for s in secrets if s in t]


def test_training_from_s3_is_the_run_the_folder_gives_and_keeps_the_key_secret(s3, local_run, tmp_path):
    out, cache, wandb_dir = tmp_path / "run", tmp_path / "cache", tmp_path / "wandb"
    wandb_dir.mkdir()
    proc = check(run_trainer(["--shards", s3.url, "--out", str(out), "--cache-dir", str(cache), *FLAGS,
                              "--wandb", "offline"], env={**s3.env(), "WANDB_DIR": str(wandb_dir)}))
    same_run(out, local_run)
    assert json.loads((out / "config.json").read_text())["shards"] == s3.url
    secret = s3.env()["AWS_SECRET_ACCESS_KEY"]
    assert secrets_in([out, cache, wandb_dir], [proc.stdout, proc.stderr], [secret]) == []
    assert list(wandb_dir.rglob("*.wandb"))  # W&B wrote its files, and they were searched


def test_training_over_http_through_a_small_cache_rides_out_cuts_and_an_outage(sample_shards, local_run, tmp_path):
    m = load_manifest(sample_shards)
    total = sum(s.bytes for split in m.shards.values() for s in split)
    cap = total // 2
    out, cache = tmp_path / "run", tmp_path / "cache"
    with RangeHTTPServer(sample_shards, token=TOKEN) as http:
        http.cut_connections(3, after_bytes=5000)
        http.stopped_at = None
        outage = threading.Thread(target=_stop_after_tars, args=(http, 4, 3.0), daemon=True)
        outage.start()
        proc = check(run_trainer(["--shards", f"{http.url}?token={TOKEN}", "--out", str(out), "--cache-dir",
                                  str(cache), "--cache-size", str(cap), *FLAGS]))
        outage.join(30)
    same_run(out, local_run)
    assert http.stopped_at and "retry 1 of 8" in proc.stderr  # the outage happened mid-run and was ridden out
    tars = [r for r in http.requests if r["method"] == "GET" and r["path"].endswith(".tar")]
    assert len({r["path"] for r in tars}) == sum(len(s) for s in m.shards.values())
    assert len(tars) > len({r["path"] for r in tars}) + 3  # evicted shards were fetched again
    on_disk = sum(p.stat().st_size for p in cache.rglob("data/*"))
    assert 0 < on_disk <= cap
    assert secrets_in([out, cache], [proc.stdout, proc.stderr], [TOKEN]) == []


def _stop_after_tars(http: RangeHTTPServer, n: int, seconds: float) -> None:
    """Stop ``http`` once it has answered ``n`` shard requests, for ``seconds``, then start it again."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sum(r["path"].endswith(".tar") for r in list(http.requests)) >= n:
            http.stop()
            http.stopped_at = time.monotonic()
            time.sleep(seconds)
            http.start()
            return
        time.sleep(0.02)


def test_a_shard_missing_from_the_store_is_skipped_and_counted(s3, sample_shards, tmp_path):
    gone = load_manifest(sample_shards).shards["train"][1]
    url = s3.upload(sample_shards, "vidshard", "missing")
    s3.remove("vidshard", f"missing/{gone.name}")
    out = tmp_path / "run"
    proc = check(run_trainer(["--shards", url, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                              *TINY, "--epochs", "1", "--workers", "1", "--val-fraction", "0", "--trace-samples"],
                             nproc=None, env=s3.env()))
    trained = {k for line in (out / "samples.jsonl").read_text().splitlines() for k in json.loads(line)["keys"]}
    assert f"skipped bad data: shard {gone.name}" in proc.stderr and f"{url}{gone.name} does not exist" in proc.stderr
    assert 0 < results(out)["skipped_train_samples"] <= gone.count and not trained & set(gone.keys)


def test_the_s3_server_stopped_and_started_again_is_ridden_out(s3, sample_shards, tmp_path, monkeypatch, caplog):
    from dist_train.data import open_manifest

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    store = open_manifest(s3.url, tmp_path / "cache", "auto", 5.0, 8).store
    info = load_manifest(sample_shards).shards["test"][0]
    s3.stop()
    restart = threading.Thread(target=lambda: (time.sleep(1.0), s3.start()))
    restart.start()
    try:
        with caplog.at_level(logging.WARNING, "dist_train"):
            path = store.path(info.name, info.sha256, info.bytes)
    finally:
        restart.join(60)
    assert path.read_bytes() == (sample_shards / info.name).read_bytes()
    assert f"{s3.url}{info.name}: asking its size" not in caplog.text  # the manifest gave the size
    assert f"{s3.url}{info.name}: reading bytes 0-{info.bytes - 1} failed" in caplog.text


def test_no_credentials_is_an_error_at_once_saying_where_keys_go(s3, tmp_path, monkeypatch):
    from dist_train.data import RemoteError, open_manifest

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata service to ask
    start = time.monotonic()
    with pytest.raises(RemoteError, match="AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") as e:
        open_manifest(s3.url, tmp_path / "cache", "auto", 5.0, 8)
    assert time.monotonic() - start < 10 and s3.url in str(e.value)  # not retried 8 times
