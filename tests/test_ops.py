"""`dla.multistate_attention` through the custom ops, against the references (SPEC §6):
outputs and caches on every policy × transition × score, gradients, `opcheck`, compile."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from dla import level_map, multistate_attention
from dla.ops.levels import dense_level_map, encode_level_map
from dla.ops.reference import multistate_attention_materialized
from dla.ops.state import empty_cache
from dla.ops.validation import SCORES
from tests.strategies import (
    FORGETFUL, TRANSITIONS, Case, build, cases, claims_decisions, comparable, fenwick_levels, information_close,
    naive_segmentation, options, random_cache, relative_error, tally_draw, well_conditioned,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
EDGE = dict(batch=1, heads=2, dk=3, dv=2, transition="both", score="token", inputs="piecewise", mean_regime=4.0, seed=7)


def reference(case: Case, t: dict, initial_state=None):
    return multistate_attention_materialized(t["q"], t["k"], t["v"], t["lam"], g=t["g"], beta=t["beta"],
                                             initial_state=initial_state, output_final_state=True, **options(case))


def cast_state(state, dtype):
    if state is None:
        return None
    fdt = torch.float64 if dtype == torch.float64 else torch.float32
    return state._replace(**{f: getattr(state, f).to(fdt) for f in ("S", "I", "Z", "zz", "N")})


def check_against_reference(case: Case, dtype, initial_state=None):
    t64 = build(case)
    seg = naive_segmentation(case, t64, initial_state)
    assume(tally_draw(case.policy, seg, comparable(case, seg, dtype)))
    o_ref, s_ref = reference(case, t64, initial_state)
    t = {n: (x.to(dtype) if x is not None else None) for n, x in t64.items()}
    o, s = multistate_attention(t["q"], t["k"], t["v"], t["lam"], g=t["g"], beta=t["beta"],
                                initial_state=cast_state(initial_state, dtype), output_final_state=True, **options(case))
    assert o.dtype == dtype and s.S.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert relative_error(o, o_ref) <= TOL[dtype]
    assert torch.equal(s.m, s_ref.m) and torch.equal(s.n, s_ref.n) and torch.equal(s.step, s_ref.step)
    assert information_close(s.I, s_ref.I, s_ref.n, dtype)
    for name in ("S", "Z", "zz", "N"):
        assert relative_error(getattr(s, name), getattr(s_ref, name)) <= TOL[dtype] * 10, name
    return seg


@claims_decisions()
@given(cases(), st.sampled_from([torch.float64, torch.float32]))
@example(Case(length=1, levels=2, policy="dla", tau=0.6, chunk_size=4, **EDGE), torch.float64)
@example(Case(length=13, levels=16, policy="dla", tau=0.0, chunk_size=4, **EDGE), torch.float64)
@example(Case(length=13, levels=3, policy="dla", tau=10.0, chunk_size=4, **EDGE), torch.float32)
@example(Case(length=13, levels=2, policy="dla", tau=0.0, chunk_size=8, **EDGE), torch.float64)
# decisions on the rule's edges (tests.strategies.designed_stream): I = τ, ties of merge densities
@example(Case(length=11, levels=3, policy="dla", tau=0.0, chunk_size=4, **{**EDGE, "inputs": "repeated"}),
         torch.float32)
@example(Case(length=10, levels=4, policy="dla", tau=0.0, chunk_size=3, **{**EDGE, "inputs": "repeated",
                                                                            "score": "state"}), torch.float64)
@example(Case(length=9, levels=3, policy="dla", tau=0.0, chunk_size=4, **{**EDGE, "inputs": "repeated",
                                                                           "score": "drift"}), torch.float32)
@example(Case(length=10, levels=4, policy="dla", tau=2.0, chunk_size=4, **{**EDGE, "inputs": "alternating"}),
         torch.float64)
@example(Case(length=7, levels=3, policy="dla", tau=2.0, chunk_size=8, **{**EDGE, "inputs": "alternating",
                                                                           "score": "state", "transition": "g"}),
         torch.float32)
@example(Case(length=9, levels=3, policy="dla", tau=2.0, chunk_size=4, **{**EDGE, "inputs": "alternating",
                                                                           "score": "drift"}), torch.float64)
def test_matches_the_reference(case: Case, dtype):
    check_against_reference(case, dtype)


@claims_decisions()
@given(cases(max_length=12), st.sampled_from([torch.float64, torch.float32]), st.integers(0, 2**31 - 1))
def test_continues_from_an_initial_state(case: Case, dtype, seed):
    if case.policy == "fenwick":
        case = replace(case, levels=fenwick_levels(case.length, offset=5))
    check_against_reference(case, dtype, initial_state=random_cache(case, seed))


@claims_decisions()
@given(cases(policies=("dla", "dla", "fenwick")), st.data())
def test_prefill_split_equals_one_call(case: Case, data):
    t = build(case)
    seg = naive_segmentation(case, t)
    assume(tally_draw(case.policy, seg, comparable(case, seg)))
    a = data.draw(st.integers(1, case.length))
    kw = dict(output_final_state=True, **options(case))
    o_one, s_one = multistate_attention(t["q"], t["k"], t["v"], t["lam"], g=t["g"], beta=t["beta"], **kw)
    head = {n: (x[:, :a] if x is not None else None) for n, x in t.items()}
    tail = {n: (x[:, a:] if x is not None else None) for n, x in t.items()}
    o1, s1 = multistate_attention(head["q"], head["k"], head["v"], head["lam"], g=head["g"], beta=head["beta"], **kw)
    outs = [o1]
    if a < case.length:
        o2, s1 = multistate_attention(tail["q"], tail["k"], tail["v"], tail["lam"], g=tail["g"], beta=tail["beta"],
                                      initial_state=s1, **kw)
        outs.append(o2)
    assert relative_error(torch.cat(outs, 1), o_one) <= 1e-10
    assert torch.equal(s1.n, s_one.n) and torch.equal(s1.m, s_one.m) and relative_error(s1.S, s_one.S) <= 1e-10
    assert relative_error(s1.N, s_one.N) <= 1e-10


@claims_decisions()
@given(cases(max_length=20))
def test_segment_op_level_map_equals_segment_naive(case: Case):
    t = build(case)
    seg = naive_segmentation(case, t)
    assume(tally_draw(case.policy, seg, comparable(case, seg)))
    starts = level_map(t["k"], t["v"], capacity=case.levels, g=t["g"], beta=t["beta"], policy=case.policy,
                       tau=case.tau, score=case.score, chunk_size=case.chunk_size)
    level, _ = dense_level_map(starts, torch.zeros(case.batch, case.heads, dtype=torch.long))
    assert torch.equal(level, seg.level)


# ---------------------------------------------------------------------------- gradients


def fixed_level_map(case: Case, t: dict):
    seg = naive_segmentation(case, t)
    return encode_level_map(seg.level, seg.initial_level, torch.zeros(case.batch, case.heads, dtype=torch.long))


@pytest.mark.parametrize("transition", ["none", "g", "beta", "both"])
def test_readout_gradcheck_through_the_registered_op(transition):
    """The op's autograd rule (backward = `dla::readout_backward`) against finite differences;
    `tests/test_readout.py` covers the kernels themselves on every policy."""
    case = Case(batch=1, length=5, heads=1, dk=2, dv=2, levels=3, policy="dla", transition=transition,
                score="token", tau=0.6, inputs="piecewise", mean_regime=3.0, seed=5, chunk_size=3)
    t = build(case)
    starts = fixed_level_map(case, t)
    S0 = torch.randn(1, 1, 3, 2, 2, dtype=torch.float64)
    names = [n for n in ("q", "k", "v", "lam", "g", "beta") if t[n] is not None]
    inputs = [t[n].clone().requires_grad_() for n in names] + [S0.requires_grad_()]

    def fn(*xs):
        kw = dict(zip(names, xs[:-1]))
        o, S = torch.ops.dla.readout(kw["q"], kw["k"], kw["v"], kw["lam"], kw.get("g"), kw.get("beta"), starts,
                                     xs[-1], case.dk**-0.5, case.chunk_size)
        return o, S

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


@claims_decisions()
@given(cases(max_length=16))
def test_float32_gradients_match_the_materialized_reference(case: Case):
    t64 = build(case)
    seg = naive_segmentation(case, t64)
    assume(tally_draw(case.policy, seg, comparable(case, seg, torch.float32)))
    names = [n for n in ("q", "k", "v", "lam", "g", "beta") if t64[n] is not None]
    weight = torch.randn(case.batch, case.length, case.heads, case.dv, dtype=torch.float64)

    def grads(fn, dtype):
        xs = {n: t64[n].detach().to(dtype).clone().requires_grad_() for n in names}
        o = fn(xs["q"], xs["k"], xs["v"], xs["lam"], g=xs.get("g"), beta=xs.get("beta"), **options(case))
        (o.double() * weight).sum().backward()
        return {n: xs[n].grad.double() for n in names}

    ref = grads(multistate_attention_materialized, torch.float64)
    got = grads(multistate_attention, torch.float32)
    for n in names:
        # float32 rounding, amplified by the UT solve and decay products, on small tensors
        assert relative_error(got[n], ref[n]) <= 1e-4, n


# ---------------------------------------------------------------------------- opcheck


def opcheck_inputs(transition: str, policy="dla"):
    case = Case(batch=1, length=9, heads=2, dk=3, dv=2, levels=5 if policy == "fenwick" else 4, policy=policy, transition=transition,
                score="token", tau=0.6, inputs="piecewise", mean_regime=3.0, seed=3, chunk_size=4)
    t = build(case, torch.float32)
    return case, t


@pytest.mark.parametrize("policy,score", [("dla", score) for score in SCORES] + [("fenwick", "drift"),
                                                                                 ("single", "drift")])
def test_opcheck_segment(policy, score):
    case, t = opcheck_inputs("both", policy)
    case = replace(case, score=score)
    state = random_cache(case, seed=1, dtype=torch.float32) if policy != "fenwick" else None
    state = state or empty_cache(1, 2, case.levels, 3, 2, dtype=torch.float32, device="cpu")
    assert policy == "fenwick" or (state.m > 0).all()  # a live cache, so the initial-slot path is checked
    args = (t["k"], t["v"], t["g"], t["beta"], state.S, state.n, state.I, state.m, state.Z, state.zz, state.N,
            state.step, case.levels, policy, score, 0.6, 4)
    torch.library.opcheck(torch.ops.dla.segment.default, args)
    no_transition = (t["k"], t["v"], None, None, *args[4:])
    torch.library.opcheck(torch.ops.dla.segment.default, no_transition)


@pytest.mark.parametrize("transition", ["none", "g", "beta", "both"])
def test_opcheck_readout(transition):
    case, t = opcheck_inputs(transition)
    starts = fixed_level_map(case, build(case))
    S0 = torch.randn(1, 2, 4, 3, 2)
    xs = [t[n].requires_grad_() if t[n] is not None else None for n in ("q", "k", "v", "lam", "g", "beta")]
    torch.library.opcheck(torch.ops.dla.readout.default, (*xs, starts, S0.requires_grad_(), 0.5, 4))
    torch.library.opcheck(torch.ops.dla.readout.default, (*xs, starts, S0, 0.5, 4, None, False))  # no final state
    o, S = torch.ops.dla.readout(*xs, starts, S0, 0.5, 4, None, False)
    assert S.shape == (0,) and torch.equal(o, torch.ops.dla.readout(*xs, starts, S0, 0.5, 4)[0])
    do, dS = torch.randn(1, 9, 2, 2), torch.randn(1, 2, 4, 3, 2)
    plain = [x.detach() if x is not None else None for x in xs]
    torch.library.opcheck(torch.ops.dla.readout_backward.default, (do, dS, *plain, starts, S0.detach(), 0.5, 4))
    # inputs as models hand them over (views of wider projections): gradients still contiguous
    wide = torch.randn(1, 9, 2, 8)
    strided = [wide[..., :3], wide[..., 3:6]] + plain[2:]
    assert not strided[0].is_contiguous()
    torch.library.opcheck(torch.ops.dla.readout_backward.default, (do, dS, *strided, starts, S0.detach(), 0.5, 4))
    # an unused final state (dS None), no gradient asked of S0: an empty dS0 in its place
    unasked = (do, None, *plain, starts, S0.detach(), 0.5, 4, None, False)
    torch.library.opcheck(torch.ops.dla.readout_backward.default, unasked)
    *grads, dS0 = torch.ops.dla.readout_backward(*unasked)
    *full, _ = torch.ops.dla.readout_backward(do, torch.zeros_like(dS), *plain, starts, S0.detach(), 0.5, 4)
    assert dS0.shape == (0,) and all(torch.equal(a, b) for a, b in zip(grads, full))


class _Calls(TorchDispatchMode):
    """The arguments of every call of `op` inside the block, by name."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            schema = func._schema.arguments
            bound = {a.name: a.default_value for a in schema if a.has_default_value()}
            self.calls.append({**bound, **dict(zip((a.name for a in schema), args)), **(kwargs or {})})
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("transition", ["none", "both"])
def test_the_backward_skips_gradients_no_one_asked_for(transition):
    """Autograd asks `dla::readout_backward` for `dS0` only where `S0` needs a gradient, and passes
    no `dS` for an unused final state (no `[B,H,K,Dk,Dv]` zeros made); the other gradients are the
    same either way."""
    case, t = opcheck_inputs(transition)
    starts = fixed_level_map(case, build(case))
    xs = [t[n].requires_grad_() if t[n] is not None else None for n in ("q", "k", "v", "lam", "g", "beta")]
    grads = {}
    for wanted in (False, True):
        S0 = torch.randn(1, 2, 4, 3, 2, requires_grad=wanted)
        with _Calls(torch.ops.dla.readout_backward.default) as spy:
            o, _ = torch.ops.dla.readout(*xs, starts, S0, 0.5, 4)
            inputs = [x for x in xs if x is not None] + ([S0] if wanted else [])
            grads[wanted] = torch.autograd.grad(o.square().sum(), inputs)
        (call,) = spy.calls
        assert call["dS"] is None and call["dS0_needed"] is wanted
    assert grads[True][-1].shape == (1, 2, 4, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))


