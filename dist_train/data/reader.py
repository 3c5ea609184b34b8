"""Reading samples from shards by their index: the one reader of the shard format.

Training, evaluation (the trainer's and ``dist_train.evaluate``), ``preprocess.preview`` and the
benchmarks all read through ``ShardReader``. Nothing here walks tar headers: a sample's members are
where the shard's index file says (``preprocess.shard_format.parse_index`` validates it against the
manifest), and each is checked against the index before it is used: the tar header in front of it
must name that member and give that size, and it must end inside the file.

Where bytes come from: a store turns a shard's name into a local file: ``LocalShards``, the shard
folder, or ``dist_train.data.cache.CachedShards``, a node-local cache of whole shards fetched from
object storage (``Manifest.store`` says which). A sample is read with one ``os.preadv`` of its byte
range into a buffer the reader reuses (its members lie side by side; members that do not are read one by
one), not through a memory map: the worker's memory stays bounded by what it reads
(``MAX_SAMPLE_BYTES``), and a shard cut short while open gives a short read, a bad sample, rather than a
SIGBUS.

Bad data never stops reading silently: a missing or unreadable shard, an index that does not fit the
manifest or the tar, a member past the end of the file or a header that differs from the index all
raise ``SampleError`` with the reason; the loaders turn it into a bad-sample record naming shard and
key (``bad_record``), or a ``BadDataError`` under ``--on-bad-sample error``. A shard-level problem is
found once and given to each of its samples.

A shard whose index file is missing gets its index inferred from the tar once, in the training
process, with a warning (``ShardIndexes``); ``python -m preprocess.index`` writes the index files
again. Tars that no manifest describes are read in order by webdataset's own iterators
(``iter_unindexed``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from webdataset.tariterators import group_by_keys, tar_file_expander

from preprocess.shard_format import (
    MAX_SAMPLE_BYTES,
    REINDEX_HINT,
    TAR_BLOCK,
    FormatError,
    Manifest,
    ShardIndex,
    ShardInfo,
    index_limit,
    parse_index,
)


class BadDataError(RuntimeError):
    """A sample or shard cannot be read and ``--on-bad-sample error`` is set."""


class SampleError(Exception):
    """One sample cannot be read; the message is the reason."""


def bad_record(on_bad: str, shard: str, key: str | None, reason: str, count: int = 1) -> dict:
    """A bad-sample record (``shard``, ``key``, ``reason``, ``count``), or BadDataError under ``on_bad="error"``."""
    if on_bad == "error":
        where = f"sample {key!r} of shard {shard}" if key else f"shard {shard}"
        raise BadDataError(f"{where}: {reason}. Re-pack the data, or pass --on-bad-sample skip to skip and count it.")
    return {"shard": shard, "key": key, "reason": reason, "count": count}


class LocalShards:
    """Shards in a local folder. Its methods are those of every store (``cache.CachedShards`` has the same):
    the one place a shard name becomes a file. ``sha256`` and ``size`` (the manifest's) are for a store that
    has to fetch the file; here the reader and ``--verify-shards`` check them."""

    remote_store = False

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.where = str(self.root)

    def path(self, name: str, sha256: str | None = None, size: int | None = None) -> Path:
        """The local file holding shard or index ``name``."""
        return self.root / name

    def open(self, name: str, sha256: str | None = None, size: int | None = None) -> int:
        """A read-only descriptor of shard ``name``; OSError if it is not a readable regular file."""
        return open_regular(self.root / name)


def store_of(manifest: Manifest) -> LocalShards:
    """Where ``manifest``'s files are read from: the store ``cache.open_manifest`` gave it, or its folder."""
    return manifest.store if manifest.store is not None else LocalShards(manifest.root)


def open_regular(path: Path) -> int:
    """A read-only descriptor of ``path``, which must be a regular file (a FIFO or a device would block or never
    end); OSError otherwise. Opened non-blocking, so a FIFO cannot hang the open itself."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def _header_problem(header: bytes, name: bytes, size: int) -> str | None:
    """Why ``header`` (a 512-byte tar header) is not the header of member ``name`` of ``size`` bytes, or None."""
    stored = header[:100].split(b"\0", 1)[0]
    if stored != name:
        return f"its tar header names {stored[:60].decode('ascii', 'replace')!r}"
    digits = header[124:136].strip(b"\0 ")
    if not digits or digits.strip(b"01234567") or int(digits, 8) != size:
        return f"its tar header gives the size {header[124:136].decode('ascii', 'replace')!r}, the index {size}"
    if header[156] not in (0x30, 0):
        return f"its tar header says it is not a regular file (type {chr(header[156])!r})"
    return None


class _Open:
    """An open shard: its file descriptor, size and validated index, or the reason it cannot be read."""

    def __init__(self, fd: int = -1, size: int = 0, index: ShardIndex | None = None, error: str | None = None):
        self.fd, self.size, self.index, self.error = fd, size, index, error


class ShardIndexes:
    """The validated indexes of a split's shards, each read once: ``get(i)`` is shard ``i``'s ``ShardIndex``
    or the reason it cannot be used.

    Loaded in the training process (``load_all``) before the loader workers start, which then share
    them (parsing an index costs ~17 us a sample: each worker doing it for every shard each epoch
    would cost a few % of its time). A shard whose index file is missing gets its index inferred from
    the tar, once, with a warning (as DALI does when it is given no index): one sequential read with the
    checks of ``python -m preprocess.index``, its sha256 included.
    """

    def __init__(self, store: LocalShards, shards: Sequence[ShardInfo], fields: Sequence[str], num_classes: int):
        self.store, self.shards, self.fields, self.num_classes = store, list(shards), tuple(fields), num_classes
        self._cache: dict[int, ShardIndex | str] = {}

    def get(self, i: int) -> ShardIndex | str:
        if i not in self._cache:
            self._cache[i] = self._read(self.shards[i])
        return self._cache[i]

    def load_all(self) -> ShardIndexes:
        if self.store.remote_store:  # fetched by 8 threads: most of the time is the round trips
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(self.get, range(len(self.shards))))
        for i in range(len(self.shards)):
            self.get(i)
        return self

    def _read(self, info: ShardInfo) -> ShardIndex | str:
        hint = REINDEX_HINT.format(root=self.store.where)
        where = f"{self.store.where}/{info.index}"
        try:
            fd = self.store.open(info.index, info.index_sha256)  # held in a cache until read: not evicted meanwhile
        except FileNotFoundError:
            return self._infer(info, hint)
        except OSError as e:
            return f"its index {info.index} cannot be read ({e.strerror or e}): {hint}"
        with os.fdopen(fd, "rb") as f:
            raw = f.read(index_limit(info.keys, self.fields) + 1)
        if hashlib.sha256(raw).hexdigest() != info.index_sha256:
            return f"its index {info.index} is not the one manifest.json lists (sha256 differs): {hint}"
        try:
            return parse_index(raw, where, info.keys, self.fields)
        except FormatError as e:
            return str(e)

    def _infer(self, info: ShardInfo, hint: str) -> ShardIndex | str:
        from preprocess.index import IndexingError, index_shard

        warnings.warn(f"{self.store.where}/{info.name}: no index file {info.index}, inferring the index from the "
                      f"tar (one full read): {hint}", stacklevel=2)
        try:
            path = self.store.path(info.name, info.sha256, info.bytes)
            os.close(open_regular(path))  # a FIFO in its place would block the read
            found = index_shard(path, info.count, info.sha256, len(self.fields) - 2, self.num_classes)
        except (OSError, IndexingError) as e:
            return f"its index {info.index} is missing and cannot be inferred from the tar ({e}): {hint}"
        if found["keys"] != list(info.keys):
            return f"its index {info.index} is missing and the tar holds other samples than manifest.json lists"
        return parse_index(found["_index_bytes"], str(path), info.keys, self.fields)


class ShardReader:
    """Samples of ``shards`` by ``(shard number, row)``; at most ``max_open`` shards open at once.

    ``bad_shards``: shard name -> reason, for shards known bad before reading (``--verify-shards``);
    ``indexes``: the shards' ``ShardIndexes`` when already loaded.
    """

    def __init__(self, store: LocalShards, shards: Sequence[ShardInfo], fields: Sequence[str],
                 bad_shards: dict[str, str] | None = None, max_open: int = 16, indexes: ShardIndexes | None = None):
        self.store, self.shards, self.fields = store, list(shards), tuple(fields)
        self.indexes = indexes or ShardIndexes(store, shards, fields, 1 << 30)
        self._suffixes = [f.encode() for f in self.fields]
        self._buffer = bytearray(1 << 18)  # reused by every read: a sample's members are views of it
        self.bad_shards = dict(bad_shards or {})
        self.max_open = max_open
        self._open: OrderedDict[int, _Open] = OrderedDict()

    def _load(self, i: int) -> _Open:
        info = self.shards[i]
        if info.name in self.bad_shards:
            return _Open(error=self.bad_shards[info.name])
        index = self.indexes.get(i)
        if isinstance(index, str):
            return _Open(error=index)
        try:
            fd = self.store.open(info.name, info.sha256, info.bytes)
        except OSError as e:
            return _Open(error=f"cannot be opened ({e.strerror or e})")
        return _Open(fd, os.fstat(fd).st_size, index)

    def _get(self, i: int) -> _Open:
        shard = self._open.get(i)
        if shard is None:
            shard = self._open[i] = self._load(i)
            while len(self._open) > self.max_open:
                _, old = self._open.popitem(last=False)
                if old.fd >= 0:
                    os.close(old.fd)
        else:
            self._open.move_to_end(i)
        return shard

    def sample(self, i: int, row: int, only: Sequence[str] | None = None) -> dict:
        """Members of sample ``row`` of shard ``i`` by field (plus ``__key__``); SampleError with the reason.

        The members are memoryviews of the reader's buffer, valid until its next ``sample()``: decode them
        or copy them (``bytes(m)``) before reading on (reading into one buffer spares an allocation and a
        copy of each sample, 5% of the time a loader worker spends on it). ``only``: read just these members."""
        shard, info = self._get(i), self.shards[i]
        if shard.error:
            raise SampleError(shard.error)
        offsets, sizes = shard.index.offsets[row].tolist(), shard.index.sizes[row].tolist()
        fields, suffixes = self.fields, self._suffixes
        if only is not None:
            cols = [self.fields.index(f) for f in only]
            offsets, sizes = [offsets[c] for c in cols], [sizes[c] for c in cols]
            fields, suffixes = tuple(only), [self._suffixes[c] for c in cols]
        start, end = min(offsets) - TAR_BLOCK, max(o + s for o, s in zip(offsets, sizes))
        if end > shard.size:
            raise SampleError(f"its members end at byte {end}, past the end of the shard ({shard.size} bytes): "
                              "truncated? Copy or re-pack the shard")
        key = info.keys[row]
        if end - start <= sum(sizes) + 2 * TAR_BLOCK * len(sizes):  # side by side, as packed: one read
            span = [(start, self._pread(shard, end - start, start, 0))]
        else:
            span, used = [], 0
            for o, s in zip(offsets, sizes):
                span.append((o - TAR_BLOCK, self._pread(shard, s + TAR_BLOCK, o - TAR_BLOCK, used)))
                used += s + TAR_BLOCK
        out: dict = {"__key__": key}
        prefix = key.encode() + b"."
        for j, (f, o, s) in enumerate(zip(fields, offsets, sizes)):
            base, buf = span[0] if len(span) == 1 else span[j]
            at, name = o - base, prefix + suffixes[j]
            head = at - TAR_BLOCK
            # What the packer (and tarfile) write, compared in place; anything else is parsed.
            if not (buf[head:head + len(name)] == name and buf[head + len(name)] == 0
                    and buf[head + 124:head + 136] == b"%011o\0" % s and buf[head + 156] in (0x30, 0)):
                problem = _header_problem(bytes(buf[head:at]), name, s)
                if problem:
                    raise SampleError(f"member {key}.{f} at byte {o} differs from the index: {problem}; "
                                      + REINDEX_HINT.format(root=self.store.where))
            out[f] = buf[at:at + s]
        return out

    def _pread(self, shard: _Open, n: int, at: int, into: int) -> memoryview:
        """``n`` bytes of the shard from byte ``at``, read into this reader's buffer from ``into`` on."""
        if into + n > MAX_SAMPLE_BYTES + 2 * TAR_BLOCK * len(self.fields):
            raise SampleError(f"a read of {n} bytes is more than a sample may take")
        if len(self._buffer) < into + n:
            self._buffer = bytearray(max(into + n, 2 * len(self._buffer)))
        view = memoryview(self._buffer)[into:into + n]
        try:
            got = os.preadv(shard.fd, [view], at)
        except OSError as e:
            raise SampleError(f"read error at byte {at} ({e.strerror or e})") from None
        if got != n:
            raise SampleError(f"the shard ends at byte {at + got}, inside a sample: truncated while in use?")
        return view

    def close(self) -> None:
        """Close every open shard."""
        while self._open:
            _, shard = self._open.popitem()
            if shard.fd >= 0:
                os.close(shard.fd)


def read_split(manifest: Manifest, split: str, limit: int | None = None, skip_bad: bool = False,
               only: Sequence[str] | None = None) -> Iterator[dict]:
    """Samples of ``split`` in packing order, at most ``limit``; a bad sample raises ``SampleError``
    (naming shard and key) or, with ``skip_bad``, is passed over. ``only``: read just these members."""
    shards = manifest.shards.get(split, [])
    reader = ShardReader(store_of(manifest), shards, manifest.fields)
    n = 0
    try:
        for i, info in enumerate(shards):
            for row in range(info.count):
                if limit is not None and n >= limit:
                    return
                try:
                    sample = reader.sample(i, row, only)
                except SampleError as e:
                    if skip_bad:
                        continue
                    raise SampleError(f"sample {info.keys[row]!r} of shard {info.name}: {e}") from None
                yield {**{k: bytes(v) if isinstance(v, memoryview) else v for k, v in sample.items()},
                       "__shard__": info.name}
                n += 1
    finally:
        reader.close()


def iter_unindexed(path: str | Path) -> Iterator[dict]:
    """Samples of a tar that has no index, in tar order, by webdataset's own iterators."""
    with open(path, "rb") as stream:
        yield from group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}]))


