"""Self-test of the loopback servers in tests/remote_servers.py (one weed start for the whole module)."""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import s3fs

from tests.remote_servers import RangeHTTPServer, S3Server, free_port

TOKEN = "s3cr3t-t0ken"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Two files: a 200 KiB one of random bytes and a tiny one."""
    root = tmp_path_factory.mktemp("remote-data")
    (root / "big.bin").write_bytes(os.urandom(200 * 1024))
    (root / "small.txt").write_bytes(b"hello shards\n")
    return root


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    with S3Server(tmp_path_factory.mktemp("weed")) as server:
        yield server


@pytest.fixture
def web(data_dir) -> Iterator[RangeHTTPServer]:
    with RangeHTTPServer(data_dir) as server:
        yield server


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
        return r.status, dict(r.headers), r.read()


def _status(url: str) -> int:
    try:
        return _get(url)[0]
    except urllib.error.HTTPError as e:
        return e.code


# -- S3 ------------------------------------------------------------------------------------------------------------


def test_s3_upload_and_range_read_with_env(s3, data_dir, monkeypatch):
    assert s3.upload(data_dir, "vidshard-data", "train/") == "s3://vidshard-data/train/"
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)  # endpoint and keys from the standard AWS variables only
    assert sorted(fs.ls("vidshard-data/train")) == ["vidshard-data/train/big.bin", "vidshard-data/train/small.txt"]
    big = (data_dir / "big.bin").read_bytes()
    assert fs.cat_file("vidshard-data/train/big.bin", start=1000, end=70000) == big[1000:70000]


def test_s3_wrong_secret_is_refused(s3):
    fs = s3fs.S3FileSystem(key=s3.access_key, secret="not-the-secret", endpoint_url=s3.endpoint,
                           skip_instance_cache=True)
    with pytest.raises(PermissionError):
        fs.ls("vidshard-data")


def test_s3_remove_and_restart_keeps_data(s3, data_dir):
    s3.remove("vidshard-data", "train/small.txt")
    s3.restart()
    fs = s3.filesystem()
    assert fs.cat_file("vidshard-data/train/big.bin") == (data_dir / "big.bin").read_bytes()
    assert not fs.exists("vidshard-data/train/small.txt")
    assert s3.upload(data_dir, "after-restart", "") == "s3://after-restart/"  # still writable, new volumes too
    assert fs.cat_file("after-restart/small.txt") == b"hello shards\n"


# -- HTTP ----------------------------------------------------------------------------------------------------------


def test_http_get_head_and_keep_alive(web, data_dir):
    big = (data_dir / "big.bin").read_bytes()
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    conn.request("GET", "/big.bin")
    resp = conn.getresponse()
    assert (resp.status, int(resp.headers["Content-Length"]), resp.read()) == (200, len(big), big)
    conn.request("HEAD", "/big.bin")  # same connection
    resp = conn.getresponse()
    assert (resp.status, int(resp.headers["Content-Length"]), resp.read()) == (200, len(big), b"")
    conn.close()
    assert [(r["method"], r["path"], r["status"]) for r in web.requests] == [("GET", "/big.bin", 200),
                                                                            ("HEAD", "/big.bin", 200)]


def test_http_ranges(web, data_dir):
    big = (data_dir / "big.bin").read_bytes()
    status, headers, body = _get(web.url + "big.bin", Range="bytes=10-19")
    assert (status, headers["Content-Range"], body) == (206, f"bytes 10-19/{len(big)}", big[10:20])
    status, headers, body = _get(web.url + "big.bin", Range="bytes=200000-")
    assert (status, headers["Content-Range"], body) == (206, f"bytes 200000-{len(big) - 1}/{len(big)}", big[200000:])
    try:
        _get(web.url + "big.bin", Range=f"bytes={len(big)}-")
    except urllib.error.HTTPError as e:
        assert (e.code, e.headers["Content-Range"]) == (416, f"bytes */{len(big)}")
    else:
        pytest.fail("416 expected")
    assert web.requests[0]["range"] == "bytes=10-19"


def test_http_missing_outside_root_and_token(data_dir):
    with RangeHTTPServer(data_dir, token=TOKEN) as web:
        assert _status(f"{web.url}small.txt?token={TOKEN}") == 200
        assert _status(f"{web.url}small.txt") == 403
        assert _status(f"{web.url}small.txt?token=wrong") == 403
        assert _status(f"{web.url}nope.tar?token={TOKEN}") == 404
        conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
        conn.request("GET", f"/../../etc/hostname?token={TOKEN}")
        assert conn.getresponse().status == 403
        conn.close()
        assert web.requests[0]["path"] == "/small.txt"


def test_http_cut_connection_and_stall(web, data_dir):
    big = (data_dir / "big.bin").read_bytes()
    web.cut_connections(1, after_bytes=5000)
    conn = http.client.HTTPConnection("127.0.0.1", web.port, timeout=5)
    conn.request("GET", "/big.bin", headers={"Range": "bytes=100-"})
    resp = conn.getresponse()
    assert int(resp.headers["Content-Length"]) == len(big) - 100
    with pytest.raises(http.client.IncompleteRead) as err:
        resp.read()
    assert err.value.partial == big[100:5100]
    conn.close()
    assert _get(web.url + "big.bin", Range="bytes=5100-")[2] == big[5100:]  # the fault was used up
    web.stall(1, 0.3)
    t0 = time.monotonic()
    assert _get(web.url + "small.txt")[0] == 200
    assert time.monotonic() - t0 >= 0.3
    assert [r["range"] for r in web.requests] == ["bytes=100-", "bytes=5100-", None]


def test_http_stop_refuses_and_start_reuses_port(web):
    url = web.url
    assert _status(url + "small.txt") == 200
    web.stop()
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", web.port, timeout=5).connect()
    web.start()
    assert web.url == url
    assert _status(url + "small.txt") == 200


def test_http_fixed_port(data_dir):
    port = free_port()
    with RangeHTTPServer(data_dir, port=port) as web:
        assert web.url == f"http://127.0.0.1:{port}/"
        assert _status(web.url + "small.txt") == 200
