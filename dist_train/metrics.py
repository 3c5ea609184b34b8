"""Logging: messages through the standard ``logging`` module, and rank 0's metrics to tqdm,
``metrics.jsonl``, W&B, PNG plots and ``results.json``.

Messages go to the ``dist_train`` logger, which ``setup_logging`` sends to stderr (through tqdm, so a
progress bar is not broken): rank 0 at ``--log-level`` (default INFO), the other ranks at
``--log-level-others`` (default WARNING, prefixed with their rank). Attach handlers or set levels on
``logging.getLogger("dist_train")`` to filter or redirect them as with any other library.

``make_logger`` returns a ``RunLogger`` on rank 0 and a ``NullLogger`` (same methods, does nothing)
elsewhere, so the training loop never asks which rank it is on. Callers pass metrics that are
already all-reduced over ranks.

W&B: ``--wandb auto`` means online when credentials exist (``WANDB_API_KEY`` or a netrc entry for
the W&B host), offline otherwise. Online start-up waits at most ``--wandb-init-timeout`` seconds and
then falls back to offline; any W&B failure disables W&B with a warning instead of stopping training.
Files go to ``$WANDB_DIR`` if set, else to the run folder (``OUT/wandb/``). The run id is stored in
every checkpoint, so a resumed run continues the same W&B run (``resume="allow"``).
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tqdm import tqdm

from preprocess.shard_format import write_json_atomic

METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CONFIG_FILE = "config.json"

log = logging.getLogger("dist_train")


class _TqdmHandler(logging.StreamHandler):
    """Writes each record to stderr through ``tqdm.write``, which keeps an active progress bar intact."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


class _Format(logging.Formatter):
    """``[dist_train] message``; ``[dist_train rank R]`` on ranks other than 0; ``warning: `` and ``error: ``
    before the message at those levels."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = "[dist_train]" if rank == 0 else f"[dist_train rank {rank}]"

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        return f"{self.prefix} {level}{record.getMessage()}"


def setup_logging(rank: int, level: str = "info", others: str = "warning") -> None:
    """Send the ``dist_train`` logger's messages to stderr: rank 0 at ``level``, other ranks at ``others``."""
    for handler in [h for h in log.handlers if isinstance(h, _TqdmHandler)]:
        log.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(_Format(rank))
    log.addHandler(handler)
    log.setLevel((level if rank == 0 else others).upper())
    log.propagate = False


def has_wandb_credentials() -> bool:
    """True when an API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> str:
    """``auto`` -> online with credentials, else offline; other modes unchanged."""
    if mode != "auto":
        return mode
    return "online" if has_wandb_credentials() else "offline"


class NullLogger:
    """The logger of ranks other than 0: every method does nothing."""

    run_id: str | None = None

    def info(self, msg: str) -> None:
        """A message about logging itself (W&B start-up and failures), to the ``dist_train`` logger."""
        log.info(msg)

    def log(self, metrics: dict, step: int) -> None:
        """Record metrics at a global step (rank 0 only)."""

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Send a PNG to W&B (rank 0 only)."""

    def progress(self, total: int, initial: int, desc: str):
        """A tqdm bar (rank 0) or a do-nothing stand-in."""
        return tqdm(total=total, initial=initial, disable=True)

    def end_progress(self) -> None:
        """Close the current progress bar (rank 0 only)."""

    def plot(self, history: list[dict], confusions: dict[str, dict], classes: list[str]) -> dict[str, Path]:
        """Write PNG curves and confusion matrices (rank 0 only)."""
        return {}

    def results(self, results: dict) -> None:
        """Write results.json (rank 0 only)."""

    def close(self, exit_code: int) -> None:
        """Flush and finish W&B (rank 0 only)."""


