"""CPU performance regression suite (issue #9): four ratios, each of a `dla` workload to a
reference workload timed in the same run (perf/timing.py: process CPU time on one thread,
workloads interleaved within every round, minima over rounds), checked against the committed
bounds of `perf/baselines/cpu.json` for this CPU type — a ratio above `baseline · (1 + tolerance)`
fails.

| figure | `dla` workload | reference |
|---|---|---|
| `readout/calibration` | the CPU readout kernels `readout_forward` + `readout_backward` on a fixed level map | `perf.calibration.chunked_multistate` forward+backward at the same shapes |
| `segment/calibration` | the CPU segmentation kernel, policy `dla` | `perf.calibration.token_scan` at the same shapes |
| `operator/recurrent` | `multistate_attention` forward (segment + readout + glue) | `multistate_attention_recurrent` forward |
| `compiled/eager step` | the tiny model's loss + backward compiled as training compiles it | the same step in eager mode |

Every test also times, in the same rounds, its `dla` workload with a 2× regression injected by
monkeypatching (the work done twice) and asserts that the check catches it: a bound too loose
to see a 2× slowdown fails the suite, as does one the code has outgrown (see perf/README.md).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import pytest
import torch

import dla
import dla.operator as api
import dla.ops.readout as readout
import dla.ops.segment.cpu as segment
import dla.run.train as train
from dla.model.config import preset
from dla.model.lm import CausalLM
from dla import level_map
from dla.ops.reference import multistate_attention_recurrent
from dla.ops.state import empty_cache
from perf import calibration
from perf.inputs import layer_inputs
from perf.timing import Rounds, check_ratio, cpu_type, load_bounds, one_thread

# readout and segmentation: one layer's worth of Mamba-2 inputs, K = 16
B, T, H, D, K, CHUNK = 1, 1024, 4, 64, 16, 64


def inductor_cache_dir() -> Path:
    """An Inductor cache per torch version and state of `dla/compile/` (the custom ops' fake
    rules). The FX-graph cache key covers the traced graph but not those rules, hence the fresh
    cache of tests/conftest.py; here a cold compile costs a minute or more of C++ builds on a
    loaded 2-core machine, so checkouts whose rules are unchanged share one."""
    compile_dir = Path(dla.__file__).parent / "compile"
    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted(compile_dir.rglob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return Path(tempfile.gettempdir()) / f"dla-perf-inductor-{digest.hexdigest()[:16]}"


@pytest.fixture
def single_thread():
    with one_thread():
        yield


def twice(fn):
    """`fn` doing its work twice: the injected 2× regression."""
    def slow(*args, **kwargs):
        fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return slow


def injected(monkeypatch, module, names, workload):
    """`workload` run while `module.<name>` for each name does its work twice."""
    originals = {n: getattr(module, n) for n in names}

    def run():
        with monkeypatch.context() as m:
            for n, fn in originals.items():
                m.setattr(module, n, twice(fn))
            workload()

    return run


def judge(benchmark, figure: str, rounds: Rounds, num: str, den: str) -> None:
    """Record the ratio `num/den` (and that of `num` with the injected regression) in the
    benchmark JSON; fail on a regression, and on a bound that cannot see a 2× one."""
    m = rounds.minima()
    ratio, slowed = m[num] / m[den], m[num + " 2x"] / m[den]
    # recorded before the bounds are read: a CPU type without bounds yet gets the runs that make them
    benchmark.extra_info.update({"figure": figure, "ratio": ratio, "ratio_with_2x_injected": slowed,
                                 "min_cpu_s": m, "cpu": cpu_type()})
    print(f"{figure}: {ratio:.4g} (with the injected 2x: {slowed:.4g}); min CPU s per call:",
          {n: round(t, 5) for n, t in m.items()})
    bounds = load_bounds()
    benchmark.extra_info["bound"] = bounds.get(figure)
    failure, caught = check_ratio(figure, ratio, bounds), check_ratio(figure, slowed, bounds)
    assert failure is None, failure
    assert caught is not None, (
        f"{figure}: with {num} doing its work twice the ratio is {slowed:.4g}, inside the bound "
        f"{bounds[figure]}: the check cannot see a 2x regression (bound stale or tolerance too loose)")


@pytest.fixture(scope="module")
def layer():
    """Inputs, the fixed level map and an output gradient for the readout and segmentation."""
    t = layer_inputs(B, T, H, D, D, K)
    starts = level_map(t["k"], t["v"], capacity=K, score="token", chunk_size=CHUNK)
    do = torch.randn(B, T, H, D, generator=torch.Generator().manual_seed(1))
    return t, starts, do


@pytest.mark.benchmark(group="cpu-regression", timer=time.process_time)
def test_readout(benchmark, single_thread, layer, monkeypatch):
    t, starts, do = layer
    S0 = torch.zeros(B, H, K, D, D)
    scale = D**-0.5
    args = (t["q"], t["k"], t["v"], t["lam"], t["g"], None, starts, S0, scale, CHUNK)
    dS = torch.zeros_like(S0)

    def fwd_bwd():  # looked up on the module at every call, so the monkeypatch reaches it
        readout.readout_forward(*args)
        readout.readout_backward(do, dS, *args)

    hm = calibration.head_major(t, do)
    rounds = Rounds({
        "readout": fwd_bwd,
        "calibration": lambda: calibration.chunked_multistate_fwd_bwd(hm, CHUNK),
        "readout 2x": injected(monkeypatch, readout, ("readout_forward", "readout_backward"), fwd_bwd),
    })
    benchmark.pedantic(rounds, rounds=15, iterations=1, warmup_rounds=1)
    judge(benchmark, "readout/calibration", rounds, "readout", "calibration")


@pytest.mark.benchmark(group="cpu-regression", timer=time.process_time)
def test_segment(benchmark, single_thread, layer, monkeypatch):
    t = layer[0]
    s = empty_cache(B, H, K, D, D, dtype=t["k"].dtype, device=t["k"].device)

    def seg():
        segment.segment_cpu(t["k"], t["v"], None, None, s.S, s.n, s.I, s.m, s.Z, s.zz, s.N, s.step, K, "dla", "token", 0.6, CHUNK)

    hm = calibration.head_major(t, torch.zeros_like(t["v"]))
    rounds = Rounds({
        "segment": seg,
        "calibration": lambda: calibration.token_scan(hm["k"], hm["v"], CHUNK, 0.6),
        "segment 2x": injected(monkeypatch, segment, ("_segment_dla",), seg),
    }, repeats={"segment": 3, "calibration": 3, "segment 2x": 2})
    benchmark.pedantic(rounds, rounds=15, iterations=1, warmup_rounds=1)
    judge(benchmark, "segment/calibration", rounds, "segment", "calibration")


@pytest.mark.benchmark(group="cpu-regression", timer=time.process_time)
def test_operator_vs_recurrent(benchmark, single_thread, monkeypatch):
    """The token-by-token reference is slow, so the shapes are small: B = 1, T = 128, H = 2,
    Dk = Dv = 64, K = 8."""
    t = layer_inputs(1, 128, 2, 64, 64, 8)
    x = (t["q"], t["k"], t["v"], t["lam"])

    @torch.no_grad()
    def operator():
        api.multistate_attention(*x, g=t["g"])

    @torch.no_grad()
    def recurrent():
        multistate_attention_recurrent(*x, g=t["g"])

    rounds = Rounds({"operator": operator, "recurrent": recurrent,
                     "operator 2x": injected(monkeypatch, api, ("multistate_attention",), operator)},
                    repeats={"operator": 12, "operator 2x": 6})
    benchmark.pedantic(rounds, rounds=8, iterations=1, warmup_rounds=1)
    judge(benchmark, "operator/recurrent", rounds, "operator", "recurrent")


@pytest.mark.benchmark(group="cpu-regression", timer=time.process_time)
def test_compiled_vs_eager_step(benchmark, single_thread, monkeypatch):
    """Forward, loss and backward of the tiny preset with one layer (B = 2, T = 128), compiled by
    `dla.run.train.compiled_loss` (Inductor, fullgraph) against eager."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
    torch.manual_seed(0)
    model = CausalLM(preset("tiny", n_layers=1))
    gen = torch.Generator().manual_seed(0)
    idx, targets = (torch.randint(0, 256, (2, 128), generator=gen) for _ in range(2))

    def step(loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn(idx, targets).backward()
        return run

    compiled = train.compiled_loss(model)
    original = train.compiled_loss

    def compiled_twice(m):
        once = original(m)
        return lambda *a: once(*a) + once(*a)

    with monkeypatch.context() as m:
        m.setattr(train, "compiled_loss", compiled_twice)
        slowed = train.compiled_loss(model)
    rounds = Rounds({"compiled": step(compiled), "eager": step(model.loss), "compiled 2x": step(slowed)},
                    repeats={"compiled": 2, "eager": 2})
    benchmark.pedantic(rounds, rounds=8, iterations=1, warmup_rounds=1)
    judge(benchmark, "compiled/eager step", rounds, "compiled", "eager")
