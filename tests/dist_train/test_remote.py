"""Remote shards through the node-local cache (``dist_train.data.cache``, ``dist_train.data.remote``), against a
real HTTP server on loopback (``tests.remote_servers.RangeHTTPServer``): what is fetched, how often, how faults
are ridden out, what is evicted and what never leaves the process (secrets). Training from S3 and HTTP:
test_remote_train.py."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from dist_train import evaluate
from dist_train.config import parse_config
from dist_train.data import cache, read_split
from dist_train.data.cache import CachedShards, open_manifest
from dist_train.data.remote import Remote, RemoteError, RemoteMissing
from dist_train.locations import check_url, parse_size, public
from preprocess.shard_format import load_manifest
from tests.remote_servers import RangeHTTPServer


@pytest.fixture
def http(sample_shards):
    with RangeHTTPServer(sample_shards) as server:
        yield server


def gets(server: RangeHTTPServer, name: str) -> list[str | None]:
    """The Range headers of the GETs ``server`` answered for ``name``."""
    return [r["range"] for r in list(server.requests) if r["method"] == "GET" and r["path"].endswith("/" + name)]


def opened(url: str, cache: Path, size="auto", timeout: float = 5.0, retries: int = 3):
    return open_manifest(url, cache, size, timeout, retries)


def test_urls_are_shown_and_saved_without_their_secrets():
    assert public("https://user:pw@host:8080/shards/?token=abc&x=1") == "https://host:8080/shards/"
    assert public("s3://bucket/prefix/") == "s3://bucket/prefix/"
    assert public("/data/shards") == "/data/shards"
    cfg = parse_config(["--shards", "https://host/s/?sig=SECRET", "--out", "o"])
    assert cfg.to_dict()["shards"] == "https://host/s/" and cfg.shards.endswith("SECRET")
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID"):
        check_url("s3://AKIA:secret@bucket/prefix/")
    with pytest.raises(ValueError, match="no bucket"):
        check_url("s3:///prefix/")


def test_cache_size_takes_bytes_with_a_suffix_or_auto():
    assert parse_size("20G") == 20 << 30 and parse_size("500M") == 500 << 20 and parse_size("1.5K") == 1536
    assert parse_size("4096") == 4096 and parse_size("2GiB") == 2 << 30 and parse_size("auto") is None
    for bad in ("ten", "0", "-5M", "3X"):
        with pytest.raises(ValueError, match="--cache-size must be auto or a size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="--cache-size must be auto"):
        parse_config(["--out", "o", "--cache-size", "lots"])
    with pytest.raises(SystemExit):
        evaluate.build_parser().parse_args(["--checkpoint", "c", "--shards", "s", "--cache-size", "lots"])


def test_a_remote_folder_reads_the_same_samples_and_fetches_each_file_once(http, sample_shards, tmp_path):
    local, far = load_manifest(sample_shards), opened(http.url, tmp_path / "cache")
    assert far.shards == local.shards and far.classes == local.classes
    strip = lambda s: {k: v for k, v in s.items() if k != "__shard__"}  # noqa: E731
    assert [strip(s) for s in read_split(far, "train")] == [strip(s) for s in read_split(local, "train")]
    name = local.shards["train"][0].name
    assert gets(http, name) == [f"bytes=0-{local.shards['train'][0].bytes - 1}"]
    list(read_split(far, "train"))  # a second pass: from the cache
    assert len(gets(http, name)) == 1
    assert (far.store.top.parent == tmp_path / "cache") and far.store.top.name == socket.gethostname()


def test_a_connection_cut_mid_shard_goes_on_from_where_it_stopped(http, sample_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "CHUNK", 4096)
    store = opened(http.url, tmp_path / "cache").store
    info = load_manifest(sample_shards).shards["train"][1]
    read, calls = store.remote.read, []

    def read_then_cut(name, start, end):  # the server cuts the response after the first chunk
        calls.append(start)
        got = read(name, start, end)
        if len(calls) == 1:
            http.cut_connections(1, after_bytes=1000)
        return got

    store.remote.read = read_then_cut
    path = store.path(info.name, info.sha256, info.bytes)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info.sha256
    ranges = gets(http, info.name)
    chunks = -(-info.bytes // 4096)
    assert len(ranges) == chunks + 1 and ranges[1] == ranges[2] == f"bytes=4096-{min(info.bytes, 8192) - 1}"
    assert ranges[0] == "bytes=0-4095" and ranges.count("bytes=0-4095") == 1  # not from the start again


def test_a_missing_shard_is_asked_for_once_and_named_and_the_rest_reads(sample_shards, tmp_path):
    copy = shutil.copytree(sample_shards, tmp_path / "shards")
    gone = load_manifest(copy).shards["train"][2]
    (copy / gone.name).unlink()
    with RangeHTTPServer(copy) as server:
        far = opened(server.url, tmp_path / "cache")
        with pytest.raises(RemoteMissing, match=f"{server.url}{gone.name} does not exist"):
            far.store.open(gone.name, gone.sha256, gone.bytes)
        assert len(gets(server, gone.name)) == 1  # not retried
        keys = [s["__key__"] for s in read_split(far, "train", skip_bad=True)]
    assert set(keys) == {k for s in load_manifest(copy).shards["train"] if s.name != gone.name for k in s.keys}


def test_a_server_stopped_for_a_few_seconds_is_ridden_out(http, sample_shards, tmp_path, caplog):
    store = opened(http.url, tmp_path / "cache", retries=6).store
    info = load_manifest(sample_shards).shards["train"][0]
    http.stop()
    threading.Timer(2.0, http.start).start()
    with caplog.at_level(logging.WARNING, "dist_train"):
        path = store.path(info.name, info.sha256, info.bytes)
    assert path.stat().st_size == info.bytes
    assert any("retry 1 of 6" in r.getMessage() and info.name in r.getMessage() for r in caplog.records)


def test_a_server_that_stops_answering_times_out_and_is_asked_again(http, sample_shards, tmp_path, caplog):
    store = opened(http.url, tmp_path / "cache", timeout=1.0).store
    info = load_manifest(sample_shards).shards["train"][0]
    http.stall(1, 30.0)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, "dist_train"):
        path = store.path(info.name, info.sha256, info.bytes)
    assert time.monotonic() - start < 10 and path.stat().st_size == info.bytes
    assert [r.getMessage() for r in caplog.records] == [
        f"{http.url}{info.name}: reading bytes 0-{info.bytes - 1} failed (FSTimeoutError); retry 1 of 3"]


def test_a_shard_that_cannot_be_fetched_is_an_error_naming_its_url(http, sample_shards, tmp_path):
    store = opened(http.url, tmp_path / "cache", retries=1).store
    info = load_manifest(sample_shards).shards["train"][0]
    http.stop()
    with pytest.raises(RemoteError, match=f"{http.url}{info.name}: reading bytes .* failed 2 times"):
        store.path(info.name, info.sha256, info.bytes)
    assert not list((store.root / "data").glob(f"*{info.name}*"))  # no partial file


def test_a_file_that_differs_from_the_manifest_is_refused_and_not_kept(sample_shards, tmp_path):
    copy = shutil.copytree(sample_shards, tmp_path / "shards")
    info = load_manifest(copy).shards["train"][0]
    raw = bytearray((copy / info.name).read_bytes())
    raw[-100] ^= 1
    (copy / info.name).write_bytes(bytes(raw))
    with RangeHTTPServer(copy) as server:
        store = opened(server.url, tmp_path / "cache").store
        with pytest.raises(RemoteError, match="is not the file manifest.json lists"):
            store.path(info.name, info.sha256, info.bytes)
    assert sorted(p.name for p in (store.root / "data").iterdir()) == []


def test_a_small_cache_evicts_the_least_recently_used_shard_not_in_use(http, sample_shards, tmp_path):
    shards = load_manifest(sample_shards).shards["train"][:3]
    a, b, c = shards
    store = opened(http.url, tmp_path / "cache", size=str(a.bytes + b.bytes + c.bytes - 1)).store
    outside = [tmp_path / "cache" / "mine.tar", store.top / "mine.tar", store.root / "mine.tar"]
    for p in outside:
        p.write_bytes(b"not the cache's")
    fd = store.open(a.name, a.sha256, a.bytes)  # a: in use, and the oldest
    time.sleep(0.01)
    store.path(b.name, b.sha256, b.bytes)
    store.path(c.name, c.sha256, c.bytes)  # room for c: b goes, a is in use
    data = store.root / "data"
    assert sorted(p.name for p in data.iterdir()) == sorted([a.name, c.name]) and store.cached() <= store.cap
    os.close(fd)
    store.path(b.name, b.sha256, b.bytes)  # now a goes: the least recently used, no longer in use
    assert sorted(p.name for p in data.iterdir()) == sorted([b.name, c.name])
    assert all(p.read_bytes() == b"not the cache's" for p in outside)


def _fetch_at(store: CachedShards, name: str, sha: str, size: int, barrier) -> None:
    barrier.wait()
    store.path(name, sha, size)


def test_processes_of_a_node_fetch_a_shard_once_between_them(http, sample_shards, tmp_path):
    store = opened(http.url, tmp_path / "cache").store
    info = load_manifest(sample_shards).shards["train"][0]
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_fetch_at, args=(store, info.name, info.sha256, info.bytes, barrier))
             for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(gets(http, info.name)) == 1


def test_nodes_sharing_a_cache_folder_keep_their_own_caches(http, sample_shards, tmp_path, monkeypatch):
    info = load_manifest(sample_shards).shards["train"][0]
    stores = {}
    for node in ("n1", "n2"):
        monkeypatch.setattr(socket, "gethostname", lambda node=node: node)
        stores[node] = opened(http.url, tmp_path / "shared").store
        stores[node].path(info.name, info.sha256, info.bytes)
    assert stores["n1"].top != stores["n2"].top and len(gets(http, info.name)) == 2


def test_secrets_stay_out_of_errors_and_logs(sample_shards, tmp_path, caplog):
    with RangeHTTPServer(sample_shards, token="TOKEN-s3cr3t") as server:
        url = server.url + "?token=TOKEN-s3cr3t"
        with caplog.at_level(logging.INFO), caplog.at_level(logging.DEBUG, "dist_train"):  # what a run logs
            far = opened(url, tmp_path / "cache", retries=1)
            assert len(list(read_split(far, "test"))) == load_manifest(sample_shards).count("test")
            with pytest.raises(RemoteMissing) as missing:
                far.store.path("nothing.tar")
            with pytest.raises(RemoteError, match="access denied") as refused:
                opened(server.url + "?token=wrong-token", tmp_path / "c2")
            server.stop()
            with pytest.raises(RemoteError) as down:
                far.store.path(load_manifest(sample_shards).shards["train"][0].name)
    text = " ".join([str(missing.value), str(refused.value), str(down.value), caplog.text,
                     *(p.name for p in (tmp_path / "cache").rglob("*"))])
    assert "TOKEN-s3cr3t" not in text and "wrong-token" not in text and server.url in str(missing.value)


def test_a_url_with_keys_in_it_is_refused_before_anything_is_fetched():
    with pytest.raises(ValueError, match="keys do not go in an s3:// URL"):
        Remote("s3://KEY:SECRET@bucket/prefix/")


def test_preview_reads_a_remote_folder(http, tmp_path):
    from preprocess import preview

    out = tmp_path / "p.png"
    assert preview.main([http.url, "--out", str(out), "--samples", "2", "--thumb", "16", "--cache-dir",
                         str(tmp_path / "cache")]) == 0
    assert out.stat().st_size > 0 and list((tmp_path / "cache").rglob("data/train-000000.tar"))


def test_a_cache_smaller_than_two_shuffle_windows_is_warned_about(http, sample_shards, tmp_path):
    m = load_manifest(sample_shards)
    biggest = sorted((s.bytes for s in m.shards["train"]), reverse=True)
    assert cache.cache_note(opened(http.url, tmp_path / "a", size=str(sum(biggest[:2]))), 1) is None
    note = cache.cache_note(opened(http.url, tmp_path / "b", size=str(sum(biggest[:2]) - 1)), 1)
    assert "raise --cache-size or lower --shuffle-window" in note
    assert cache.cache_note(m, 1) is None  # local shards: no cache


def test_a_store_pickled_to_a_spawned_process_fetches_there(http, sample_shards, tmp_path):
    store = opened(http.url, tmp_path / "cache").store  # used here first: it holds this process's filesystem
    info = load_manifest(sample_shards).shards["train"][0]
    ctx = multiprocessing.get_context("spawn")  # as under a forkserver or spawn start method: the store is pickled
    barrier = ctx.Barrier(1)
    proc = ctx.Process(target=_fetch_at, args=(store, info.name, info.sha256, info.bytes, barrier))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0 and (store.root / "data" / info.name).stat().st_size == info.bytes


def test_the_part_file_of_a_download_that_died_is_deleted_to_make_room(http, sample_shards, tmp_path, caplog):
    a, b = load_manifest(sample_shards).shards["train"][:2]
    store = opened(http.url, tmp_path / "cache", size=str(a.bytes + 4096)).store
    dead = store.root / "data" / f".{b.name}.999999.part"  # what a process killed while downloading b leaves
    with open(dead, "wb") as f:
        f.truncate(b.bytes)
    with caplog.at_level(logging.WARNING, "dist_train"):
        store.path(a.name, a.sha256, a.bytes)
    assert not dead.exists() and "over --cache-size" not in caplog.text and store.cached() <= store.cap
