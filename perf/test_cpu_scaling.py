"""The chunked CPU path is linear in T (issue #3): forward+backward time and peak memory at
B = 2, H = 4, Dk = Dv = 64, K = 32 on piecewise-stationary inputs, over T = 512 … 4096.

Time: each doubling of T may multiply it by at most 2√2 ≈ 2.83, the geometric midpoint of
linear (×2) and quadratic (×4) growth, so that either side has the same factor √2 of room for a
loaded machine; a quadratic workload timed in the same sweeps (a T × T attention matrix: what a
quadratic path would compute) must fail that bound, or the test does not tell the two apart.
Times come from pytest-benchmark in this run, as process CPU time on one thread (wall-clock
ratios on a shared 2-core machine move with its other load), minima over rounds.

Peak memory, which the machine's load does not move: at most 2.3× per doubling, from a fresh
subprocess per T (the high-water mark of its resident set above what it held once libraries were
loaded by a tiny warm-up call and the inputs were built)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from dla import multistate_attention
from perf import timing
from perf.inputs import layer_inputs

LENGTHS = (512, 1024, 2048, 4096)
SHAPE = dict(batch=2, heads=4, dk=64, dv=64, levels=32)
TIME_GROWTH_BOUND = 2 * math.sqrt(2)
MEMORY_GROWTH_BOUND = 2.3


def fwd_bwd(t: dict) -> None:
    xs = {n: (x.detach().requires_grad_() if n in ("q", "k", "v", "lam") else x) for n, x in t.items()}
    o = multistate_attention(xs["q"], xs["k"], xs["v"], xs["lam"], g=xs["g"], chunk_size=64)
    o.sum().backward()


def quadratic(t: dict) -> None:
    """Softmax attention through the T × T score matrix of one head: O(T²) time and memory."""
    q, k, v = (t[n][:1, :, :1].transpose(1, 2) for n in ("q", "k", "v"))  # [1, 1, T, D]
    scores = (q @ k.transpose(-1, -2)).masked_fill(
        torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).triu(1), float("-inf"))
    torch.softmax(scores, dim=-1) @ v


def growth(times: dict[int, float]) -> list[float]:
    return [times[b] / times[a] for a, b in zip(LENGTHS, LENGTHS[1:])]


@pytest.fixture
def one_thread():
    with timing.one_thread():
        yield


@pytest.mark.benchmark(group="cpu-scaling", timer=time.process_time)
def test_forward_backward_time_grows_linearly(benchmark, one_thread):
    """One benchmark round is a sweep over every length, so a slow spell of the shared machine lands
    on all lengths alike instead of on whichever length happened to be timed then; within a sweep each
    length repeats 4096 / T times, so every sample spans the same stretch of wall time."""
    inputs = {n: layer_inputs(SHAPE["batch"], n, SHAPE["heads"], SHAPE["dk"], SHAPE["dv"], SHAPE["levels"])
              for n in LENGTHS}
    workloads = {"operator": fwd_bwd, "quadratic": quadratic}
    samples = {(w, n): [] for w in workloads for n in LENGTHS}

    def sweep():
        for n in LENGTHS:
            repeats = LENGTHS[-1] // n
            for name, fn in workloads.items():
                start = time.process_time()
                for _ in range(repeats):
                    fn(inputs[n])
                samples[name, n].append((time.process_time() - start) / repeats)

    benchmark.pedantic(sweep, rounds=5, iterations=1, warmup_rounds=1)
    # interference only adds time: the minimum is the cost
    times = {w: {n: min(samples[w, n]) for n in LENGTHS} for w in workloads}
    ratios = {w: growth(times[w]) for w in workloads}
    benchmark.extra_info.update({"min_cpu_s": {w: {str(n): t for n, t in times[w].items()} for w in workloads},
                                 "growth_per_doubling": ratios["operator"], "quadratic_growth": ratios["quadratic"],
                                 "bound": TIME_GROWTH_BOUND})
    print("fwd+bwd min CPU s:", {n: round(t, 4) for n, t in times["operator"].items()}, "growth per doubling:",
          ratios["operator"], "quadratic control:", ratios["quadratic"])
    assert max(ratios["operator"]) <= TIME_GROWTH_BOUND, ratios
    assert max(ratios["quadratic"]) > TIME_GROWTH_BOUND, (
        f"the quadratic control grew by {ratios['quadratic']} per doubling, inside the bound {TIME_GROWTH_BOUND:.3f}: "
        f"the check cannot tell quadratic growth from linear")


PEAK_SCRIPT = r"""
import json, os, resource, sys, torch
torch.set_num_threads(1)
from perf.inputs import layer_inputs
from perf.test_cpu_scaling import SHAPE, fwd_bwd
fwd_bwd(layer_inputs(1, 64, 1, SHAPE["dk"], SHAPE["dv"], SHAPE["levels"]))  # load libraries; a tiny high-water mark
t = layer_inputs(SHAPE["batch"], int(sys.argv[1]), SHAPE["heads"], SHAPE["dk"], SHAPE["dv"], SHAPE["levels"])
with open("/proc/self/statm") as f:
    resident_kib = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
fwd_bwd(t)
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"kib": peak_kib - resident_kib}))
"""


def test_peak_memory_grows_linearly():
    # a fixed mmap threshold gives every tensor buffer its own mapping, returned on free, so the
    # resident set follows live tensors instead of glibc's adaptive heap; the lengths run side by
    # side (each high-water mark is its own process's, whatever runs beside it)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    runs = {length: subprocess.Popen([sys.executable, "-c", PEAK_SCRIPT, str(length)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env) for length in LENGTHS}
    done = {length: (run.communicate(), run.returncode) for length, run in runs.items()}  # all end before a check
    for length, ((_, err), code) in done.items():
        assert code == 0, f"T = {length}: {err[-3000:]}"
    peaks = {length: json.loads(out.strip().splitlines()[-1])["kib"] for length, ((out, _), _) in done.items()}
    ratios = [peaks[b] / max(peaks[a], 1) for a, b in zip(LENGTHS, LENGTHS[1:])]
    print("peak fwd+bwd KiB above inputs:", peaks, "growth per doubling:", ratios)
    assert all(p > 0 for p in peaks.values()), peaks
    assert max(ratios) <= MEMORY_GROWTH_BOUND, ratios
