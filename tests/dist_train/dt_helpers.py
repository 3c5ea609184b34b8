"""Helpers for the trainer tests: run the real torchrun / python -m dist_train, read W&B offline files."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

# Small and fast on 2 CPU cores; tests add or override flags.
TINY = ["--img-size", "32", "--hidden-size", "32", "--batch-size", "2", "--no-progress", "--wandb", "disabled",
        "--ckpt-every-minutes", "0"]


def trainer_command(args: list[str], nproc: int | None = 2, env: dict | None = None,
                    launcher: list[str] = ()) -> tuple[list[str], dict]:
    """Command and environment of ``torchrun --standalone --nproc_per_node=nproc LAUNCHER -m dist_train ARGS``.

    ``nproc=None``: plain ``python -m dist_train``. ``env`` adds variables; a value of None removes one.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # env={"X": None} removes X
    if nproc is None:
        cmd = [sys.executable, "-m", "dist_train", *args]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", *launcher, "-m", "dist_train", *args]
    return cmd, full_env


def run_trainer(args: list[str], nproc: int | None = 2, timeout: float = 240, env: dict | None = None,
                cwd: Path | None = None, launcher: list[str] = ()) -> subprocess.CompletedProcess:
    """Run the trainer to the end (see ``trainer_command``) and capture its output."""
    cmd, full_env = trainer_command(args, nproc, env, launcher)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or REPO)


def start_trainer(args: list[str], log: Path, nproc: int | None = 2, env: dict | None = None,
                  launcher: list[str] = ()) -> subprocess.Popen:
    """Start the trainer in a session of its own, stdout and stderr to ``log``; the caller waits or kills.

    torchrun starts every worker in a session of its own too: to kill a run, kill each process of its tree.
    """
    cmd, full_env = trainer_command(args, nproc, env, launcher)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env, cwd=REPO, start_new_session=True)


def check(proc: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    """Assert the exit status, showing the output tail when it differs."""
    assert proc.returncode == code, f"exit {proc.returncode} != {code}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def results(out: Path) -> dict:
    """results.json of a run folder."""
    return json.loads((Path(out) / "results.json").read_text())


def wandb_records(path: Path):
    """Protobuf records of a W&B ``.wandb`` file (LevelDB log format after a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = Path(path).read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):  # FULL, FIRST
            buf = chunk
        else:  # MIDDLE, LAST
            buf += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_run_contents(run_file: Path) -> tuple[str, dict, list[dict]]:
    """Run id, config and history rows written to an offline W&B run file."""
    run_id, config, history = None, {}, []
    for r in wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return run_id, config, history