def test_the_operator_asks_for_a_final_state_only_when_it_returns_one():
    """`multistate_attention` calls `dla::readout` with `final` = `output_final_state`: a training
    call has the kernels write no `[B,H,K,Dk,Dv]` final state; its output is the same."""
    case, t = opcheck_inputs("both")
    args = [t[n] for n in ("q", "k", "v", "lam")]
    outputs = {}
    for want in (False, True):
        with _Calls(torch.ops.dla.readout.default) as spy:
            got = multistate_attention(*args, g=t["g"], beta=t["beta"], chunk_size=4, output_final_state=want)
        (call,) = spy.calls
        assert call["final"] is want
        outputs[want] = got[0] if want else got
        if want:
            assert got[1].S.shape == (1, 2, case.levels, case.dk, case.dv)
    assert torch.equal(outputs[False], outputs[True])


# ---------------------------------------------------------------------------- compile


def compile_inputs(length=24, seed=0):
    case = Case(batch=2, length=length, heads=2, dk=4, dv=4, levels=4, policy="dla", transition="g", score="drift",
                tau=0.6, inputs="piecewise", mean_regime=4.0, seed=seed, chunk_size=8, log_decay=FORGETFUL)
    t = build(case, torch.float32)
    for n in ("q", "k", "v", "lam"):
        t[n].requires_grad_()
    return t


