"""The Triton object readout without β (`dla.ops.readout.objects_triton`: build, per-chunk forward
and backward, object-major dS, pushdown; mixed in one call with the dense path) against the
oracles.

On the CPU the kernels run through the Triton interpreter (tiny shapes, float32, ieee dots, chunk
16 so that sequences span several chunks) with every row forced onto the objects (`objects=`):
output and final slot states against the materialized masked form in float64; every gradient
(`dq, dk, dv, dλ, dg, dS0`) against the torch object path in float64 (`dla.ops.readout.objects`,
which tests/test_readout.py holds to autograd of the materialized form) on drawn cases, and
against autograd of the materialized form itself on fixed ones. Draws reach boundaries, in-block
and capacity merges (asserted), every token a boundary, initial caches, `T` and `step` that are
not multiples of the chunk; a plan that overflows the pool takes the dense path for its rows;
object and dense rows share a call. Outputs are allocated by `torch.empty`, poisoned with NaN.

On a GPU machine (`pytest -m gpu`) a fixed grid of long sequences (T up to 16384), K ∈ {8, 16,
32}, Dk, Dv ∈ {64, 128}, in float32 (ieee) and bfloat16, checks forward and gradients against
the torch object path in float64 on the device (SPEC §6: bf16 ≤ 2e-2 and at most twice the
torch path's own bf16 error), forced onto objects and by the stage's rule. A compile test pushes
every object kernel through Triton's GPU compiler and ptxas for sm_90 on any machine, and
Inductor compiles the `triton_op` whole on the CPU (its user kernels interpreted), held to eager.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dla.ops.readout.objects_triton as OT
from dla.ops.readout import cost
from dla.ops.readout.objects import objects_backward
from dla.ops.readout.objects_triton import mixed_backward, mixed_forward
from dla.ops.readout.plan import build_plan
from dla.testing import triton_interpreter
from tests.readout_helpers import (
    DEVICES, TOL32, assert_matches_float64, cast, cotangents, cpu, dla_map, f32, gpu_inputs, reference, setup,
)
from tests.sm90 import compile_script
from tests.strategies import (
    Case, claims_decisions, kernel_cases, map_decisions, poisoned_empty, relative_error, tally_draw,
)

INTERPRETER = [DEVICES[0]]
EDGE = dict(batch=1, heads=2, dk=16, dv=16, score="token", inputs="piecewise", mean_regime=4.0, seed=7)
NAMES = ("q", "k", "v", "lam", "g", "S0")


def cases(max_length=48):
    """`dla` maps that reach capacity merges (`tests.strategies.kernel_cases`) in most draws."""
    return kernel_cases(max_length)


def arguments(case: Case, initial: bool, step_shift: int = 0, device="cpu"):
    """`(case, t, state, (q, k, v, lam, g, level_start, S0, scale), step)`: float32 kernel
    arguments on `device`; a call without a cache (and not fenwick, whose map is absolute) may
    start at `step_shift`."""
    case, t, state, level_start, S0, live, step = setup(case, initial)
    if state is None and case.policy != "fenwick":
        step = step + step_shift
    args = (*(f32(t[n], device) for n in ("q", "k", "v", "lam", "g")), level_start.to(device), f32(S0, device),
            case.dk**-0.5)
    return case, t, state, live, args, step.to(device), S0, level_start


def every_row(case: Case, device="cpu") -> torch.Tensor:
    return torch.ones(case.batch * case.heads, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------------------------
# Against the oracles: tiny shapes, float32, ieee dots (the interpreter's chunk is 16)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", INTERPRETER)
@claims_decisions()
@settings(max_examples=3, derandomize=True)  # a handful of interpreter draws: the same ones on every run
@given(cases(), st.booleans(), st.integers(0, 40))
@example(Case(length=1, levels=2, policy="dla", transition="g", tau=0.6, **EDGE), True, 0)  # T = 1
@example(Case(length=37, levels=5, policy="dla", transition="g", tau=0.6, **EDGE), True, 0)  # T % C ≠ 0, a cache
@example(Case(length=35, levels=3, policy="dla", transition="none", tau=0.6, **EDGE), False, 9)  # step % C ≠ 0
@example(Case(length=40, levels=2, policy="dla", transition="g", tau=0.0, **EDGE), True, 0)  # capacity merges
@example(Case(length=20, levels=20, policy="dla", transition="g", tau=0.0, **EDGE), False, 3)  # every token a slot
@example(Case(length=45, levels=7, policy="fenwick", transition="g", tau=0.6, **EDGE), True, 0)  # from step 5
@example(Case(length=33, levels=3, policy="single", transition="none", tau=0.6, **EDGE), True, 0)
def test_forward_matches_materialized(device, case: Case, initial: bool, shift: int):
    case, t, state, _, args, step, _, level_start = arguments(case, initial, shift, device)
    tally_draw(case.policy, map_decisions(level_start, None if state is None else state.m))
    with poisoned_empty():
        o, S = cpu(mixed_forward(*args, step, objects=every_row(case, device)))
    o_ref, S_ref = reference(case, t, state)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert relative_error(o, o_ref) <= TOL32
    assert relative_error(S, S_ref) <= TOL32


def torch_grads(case, t, level_start, S0, do, dS, step) -> dict:
    out = objects_backward(do, dS, t["q"], t["k"], t["v"], t["lam"], t["g"], level_start, S0, case.dk**-0.5, 5,
                           step.cpu())
    return dict(zip(NAMES, out))


def check_grads(got: dict, ref: dict, has_g: bool):
    for name in NAMES:
        if name == "g" and not has_g:
            assert torch.equal(got["g"], torch.zeros_like(got["g"]))
            continue
        assert got[name].dtype == torch.float32 and got[name].shape == ref[name].shape, name
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name], ref[name]) <= TOL32, (name, relative_error(got[name], ref[name]))


def triton_grads(case, args, step, do, dS, device, objects=None, S=None):
    with poisoned_empty():
        grads = mixed_backward(f32(do, device), f32(dS, device), *args[:5], args[5], args[6], args[7], step, S,
                               objects=every_row(case, device) if objects is None else objects)
    return dict(zip(NAMES, cpu(grads)))


@pytest.mark.parametrize("device", INTERPRETER)
@claims_decisions()
@settings(max_examples=2, derandomize=True)
@given(cases(max_length=40), st.booleans(), st.integers(0, 40))
@example(Case(length=1, levels=2, policy="single", transition="g", tau=0.6, **EDGE), True, 0)
@example(Case(length=70, levels=3, policy="dla", transition="g", tau=0.6, **EDGE), True, 0)  # 5 chunks
@example(Case(length=40, levels=2, policy="dla", transition="g", tau=0.0, **EDGE), True, 0)  # capacity merges
@example(Case(length=18, levels=18, policy="dla", transition="none", tau=0.0, **EDGE), False, 7)  # every token a slot
@example(Case(length=29, levels=4, policy="dla", transition="g", tau=10.0, **EDGE), True, 0)  # all merged
def test_backward_matches_the_torch_path(device, case: Case, initial: bool, shift: int):
    case, t, state, _, args, step, S0, level_start = arguments(case, initial, shift, device)
    tally_draw(case.policy, map_decisions(level_start, None if state is None else state.m))
    do, dS = cotangents(case, S0)
    got = triton_grads(case, args, step, do, dS, device)
    check_grads(got, torch_grads(case, t, level_start, S0, do, dS, step), t["g"] is not None)


@pytest.mark.parametrize("device", INTERPRETER)
@pytest.mark.parametrize("case", [
    Case(length=37, levels=3, policy="dla", transition="g", tau=0.6, **EDGE),
    Case(length=33, levels=7, policy="fenwick", transition="none", tau=0.6, **EDGE),
], ids=["dla-g", "fenwick"])
def test_backward_matches_materialized_autograd(device, case: Case):
    """The oracle itself (autograd of the materialized form), with a cache."""
    case, t, state, live, args, step, S0, _ = arguments(case, True, 0, device)
    do, dS = cotangents(case, S0)
    got = triton_grads(case, args, step, do, dS, device)
    ref = reference(case, t, state, grads=(do, dS))
    for name in ("q", "k", "v", "lam", "g"):
        if name in ref:
            assert relative_error(got[name], ref[name]) <= TOL32, name
    mask = live[..., None, None]  # live non-empty initial slots (an empty fenwick level is a hole)
    assert relative_error(torch.where(mask, got["S0"], 0.0), torch.where(mask, ref["S0"], 0.0)) <= TOL32


@pytest.mark.parametrize("device", INTERPRETER)
def test_object_and_dense_rows_share_a_call(device, monkeypatch):
    """Rows on objects and rows on the dense kernels in one call — asked for, and forced by a
    plan that overflows the pool (a capacity too small for one row's plan): outputs and every
    gradient as if each row ran alone."""
    case = Case(length=50, levels=4, policy="dla", transition="g", tau=0.6, **{**EDGE, "batch": 2})
    case, t, state, _, args, step, S0, level_start = arguments(case, True, 0, device)
    do, dS = cotangents(case, S0)
    o_ref, S_ref = reference(case, t, state)
    ref = torch_grads(case, t, level_start, S0, do, dS, step)
    asked = torch.tensor([True, False, False, True], device=device)
    with poisoned_empty():
        o, S = cpu(mixed_forward(*args, step, objects=asked))
    assert relative_error(o, o_ref) <= TOL32 and relative_error(S, S_ref) <= TOL32
    check_grads(triton_grads(case, args, step, do, dS, device, asked), ref, True)
    plan = build_plan(level_start, step, 16)
    need = int(plan.created.min()) + case.levels  # the smallest row's plan fits, a larger one does not
    assert int(plan.created.max()) + case.levels > need
    monkeypatch.setattr(cost, "pool_capacity", lambda *a, **kw: (need, need))
    x = OT._Prepared(*args[:5], level_start, args[6], None)
    _, mode = OT.row_modes(x, level_start, step, every_row(case, device))
    assert 0 < int(mode.sum()) < mode.numel()
    with poisoned_empty():
        o, S = cpu(mixed_forward(*args, step, objects=every_row(case, device)))
    assert relative_error(o, o_ref) <= TOL32 and relative_error(S, S_ref) <= TOL32
    check_grads(triton_grads(case, args, step, do, dS, device), ref, True)


@pytest.mark.parametrize("device", INTERPRETER)
def test_the_final_state_given_or_rebuilt(device):
    """The backward takes the forward's S, or rebuilds it: the same gradients."""
    case = Case(length=41, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, _, _, args, step, S0, level_start = arguments(case, True, 0, device)
    do, dS = cotangents(case, S0)
    _, S = mixed_forward(*args, step, objects=every_row(case, device))
    rebuilt = triton_grads(case, args, step, do, dS, device)
    given_S = triton_grads(case, args, step, do, dS, device, S=S)
    for name in NAMES:
        assert relative_error(given_S[name], rebuilt[name]) <= 1e-6, name


@pytest.mark.parametrize("device", INTERPRETER)
@pytest.mark.parametrize("rows", ["objects", "mixed", "rule", "decode"])
def test_the_backward_reads_the_forwards_plan(device, rows, monkeypatch):
    """The plan the forward keeps (`keep_plan`, as `dla::readout_without_beta` does) gives the
    backward exactly what building it again gives, without building it: every row on objects,
    object and dense rows in one call, the rule's choice, and a call dense from its shapes (one
    chunk, no tables); the empty sequence keeps its modes only."""
    length = 9 if rows == "decode" else 45
    case = Case(length=length, levels=4, policy="dla", transition="g", tau=0.6, **{**EDGE, "batch": 2})
    case, _, _, _, args, step, S0, _ = arguments(case, True, 0, device)
    do, dS = cotangents(case, S0)
    objects = {"objects": every_row(case, device), "mixed": torch.tensor([True, False, False, True], device=device),
               "rule": None, "decode": None}[rows]
    o, S, plan = mixed_forward(*args, step, objects=objects, keep_plan=True)
    assert plan.dtype == torch.int32 and (plan.shape[0] == case.batch * case.heads) == (rows == "decode")
    rebuilt = mixed_backward(f32(do, device), f32(dS, device), *args, step, S, objects=objects)
    monkeypatch.setattr(OT, "build_plan", lambda *a, **kw: pytest.fail("the backward built the plan again"))
    kept = mixed_backward(f32(do, device), f32(dS, device), *args, step, S, plan=plan)
    for name, a, b in zip(NAMES, kept, rebuilt):
        assert torch.equal(a, b), name
    empty = [x[:, :0] for x in args[:6]] + list(args[6:])
    *_, plan = mixed_forward(*empty, step, keep_plan=True)
    assert torch.equal(plan, torch.zeros(case.batch * case.heads, dtype=torch.int32))


@pytest.mark.parametrize("device", INTERPRETER)
def test_missing_cotangents_and_empty_sequence(device):
    case = Case(length=25, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    case, _, _, _, args, step, S0, _ = arguments(case, True, 0, device)
    do, dS = cotangents(case, S0)
    objects = every_row(case, device)
    both = mixed_backward(f32(do, device), f32(dS, device), *args, step, objects=objects)
    no_do = mixed_backward(None, f32(dS, device), *args, step, objects=objects)
    no_dS = mixed_backward(f32(do, device), None, *args, step, objects=objects)
    for a, b, c in zip(both, no_do, no_dS):
        assert relative_error((b + c).cpu(), a.cpu()) <= TOL32
    empty = [x[:, :0] for x in args[:6]] + list(args[6:])
    o, S = mixed_forward(*empty, step, objects=objects)
    assert o.shape == (1, 0, 2, case.dv) and torch.equal(S.cpu(), f32(S0))


@pytest.mark.parametrize("device", INTERPRETER)
def test_decode_sized_calls_take_the_dense_path_from_shapes(device):
    """A call of at most one chunk builds no plan: every row dense, nothing read from the device."""
    case = Case(length=9, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    _, _, _, _, args, step, _, level_start = arguments(case, True, 0, device)
    x = OT._Prepared(*args[:5], level_start, args[6], None)
    plan, mode = OT.row_modes(x, level_start, step)
    assert plan is None and not mode.any()


def test_the_rule_takes_objects_wherever_the_plan_fits_the_pool():
    """`cost.takes_objects`: a sparse long plan fits and takes objects, a boundary-dense one
    overflows the pool and takes the dense path; the same dense map in a roomy pool fits and
    takes objects; all from the plan alone."""
    T, K, D = 4096, 16, 128
    sparse = dla_map(1, T, 2, K, 0, 1 / 128, seed=0)
    dense = dla_map(1, T, 2, K, 0, 0.9, seed=0)
    zero = torch.zeros(1, dtype=torch.int64)
    P, M = cost.pool_capacity(T, K, D, D, 2)
    assert cost.takes_objects(build_plan(sparse, zero, 64, P, M)).all()
    dense_plan = build_plan(dense, zero, 64, P, M)
    assert dense_plan.overflow.all() and not cost.takes_objects(dense_plan).any()
    assert cost.takes_objects(build_plan(dense, zero, 64)).all()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(1, 200), st.integers(0, 63), st.integers(0, 2**31 - 1))
def test_chunk_local_dg_is_the_suffix_sum(H, T, step, seed):
    """`chunk_local_dg`: within-chunk sums plus the crossing term `R` of the next boundary give
    the whole suffix sum `Σ_{t≥u} dG_t` on the object rows, whatever the plan's chunking (a partial
    first chunk, trailing chunks that start at T, whose `R` must be ignored); dense rows keep the
    suffix as it is."""
    gen = torch.Generator().manual_seed(seed)
    B, C = 2, 16
    dG = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    suffix = dG.flip(1).cumsum(1).flip(1)
    first = (-step) % C
    cuts = [0] + [c for c in range(first, T, C) if c > 0] + [T, T]  # one trailing chunk at T
    starts = torch.tensor(cuts).expand(B * H, -1).contiguous()
    rows = suffix.transpose(1, 2).reshape(B * H, T)
    crossing = torch.randn(B * H, len(cuts) + 1, generator=gen, dtype=torch.float64)  # garbage where unused
    inside = starts < T
    crossing[:, :-1] = torch.where(inside, torch.gather(torch.cat([rows, rows.new_zeros(B * H, 1)], 1), 1, starts),
                                   crossing[:, :-1])
    mode = torch.arange(B * H) % 3 != 0
    got = OT.chunk_local_dg(suffix, starts, crossing, mode)
    assert torch.allclose(got, suffix, rtol=0, atol=1e-12)
    garbage = suffix + 1.0  # the dense rows pass their suffix through untouched
    got = OT.chunk_local_dg(garbage, starts, crossing, torch.zeros_like(mode))
    assert torch.equal(got, garbage)


def test_rejects_float64_and_unknown_precision():
    case = Case(length=3, levels=2, policy="single", transition="none", tau=0.6, **EDGE)
    _, t, _, _, args, step, _, _ = arguments(case, False)
    doubles = [t["q"], t["k"], t["v"], t["lam"]] + list(args[4:])
    with pytest.raises(TypeError, match="float64"):
        mixed_forward(*doubles, step)
    with pytest.raises(ValueError, match="input_precision"):
        mixed_forward(*args, step, input_precision="fp32")


# --------------------------------------------------------------------------------------------
# The registered ops with the Triton kernels on CPU tensors: opcheck, autograd, fullgraph compile
# --------------------------------------------------------------------------------------------


def test_registered_op_opcheck_and_fullgraph_compile():
    """`dla::readout` without β, its Triton side on CPU tensors (`dla.testing.triton_interpreter()`,
    the stage's rule on the device): opcheck, and the compiled loss's gradients against the torch
    object path in float64."""
    ops = torch.ops.dla
    case = Case(length=40, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, state, _, args, step, S0, level_start = arguments(case, True, 0)
    q, k, v, lam, g, ls, S0f, scale = args
    leaves = [x.clone().requires_grad_() for x in (q, k, v, lam, g, S0f)]
    do = torch.randn(case.batch, case.length, case.heads, case.dv)
    dS = torch.randn(S0f.shape)
    with triton_interpreter():
        torch.library.opcheck(ops.readout.default, (*leaves[:5], None, ls, leaves[5], scale, 16, step),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.library.opcheck(ops.readout_backward.default, (do, dS, q, k, v, lam, g, None, ls, S0f, scale, 16, step),
                              test_utils=("test_schema", "test_faketensor"))

    def loss(q, k, v, lam, g, S0):
        o, S = ops.readout(q, k, v, lam, g, None, ls, S0, scale, 16, step)
        return (o * do).sum() + (S * dS).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with triton_interpreter():
        value = compiled(*leaves)
        got = torch.autograd.grad(value, leaves)
    ref = torch_grads(case, t, level_start, S0, do.double(), dS.double(), step)
    for name, x in zip(NAMES, got):
        assert relative_error(x, ref[name]) <= TOL32, name
    o_ref, S_ref = reference(case, t, state)
    want = float((o_ref * do.double()).sum() + (S_ref * dS.double()).sum())
    assert abs(float(value.detach()) - want) <= 1e-4 * (1 + abs(want))


TRITON_OP = r"""
import torch
from torch._dynamo.backends.debugging import aot_eager, boxed_nop

import dla.compile.ops  # noqa: F401  registers the ops
from dla.ops.readout.objects import objects_backward
from dla.testing import triton_interpreter
from tests.readout_helpers import f32, setup
from tests.strategies import Case, relative_error

case = Case(batch=1, length=40, heads=2, dk=16, dv=16, levels=3, policy="dla", transition="g", tau=0.6,
            score="token", inputs="piecewise", mean_regime=4.0, seed=7)
case, t, state, ls, S0, live, step = setup(case, True)
q, k, v, lam, g, S0f = (f32(x) for x in (t["q"], t["k"], t["v"], t["lam"], t["g"], S0))
scale = case.dk**-0.5
ops = torch.ops.dla
leaves = [x.clone().requires_grad_() for x in (q, k, v, lam, g, S0f)]
gen = torch.Generator().manual_seed(0)
do, dS = torch.randn(1, 40, 2, 16, generator=gen), torch.randn(S0f.shape, generator=gen)
graphs = []


def keep(gm, inputs):
    graphs.append(gm.code)
    return boxed_nop(gm, inputs)


def backend(gm, inputs):
    return aot_eager(gm, inputs, fw_compiler=keep, bw_compiler=keep)


def loss(q, k, v, lam, g, S0):
    o, S, _ = ops.readout_without_beta(q, k, v, lam, g, ls, S0, scale, step)
    return (o * do).sum() + (S * dS).sum()


with triton_interpreter():
    _, S, plan = ops.readout_without_beta(q, k, v, lam, g, ls, S0f, scale, step)
    torch.library.opcheck(ops.readout_without_beta.default, (*leaves[:5], ls, leaves[5], scale, step),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(ops.readout_without_beta_backward.default,
                          (do, dS, q, k, v, lam, g, ls, S0f, scale, step, S, plan),
                          test_utils=("test_schema", "test_faketensor"))
    value = torch.compile(loss, fullgraph=True, backend=backend)(*leaves)
    got = torch.autograd.grad(value, leaves)
ref = objects_backward(do.double(), dS.double(), t["q"], t["k"], t["v"], t["lam"], t["g"], ls, S0, scale, 5, step)
for name, x, r in zip(("q", "k", "v", "lam", "g", "S0"), got, ref):
    print(name, relative_error(x, r))
print("plan sorts", [code.count("aten.sort") for code in graphs])
print("kernels traced", [code.count("higher_order.triton_kernel_wrapper_functional(") for code in graphs])
"""


def test_triton_op_opcheck_and_fullgraph_compile():
    """`dla::readout_without_beta` (a `torch.library.triton_op`) on CPU tensors through
    `dla.testing.triton_interpreter()`: opcheck, and a `fullgraph=True` compile of a loss whose
    forward and backward graphs hold the Triton kernels themselves (AOT autograd decomposes the
    op) and only the forward builds the plan, with gradients against the torch object path. In
    a subprocess without TRITON_INTERPRET: kernels defined under it are interpreted functions,
    which `wrap_triton` runs instead of tracing."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", TRITON_OP], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    errors = {line.split()[0]: float(line.split()[1]) for line in lines[:-2]}
    assert set(errors) == set(NAMES) and max(errors.values()) <= TOL32, errors
    forward, backward = eval(lines[-1].removeprefix("kernels traced "))
    assert (forward, backward) == (6, 11)  # every launch of each pass: 2 + 4 object kernels, 4 + 7 dense
    # the plan is built once, in the forward (its one sort), and handed to the backward
    assert eval(lines[-2].removeprefix("plan sorts ")) == [1, 0]


INDUCTOR = r"""
import os
import torch
import triton
from triton.backends.compiler import GPUTarget
import torch._inductor.async_compile as async_compile
from torch._inductor.runtime import triton_heuristics

import dla.compile.ops  # noqa: F401  registers the ops
from dla.testing import triton_interpreter
from tests.readout_helpers import f32, setup
from tests.strategies import Case, relative_error


class SM90:
    '''A driver that names the H100 as its target and has no device: Inductor generates its
    wrapper and analyses the kernels' writes (Triton IR) as it does on the card.'''

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


class Interpreted:
    '''A user kernel of Inductor's wrapper, launched by `fn[grid]` (interpreted inside
    `triton_interpreter()`): Inductor passes the non-constexpr arguments, then the grid.'''

    def __init__(self, fn, triton_meta, inductor_meta):
        self.fn, self.meta = fn, triton_meta
        self.names = [n for n, t in triton_meta["signature"].items() if t != "constexpr"]
        self.grid = len(inductor_meta.get("extra_launcher_args", ())) or 3

    def run(self, *args, stream=None):
        n = len(self.names)
        kwargs = dict(zip(self.names, args[:n]))
        constants = {k: v for k, v in self.meta["constants"].items() if k not in kwargs}
        self.fn[tuple(int(g) for g in args[n:n + self.grid])](**kwargs, **constants)


def user_kernel(self, kernel_name, source_code, device_str="cuda"):
    if "user_autotune" not in source_code:
        return original(self, kernel_name, source_code, device_str)
    made = {}

    def user_autotune(configs, triton_meta, filename=None, inductor_meta=None, custom_kernel=False, **_):
        def wrap(fn):
            made["kernel"] = Interpreted(fn, triton_meta, inductor_meta or {})
            return fn
        return wrap

    path = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], f"user_{kernel_name}_{len(source_code)}.py")
    with open(path, "w") as f:
        f.write(source_code)  # triton.jit reads a kernel's source from its file
    real, triton_heuristics.user_autotune = triton_heuristics.user_autotune, user_autotune
    try:
        exec(compile(source_code, path, "exec"), {"__file__": path, "__name__": kernel_name})
    finally:
        triton_heuristics.user_autotune = real
    return made["kernel"]


def red_zoned(empty):
    '''Inductor's CPU buffers NaN-filled and followed by as many NaNs again, so that a read past
    a buffer's end, or of what no kernel wrote, shows (as uninitialised memory does on the card).'''

    def allocate(size, stride, dtype, *rest):
        extent = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(n > 0 for n in size) else 0
        if not dtype.is_floating_point:
            return empty(size, stride, dtype, *rest)
        return torch.full((2 * extent + 16,), float("nan"), dtype=dtype).as_strided(size, stride)
    return allocate


torch._C._dynamo.guards._empty_strided_cpu = red_zoned(torch._C._dynamo.guards._empty_strided_cpu)
triton.runtime.driver.set_active(SM90())
original = async_compile.AsyncCompile.triton
async_compile.AsyncCompile.triton = user_kernel

case = Case(batch=1, length=40, heads=2, dk=16, dv=16, levels=3, policy="dla", transition="g", tau=0.6,
            score="token", inputs="piecewise", mean_regime=4.0, seed=7)
case, t, state, ls, S0, live, step = setup(case, False)
q, k, v, lam, g, S0f = (f32(x) for x in (t["q"], t["k"], t["v"], t["lam"], t["g"], S0))
gen = torch.Generator().manual_seed(0)
do, dS = torch.randn(v.shape, generator=gen), torch.randn(S0f.shape, generator=gen)


def loss(q, k, v, lam, g, S0):
    # a fresh call, as the operator makes it: no step
    o, S, _ = torch.ops.dla.readout_without_beta(q, k, v, lam, g, ls, S0, case.dk**-0.5, None)
    return (o * do).sum() + (S * dS).sum()


results = []
with triton_interpreter():
    # compiled first: Inductor reads the kernels' Triton IR, which no interpreted launch may precede
    for fn in (torch.compile(loss, fullgraph=True, backend="inductor"), loss):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, lam, g, S0f)]
        value = fn(*leaves)
        results.append((value.detach(), torch.autograd.grad(value, leaves)))
(compiled, got), (eager, want) = results
print("loss", relative_error(compiled, eager.double()))
for name, x, r in zip(("q", "k", "v", "lam", "g", "S0"), got, want):
    print(name, relative_error(x, r.double()) if torch.isfinite(x).all() else float("inf"))
"""


def test_inductor_compiled_backward_matches_eager(tmp_path):
    """`dla::readout_without_beta` compiled by Inductor itself (the recall grid's path on the
    card: compile = true, a fresh call, so no `step`), forward and backward, against the same op
    run eagerly: every gradient finite and equal to float32 rounding. No GPU: the driver names
    sm_90 as its target (Inductor generates its wrapper and reads the kernels' writes from
    their Triton IR as on the H100), the wrapper's torch parts are Inductor's C++ kernels, its
    user Triton kernels launch through the interpreter, and its buffers are NaN with a NaN red
    zone behind them, as uninitialised memory may be on the card. Regression: the backward's
    two dg crossing accumulators were two views of one zeros tensor, and Inductor's lowering
    of the kernels' functionalized writes into them lost the second view's zeros (a copy read
    past the end of a buffer of half the size), so dg came out NaN and the compiled Mamba-2
    `dla` run of `tests/test_eval.py::test_compiled_grid_runs_on_the_gpu` went non-finite."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("Inductor's CPU kernels need a C++ compiler")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(tmp_path), TORCHINDUCTOR_FORCE_DISABLE_CACHES="1")
    done = subprocess.run([sys.executable, "-c", INDUCTOR], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = {line.split()[0]: float(line.split()[1]) for line in done.stdout.strip().splitlines()}
    assert set(errors) == {"loss", *NAMES} and max(errors.values()) <= TOL32, errors


# --------------------------------------------------------------------------------------------
# The kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

COMPILE = r"""
import sys, torch
from dla.testing import compile_for_sm90
import dla.ops.readout.objects_triton as R
import dla.ops.readout.masked_triton as M

M.interpreting = lambda x: False  # the GPU's launch configurations, from CPU tensors
dtype, D, L, has_g = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
z = torch.zeros(1, 4, 1, D, dtype=dtype)
x = M._Prepared(z, z, z, torch.zeros(1, 4, 1, L, dtype=dtype), torch.zeros(1, 4, 1) if has_g else None,
                torch.zeros(1, 4, 1, L, dtype=torch.int32), torch.zeros(1, 1, L, D, D), None)
meta = R._meta(x, False)
options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
tiles, _ = R._tiles(x, False)
whole = dict(BK=x.BK, BV=x.BV, BL=x.BL)
ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
inputs = {"Q", "K", "V", "LAM", "DO", "O", "COPY", "DTOT", "DQ", "DK_", "DV_", "DLAM"}
floats = {"GH", "GL", "S0", "S", "DS", "DS0", "DBUF", "DGR", "DGC", "RB"}
scalars = {"T", "H", "NC", "P", "M"}
variants = {"build": [dict(**tiles, HAS_LO=dtype != torch.float32, FINAL=f, ALL_MASTERS=f) for f in (True, False)],
            "chunk_fwd": [whole], "chunk_bwd": [whole],
            "bwd_objects": [dict(**tiles, BL=x.BL)], "pushdown": [dict(**tiles, BL=x.BL)]}
kernels = {"build": R._build_kernel, "chunk_fwd": R._chunk_fwd_kernel, "chunk_bwd": R._chunk_bwd_kernel,
           "bwd_objects": R._bwd_objects_kernel, "pushdown": R._pushdown_kernel}
for name, fn in kernels.items():
    for extra in variants[name]:
        compile_for_sm90(fn, lambda a: "fp32" if a == "scale" else "i32" if a in scalars else ptr if a in inputs
                         else "*bf16" if a == "LO" else "*fp32" if a in floats else "*i32", {**meta, **extra},
                         **options)
        print(name, "compiled", flush=True)
"""


@pytest.mark.parametrize("dtype,D,L,has_g", [
    ("bfloat16", 128, 32, 1),  # the benchmark's configuration
    pytest.param("float32", 64, 8, 0, marks=pytest.mark.slow),
])
def test_kernels_compile_for_sm90(dtype, D, L, has_g):
    """Every object kernel, with the launchers' meta-parameters (the card's chunk 64, both build
    variants), through Triton's GPU compiler and ptxas for the H100."""
    assert compile_script(COMPILE, dtype, str(D), str(L), str(has_g)).count("compiled") == 6


# --------------------------------------------------------------------------------------------
# GPU: long sequences against the torch object path in float64 on the device
# --------------------------------------------------------------------------------------------

GPU_CASES = [  # (policy, B, H, T, Dk, Dv, K, has_g, initial, p_boundary)
    ("dla", 1, 2, 1000, 64, 64, 8, True, True, 1 / 16),
    ("dla", 1, 2, 4096, 128, 128, 16, True, False, 1 / 64),
    ("dla", 1, 2, 16384, 128, 128, 32, True, True, 1 / 64),
    ("dla", 1, 2, 4096, 64, 128, 32, False, True, 1 / 16),
    ("dla", 2, 4, 2048, 128, 64, 32, True, False, 1 / 4),
    ("fenwick", 1, 2, 4096, 128, 128, 16, True, False, 0.0),
    ("fenwick", 1, 2, 16384, 64, 64, 16, False, False, 0.0),
    ("single", 1, 2, 8192, 128, 128, 8, True, True, 0.0),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rule", [False, True], ids=["objects", "rule"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy,B,H,T,Dk,Dv,K,has_g,initial,p", GPU_CASES)
def test_gpu_matches_the_torch_path_in_float64(policy, B, H, T, Dk, Dv, K, has_g, initial, p, dtype, rule):
    t, ls, S0 = gpu_inputs(policy, T, Dk, Dv, K, has_g, initial, B=B, H=H, p_boundary=p)
    scale = Dk**-0.5
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64).cuda()
    dS = torch.randn(S0.shape, generator=gen, dtype=torch.float64).cuda()
    objects = None if rule else torch.ones(B * H, dtype=torch.bool, device="cuda")
    # dla maps do not depend on the step (fenwick's closed form starts at 0): a partial first chunk
    step = torch.full((B,), T % 97 if policy == "dla" else 0, dtype=torch.int64, device="cuda")

    def forward(q, k, v, lam, g, beta, ls, S0):
        return mixed_forward(q, k, v, lam, g, ls, S0, scale, step, objects=objects)

    def backward(do, dS, q, k, v, lam, g, beta, ls, S0):
        dq, dk, dv, dlam, dg, dS0 = mixed_backward(do, dS, q, k, v, lam, g, ls, S0, scale, step, objects=objects)
        return dq, dk, dv, dlam, dg, None, dS0

    assert_matches_float64(forward, backward, cast(t, dtype), do.to(dtype), dS, ls, S0, scale, step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_quick_benchmark():
    """A quick look at the speed of the object path beside the dense one on the §7 shapes at
    T = 8192, K = 32, sparse synthetic map (printed; `perf/bench_gpu.py` is the measurement)."""
    from triton.testing import do_bench

    B, T, H, D, K = 4, 8192, 16, 128, 32
    t, ls, S0 = gpu_inputs("dla", T, D, D, K, True, False, B=B, H=H, p_boundary=1 / 64)
    x = cast(t, torch.bfloat16)
    S0 = S0.float()
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    for name, objects in (("objects", torch.ones(B * H, dtype=torch.bool, device="cuda")),
                          ("dense", torch.zeros(B * H, dtype=torch.bool, device="cuda")), ("rule", None)):
        args = (x["q"], x["k"], x["v"], x["lam"], x["g"], ls, S0, D**-0.5)
        fwd = do_bench(lambda: mixed_forward(*args, objects=objects), warmup=5, rep=20)
        bwd = do_bench(lambda: mixed_backward(do, None, *args, objects=objects), warmup=5, rep=20)
        print(f"{name}: forward {fwd:.2f} ms, backward {bwd:.2f} ms")
        assert fwd > 0 and bwd > 0
