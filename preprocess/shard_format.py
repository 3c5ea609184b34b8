"""The shard format: the one contract between the packer (preprocess.shard) and the readers (dist_train).

A shard folder holds ``train-000000.tar``, ``test-000000.tar``, ..., one index file per tar
(``train-000000.idx``), ``wids-train.json`` / ``wids-test.json`` and ``manifest.json``.
Each tar holds one sample per video, all members named ``<key>.<field>`` with a dot-free key:

    00000042.000.jpg ... 00000042.015.jpg   RGB JPEG frames in time order (``n_frames`` of them)
    00000042.cls                             integer label, ASCII
    00000042.json                            metadata (see ``preprocess.shard.encode_item``)

A sample holds ``frames`` segments of the video times ``temporal_views`` frames per segment, in time
order: ``n_frames = frames * temporal_views`` frames are stored, and stored frame ``i * temporal_views + k``
is offset ``k`` of segment ``i`` (``view_positions``). ``temporal_views`` is 1 unless packed with
``--temporal-views``; then every segment holds that many frames, each view a full clip of ``frames``.

The index is DALI's ``wds2idx`` format (version ``v1.2``): a first line ``v1.2 <samples>``, then
one line per sample of ``<field> <data offset> <size> <member name>`` groups, one per member.
The manifest gives ``n_frames`` (frames stored per sample: what the member names depend on),
``frames`` (the clip length a model sees) and ``temporal_views`` (frames per segment; an older manifest
without it has 1, and no ``frames``), and lists every shard with its sample count, sha256, size, its
index's sha256, and each sample's key, label and group (source film), so a data plan needs nothing but
the manifest.

Nothing outside this module spells out member names, shard names, the index or the manifest layout.
Reading is validated here too (``load_manifest``, ``parse_index``): a hostile or damaged file gives a
``FormatError`` naming the file and what is wrong, never a loop or an unbounded allocation.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
MAX_TEMPORAL_VIEWS = 16
MAX_STORED_FRAMES = 1000  # frames per sample (the manifest's n_frames)
LABEL_FIELD = "cls"
META_FIELD = "json"
FRAME_EXT = "jpg"
TMP_SUFFIX = ".tmp"
INDEX_SUFFIX = ".idx"
INDEX_VERSION = "v1.2"  # DALI's wds2idx
TAR_BLOCK = tarfile.BLOCKSIZE
MAX_MEMBER_BYTES = 32 << 20  # a frame, label or metadata member; more is not something we packed
MAX_SAMPLE_BYTES = 64 << 20  # all members of one sample: what a reader may allocate for it
_SHARD_RE = re.compile(r"(?P<split>train|test)-(?P<index>[0-9]{6})\.tar")  # used with fullmatch: no newline
_KEY_RE = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
REINDEX_HINT = "run `python -m preprocess.index {root}` to rebuild the index files, or re-pack the videos"


class FormatError(ValueError):
    """A manifest or index that this code cannot trust; the message names the file and what to do."""


def frame_field(i: int) -> str:
    """Tar member suffix of frame ``i`` (``000.jpg``)."""
    return f"{i:03d}.{FRAME_EXT}"


@functools.lru_cache(maxsize=64)
def frame_fields(n_frames: int) -> tuple[str, ...]:
    """Member suffixes of all frames of a sample, in time order."""
    return tuple(frame_field(i) for i in range(n_frames))


@functools.lru_cache(maxsize=64)
def sample_fields(n_frames: int) -> tuple[str, ...]:
    """Every member suffix of a sample, in the order the packer writes and the index lists them."""
    return (*frame_fields(n_frames), LABEL_FIELD, META_FIELD)


def view_positions(frames: int, temporal_views: int, view: int) -> list[int]:
    """Stored positions of temporal view ``view`` of a sample: offset ``view`` of each of its ``frames`` segments.

    A sample packed with ``temporal_views`` K stores K frames per segment, segment by segment, so
    position ``i * K + view`` is that view's frame of segment ``i``; the ``frames`` positions returned are
    in time order. With K = 1 (and view 0) it is every stored frame.
    """
    if frames < 1 or temporal_views < 1 or not 0 <= view < temporal_views:
        raise ValueError(f"need frames >= 1 and 0 <= view < temporal_views, got {frames}, {temporal_views}, {view}")
    return [i * temporal_views + view for i in range(frames)]


def sample_key(video_id: int) -> str:
    """Dot-free sample key of the video with this id (its index in the sorted input list)."""
    return f"{video_id:08d}"


def is_sample_key(key: str) -> bool:
    """True for keys this format allows: 1-64 letters, digits, ``_`` or ``-`` (no dot, no path)."""
    return _KEY_RE.fullmatch(key) is not None


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def is_shard_name(name: str) -> bool:
    """True for names this format uses for shards (``train-000000.tar``)."""
    return _SHARD_RE.fullmatch(name) is not None


def index_name(shard: str) -> str:
    """Index file of a shard: ``train-000000.tar`` -> ``train-000000.idx`` (where DALI's wds2idx puts it)."""
    return shard[: -len(".tar")] + INDEX_SUFFIX


def wids_name(split: str) -> str:
    """The wids dataset description of a split (``wids-train.json``)."""
    return f"wids-{split}.json"


# ---------------------------------------------------------------------------------------------
# Writing


def tar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header ``tarfile`` writes for a regular file with the fixed fields below.

    Mode 0644, uid/gid 0, empty user/group names, mtime 0: byte for byte what
    ``tarfile.open(mode="w", format=tarfile.USTAR_FORMAT).addfile`` writes for such a member, made
    here in one step (tarfile's generic path costs ~30 us per member, a tenth of a frame's encode).
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    if size >= 8**11:
        raise ValueError(f"tar member {name!r} is too large for a ustar header ({size} bytes)")
    head = bytearray(_HEADER_TEMPLATE)
    head[0:len(raw)] = raw
    head[124:136] = b"%011o\0" % size
    head[148:155] = b"%06o\0" % sum(head)  # checksum over the header with its own field as spaces
    return bytes(head)


def _header_template() -> bytes:
    h = bytearray(TAR_BLOCK)
    h[100:124] = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
    h[136:148] = b"00000000000\0"  # mtime 0
    h[148:156] = b" " * 8  # checksum placeholder
    h[156] = ord(tarfile.REGTYPE)
    h[257:265] = tarfile.POSIX_MAGIC  # "ustar\0" + version "00"
    return bytes(h)


_HEADER_TEMPLATE = _header_template()


def format_index(samples: Sequence[tuple[str, Sequence[tuple[str, int, int]]]]) -> bytes:
    """The index file of a shard: ``samples`` as ``(key, [(field, data offset, size), ...])`` in tar order."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for key, members in samples:
        lines.append(" ".join(f"{f} {off} {size} {key}.{f}" for f, off, size in members))
    return ("\n".join(lines) + "\n").encode("ascii")


class ShardWriter:
    """Writes one tar and its index deterministically (fixed mtime/owner, given member order), atomically.

    The tar is written to ``<name>.tmp`` and renamed on ``close()``, then the index: an interrupted
    run never leaves a file that looks like a complete shard. The tar bytes are exactly what ``tarfile``
    writes (ustar, end-of-archive zero blocks, padded to 10 kB records); the sha256 is taken as they are
    written, and each member's offset is recorded for the index.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self._file = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.count = 0
        self._index: list[tuple[str, list[tuple[str, int, int]]]] = []
        self._samples: dict[str, list] = {"keys": [], "labels": [], "groups": []}

    def _write(self, parts: list[bytes]) -> None:
        data = b"".join(parts)
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def write(self, key: str, frames: list[bytes], label: int, meta: dict, group: str = "") -> None:
        """Append one sample: JPEG-encoded frames in order, its label, metadata and group (source film)."""
        if not is_sample_key(key):
            raise ValueError(f"sample key {key!r} must be 1-64 letters, digits, '_' or '-' (no dot)")
        members = list(zip(frame_fields(len(frames)), frames))
        members.append((LABEL_FIELD, str(int(label)).encode("ascii")))
        members.append((META_FIELD, json.dumps(meta, sort_keys=True).encode("utf-8")))
        parts, entries, pos = [], [], self._size
        for name, data in members:
            parts += (tar_header(f"{key}.{name}", len(data)), data, bytes(-len(data) % TAR_BLOCK))
            entries.append((name, pos + TAR_BLOCK, len(data)))
            pos += TAR_BLOCK + len(data) + (-len(data) % TAR_BLOCK)
        self._write(parts)
        self._index.append((key, entries))
        for k, v in (("keys", key), ("labels", int(label)), ("groups", str(group))):
            self._samples[k].append(v)
        self.count += 1

    def close(self) -> dict:
        """Finish the tar, rename it and its index into place and return its manifest entry."""
        end = 2 * TAR_BLOCK  # two zero blocks, then zeros up to a whole record, as tarfile ends an archive
        end += -(self._size + end) % tarfile.RECORDSIZE
        self._write([bytes(end)])
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        index = format_index(self._index)
        write_bytes_atomic(self.path.with_name(index_name(self.path.name)), index)
        return {"name": self.path.name, "count": self.count, "sha256": self._hash.hexdigest(), "bytes": self._size,
                "index": index_name(self.path.name), "index_sha256": hashlib.sha256(index).hexdigest(),
                **self._samples}

    def abort(self) -> None:
        """Drop the unfinished tar."""
        try:
            self._file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))


