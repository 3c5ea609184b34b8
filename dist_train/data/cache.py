"""Shards in object storage, read through a node-local cache of whole shards.

``--shards`` names a local folder or a remote one; ``open_manifest`` reads its ``manifest.json`` and
returns it with its store: ``LocalShards`` (``dist_train.data.reader``) or ``CachedShards`` (here). The
reader asks the store for a shard's file and never learns where the bytes came from; the bytes come
through ``dist_train.data.remote``, which fetches them (and keeps secrets out of sight).

**The cache** (``--cache-dir``, ``--cache-size``) holds whole files in ``CACHE_DIR/HOST/SOURCE/``, one
folder per node, so a cache folder that several nodes share is safe (no lock is ever taken across
nodes) and each node keeps its own cache (on SLURM the default is node-local: ``$SLURM_TMPDIR`` or
``$TMPDIR``). On a node, every process (all ranks and their loader workers) shares it, coordinated by
``flock`` locks, which the kernel drops when a process dies, so a crash leaves no stale lock (the run
folder's and the packer's lock files, ``preprocess.lockfile``, outlive their process on purpose and are
judged stale by host and pid; here a lock only has to last while its holder runs, and readers need
shared locks), and which hold on NFS too (Linux maps them to NFS byte-range locks):

- ``locks/NAME.lock``: held by the one process downloading ``NAME``; the others wait for it, then use
  its file. A download is written to ``data/.NAME.PID.part``, checked (size and the manifest's sha256)
  and renamed into place: a file in ``data/`` is always complete.
- a shard open for reading holds a shared lock on its file: it is in use and is not evicted.
- ``HOST/.lock``: held while making room. Before a download, files not in use are deleted least
  recently used first (their mtime is set at each use) until the download fits under the cap, and the
  ``.part`` file is given its full size at once, so concurrent downloads count against the cap (the
  ``.part`` file of a process that died downloading is deleted then). Only files in the cache's own
  ``data/`` folders are ever deleted.

Loader workers prefetch: each starts a thread (``Prefetch``) that fetches the shards it will read
next, in the order it will first read them.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import shutil
import socket
import threading
from collections.abc import Sequence
from pathlib import Path

from dist_train.data.remote import Remote, RemoteError, RemoteMissing
from dist_train.locations import default_cache_dir, is_remote, parse_size
from preprocess import shard_format as fmt

log = logging.getLogger("dist_train")

CHUNK = 8 << 20  # bytes per ranged request: a worker's download memory, and how much a cut connection costs


class _Flock:
    """An exclusive ``flock`` on a file, waited for or not (``acquired`` says)."""

    def __init__(self, path: Path, wait: bool = True):
        self.fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            self.acquired = True
        except BlockingIOError:
            self.acquired = False

    def __enter__(self) -> _Flock:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


class CachedShards:
    """The store of a remote shard folder: each file fetched whole into this node's cache (see the module
    docstring), where the reader opens it. Picklable: loader workers get a copy and share the cache on disk."""

    remote_store = True

    def __init__(self, remote: Remote, cache_dir: str | Path, cap: int | None):
        self.remote, self.where = remote, remote.public.rstrip("/")
        self.top = Path(cache_dir) / socket.gethostname()
        self.root = self.top / hashlib.sha256(remote.public.encode()).hexdigest()[:16]
        self.cap = cap
        self._warned = False
        for d in (self.root / "data", self.root / "locks"):
            d.mkdir(parents=True, exist_ok=True)
        (self.root / "source.txt").write_text(remote.public + "\n")

    def path(self, name: str, sha256: str | None = None, size: int | None = None) -> Path:
        """The local file holding ``name``, fetched into the cache first if it is not there."""
        final = self.root / "data" / name
        if not final.exists():
            with _Flock(self.root / "locks" / f"{name}.lock"):
                if not final.exists():
                    self._download(name, final, sha256, size)
        _touch(final)
        return final

    def open(self, name: str, sha256: str | None = None, size: int | None = None) -> int:
        """A descriptor of ``name``'s cached file, which stays in the cache (in use) until it is closed."""
        from dist_train.data.reader import open_regular

        for _ in range(3):
            path = self.path(name, sha256, size)
            try:
                fd = open_regular(path)
            except FileNotFoundError:  # evicted between the fetch and the open
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_nlink:  # not evicted between the fetch and the lock
                return fd
            os.close(fd)
        raise RemoteError(errno.EIO, f"{self.remote.url(name)}: evicted from the cache as soon as fetched, three "
                          f"times: the cache ({self.top}) is too small for the shards in use at once; raise "
                          "--cache-size")

    def prefetch(self, name: str, sha256: str | None = None, size: int | None = None) -> None:
        """Fetch ``name`` now unless it is cached or another process is fetching it; never raises (the reader
        meets any problem itself, and reports it)."""
        final = self.root / "data" / name
        if final.exists():
            return
        try:
            with _Flock(self.root / "locks" / f"{name}.lock", wait=False) as lock:
                if lock.acquired and not final.exists():
                    self._download(name, final, sha256, size)
        except OSError:
            pass

    def _download(self, name: str, final: Path, sha256: str | None, size: int | None) -> None:
        """Download ``name`` to ``final`` through a ``.part`` file (the caller holds its lock)."""
        for stale in final.parent.glob(f".{name}.*.part"):  # left by a process that died downloading
            stale.unlink(missing_ok=True)
        size = self.remote.size(name) if size is None else size
        part = final.with_name(f".{name}.{os.getpid()}.part")
        self._make_room(size, part)
        h = hashlib.sha256()
        try:
            with open(part, "r+b") as f:
                for start in range(0, size, CHUNK):
                    block = self.remote.read(name, start, min(size, start + CHUNK))
                    f.write(block)
                    h.update(block)
            if sha256 is not None and h.hexdigest() != sha256:
                raise RemoteError(errno.EIO, f"{self.remote.url(name)} is not the file manifest.json lists (sha256 "
                                  f"{h.hexdigest()[:12]}..., expected {sha256[:12]}...): it changed after packing; "
                                  "upload the shard folder again")
            os.replace(part, final)
        finally:
            part.unlink(missing_ok=True)

    def _make_room(self, size: int, part: Path) -> None:
        """Evict files not in use, least recently used first, until ``size`` more bytes fit under the cap, then
        create ``part`` at that size (so that other downloads count it)."""
        with _Flock(self.top / ".lock"):
            if self.cap is not None:
                files = [f for f in _files(self.top) if not _stale_part(f[1])]
                used = sum(st.st_size for st, _ in files)
                for st, p in sorted((f for f in files if not f[1].name.startswith(".")), key=lambda f: f[0].st_mtime):
                    if used + size <= self.cap:
                        break
                    with _Flock(p, wait=False) as lock:  # a reader's shared lock: in use
                        if lock.acquired:
                            p.unlink(missing_ok=True)
                            used -= st.st_size
                if used + size > self.cap and not self._warned:
                    self._warned = True
                    log.warning("the shard cache %s holds %s in use, over --cache-size %s: the shards read at once "
                                "do not fit; raise --cache-size (or lower --shuffle-window)", self.top,
                                _human(used + size), _human(self.cap))
            with open(part, "wb") as f:
                f.truncate(size)

    def cached(self) -> int:
        """Bytes in this node's cache (every source), ``.part`` files at their full size."""
        return sum(st.st_size for st, _ in _files(self.top))


