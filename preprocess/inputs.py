"""Find the labelled videos of an input folder: ``root/<class>/**/<video>``, in a machine-independent order.

Symbolic links are followed, but a folder that leads back to itself or to a folder above it is a
``symlink loop`` (skipped, not walked), and a file reached twice (a link to a video, a linked folder,
a hard link) is packed once: the copy not reached through a link wins, else the first in sorted order,
and the others are skipped as ``duplicate of <path>``. File names may hold any bytes: ``printable``
gives the form used in the manifest and in messages.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from preprocess.frames import is_video_name


class ScanError(Exception):
    """The input folder cannot be used; the message says why."""


def printable(name: str) -> str:
    """``name`` fit for UTF-8 JSON and one-line messages.

    Bytes that are not UTF-8 (kept by Python as surrogates) become ``\\xNN``, control characters such as
    a newline become ``\\n``; everything else is kept. E.g. the file name bytes ``caf\\xe9.avi`` (Latin-1)
    give the text ``caf\\xe9.avi``.
    """
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


@dataclass
class Item:
    """One candidate video: ``rel`` and ``cls`` are the real names (to open the file), ``path`` the printable one."""

    video_id: int
    rel: str
    cls: str
    label: int

    @property
    def path(self) -> str:
        return printable(self.rel)

    @property
    def cls_name(self) -> str:
        return printable(self.cls)


def _skip(rel: str, reason: str) -> dict:
    return {"path": printable(rel), "reason": reason}


def _walk(folder: Path, rel: str, above: set[str], files: list[tuple[str, Path]], skipped: list[dict]) -> None:
    """Append (relative path, path) of every non-hidden file under ``folder``; ``above`` holds the real paths
    of the folders walked to get here (the input root included)."""
    try:
        entries = sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as e:
        skipped.append(_skip(rel, f"folder cannot be listed ({e.strerror}); its videos are not packed"))
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue
        entry_rel = f"{rel}/{entry.name}"
        if not entry.is_dir():
            files.append((entry_rel, entry))
            continue
        real = os.path.realpath(entry)
        if real in above:
            skipped.append(_skip(entry_rel, "symlink loop (leads back to a folder above it); not walked"))
            continue
        _walk(entry, entry_rel, above | {real}, files, skipped)


def _drop_duplicates(root: Path, videos: list[tuple[str, Path]], skipped: list[dict]) -> list[str]:
    """Relative paths of the videos to pack: one per file on disk; the others skipped with the reason."""
    root_real = os.path.realpath(root)
    by_file: dict[tuple[int, int], list[str]] = {}
    keep: list[str] = []
    for rel, path in videos:
        try:
            st = os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                skipped.append(_skip(rel, "symlink loop (the link points at itself)"))
            else:
                keep.append(rel)  # the decoder gives the reason (a broken link, ...)
            continue
        by_file.setdefault((st.st_dev, st.st_ino), []).append(rel)
    for rels in by_file.values():
        # Prefer the copy not reached through a link (its real path is where it is listed), then sorted order.
        first = min(rels, key=lambda r: (os.path.realpath(root / r) != os.path.join(root_real, r), r))
        keep.append(first)
        skipped += [_skip(r, f"duplicate of {printable(first)} (the same file, reached through a link)")
                    for r in rels if r != first]
    return keep


def scan(root: Path) -> tuple[list[str], list[Item], list[dict]]:
    """Classes, candidate videos (sorted, so ids and labels agree across machines) and the skipped entries."""
    if not root.is_dir():
        raise ScanError(f"input folder {printable(str(root))} does not exist or is not a folder")
    skipped: list[dict] = []
    files: list[tuple[str, Path]] = []
    root_real = os.path.realpath(root)
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            skipped.append(_skip(entry.name, "not inside a class folder"))
        elif os.path.realpath(entry) == root_real or root_real.startswith(os.path.realpath(entry) + os.sep):
            skipped.append(_skip(entry.name, "symlink loop (leads to the input folder or above it); not a class"))
        else:
            _walk(entry, entry.name, {root_real, os.path.realpath(entry)}, files, skipped)
    videos = []
    for rel, path in files:
        if is_video_name(path.name):
            videos.append((rel, path))
        else:
            skipped.append(_skip(rel, f"not a video file name (extension {printable(path.suffix) or 'none'!r})"))
    kept = sorted(_drop_duplicates(root, videos, skipped), key=lambda r: r.encode("utf-8", "surrogateescape"))
    found: dict[str, list[str]] = {}
    for rel in kept:
        found.setdefault(rel.split("/", 1)[0], []).append(rel)
    classes = sorted(found)
    shown = [printable(c) for c in classes]
    if len(set(shown)) != len(shown):
        raise ScanError(f"two class folders of {printable(str(root))} have names that print the same: rename one of "
                        + ", ".join(sorted({c for c in shown if shown.count(c) > 1})))
    items = []
    for label, cls in enumerate(classes):
        for rel in found[cls]:
            items.append(Item(len(items), rel, cls, label))
    return classes, items, skipped