def write_manifest(out: Path, manifest: dict) -> None:
    """The wids descriptions of each split, then ``manifest.json`` (last: a folder without it is incomplete)."""
    for split, info in manifest["splits"].items():
        shards = [{"url": s["name"], "nsamples": s["count"], "filesize": s["bytes"]} for s in info["shards"]]
        write_json_atomic(Path(out) / wids_name(split), {"__kind__": "wids-shard-index-v1", "wids_version": 1,
                                                          "name": split, "shardlist": shards})
    write_json_atomic(Path(out) / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it: sizes and hashes, and each sample's key, label and group."""

    name: str
    count: int
    sha256: str
    bytes: int = 0
    index: str = ""
    index_sha256: str = ""
    keys: tuple[str, ...] = ()
    labels: tuple[int, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass
class Manifest:
    """What ``manifest.json`` says about a shard folder."""

    root: Path
    classes: list[str]
    n_frames: int  # frames stored per sample: frames * temporal_views
    shards: dict[str, list[ShardInfo]]
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    args: dict = field(default_factory=dict)
    temporal_views: int = 1  # stored frames per segment (``view_positions``)
    # Where the reader finds the files (dist_train.data's stores); None: in ``root``.
    store: object = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def frames(self) -> int:
        """Clip length a model sees: the segments of a sample (one frame of each per temporal view)."""
        return self.n_frames // self.temporal_views

    @property
    def fields(self) -> tuple[str, ...]:
        """Member suffixes of every sample, in index order."""
        return sample_fields(self.n_frames)

    def count(self, split: str) -> int:
        """Number of samples in ``split``."""
        return sum(s.count for s in self.shards.get(split, []))

    def urls(self, split: str) -> list[str]:
        """Paths of the shards of ``split``, in order."""
        return [str(self.root / s.name) for s in self.shards.get(split, [])]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shard_info(raw, split: str, num_classes: int, where: str) -> ShardInfo:
    """One validated shard entry; FormatError saying which field is wrong."""
    if not isinstance(raw, dict):
        raise FormatError(f"{where} must be an object, got {type(raw).__name__}")
    name = raw.get("name")
    m = _SHARD_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None or m["split"] != split:
        raise FormatError(f"{where}.name must be a plain file name like {shard_name(split, 0)} (no folders, no '..'), "
                          f"got {name!r}")
    for k in ("count", "bytes"):
        if not _is_int(raw.get(k)) or raw[k] < 0:
            raise FormatError(f"{where}.{k} must be a non-negative integer, got {raw.get(k)!r}")
    for k in ("sha256", "index_sha256"):
        if not isinstance(raw.get(k), str) or not _SHA_RE.fullmatch(raw[k]):
            raise FormatError(f"{where}.{k} must be 64 lowercase hex digits, got {raw.get(k)!r}")
    if raw.get("index") != index_name(name):
        raise FormatError(f"{where}.index must be {index_name(name)!r}, got {raw.get('index')!r}")
    n = raw["count"]
    keys, labels, groups = raw.get("keys"), raw.get("labels"), raw.get("groups")
    if not all(isinstance(x, list) and len(x) == n for x in (keys, labels, groups)):
        raise FormatError(f"{where}: keys, labels and groups must be lists of count ({n}) entries")
    if not all(isinstance(k, str) and is_sample_key(k) for k in keys):
        raise FormatError(f"{where}.keys: every key must be 1-64 letters, digits, '_' or '-'")
    if not all(_is_int(y) and 0 <= y < num_classes for y in labels):
        raise FormatError(f"{where}.labels: every label must be an integer in 0..{num_classes - 1}")
    if not all(isinstance(g, str) for g in groups):
        raise FormatError(f"{where}.groups: every group must be a string")
    return ShardInfo(name, n, raw["sha256"], raw["bytes"], raw["index"], raw["index_sha256"],
                     tuple(keys), tuple(labels), tuple(groups))


def load_manifest(root: str | Path) -> Manifest:
    """Read and validate ``root/manifest.json``; a clear error if it is missing, damaged or from another format."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a shard folder. Create one with "
            f"`python -m preprocess.shard VIDEO_DIR {root}`."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON ({e}); re-run preprocess.shard to rewrite it.") from e
    return parse_manifest(raw, root)


def parse_manifest(raw, root: Path) -> Manifest:
    """The ``Manifest`` of ``root`` from the decoded JSON ``raw``, validated field by field (``FormatError``)."""
    path = Path(root) / MANIFEST_NAME
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version == 1:
        raise FormatError(f"{path} is shard format version 1, which has no sample index: "
                          + REINDEX_HINT.format(root=root).replace("rebuild", "add"))
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path} has shard format version {version}, this code reads version {FORMAT_VERSION}; "
            "re-pack the videos with this version of preprocess.shard."
        )
    classes, n_frames, splits = raw.get("classes"), raw.get("n_frames"), raw.get("splits")
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes) \
            or len(set(classes)) != len(classes):
        raise FormatError(f"{path}: classes must be a list of distinct class names")
    if not _is_int(n_frames) or not 1 <= n_frames <= MAX_STORED_FRAMES:
        raise FormatError(f"{path}: n_frames must be an integer in 1..{MAX_STORED_FRAMES}, got {n_frames!r}")
    views = raw.get("temporal_views", 1)  # absent: packed before --temporal-views, one frame per segment
    if not _is_int(views) or not 1 <= views <= MAX_TEMPORAL_VIEWS:
        raise FormatError(f"{path}: temporal_views must be an integer in 1..{MAX_TEMPORAL_VIEWS}, got {views!r}")
    if n_frames % views:
        raise FormatError(f"{path}: n_frames ({n_frames}) must be a multiple of temporal_views ({views}): "
                          "frames x temporal_views frames are stored per sample")
    if "frames" in raw and (not _is_int(raw["frames"]) or raw["frames"] != n_frames // views):
        raise FormatError(f"{path}: frames must be n_frames / temporal_views = {n_frames // views}, "
                          f"got {raw['frames']!r}")
    if not isinstance(splits, dict) or not set(splits) <= set(SPLITS):
        raise FormatError(f"{path}: splits must be an object with keys among {', '.join(SPLITS)}")
    shards, per_class = {}, {}
    for split, info in splits.items():
        entries = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(entries, list):
            raise FormatError(f"{path}: splits.{split}.shards must be a list")
        shards[split] = [_shard_info(s, split, len(classes), f"{path}: splits.{split}.shards[{i}]")
                         for i, s in enumerate(entries)]
        names = [s.name for s in shards[split]]
        keys = [k for s in shards[split] for k in s.keys]
        if len(set(names)) != len(names) or len(set(keys)) != len(keys):
            raise FormatError(f"{path}: splits.{split} lists a shard or a sample key twice")
        if not _is_int(info.get("count")) or info["count"] != len(keys):
            raise FormatError(f"{path}: splits.{split}.count is {info.get('count')!r}, its shards hold {len(keys)}")
        per_class[split] = info.get("per_class", {})
    keys_of = {split: {k for s in shards.get(split, []) for k in s.keys} for split in SPLITS}
    in_both = keys_of["train"] & keys_of["test"]
    if in_both:
        raise FormatError(f"{path}: sample key {sorted(in_both)[0]!r} is in both train and test; re-pack the videos")
    if not isinstance(raw.get("skipped", []), list) or not isinstance(raw.get("args", {}), dict):
        raise FormatError(f"{path}: skipped must be a list and args must be an object")
    return Manifest(root=Path(root), classes=list(classes), n_frames=n_frames, shards=shards, per_class=per_class,
                    skipped=list(raw.get("skipped", [])), args=dict(raw.get("args", {})), temporal_views=views)


@dataclass(frozen=True)
class ShardIndex:
    """Where each member of each sample of one shard lies: data offsets and sizes, ``[samples, fields]``."""

    offsets: np.ndarray
    sizes: np.ndarray


def index_limit(keys: Sequence[str], fields: Sequence[str]) -> int:
    """The most bytes an index of samples ``keys`` with members ``fields`` may take (longer is refused unread):
    each member ``<field> <offset> <size> <key>.<field>`` with at most 15 and 9 digits."""
    per_sample = sum(2 * len(f) + 30 for f in fields) + 1
    return 64 + len(keys) * per_sample + len(fields) * sum(map(len, keys))


def parse_index(raw: bytes, where: str, keys: Sequence[str], fields: Sequence[str]) -> ShardIndex:
    """Validate an index file's bytes against the manifest's ``keys`` and the format's ``fields``.

    Every sample must list exactly ``fields``, each named ``<key>.<field>`` with the manifest's key at
    that position, at a block-aligned data offset after its header, at most ``MAX_MEMBER_BYTES`` long
    (``MAX_SAMPLE_BYTES`` per sample), and no two members (header and data) may overlap. Raises
    ``FormatError`` naming ``where`` and the line. Work and memory are bounded by ``index_limit``.
    """
    if len(raw) > index_limit(keys, fields):
        raise FormatError(f"{where}: {len(raw)} bytes, more than an index of {len(keys)} samples can take")
    try:
        lines = raw.decode("ascii").split("\n")
    except UnicodeDecodeError:
        raise FormatError(f"{where}: not an index file (not ASCII text)") from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != f"{INDEX_VERSION} {len(keys)}" or len(lines) != len(keys) + 1:
        head = lines[0][:40] if lines else ""
        raise FormatError(f"{where}: expected the header '{INDEX_VERSION} {len(keys)}' and {len(keys)} sample lines, "
                          f"got {head!r} and {len(lines) - 1} lines")
    column = {f: j for j, f in enumerate(fields)}
    canonical = list(fields)
    order = np.empty((len(keys), len(fields)), np.int64)  # column of each listed member
    numbers: list[str] = []
    for i, (key, line) in enumerate(zip(keys, lines[1:])):
        tokens = line.split(" ")
        listed = tokens[0::4]
        if len(tokens) != 4 * len(fields) or tokens[3::4] != [f"{key}.{f}" for f in listed] or (
                listed != canonical and sorted(listed) != sorted(canonical)):
            raise FormatError(f"{where} line {i + 2}: does not list exactly the {len(fields)} members of sample "
                              f"{key!r} ({fields[0]} ... {fields[-1]}, each as "
                              f"'<field> <offset> <size> {key}.<field>')")
        order[i] = np.arange(len(fields)) if listed == canonical else [column[f] for f in listed]
        numbers += tokens[1::4]
        numbers += tokens[2::4]
    if not "".join(numbers).isdigit() or max(map(len, numbers), default=0) > 15 or "" in numbers:
        raise FormatError(f"{where}: offsets and sizes must be plain integers (at most 15 digits)")
    values = np.array(list(map(int, numbers)), np.int64).reshape(len(keys), 2, len(fields))
    listed_offsets, listed_sizes = values[:, 0], values[:, 1]
    bad = (listed_offsets < TAR_BLOCK) | (listed_offsets % TAR_BLOCK != 0) | (listed_sizes < 0) \
        | (listed_sizes > MAX_MEMBER_BYTES) | (listed_offsets > 2**50)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise FormatError(f"{where} line {i + 2}: member {keys[i]}.{lines[i + 1].split(' ')[4 * j]} at byte "
                          f"{listed_offsets[i, j]} ({listed_sizes[i, j]} bytes) is not a member of a tar of this "
                          f"format (offsets are block-aligned, members at most {MAX_MEMBER_BYTES >> 20} MiB)")
    offsets, sizes = np.empty_like(listed_offsets), np.empty_like(listed_sizes)
    rows = np.arange(len(keys))[:, None]
    offsets[rows, order], sizes[rows, order] = listed_offsets, listed_sizes
    heavy = np.flatnonzero(sizes.sum(1) > MAX_SAMPLE_BYTES)
    if len(heavy):
        raise FormatError(f"{where} line {heavy[0] + 2}: sample {keys[heavy[0]]!r} claims "
                          f"{int(sizes[heavy[0]].sum())} bytes, more than {MAX_SAMPLE_BYTES >> 20} MiB")
    starts = offsets.ravel() - TAR_BLOCK
    order = np.argsort(starts, kind="stable")
    ends = (offsets.ravel() + sizes.ravel())[order]
    if len(order) > 1 and (starts[order][1:] < ends[:-1]).any():
        raise FormatError(f"{where}: members overlap (two members claim the same bytes of the tar)")
    return ShardIndex(offsets, sizes)


def split_sample(sample: dict, n_frames: int) -> tuple[list, int, dict]:
    """Frames (as stored or as decoded by webdataset), label and metadata of one sample dict.

    Works on raw webdataset samples (bytes values) and on ones that went through ``.decode()``.
    Raises ``KeyError`` naming the missing member when a sample is incomplete.
    """
    try:
        frames = [sample[f] for f in frame_fields(n_frames)]
        label = sample[LABEL_FIELD]
    except KeyError:
        missing = [f for f in (*frame_fields(n_frames), LABEL_FIELD) if f not in sample]
        where = sample.get("__url__", "?")
        raise KeyError(f"sample {sample.get('__key__')!r} in {where} lacks members {missing}") from None
    label = int(label.decode("ascii") if isinstance(label, bytes) else label)
    meta = sample.get(META_FIELD, {})
    if isinstance(meta, bytes):
        meta = json.loads(meta.decode("utf-8"))
    return frames, label, meta