def _files(top: Path) -> list[tuple[os.stat_result, Path]]:
    """``(stat, path)`` of each file in the cache folders under ``top`` (a file renamed or evicted meanwhile is
    passed over)."""
    out = []
    for p in top.glob("*/data/*"):
        try:
            out.append((p.stat(), p))
        except FileNotFoundError:
            continue
    return out


def _stale_part(path: Path) -> bool:
    """Whether ``path`` is the ``.part`` file of a download whose process died (nobody holds its lock); it is
    deleted then, so that the size it reserved is free again."""
    if not (path.name.startswith(".") and path.name.endswith(".part")):
        return False
    name = path.name[1:].rsplit(".", 2)[0]  # .NAME.PID.part
    with _Flock(path.parent.parent / "locks" / f"{name}.lock", wait=False) as lock:
        if lock.acquired:
            path.unlink(missing_ok=True)
    return lock.acquired


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:  # evicted meanwhile: the caller's open finds out
        pass


def _human(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def _auto_cap(store: CachedShards, manifest: fmt.Manifest) -> int:
    """``--cache-size auto``: the whole shard set, or 80% of the disk space the cache may take if that is less."""
    total = sum(s.bytes for shards in manifest.shards.values() for s in shards)
    room = shutil.disk_usage(store.top).free + store.cached()
    if total <= 0.8 * room:
        return int(total * 1.05) + (64 << 20)  # the index files, and a margin
    log.warning("the shard set (%s) does not fit on the disk of the shard cache %s: it keeps %s of it (80%% of the "
                "space it may take); pass --cache-size to choose", _human(total), store.top, _human(int(0.8 * room)))
    return int(0.8 * room)


def cache_note(manifest: fmt.Manifest, window: int) -> str | None:
    """A warning when the cache of remote shards cannot hold what a node reads at once: two shuffle windows (the
    one being read and the one being prefetched) of the largest shards; None when it can, or for local shards."""
    store = manifest.store
    if not getattr(store, "remote_store", False):
        return None
    sizes = sorted((s.bytes for s in manifest.shards.get("train", [])), reverse=True)
    need = sum(sizes[:2 * window])
    if store.cap >= need:
        return None
    return (f"--cache-size {_human(store.cap)} is less than two shuffle windows of shards ({_human(need)}: the "
            f"window read and the one fetched meanwhile, {window} shards each): shards will be fetched more than "
            "once per epoch and the cache will go over its size; raise --cache-size or lower --shuffle-window")


class Prefetch:
    """A loader worker's prefetch thread: fetches the shards the worker will read, in the order it first reads
    them, at most ``ahead`` shards past the one it is reading (``reading(i)``)."""

    def __init__(self, store: CachedShards, shards: Sequence[fmt.ShardInfo], order: Sequence[int], ahead: int):
        self.store, self.shards, self.order, self.ahead = store, shards, list(order), max(1, ahead)
        self.position = {s: j for j, s in enumerate(self.order)}
        self.reached, self.stopped = 0, False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self._thread.start()

    def reading(self, shard: int) -> None:
        """The worker reads shard ``shard`` now."""
        j = self.position.get(shard, 0)
        if j > self.reached:
            with self._wake:
                self.reached = j
                self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self.stopped = True
            self._wake.notify()

    def _run(self) -> None:
        for j, s in enumerate(self.order):
            with self._wake:
                self._wake.wait_for(lambda j=j: self.stopped or j <= self.reached + self.ahead)
                if self.stopped:
                    return
            info = self.shards[s]
            self.store.prefetch(info.name, info.sha256, info.bytes)


def open_manifest(where: str | Path, cache_dir: str | Path | None = None, cache_size: str | int | None = "auto",
                  timeout: float = 60.0, retries: int = 8) -> fmt.Manifest:
    """The manifest of ``--shards`` (a folder or a URL) with its ``store``: where the reader finds its files.

    A remote manifest is fetched anew (into the cache, as ``manifest.json`` beside the cached files);
    ``cache_size``: bytes, a ``--cache-size`` text, or auto/None (``dist_train.locations.parse_size``)."""
    if not is_remote(where):
        from dist_train.data.reader import LocalShards

        manifest = fmt.load_manifest(where)
        manifest.store = LocalShards(manifest.root)
        return manifest
    remote = Remote(str(where), timeout, retries)
    cap = parse_size(cache_size) if isinstance(cache_size, str) or cache_size is None else int(cache_size)
    store = CachedShards(remote, cache_dir or default_cache_dir(), cap)
    try:
        raw = remote.read_all(fmt.MANIFEST_NAME)
    except RemoteMissing:
        raise FileNotFoundError(f"{remote.url(fmt.MANIFEST_NAME)} not found: {remote.public} is not a shard folder. "
                                "Upload one made by `python -m preprocess.shard` (manifest.json included)") from None
    tmp = store.root / f".{fmt.MANIFEST_NAME}.{os.getpid()}.tmp"  # every process of the node writes its copy
    tmp.write_bytes(raw)
    os.replace(tmp, store.root / fmt.MANIFEST_NAME)
    try:
        manifest = fmt.load_manifest(store.root)
    except fmt.FormatError as e:
        raise fmt.FormatError(f"{remote.url(fmt.MANIFEST_NAME)} (fetched to {store.root}): {e}") from None
    if store.cap is None:
        store.cap = _auto_cap(store, manifest)
    manifest.store = store
    return manifest


