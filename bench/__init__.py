"""Side-by-side benchmarks: our pipeline against a faithful copy of the seed's method.

    python -m bench [--quick] [--only pack,load,...]

Each benchmark module exposes ``run(quick: bool) -> dict`` with the keys of ``result()``; a module
with several floors lists them under ``checks`` (each a dict with the same keys) and passes only
when all do. Figures are also written to ``bench/results/<name>.json``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
WORK = BENCH / "work"


def machine() -> dict:
    """What the figures were taken on: CPU model, cores, load, library versions."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    for mod in ("cv2", "torch", "torchvision", "PIL", "webdataset", "numpy"):
        m = sys.modules.get(mod)
        if m is not None:
            info[mod] = getattr(m, "__version__", "?")
    return info


def command() -> str:
    """The command line that produced these figures."""
    if hasattr(sys, "orig_argv"):
        return shlex.join([Path(sys.executable).name, *sys.orig_argv[1:]])
    return " ".join(sys.argv)


def check(name: str, ours: float, baseline: float, ratio: float, floor: float | None, unit: str,
          goal: str = ">=", note: str = "") -> dict:
    """One floor: ``ratio`` (from ``ours`` and ``baseline``) must be ``goal`` (>= or <=) ``floor``.

    ``floor=None``: a figure reported beside the floors (printed as "(report)"), never a failure.
    """
    if floor is None:
        passed, goal = True, "report"
    else:
        passed = ratio >= floor if goal == ">=" else ratio <= floor
    return {"name": name, "ours": ours, "baseline": baseline, "ratio": ratio, "floor": floor,
            "goal": goal, "unit": unit, "passed": bool(passed), "note": note}


def result(name: str, checks: list[dict], inputs: dict, extra: dict | None = None) -> dict:
    """A benchmark's result: the first check's figures at top level, all checks under ``checks``."""
    head = checks[0]
    return {
        "name": name,
        "ours": head["ours"], "baseline": head["baseline"], "floor": head["floor"], "ratio": head["ratio"],
        "unit": head["unit"], "goal": head["goal"],
        "passed": all(c["passed"] for c in checks),
        "checks": checks,
        "inputs": inputs,
        "extra": extra or {},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": command(),
    }


def write_result(res: dict) -> Path:
    """Write ``bench/results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{res['name']}.json"
    path.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    return path


def report(res: dict) -> int:
    """A benchmark module's ending: write its result, print its table, exit 0 when its floors are met, else 1."""
    from bench.__main__ import print_table

    path = write_result(res)
    print_table([res])
    print(f"wrote {path}", file=sys.stderr)
    return 0 if res["passed"] else 1


def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def paired_min(items: list, sides: dict, chunk: int, rounds: int, setup=None) -> dict[str, float]:
    """Seconds each of ``sides`` (name -> function of a list of items) takes for all ``items``, robust to a
    noisy machine.

    The items are cut into chunks of ``chunk``; every side runs each chunk in turn (the order reversed
    every other time), ``rounds`` times over, ``setup()`` (untimed) before each run. A side's time is the
    sum over the chunks of its fastest run of each chunk: the sides are compared seconds apart, and a
    burst of load from elsewhere spoils one run of one chunk instead of a whole measurement.
    """
    names = list(sides)
    parts = [items[j:j + chunk] for j in range(0, len(items), chunk)]
    best = {k: [float("inf")] * len(parts) for k in names}
    for r in range(rounds):
        for j, part in enumerate(parts):
            for k in (names if (r + j) % 2 == 0 else names[::-1]):
                if setup is not None:
                    setup()
                t0 = time.perf_counter()
                sides[k](part)
                best[k][j] = min(best[k][j], time.perf_counter() - t0)
    return {k: sum(v) for k, v in best.items()}


def run_child(module: str, spec: dict, timeout: float = 900, env: dict | None = None) -> dict:
    """Run ``python -m <module> --child <spec-json>`` and return the JSON its last stdout line holds.

    Each measurement runs in a fresh process so thread settings, caches and memory of one side
    never leak into the other.
    """
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONPATH", str(REPO))
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env)
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])