def loss_fn(q, k, v, lam, g):
    o = multistate_attention(q, k, v, lam, g=g, chunk_size=8)  # the default score: drift
    return o.square().mean()


def test_forward_and_loss_compile_in_one_frame_with_aot_backward():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    t = compile_inputs()
    loss = compiled(t["q"], t["k"], t["v"], t["lam"], t["g"])
    loss.backward()
    assert counter.frame_count == 1
    eager = loss_fn(*(x.detach().requires_grad_() for x in (t["q"], t["k"], t["v"], t["lam"])), t["g"])
    assert torch.allclose(loss, eager, rtol=1e-6)
    assert t["q"].grad is not None and torch.isfinite(t["q"].grad).all()
    t2 = compile_inputs(seed=1)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled(t2["q"], t2["k"], t2["v"], t2["lam"], t2["g"]).backward()
    assert counter.frame_count == 1


def test_inductor_compiles_forward_and_loss():
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    t = compile_inputs()
    loss = compiled(t["q"], t["k"], t["v"], t["lam"], t["g"])
    loss.backward()
    eager = loss_fn(t["q"].detach(), t["k"].detach(), t["v"].detach(), t["lam"].detach(), t["g"])
    assert torch.allclose(loss, eager, rtol=1e-5)


def test_a_new_length_recompiles_once_then_stays_dynamic():
    """A new T costs exactly one recompile, which marks T dynamic; later lengths reuse it."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, backend=counter, fullgraph=True)
    for length, frames in ((24, 1), (40, 2), (56, 2), (33, 2)):
        t = compile_inputs(length)
        compiled(t["q"], t["k"], t["v"], t["lam"], t["g"]).backward()
        assert counter.frame_count == frames, length


# ---------------------------------------------------------------------------- drift: decode, prefill


@st.composite
def drift_cases(draw, transition: str):
    """Decay-driven piecewise-stationary inputs under `drift` (slots open at regime changes);
    without `g`, where slots open early only, Gaussian inputs at a low threshold into a small
    capacity."""
    if transition in ("g", "both"):
        fields = dict(levels=draw(st.integers(2, 3)), inputs="piecewise", tau=draw(st.sampled_from([0.3, 0.6])),
                      mean_regime=draw(st.sampled_from([2.0, 4.0])))
    else:
        fields = dict(levels=draw(st.integers(2, 3)), inputs="gaussian", tau=0.3, mean_regime=4.0)
    return Case(
        batch=draw(st.integers(1, 2)), length=draw(st.integers(12, 20)), heads=draw(st.integers(1, 2)),
        dk=draw(st.integers(2, 4)), dv=draw(st.integers(2, 4)), policy="dla", transition=transition, score="drift",
        seed=draw(st.integers(0, 2**31 - 1)), chunk_size=draw(st.sampled_from([4, 64])), log_decay=FORGETFUL,
        **fields,
    )


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_drift_decode_and_split_prefill_equal_one_call(transition):
    """Under `drift`: a prefill of `x[:a]` followed by decode steps (`T = 1` with the cache) equals
    one parallel call — outputs, counts, slot states and the carried `N` — in float32 and
    float64, on well-conditioned draws (most of them, most with capacity merges)."""

    @claims_decisions(well_share=0.8)
    @settings(max_examples=4, database=None, derandomize=True, deadline=None)
    @given(drift_cases(transition), st.sampled_from([torch.float64, torch.float32]), st.data())
    def check(case, dtype, data):
        t64 = build(case)
        seg = naive_segmentation(case, t64)
        if not tally_draw(case.policy, seg, well_conditioned(seg, dtype)):
            return
        t = {n: (x.to(dtype) if x is not None else None) for n, x in t64.items()}
        kw = dict(output_final_state=True, **options(case))

        def call(lo, hi, state):
            p = {n: (x[:, lo:hi] if x is not None else None) for n, x in t.items()}
            return multistate_attention(p["q"], p["k"], p["v"], p["lam"], g=p["g"], beta=p["beta"],
                                        initial_state=state, **kw)

        o_one, s_one = call(0, case.length, None)
        a = data.draw(st.integers(1, case.length - 1))
        o, state = call(0, a, None)
        outs = [o]
        for i in range(a, case.length):
            o, state = call(i, i + 1, state)
            outs.append(o)
        assert relative_error(torch.cat(outs, 1), o_one) <= TOL[dtype]
        assert torch.equal(state.m, s_one.m) and torch.equal(state.n, s_one.n)
        for name in ("S", "N", "Z", "zz"):
            assert relative_error(getattr(state, name), getattr(s_one, name)) <= 10 * TOL[dtype], name

    check()
