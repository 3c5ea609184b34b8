"""Write the sample index of a shard folder: ``python -m preprocess.index shards/``.

For shard folders packed before the index existed (``manifest.json`` format version 1) or whose
index files were lost or damaged. Each tar is read once with Python's ``tarfile`` in stream mode (it
cannot seek back, so a negative size field ends the read instead of looping) and checked: its sha256
must be the manifest's, its members regular files in order and inside the file, at most as many as
its samples can have, named ``<key>.<field>`` as the format says, each sample whole. Then every
index file is written beside its tar and ``manifest.json`` is rewritten as format version 2, with
each sample's key, label and group (source film) read from its members. The tars are never changed,
and nothing is written unless every shard could be indexed. The result is byte for byte what
``preprocess.shard`` writes today for the same shards.

Exit status: 0 done, 1 a shard or the manifest cannot be used (the message names it and says what
to do), 2 bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
from pathlib import Path

from preprocess import shard_format as fmt
from preprocess.splits import source_of


class IndexingError(Exception):
    """A shard or manifest that cannot be indexed; the message says which and why."""


class _Hashing:
    """A read-only file wrapper that hashes what is read (tarfile's stream mode reads every byte in order)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.sha.update(data)
        return data

    def rest(self) -> str:
        for _ in iter(lambda: self.read(1 << 20), b""):
            pass
        return self.sha.hexdigest()


def index_shard(path: Path, count: int, sha256: str, n_frames: int, num_classes: int) -> dict:
    """The manifest entry fields and the index bytes of one tar (``IndexingError`` when it cannot be trusted)."""
    fields = fmt.sample_fields(n_frames)
    size, limit = path.stat().st_size, count * len(fields)
    if size > count * (fmt.MAX_SAMPLE_BYTES + 2 * fmt.TAR_BLOCK * len(fields)) + 2 * tarfile.RECORDSIZE:
        raise IndexingError(f"it is {size} bytes, more than its {count} samples can take")
    samples: list[tuple[str, list[tuple[str, int, int]]]] = []
    labels, groups, done = [], [], set()
    meta: dict = {}
    with open(path, "rb") as raw:
        f = _Hashing(raw)
        try:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                end = 0
                for n, m in enumerate(tar):
                    tar.members = []  # stream mode keeps every header otherwise
                    if n >= limit:
                        raise IndexingError(f"it holds more members than its {count} samples can have ({limit})")
                    if not m.isreg() or m.size < 0 or m.offset_data < end or m.offset_data + m.size > size \
                            or m.size > fmt.MAX_MEMBER_BYTES:
                        raise IndexingError(f"member {m.name!r} is not a regular file of the shard format "
                                          f"(size {m.size}, at byte {m.offset_data} of {size})")
                    key, _, field = m.name.partition(".")
                    if field not in fields or not fmt.is_sample_key(key):
                        raise IndexingError(f"member {m.name!r} is not named <key>.<field> "
                                            f"with a field of {fields[:2]}...")
                    if not samples or samples[-1][0] != key:
                        if key in done:
                            raise IndexingError(f"the members of sample {key!r} are not side by side")
                        if samples:
                            _close_sample(samples[-1], fields, labels, groups, meta, num_classes)
                        done.add(key)
                        samples.append((key, []))
                        meta = {}
                    if field in (fmt.LABEL_FIELD, fmt.META_FIELD):
                        meta[field] = tar.extractfile(m).read()
                    samples[-1][1].append((field, m.offset_data, m.size))
                    end = m.offset_data + m.size
        except tarfile.TarError as e:
            raise IndexingError(f"it is not a readable tar ({e})") from None
        if samples:
            _close_sample(samples[-1], fields, labels, groups, meta, num_classes)
        got = f.rest()
    if got != sha256:
        raise IndexingError("its sha256 is not the one manifest.json lists: it changed after packing; re-pack it")
    if len(samples) != count:
        raise IndexingError(f"it holds {len(samples)} samples, manifest.json says {count}")
    index = fmt.format_index([(k, sorted(ms, key=lambda x: fields.index(x[0]))) for k, ms in samples])
    return {"bytes": size, "index": fmt.index_name(path.name), "index_sha256": hashlib.sha256(index).hexdigest(),
            "keys": [k for k, _ in samples], "labels": labels, "groups": groups, "_index_bytes": index}


def _close_sample(sample, fields, labels: list, groups: list, meta: dict, num_classes: int) -> None:
    key, members = sample
    if sorted(f for f, _, _ in members) != sorted(fields):
        raise IndexingError(f"sample {key!r} does not hold exactly the members {fields[0]} ... {fields[-1]}")
    try:
        label = int(meta[fmt.LABEL_FIELD].decode("ascii"))
        info = json.loads(meta[fmt.META_FIELD].decode("utf-8"))
        group = source_of(info["path"], info["class"])
    except (ValueError, KeyError, TypeError) as e:
        raise IndexingError(f"sample {key!r}: its label or metadata member cannot be read ({e})") from None
    if not 0 <= label < num_classes:
        raise IndexingError(f"sample {key!r}: label {label} is not one of the {num_classes} classes")
    labels.append(label)
    groups.append(group)


def reindex(root: Path) -> dict:
    """Index every shard of ``root`` and rewrite its manifest as format version 2; returns the manifest."""
    path = root / fmt.MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        classes, n_frames, splits = raw["classes"], int(raw["n_frames"]), raw["splits"]
    except FileNotFoundError:
        raise IndexingError(f"{path} not found: {root} is not a shard folder") from None
    except (ValueError, KeyError, TypeError) as e:
        raise IndexingError(f"{path} cannot be read ({e}); re-pack the videos") from None
    if raw.get("format_version") not in (1, fmt.FORMAT_VERSION):
        raise IndexingError(f"{path} has shard format version {raw.get('format_version')}: re-pack the videos")
    if not 1 <= n_frames <= 1000 or not isinstance(classes, list) or not isinstance(splits, dict):
        raise IndexingError(f"{path} is not a manifest of this format (n_frames, classes, splits); re-pack the videos")
    try:  # every shard name checked before any file is opened
        entries = [(split, entry) for split, info in splits.items() for entry in info["shards"]]
        bad = [(split, e.get("name")) for split, e in entries if split not in fmt.SPLITS
               or not isinstance(e.get("name"), str) or not fmt.is_shard_name(e["name"])
               or not e["name"].startswith(f"{split}-")]
    except (AttributeError, TypeError) as e:
        raise IndexingError(f"{path}: its splits are not lists of shard entries ({e}); re-pack the videos") from None
    if bad:
        raise IndexingError(f"{path}: {bad[0][1]!r} is not a shard name of split {bad[0][0]!r}; re-pack the videos")
    indexes = {}
    for _, entry in entries:
        name = entry["name"]
        try:
            found = index_shard(root / name, int(entry["count"]), entry["sha256"], n_frames, len(classes))
        except (OSError, KeyError, ValueError, TypeError) as e:
            raise IndexingError(f"{root / name}: cannot be indexed ({e})") from None
        except IndexingError as e:
            raise IndexingError(f"{root / name}: cannot be indexed: {e}") from None
        indexes[found["index"]] = found.pop("_index_bytes")
        entry.update(found)
    raw["format_version"] = fmt.FORMAT_VERSION
    try:  # what is about to be written must read back
        fmt.parse_manifest(raw, root)
    except fmt.FormatError as e:
        raise IndexingError(f"{e}; nothing was written") from None
    for name, index in indexes.items():
        fmt.write_bytes_atomic(root / name, index)
    fmt.write_manifest(root, raw)
    return raw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocess.index", description=__doc__.split("\n\n")[0])
    p.add_argument("shards", type=Path, help="shard folder (with manifest.json)")
    a = p.parse_args(argv)
    try:
        manifest = reindex(a.shards)
    except IndexingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    n = sum(len(s["shards"]) for s in manifest["splits"].values())
    print(f"indexed {n} shards in {a.shards}; manifest.json is now format version {fmt.FORMAT_VERSION}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
