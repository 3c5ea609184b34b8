"""The shard format: the one contract between the packer (preprocess.shard) and the readers (dist_train).

A shard folder holds ``train-000000.tar``, ``test-000000.tar``, ... and ``manifest.json``.
Each tar holds one sample per video, all members named ``<key>.<field>`` with a dot-free key:

    00000042.000.jpg ... 00000042.015.jpg   RGB JPEG frames in time order
    00000042.cls                             integer label, ASCII
    00000042.json                            metadata (see ``sample_meta``)

Nothing outside this module spells out member names, shard names or the manifest layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "test")
LABEL_FIELD = "cls"
META_FIELD = "json"
FRAME_EXT = "jpg"
TMP_SUFFIX = ".tmp"
_SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<index>\d{6})\.tar$")


def frame_field(i: int) -> str:
    """Tar member suffix of frame ``i`` (``000.jpg``)."""
    return f"{i:03d}.{FRAME_EXT}"


@functools.lru_cache(maxsize=64)
def frame_fields(n_frames: int) -> tuple[str, ...]:
    """Member suffixes of all frames of a sample, in time order."""
    return tuple(frame_field(i) for i in range(n_frames))


def sample_key(video_id: int) -> str:
    """Dot-free sample key of the video with this id (its index in the sorted input list)."""
    return f"{video_id:08d}"


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def is_shard_name(name: str) -> bool:
    """True for names this format uses for shards (``train-000000.tar``)."""
    return _SHARD_RE.match(name) is not None


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


TAR_BLOCK = tarfile.BLOCKSIZE
_HEADER_TEMPLATE = _header_template()


class ShardWriter:
    """Writes one tar deterministically (fixed mtime/owner, given member order), atomically.

    The tar is written to ``<name>.tmp`` and renamed on ``close()``: an interrupted run never
    leaves a file that looks like a complete shard. The bytes are exactly what ``tarfile`` writes
    (ustar, end-of-archive zero blocks, padded to 10 kB records); the sha256 is taken as they are written.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + TMP_SUFFIX)
        self._file = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self._size = 0
        self.count = 0

    def _write(self, parts: list[bytes]) -> None:
        data = b"".join(parts)
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def write(self, key: str, frames: list[bytes], label: int, meta: dict) -> None:
        """Append one sample: JPEG-encoded frames in order, its label and metadata."""
        if "." in key:
            raise ValueError(f"sample key {key!r} must not contain a dot")
        members = list(zip(frame_fields(len(frames)), frames))
        members.append((LABEL_FIELD, str(int(label)).encode("ascii")))
        members.append((META_FIELD, json.dumps(meta, sort_keys=True).encode("utf-8")))
        parts = []
        for name, data in members:
            parts += (tar_header(f"{key}.{name}", len(data)), data, bytes(-len(data) % TAR_BLOCK))
        self._write(parts)
        self.count += 1

    def close(self) -> dict:
        """Finish the tar, rename it into place and return its manifest entry."""
        end = 2 * TAR_BLOCK  # two zero blocks, then zeros up to a whole record, as tarfile ends an archive
        end += -(self._size + end) % tarfile.RECORDSIZE
        self._write([bytes(end)])
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return {"name": self.path.name, "count": self.count, "sha256": self._hash.hexdigest()}

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


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass
class ShardInfo:
    name: str
    count: int
    sha256: str


@dataclass
class Manifest:
    """What ``manifest.json`` says about a shard folder."""

    root: Path
    classes: list[str]
    n_frames: int
    shards: dict[str, list[ShardInfo]]
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    args: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def count(self, split: str) -> int:
        """Number of samples in ``split``."""
        return sum(s.count for s in self.shards.get(split, []))

    def urls(self, split: str) -> list[str]:
        """Paths of the shards of ``split``, in order."""
        return [str(self.root / s.name) for s in self.shards.get(split, [])]


def load_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json``; a clear error if it is missing or from another format."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {root} is not a shard folder. Create one with "
            f"`python -m preprocess.shard VIDEO_DIR {root}`."
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-run preprocess.shard to rewrite it.") from e
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has shard format version {version}, this code reads version {FORMAT_VERSION}; "
            "re-pack the videos with this version of preprocess.shard."
        )
    shards = {
        split: [ShardInfo(**s) for s in info["shards"]] for split, info in raw["splits"].items()
    }
    return Manifest(
        root=root,
        classes=list(raw["classes"]),
        n_frames=int(raw["n_frames"]),
        shards=shards,
        per_class={split: info["per_class"] for split, info in raw["splits"].items()},
        skipped=list(raw.get("skipped", [])),
        args=dict(raw.get("args", {})),
    )


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