class RunLogger(NullLogger):
    """Rank 0's logger."""

    def __init__(self, out: Path, config: dict, wandb_mode: str, run_id: str | None, progress: bool = True,
                 project: str = "vidshard", entity: str | None = None, run_name: str | None = None,
                 init_timeout: float = 30.0):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.show_progress = progress
        self._jsonl = open(self.out / METRICS_FILE, "a", encoding="utf-8")
        self._bar: tqdm | None = None
        self._wandb = None
        self.run_id = run_id
        if wandb_mode != "disabled":
            self._wandb = self._start_wandb(config, wandb_mode, run_id, project, entity,
                                            run_name or self.out.resolve().name, init_timeout)
            self.run_id = self._wandb.id if self._wandb is not None else run_id

    def _start_wandb(self, config, mode, run_id, project, entity, name, timeout):
        try:
            import wandb
        except ImportError:
            self.info("wandb is not installed: W&B logging disabled")
            return None
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
        kwargs = dict(project=project, entity=entity, name=name, config=config, id=run_id, resume="allow",
                      dir=os.environ.get("WANDB_DIR") or str(self.out))
        for attempt in ([mode, "offline"] if mode == "online" else [mode]):
            try:
                settings = wandb.Settings(init_timeout=timeout, console="off", silent=True)
                run = wandb.init(mode=attempt, settings=settings, **kwargs)
                if attempt != mode:
                    self.info(f"W&B online did not start within {timeout:.0f}s: logging offline to {run.dir} "
                              f"(upload later with `wandb sync`)")
                return run
            except Exception as e:  # no network, bad credentials, service down: never stop training for W&B
                self.info(f"W&B {attempt} failed to start ({type(e).__name__}: {e})")
        self.info("W&B logging disabled for this run")
        return None

    def log(self, metrics: dict, step: int) -> None:
        """Append a row to metrics.jsonl and send it to W&B."""
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(row, default=float) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            try:
                self._wandb.log(metrics, step=step)
            except Exception as e:
                self.info(f"W&B log failed ({e}); W&B logging disabled")
                self._wandb = None

    def log_image(self, key: str, path: Path, step: int) -> None:
        """Send a PNG to W&B."""
        if self._wandb is not None:
            try:
                import wandb

                self._wandb.log({key: wandb.Image(str(path))}, step=step)
            except Exception as e:
                self.info(f"W&B image upload of {path} failed: {e}")

    def progress(self, total: int, initial: int, desc: str):
        """A tqdm bar on stderr showing clips/s and the ETA."""
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr,
                         disable=not self.show_progress, dynamic_ncols=True, leave=False)
        return self._bar

    def end_progress(self) -> None:
        """Close the current progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def plot(self, history: list[dict], confusions: dict[str, dict], classes: list[str]) -> dict[str, Path]:
        """``curves.png`` from the per-epoch history and ``confusion_<split>.png`` per split."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths = {}
        if history:
            fig, axes = plt.subplots(1, 3, figsize=(15, 4))
            epochs = [h["epoch"] for h in history]
            for ax, metric in zip(axes, ("loss", "top1", "lr")):
                for split in ("train", "val", "test"):
                    key = f"{split}/{metric}" if metric != "lr" else "lr"
                    ys = [h.get(key) for h in history]
                    if any(y is not None for y in ys):
                        ax.plot(epochs, [float("nan") if y is None else y for y in ys], marker="o",
                                label=split if metric != "lr" else "lr")
                    if metric == "lr":
                        break
                ax.set_xlabel("epoch")
                ax.set_title(metric)
                ax.grid(alpha=0.3)
                ax.legend()
            fig.tight_layout()
            paths["curves"] = self.out / "curves.png"
            fig.savefig(paths["curves"], dpi=100)
            plt.close(fig)
        for split, matrix in confusions.items():
            paths[split] = save_confusion_png(matrix, classes, self.out / f"confusion_{split}.png", split)
        return paths

    def results(self, results: dict) -> None:
        """Write results.json and put its scalars into the W&B summary."""
        write_json_atomic(self.out / RESULTS_FILE, results)
        if self._wandb is not None:
            for k, v in results.items():
                if isinstance(v, (int, float, str)):
                    self._wandb.summary[f"final/{k}"] = v

    def close(self, exit_code: int) -> None:
        """Flush files and finish the W&B run."""
        self.end_progress()
        self._jsonl.close()
        if self._wandb is not None:
            try:
                self._wandb.finish(exit_code=exit_code)
            except Exception as e:
                self.info(f"W&B finish failed: {e}")
            self._wandb = None


def make_logger(is_main: bool, out: Path, config: dict, wandb_mode: str, run_id: str | None, **kw: Any) -> NullLogger:
    """A RunLogger on rank 0, a NullLogger elsewhere."""
    if not is_main:
        return NullLogger()
    return RunLogger(out, config, wandb_mode, run_id, **kw)


def save_confusion_png(matrix: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    """Write a confusion matrix (rows: true class, columns: predicted) as a PNG; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * n + 3), max(4, 0.3 * n + 3)))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({title})")
    if n <= 60:
        ax.set_xticks(range(n), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(n), classes, fontsize=7)
    if n <= 12:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i][j])), ha="center", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
