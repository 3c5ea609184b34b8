"""The output folder of a packing run: what in it is ours, one packer at a time, and an all-or-nothing swap.

A run writes its shards into a staging folder inside the output folder (``.staging-<pid>-<random>/``, so
on the same file system), and only when everything is written moves them in: shards and indexes, the
wids files, ``manifest.json`` last, then removes the shards of the old set that the new one lacks. A run
that fails or is killed before that leaves the previous complete set as it was; its staging folder is
removed then or by the next run. Nothing is ever deleted here that this format does not name.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

from preprocess import lockfile
from preprocess import shard_format as fmt
from preprocess.inputs import printable

LOCK_NAME = ".pack.lock"
_STAGING_RE = re.compile(r"\.staging-[0-9]+-[a-z0-9_]+")
# What a repository keeps in an otherwise git-ignored output folder (this one's shards/README.md): not
# ours, never touched, but no reason to refuse the folder.
HARMLESS = frozenset({"README.md", "README", "README.txt", ".gitignore", ".gitkeep"})


class OutputError(Exception):
    """The output folder cannot be used; the message says why and what to do."""


def _our_file(name: str) -> bool:
    stem = name[: -len(fmt.INDEX_SUFFIX)] if name.endswith(fmt.INDEX_SUFFIX) else None
    return (fmt.is_shard_name(name) or (stem is not None and fmt.is_shard_name(stem + ".tar"))
            or name == fmt.MANIFEST_NAME or name in {fmt.wids_name(s) for s in fmt.SPLITS})


def is_ours(name: str) -> bool:
    """True for the file names a packing run writes: shards, indexes, wids files, the manifest, their temporaries."""
    if name.endswith(fmt.TMP_SUFFIX):
        name = name[: -len(fmt.TMP_SUFFIX)]
    return _our_file(name)


def _is_shard_or_index(name: str) -> bool:
    return _our_file(name) and name != fmt.MANIFEST_NAME and not name.startswith("wids-")


def check_apart(inp: Path, out: Path) -> None:
    """Refuse an output folder inside the input folder (its shards would be read as input next time) and the reverse."""
    i, o = Path(os.path.realpath(inp)), Path(os.path.realpath(out))
    if i == o:
        raise OutputError(f"input and output are the same folder ({printable(str(inp))}): "
                          "give the shards a folder of their own, outside the videos")
    if o.is_relative_to(i):
        raise OutputError(f"output folder {printable(str(out))} is inside the input folder {printable(str(inp))}: "
                          "a later run would read its shards as input videos. Choose an output folder outside it, "
                          f"e.g. {printable(str(i.parent / 'shards'))}")
    if i.is_relative_to(o):
        raise OutputError(f"input folder {printable(str(inp))} is inside the output folder {printable(str(out))}: "
                          "choose an output folder that does not hold the videos")


def has_our_manifest(out: Path) -> bool:
    """True when ``out/manifest.json`` is a manifest of this format (any version)."""
    try:
        raw = json.loads((out / fmt.MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "format_version" in raw and "splits" in raw


def check_ours(out: Path, force: bool) -> None:
    """Refuse a folder holding files this packer did not write and no manifest of ours, unless ``force``."""
    foreign = sorted(printable(p.name) for p in out.iterdir()
                     if not (is_ours(p.name) or p.name == LOCK_NAME or _STAGING_RE.fullmatch(p.name)
                             or p.name in HARMLESS))
    if not foreign or force or has_our_manifest(out):
        return
    shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
    raise OutputError(f"output folder {printable(str(out))} is not a shard folder: it holds {len(foreign)} "
                      f"entries that preprocess.shard did not write ({shown}) and no manifest.json of ours. "
                      "Choose a new or empty output folder, or pass --force to pack there anyway "
                      "(those entries are left untouched).")


class PackLock:
    """``out/.pack.lock``, created exclusively (O_CREAT|O_EXCL, which NFS honours too) with host, pid and time."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.info = {"host": socket.gethostname(), "pid": os.getpid(),
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    def __enter__(self) -> PackLock:
        for _ in range(2):
            if lockfile.create(self.path, self.info):
                return self
            self._take_over_if_stale()
        raise OutputError(f"{self.path} was taken by another packer meanwhile; wait for it to finish")

    def _take_over_if_stale(self) -> None:
        """Remove a lock whose packer is gone (same host, pid not running); refuse any other."""
        h = lockfile.read(self.path)
        if h is None:
            raise OutputError(f"{self.path} exists but is not a readable lock: another packer may be starting. "
                              "If no packer is writing to this folder, delete the file and run again.")
        pid, host = h.get("pid"), h.get("host")
        holder = f"pid {pid} on host {host} (since {h.get('time')})"
        if host == self.info["host"] and isinstance(pid, int) and pid > 0 and not lockfile.pid_alive(pid):
            print(f"warning: taking over the stale lock {self.path} of {holder}: that process is gone",
                  file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return
        raise OutputError(f"another packer is writing to {printable(str(self.path.parent))}: {self.path.name} is "
                          f"held by {holder}. Wait for it to finish; if that process no longer runs, delete "
                          f"{self.path} and run again.")

    def __exit__(self, *exc) -> None:
        lockfile.release(self.path, self.info)


def make_staging(out: Path) -> Path:
    """A new, empty staging folder inside ``out``."""
    return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=out))


def remove_staging(staging: Path) -> None:
    """Delete our files in a staging folder, then the folder; anything else in it is left (with a warning)."""
    for p in staging.iterdir():
        if is_ours(p.name) and not p.is_dir():
            p.unlink()
    try:
        staging.rmdir()
    except OSError:
        print(f"warning: left {printable(str(staging))}: it holds files preprocess.shard did not write",
              file=sys.stderr)


def clean_leftovers(out: Path) -> None:
    """Remove what killed runs left in ``out``: staging folders and temporary files, ours only."""
    for p in out.iterdir():
        if _STAGING_RE.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
            remove_staging(p)
        elif p.name.endswith(fmt.TMP_SUFFIX) and is_ours(p.name) and not p.is_dir():
            p.unlink()


def swap_in(staging: Path, out: Path) -> list[str]:
    """Move a complete set from ``staging`` into ``out`` (manifest last), then drop the old set's extra shards.

    The old manifest goes first: during the few renames the folder has no manifest (incomplete, as the
    format says), never one that names files of the other set. Returns the new set's shard names.
    """
    names = sorted((p.name for p in staging.iterdir()),
                   key=lambda n: (n == fmt.MANIFEST_NAME, n.startswith("wids-"), n))
    (out / fmt.MANIFEST_NAME).unlink(missing_ok=True)
    for n in names:
        os.replace(staging / n, out / n)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames reach the disk before the stale shards go
    finally:
        os.close(fd)
    for p in out.iterdir():
        if _is_shard_or_index(p.name) and p.name not in names and not p.is_dir():
            p.unlink()  # left from an earlier, larger set
    return [n for n in names if fmt.is_shard_name(n)]


def state_note(out: Path) -> str:
    """What a failed run leaves in ``out``, for its error message."""
    if has_our_manifest(out):
        return f"the previous shard set in {printable(str(out))} is unchanged"
    return f"{printable(str(out))} holds no complete shard set (no manifest.json)"
