"""Run all CPU benchmarks and print the table of ratios against the floors.

    python -m bench [--quick] [--only pack,load,model_step,memory,resume,remote]

Writes ``bench/results/<name>.json`` per benchmark. Exit status 0 when every floor is met, 1 when
one is missed, 2 when a benchmark could not run; figures reported beside the floors ("(report)")
never fail. GPU figures come from ``bench/gpu.sh``. ``remote`` starts a loopback S3 server (SeaweedFS's
``weed``, from the dev extras).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback

from bench import command, machine, write_result

BENCHMARKS = ("pack", "load", "model_step", "memory", "resume", "remote")


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def rows(res: dict) -> list[dict]:
    """The table rows of one result: its checks, or the result itself when it has none."""
    return res.get("checks") or [res]


def print_table(results: list[dict], out=sys.stdout) -> None:
    """Markdown table: one row per floor."""
    print("| benchmark | check | ours | baseline | unit | ratio | floor | pass |", file=out)
    print("|---|---|---:|---:|---|---:|---:|---|", file=out)
    for res in results:
        if res.get("error"):
            print(f"| {res['name']} | (did not run) | | | | | | ERROR: {res['error']} |", file=out)
            continue
        for c in rows(res):
            goal = c.get("goal", ">=")
            floor, verdict = (("(report)", "") if goal == "report" else
                              (f"{goal} {_fmt(c['floor'])}", "yes" if c["passed"] else "NO"))
            print(f"| {res['name']} | {c.get('name', res['name'])} | {_fmt(c['ours'])} | {_fmt(c['baseline'])} | "
                  f"{c.get('unit', '')} | {_fmt(c['ratio'])} | {floor} | {verdict} |", file=out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller inputs, one repeat (a smoke run, minutes)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    a = p.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    start = time.monotonic()
    results, failed_to_run = [], False
    for name in names:
        if importlib.util.find_spec(f"bench.{name}") is None:
            print(f"bench: {name}: bench/{name}.py not present, skipped", file=sys.stderr)
            continue
        t0 = time.monotonic()
        print(f"bench: running {name} ...", file=sys.stderr, flush=True)
        try:
            res = importlib.import_module(f"bench.{name}").run(quick=a.quick)
        except Exception as e:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            res = {"name": name, "error": f"{type(e).__name__}: {e}".splitlines()[0][:200], "passed": False,
                   "machine": machine(), "command": command()}
            failed_to_run = True
        res.setdefault("seconds", round(time.monotonic() - t0, 1))
        write_result(res)
        results.append(res)
        print(f"bench: {name} done in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    print()
    print_table(results)
    m = machine()
    print(f"\nmachine: {m.get('cpu')} x{m.get('cores')} (load {m.get('load_avg_1m')}); "
          f"total {time.monotonic() - start:.0f} s; figures in bench/results/")
    if failed_to_run:
        return 2
    return 0 if all(r.get("passed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
