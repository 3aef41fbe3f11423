"""Timing for the CPU benchmarks (perf/test_cpu_*.py), which share a 2-core machine with other
work: absolute times there move with its load, so every assertion is a ratio of two workloads
measured in the same run, timed so that the load touches both alike.

* Process CPU time on one intra-op thread: time spent waiting for a core is not counted, and
  thread forks and joins (whose cost follows the load) do not happen.
* Interleaving: one round runs every workload once, so a slow spell of the machine lands on all
  of them instead of on whichever was being timed then. Each workload repeats enough times per
  round that the samples span comparable stretches of wall time.
* Minima over rounds: interference only adds time, so the least is the workload's own cost.

Bounds are kept per CPU type (`cpu_type`): the ratios are stable on one type of CPU, not
across them — `readout/calibration` measured 1.26 on the CI machine's Intel Xeon and 2.0–2.8 on
its AMD EPYC, so one bound either fails the EPYC or lets a 2× slowdown through on the Xeon.

`python -m perf.timing refresh RESULT.json [RESULT.json …] [--cpu TYPE]` rewrites this CPU
type's bounds in `perf/baselines/cpu.json` from pytest-benchmark results of the regression suite
(the median of each ratio over the files; see perf/README.md for when that is allowed).
"""

from __future__ import annotations

import argparse
import json
import platform
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


# substrings of the model name that name a CPU type; the CI machines' virtual CPUs report
# only the family ("AMD EPYC"), so the family is the finest key that every machine can give
CPU_FAMILIES = {"EPYC": "AMD EPYC", "Xeon": "Intel Xeon"}


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo`, else `platform.processor()`)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_type(model: str | None = None) -> str:
    """The key of this CPU's bounds: its family where `CPU_FAMILIES` names one, else the model name."""
    model = cpu_model() if model is None else model
    return next((family for key, family in CPU_FAMILIES.items() if key in model), model)


def load_bounds(path: Path = CPU_BASELINE, cpu: str | None = None) -> dict:
    """The bounds of CPU type `cpu` (default: this machine's); a type without bounds is an error
    that says how to measure them — a check against another CPU type's bounds means nothing."""
    cpu = cpu_type() if cpu is None else cpu
    cpus = json.loads(Path(path).read_text())["cpus"]
    if cpu not in cpus:
        raise ValueError(f"{Path(path).name} has no bounds for this CPU type, {cpu!r} (model {cpu_model()!r}; "
                         f"bounds exist for {sorted(cpus)}): measure them as perf/README.md says "
                         "(five runs, then python -m perf.timing refresh)")
    return cpus[cpu]["ratios"]


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


def refresh(results: list[Path], path: Path = CPU_BASELINE, cpu: str | None = None) -> dict:
    """The median ratio of each tracked figure over pytest-benchmark JSON files (their
    `extra_info["ratio"]`, keyed by `extra_info["figure"]`) replaces that figure's baseline for
    CPU type `cpu` (default: this machine's); tolerances and notes stay. A CPU type new to the
    file takes each figure's tolerance from a type that has it (0.41 = √2 − 1 where none does).
    Returns the new file's content."""
    cpu = cpu_type() if cpu is None else cpu
    baseline = json.loads(Path(path).read_text())
    seen: dict[str, list[float]] = {}
    for result in results:
        for bench in json.loads(Path(result).read_text())["benchmarks"]:
            info = bench.get("extra_info", {})
            if "figure" in info and "ratio" in info:
                seen.setdefault(info["figure"], []).append(float(info["ratio"]))
    tracked = {name for entry in baseline["cpus"].values() for name in entry["ratios"]}
    missing = sorted(tracked - set(seen))
    if missing:
        raise ValueError(f"results: no measurement of {missing} in {[str(r) for r in results]}")
    tolerances = {name: e["tolerance"] for entry in baseline["cpus"].values() for name, e in entry["ratios"].items()}
    ratios = baseline["cpus"].setdefault(cpu, {}).setdefault("ratios", {})
    for name, measured in seen.items():
        entry = ratios.setdefault(name, {"tolerance": tolerances.get(name, 0.41)})
        entry["ratio"] = round(statistics.median(measured), 5)
        entry["measured"] = [round(r, 5) for r in measured]
    Path(path).write_text(json.dumps(baseline, indent=1) + "\n")
    return baseline


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.timing")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("refresh", help="rewrite a CPU type's bounds in perf/baselines/cpu.json from pytest-benchmark "
                                       "results")
    r.add_argument("results", type=Path, nargs="+")
    r.add_argument("--baseline", type=Path, default=CPU_BASELINE)
    r.add_argument("--cpu", default=None, help=f"the CPU type (default: this machine's, {cpu_type()!r})")
    args = parser.parse_args(argv)
    cpu = cpu_type() if args.cpu is None else args.cpu
    baseline = refresh(args.results, args.baseline, cpu)
    print(f"bounds of {cpu}:")
    for name, entry in baseline["cpus"][cpu]["ratios"].items():
        print(f"{name}: {entry['ratio']:.4g} (tolerance {entry['tolerance']:g}; runs {entry['measured']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
