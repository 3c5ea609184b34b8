"""A lock file: created exclusively (``O_CREAT | O_EXCL``, atomic on local file systems and on NFSv3+)
holding its holder as JSON. The packer's ``.pack.lock`` and the trainer's run-folder lock are both made
of these functions; each decides for itself when a lock it finds is stale.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def create(path: Path, holder: dict) -> bool:
    """Write ``holder`` into a new lock file at ``path``; False when the file exists already."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(holder, f)
        f.flush()
        os.fsync(f.fileno())
    return True


def read(path: Path) -> dict | None:
    """The holder written in the lock file, or None when there is none or it cannot be read."""
    try:
        holder = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def release(path: Path, holder: dict) -> None:
    """Remove the lock file if it still holds ``holder`` (never another's lock)."""
    if read(path) == holder:
        Path(path).unlink(missing_ok=True)


def pid_alive(pid) -> bool:
    """Whether process ``pid`` of this host runs (True when that cannot be told)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or not a pid: cannot tell, so keep the lock
    return True
