"""``--trace-samples``: ``OUT/samples.jsonl``, one line per rank per optimizer step,
``{"epoch", "step", "rank", "keys"}`` (the keys that rank trained on in that step, accumulation
micro-batches included). A resumed run first drops the lines of steps after its checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from preprocess.shard_format import write_bytes_atomic

SAMPLES_FILE = "samples.jsonl"


def trim(out: Path, step: int) -> None:
    """Keep only the lines of steps up to ``step``, the checkpoint's (rank 0)."""
    path = Path(out) / SAMPLES_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a line cut short by a kill: its step was not saved
            continue
    write_bytes_atomic(path, "".join(kept).encode("utf-8"))


def append(out: Path, epoch: int, step: int, per_rank: list[list[str]]) -> None:
    """Append one step's keys of every rank (rank 0)."""
    lines = "".join(json.dumps({"epoch": epoch, "step": step, "rank": rank, "keys": keys}) + "\n"
                    for rank, keys in enumerate(per_rank))
    fd = os.open(Path(out) / SAMPLES_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, lines.encode("utf-8"))  # one write a step: a kill leaves at most one torn line
    finally:
        os.close(fd)