def verify_shards(manifest: Manifest, splits: Sequence[str] = ("train", "test"),
                  part: tuple[int, int] = (0, 1)) -> dict[str, str]:
    """Shard name -> what is wrong, for the shards of ``splits`` whose sha256 (tar or index) is not the
    manifest's (``--verify-shards``: reads every byte once). ``part=(k, n)`` checks every n-th shard from
    the k-th, so n processes share the work."""
    if store_of(manifest).remote_store:
        return {}  # every file fetched from object storage is checked against the manifest's sha256 already
    shards = [info for split in splits for info in manifest.shards.get(split, [])][part[0]::part[1]]
    bad = {}
    for info in shards:
        for name, want, size in ((info.name, info.sha256, info.bytes), (info.index, info.index_sha256, None)):
            try:
                got = _sha256_regular(manifest.root / name, size)
            except OSError as e:
                bad[info.name] = f"{name} cannot be read ({e.strerror or e})"
                break
            if got != want:
                bad[info.name] = (f"{name} is not the file manifest.json lists (sha256 {got[:12]}..., expected "
                                  f"{want[:12]}...): it changed after packing; re-pack it")
                break
    return bad


def _sha256_regular(path: Path, size: int | None) -> str:
    """sha256 of a regular file, read up to one byte more than ``size`` (its manifest size) at most."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path), "rb") as f:
        left = (size + 1) if size is not None else None
        while left is None or left > 0:
            block = f.read(1 << 20 if left is None else min(1 << 20, left))
            if not block:
                break
            h.update(block)
            left = None if left is None else left - len(block)
    return h.hexdigest()
