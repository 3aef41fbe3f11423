"""Timing for the CPU benchmarks (perf/test_cpu_*.py), which share a 2-core machine with other
work: absolute times there move with its load, so every assertion is a ratio of two workloads
measured in the same run, timed so that the load touches both alike.

* Process CPU time on one intra-op thread: time spent waiting for a core is not counted, and
  thread forks and joins (whose cost follows the load) do not happen.
* Interleaving: one round runs every workload once, so a slow spell of the machine lands on all
  of them instead of on whichever was being timed then. Each workload repeats enough times per
  round that the samples span comparable stretches of wall time.
* Minima over rounds: interference only adds time, so the least is the workload's own cost.

`python -m perf.timing refresh RESULT.json [RESULT.json …]` rewrites the bounds of
`perf/baselines/cpu.json` from pytest-benchmark results of the regression suite (the median of
each ratio over the files; see perf/README.md for when that is allowed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

CPU_BASELINE = Path(__file__).parent / "baselines" / "cpu.json"


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class Rounds:
    """`Rounds(workloads, repeats)()` is one round: each workload in turn, `repeats[name]` calls
    timed together (process CPU time per call). `minima()` gives each workload's least time per
    call over the rounds so far. Pass an instance to `benchmark.pedantic` as the function."""

    def __init__(self, workloads: dict[str, Callable[[], object]], repeats: dict[str, int] | None = None):
        self.workloads = workloads
        self.repeats = {name: (repeats or {}).get(name, 1) for name in workloads}
        self.samples: dict[str, list[float]] = {name: [] for name in workloads}

    def __call__(self) -> None:
        for name, fn in self.workloads.items():
            n = self.repeats[name]
            start = time.process_time()
            for _ in range(n):
                fn()
            self.samples[name].append((time.process_time() - start) / n)

    def minima(self) -> dict[str, float]:
        return {name: min(s) for name, s in self.samples.items()}


def load_bounds(path: Path = CPU_BASELINE) -> dict:
    return json.loads(Path(path).read_text())["ratios"]


def check_ratio(name: str, ratio: float, bounds: dict) -> str | None:
    """None when `ratio ≤ baseline · (1 + tolerance)`, else the failure message. `bounds` is
    `load_bounds()`; a ratio missing from it is a failure (a tracked figure needs a bound)."""
    if name not in bounds:
        return f"{name}: no bound in {CPU_BASELINE.name} (add one: see perf/README.md)"
    base, tol = bounds[name]["ratio"], bounds[name]["tolerance"]
    limit = base * (1 + tol)
    if ratio > limit:
        return (f"{name}: {ratio:.4g} exceeds its bound {limit:.4g} = baseline {base:.4g} × (1 + {tol:g}), "
                f"{ratio / base:.2f}× the baseline: a performance regression")
    return None


def refresh(results: list[Path], path: Path = CPU_BASELINE) -> dict:
    """The median ratio of each tracked figure over pytest-benchmark JSON files (their
    `extra_info["ratio"]`, keyed by `extra_info["figure"]`) replaces that figure's baseline;
    tolerances and notes stay. Returns the new file's content."""
    baseline = json.loads(Path(path).read_text())
    seen: dict[str, list[float]] = {}
    for result in results:
        for bench in json.loads(Path(result).read_text())["benchmarks"]:
            info = bench.get("extra_info", {})
            if "figure" in info and "ratio" in info:
                seen.setdefault(info["figure"], []).append(float(info["ratio"]))
    missing = sorted(set(baseline["ratios"]) - set(seen))
    if missing:
        raise ValueError(f"results: no measurement of {missing} in {[str(r) for r in results]}")
    for name, ratios in seen.items():
        entry = baseline["ratios"].setdefault(name, {"tolerance": 0.5})
        entry["ratio"] = round(statistics.median(ratios), 5)
        entry["measured"] = [round(r, 5) for r in ratios]
    Path(path).write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.timing")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("refresh", help="rewrite perf/baselines/cpu.json from pytest-benchmark results")
    r.add_argument("results", type=Path, nargs="+")
    r.add_argument("--baseline", type=Path, default=CPU_BASELINE)
    args = parser.parse_args(argv)
    baseline = refresh(args.results, args.baseline)
    for name, entry in baseline["ratios"].items():
        print(f"{name}: {entry['ratio']:.4g} (tolerance {entry['tolerance']:g}; runs {entry['measured']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
