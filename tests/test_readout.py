"""The CPU readout (`dla.ops.readout`: the persistent-object algorithm of `objects.py` without
β, the chunked form of `chunked.py` with β) against the materialized masked form (SPEC §2, §3):
forward output and final slot states, gradients by finite differences (float64) and by autograd
of the reference (float32), and no NaN from finite inputs. Calls carry a `step`, so chunks
aligned to absolute positions start with a partial chunk.

Both sides get the same level map: `segment_naive` decides, `encode_level_map` encodes, and
the materialized reference re-derives the identical map from the same `k, v` (so no decision
margin is involved)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dla.ops.levels import EMPTY, encode_level_map, level_of, running_min
from dla.ops.readout import readout_backward, readout_forward
from dla.ops.readout.chunked import level_of_by_search
from dla.ops.reference import multistate_attention_materialized, segment_naive
from dla.ops.state import MultiStateCache
from tests.strategies import (
    POLICIES, TRANSITIONS, Case, build, claims_decisions, map_decisions, random_cache,
    relative_error, tally_draw, token_map_fields,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # SPEC §6
# float32 gradients vs float64 autograd of the reference: each gradient passes through the UT
# solve and its adjoint, exp-decay products and, for dg, a reverse cumsum of differences of
# terms larger than their sum; over 300 draws of these shapes the worst observed relative error
# was 2.6e-6 (dg; the others ≤ 1e-6), so 1e-4 leaves ~40× headroom while any wrong or missing
# term still shows as an O(1e-2..1) error.
GRAD_TOL32 = 1e-4
NAMES = ("q", "k", "v", "lam", "g", "beta")
F64, F32 = torch.float64, torch.float32
BASE = dict(batch=1, heads=2, dk=3, dv=2, score="token", inputs="piecewise", mean_regime=3.0, seed=7)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These shapes are tiny: intra-op threads only add synchronisation, and on a busy 2-core
    runner they slow gradcheck's thousands of small forward calls by an order of magnitude."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def edge(length, levels, policy, transition, tau, chunk_size, initial, dtype, step=0):
    """An edge case for `@example`, drawn as `readout_cases` draws: (Case, initial state?, dtype,
    step of a call without a cache)."""
    case = Case(length=length, levels=levels, policy=policy, transition=transition, tau=tau, chunk_size=chunk_size,
                **BASE)
    return case, initial, dtype, step


def to_rank_order(S_oldest: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Oldest-first slots [B,H,K,Dk,Dv] with m live → rank order (rank r = slot m−1−r; zero
    beyond m)."""
    K = S_oldest.shape[2]
    r = torch.arange(K)
    idx = (m[..., None] - 1 - r).clamp(min=0)
    S = torch.gather(S_oldest, 2, idx[..., None, None].expand_as(S_oldest))
    return torch.where((r < m[..., None])[..., None, None], S, torch.zeros((), dtype=S.dtype))


def with_random_states(state: MultiStateCache, seed: int) -> MultiStateCache:
    """The same cache with Gaussian slot states in every live, non-empty slot (zero elsewhere:
    fenwick's empty levels hold no state)."""
    gen = torch.Generator().manual_seed(seed)
    S = torch.randn(state.S.shape, generator=gen, dtype=torch.float64).to(state.S.dtype)
    K = state.S.shape[2]
    keep = (torch.arange(K) < state.m[..., None]) & (state.n > 0)
    return state._replace(S=torch.where(keep[..., None, None], S, torch.zeros((), dtype=S.dtype)))


def setup(case: Case, dtype, initial: bool, state_seed: int = 3, step: int = 0):
    """Inputs in `dtype`, their float64 twins (exactly the rounded values), the initial cache
    (or None), the level map, S0 in rank order and the call's `step [B]` (the cache's, or
    `step` for a call without one; `fenwick` levels are absolute, so its map starts at 0)."""
    t = build(case, dtype)
    t64 = {n: (x.double() if x is not None else None) for n, x in t.items()}
    state = None
    if initial:
        state = with_random_states(random_cache(case, seed=state_seed), seed=state_seed + 1)
        state = state._replace(S=state.S.to(dtype).double())  # the readout sees S0 in dtype
    seg = segment_naive(t64["k"], t64["v"], levels=case.levels, policy=case.policy, tau=case.tau,
                        score=case.score, initial_state=state)
    m0 = state.m if state is not None else torch.zeros(case.batch, case.heads, dtype=torch.int64)
    level_start = encode_level_map(seg.level, seg.initial_level, m0)
    S0 = to_rank_order(state.S, state.m) if state is not None else \
        torch.zeros(case.batch, case.heads, case.levels, case.dk, case.dv, dtype=torch.float64)
    if state is not None:
        steps = state.step
    else:
        steps = torch.full((case.batch,), step if case.policy != "fenwick" else 0, dtype=torch.int64)
    return t, t64, state, seg, level_start, S0, steps


def materialized(case: Case, t64: dict, state, **kw):
    o, final = multistate_attention_materialized(
        t64["q"], t64["k"], t64["v"], t64["lam"], g=t64["g"], beta=t64["beta"], policy=case.policy, tau=case.tau,
        score=case.score, initial_state=state, output_final_state=True, **kw)
    return o, to_rank_order(final.S, final.m)


def run_forward(case: Case, t: dict, level_start, S0, dtype, step):
    return readout_forward(t["q"], t["k"], t["v"], t["lam"], t["g"], t["beta"], level_start, S0.to(dtype),
                           case.dk**-0.5, case.chunk_size, step)


@st.composite
def readout_cases(draw, policies=("dla", "dla") + POLICIES[1:], transitions=TRANSITIONS, max_length=20):
    """`(case, initial?, dtype, step)`: `dla` maps that reach capacity merges (`decisive`)."""
    policy = draw(st.sampled_from(policies))
    initial = draw(st.booleans())
    fields = draw(token_map_fields(policy, max_length, initial))
    case = Case(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=draw(st.integers(1, 5)),
        dv=draw(st.integers(1, 4)), policy=policy, transition=draw(st.sampled_from(transitions)), score="token",
        seed=draw(st.integers(0, 2**31 - 1)), chunk_size=draw(st.sampled_from([1, 3, 4, 8])), **fields,
    )
    return case, initial, draw(st.sampled_from([torch.float64, torch.float32])), draw(st.integers(0, 9))


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@given(st.integers(1, 8), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_binary_search_level_of_equals_the_definition(levels, positions, seed):
    """The readout's `level_of_by_search` (cummin + searchsorted) is `levels.level_of` on any starts,
    sorted or not, with EMPTY gaps and initial-slot positions."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(-4, 12, (3, 5, levels), generator=gen)
    starts = torch.where(torch.rand(starts.shape, generator=gen) < 0.3, EMPTY, starts).to(torch.int32)
    pos = torch.randint(-5, 13, (3, 5, positions), generator=gen)
    pos = torch.where(torch.rand(pos.shape, generator=gen) < 0.1, EMPTY, pos)
    assert torch.equal(level_of_by_search(starts.long(), pos), level_of(starts, pos))


@given(st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_running_min_equals_cummin(levels, seed):
    """The shifted-minima scan is `torch.cummin`'s values at every length (powers of two and
    not), with EMPTY entries and negative positions."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(-4, 50, (2, 3, levels), generator=gen)
    starts = torch.where(torch.rand(starts.shape, generator=gen) < 0.3, EMPTY, starts).to(torch.int32)
    assert torch.equal(running_min(starts), starts.cummin(-1).values)


@claims_decisions()
@given(readout_cases())
@example(edge(1, 2, "dla", "both", 0.6, 4, False, F64))  # T = 1
@example(edge(1, 3, "dla", "both", 0.6, 4, True, F32))  # T = 1 after a cache
@example(edge(11, 11, "dla", "both", 0.0, 4, False, F64))  # every token a boundary
@example(edge(11, 3, "dla", "g", 10.0, 3, True, F64))  # all tokens merged
@example(edge(12, 2, "dla", "beta", 0.0, 8, True, F64))  # full cache from the first chunk
@example(edge(13, 6, "fenwick", "both", 0.6, 4, True, F32))  # fenwick after a cache
@example(edge(9, 3, "single", "none", 0.6, 8, True, F64))  # single, T < C
@example(edge(19, 4, "dla", "g", 0.0, 8, False, F64, step=5))  # no β: every token a boundary, step % C ≠ 0
@example(edge(21, 3, "dla", "none", 0.6, 4, True, F32))  # no β: capacity merges after a cache, T % C ≠ 0
@example(edge(13, 6, "fenwick", "g", 0.6, 4, True, F64))  # no β: fenwick from step 5 (partial first chunk)
def test_forward_matches_materialized(drawn):
    case, initial, dtype, step = drawn
    t, t64, state, seg, level_start, S0, steps = setup(case, dtype, initial, step=step)
    tally_draw(case.policy, seg)
    if case.policy == "dla":  # what the Triton tests tally from a level map alone is the oracle's count
        decisions = map_decisions(level_start, None if state is None else state.m)
        assert torch.equal(decisions.capacity_merges, seg.capacity_merges)
        assert torch.equal(decisions.absorbed, seg.absorbed)
    o, S = run_forward(case, t, level_start, S0, dtype, steps)
    o_ref, S_ref = materialized(case, t64, state)
    assert o.dtype == dtype and S.dtype == dtype
    assert o.shape == t["v"].shape and S.shape == S0.shape
    assert relative_error(o, o_ref) <= TOL[dtype]
    assert relative_error(S, S_ref) <= TOL[dtype]


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_forward_with_capacity_merges_across_chunks(transition):
    """A piecewise-stationary stream long enough that boundaries, in-block merges and capacity
    merges all happen, several of them inside chunks and across chunk ends."""
    case = Case(batch=2, length=40, heads=2, dk=4, dv=3, levels=3, policy="dla", transition=transition, score="token",
                tau=0.6, inputs="piecewise", mean_regime=4.0, seed=11, chunk_size=8)
    t, t64, state, seg, level_start, S0, steps = setup(case, torch.float64, initial=True)
    assert seg.boundaries.sum() > 0 and seg.absorbed.sum() > 0 and seg.capacity_merges.sum() > 0
    o, S = run_forward(case, t, level_start, S0, torch.float64, steps)
    o_ref, S_ref = materialized(case, t64, state)
    assert relative_error(o, o_ref) <= 1e-10 and relative_error(S, S_ref) <= 1e-10


@pytest.mark.parametrize("transition", ["both", "g"])
def test_chunk_size_and_step_do_not_change_the_result(transition):
    """The chunk size, and without β the chunks' alignment to `step`, move rounding only."""
    case = Case(length=17, levels=4, policy="dla", transition=transition, tau=0.6, chunk_size=1, **BASE)
    t, _, _, _, level_start, S0, steps = setup(case, torch.float64, initial=True)
    o1, S1 = run_forward(case, t, level_start, S0, torch.float64, steps)
    for C in (2, 5, 16, 17, 64):
        for shift in (0, 1, 3):
            o, S = run_forward(replace(case, chunk_size=C), t, level_start, S0, torch.float64, steps + shift)
            assert relative_error(o, o1) <= 1e-12 and relative_error(S, S1) <= 1e-12


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


class Readout(torch.autograd.Function):
    """Test-only autograd wrapper: forward and explicit backward of the readout."""

    @staticmethod
    def forward(ctx, q, k, v, lam, g, beta, S0, level_start, scale, chunk_size, step):
        ctx.save_for_backward(q, k, v, lam, g, beta, S0, level_start, step)
        ctx.scale, ctx.chunk_size = scale, chunk_size
        return readout_forward(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size, step)

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, lam, g, beta, S0, level_start, step = ctx.saved_tensors
        dq, dk, dv, dlam, dg, dbeta, dS0 = readout_backward(do, dS, q, k, v, lam, g, beta, level_start, S0,
                                                            ctx.scale, ctx.chunk_size, step)
        return dq, dk, dv, dlam, dg if g is not None else None, dbeta if beta is not None else None, dS0, \
            None, None, None, None


def gradcheck_case(policy: str, transition: str, chunk_size: int) -> None:
    case = Case(length=7, levels=5, policy=policy, transition=transition, tau=0.6, chunk_size=chunk_size, **BASE)
    t, _, _, _, level_start, _, steps = setup(case, torch.float64, initial=True)
    gen = torch.Generator().manual_seed(1)
    S0 = torch.randn(case.batch, case.heads, case.levels, case.dk, case.dv, generator=gen, dtype=torch.float64)
    leaves = [t[n].clone().requires_grad_() if t[n] is not None else None for n in NAMES] + [S0.requires_grad_()]
    assert torch.autograd.gradcheck(lambda *a: Readout.apply(*a, level_start, 0.7, chunk_size, steps), leaves)


@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("policy", POLICIES)
def test_backward_gradcheck(policy, transition):
    gradcheck_case(policy, transition, chunk_size=3)  # T = 7: a partial last chunk


@pytest.mark.parametrize("chunk_size", [1, 8])
def test_backward_gradcheck_chunk_sizes(chunk_size):
    gradcheck_case("dla", "both", chunk_size)


@claims_decisions()
@given(readout_cases(max_length=12))
@example(edge(10, 3, "dla", "both", 0.0, 4, True, F32))
@example(edge(9, 5, "fenwick", "beta", 0.6, 3, True, F32))
@example(edge(11, 3, "dla", "g", 0.0, 4, False, F64, step=2))  # no β: every token a boundary, partial chunk
@example(edge(12, 2, "dla", "g", 0.6, 3, True, F64))  # no β: capacity merges after a cache
def test_backward_matches_reference_autograd(drawn):
    """Float32 (or float64) readout_backward vs float64 autograd through the materialized form,
    for a loss ⟨o, R_o⟩ + ⟨S, R_S⟩ that exercises both cotangents."""
    case, initial, dtype, step = drawn
    t, t64, state, seg, level_start, S0, steps = setup(case, dtype, initial, step=step)
    tally_draw(case.policy, seg)
    leaves = {n: x.clone().requires_grad_() for n, x in t64.items() if x is not None}
    S_leaf = state.S.clone().requires_grad_() if state is not None else None
    ref_state = state._replace(S=S_leaf) if state is not None else None
    o_ref, S_ref = materialized(case, {n: leaves.get(n) for n in NAMES}, ref_state)
    gen = torch.Generator().manual_seed(case.seed % 1000)
    do = torch.randn(o_ref.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
    sources = [leaves[n] for n in NAMES if n in leaves] + ([S_leaf] if S_leaf is not None else [])
    refs = torch.autograd.grad((o_ref * do).sum() + (S_ref * dS).sum(), sources, allow_unused=True)
    grads = readout_backward(do.to(dtype), dS.to(dtype), t["q"], t["k"], t["v"], t["lam"], t["g"], t["beta"],
                             level_start, S0.to(dtype), case.dk**-0.5, case.chunk_size, steps)
    tol = TOL[torch.float64] if dtype == torch.float64 else GRAD_TOL32
    ours = dict(zip((*NAMES, "S0"), grads))
    for name, ref in zip([n for n in NAMES if n in leaves], refs):
        assert ours[name].dtype == dtype and ours[name].shape == t[name].shape
        ref = torch.zeros_like(leaves[name]) if ref is None else ref
        assert relative_error(ours[name], ref) <= tol, name
    for name in NAMES[4:]:
        if name not in leaves:
            assert ours[name].dtype == torch.float32 and not ours[name].any()
    if S_leaf is not None:
        # reference slot i (oldest first) ↔ rank m0 − 1 − i; compare live, non-empty slots (an
        # empty fenwick level is a hole the level-map encoding cannot express: its zero state is
        # read at a neighbour's level, so only its gradient may differ)
        ref_rank = to_rank_order(refs[-1] if refs[-1] is not None else torch.zeros_like(S_leaf), state.m)
        keep = to_rank_order((state.n > 0).double()[..., None, None].expand_as(S_leaf), state.m) > 0
        assert relative_error(torch.where(keep, grads[-1].double(), 0.0), torch.where(keep, ref_rank, 0.0)) <= tol
    else:
        # no initial state: the reference reads no initial slot (nothing in the level map sits at a
        # pseudo-position), so autograd through it gives S0 no gradient at all — exactly zero here
        assert torch.equal(grads[-1], torch.zeros_like(grads[-1]))


@pytest.mark.parametrize("transition", ["both", "g"])
def test_backward_accepts_missing_cotangents(transition):
    case = Case(length=6, levels=4, policy="dla", transition=transition, tau=0.6, chunk_size=4, **BASE)
    t, _, _, _, level_start, S0, steps = setup(case, torch.float64, initial=True)
    args = (t["q"], t["k"], t["v"], t["lam"], t["g"], t["beta"], level_start, S0, 0.5, 4, steps)
    o, S = readout_forward(*args)
    gen = torch.Generator().manual_seed(2)
    do, dS = torch.randn(o.shape, generator=gen, dtype=o.dtype), torch.randn(S.shape, generator=gen, dtype=S.dtype)
    both = readout_backward(do, dS, *args)
    only_o = readout_backward(do, None, *args)
    only_S = readout_backward(None, dS, *args)
    for a, b, c in zip(both, only_o, only_S):
        assert torch.allclose(a, b + c, rtol=1e-12, atol=1e-12)
    zeros = readout_backward(torch.zeros_like(o), torch.zeros_like(S), *args)
    assert all(torch.equal(a, b) for a, b in zip(zeros, readout_backward(None, None, *args)))


# --------------------------------------------------------------------------------------------
# Poison: finite inputs never give NaN; outputs are fresh tensors
# --------------------------------------------------------------------------------------------


@given(readout_cases(max_length=24), st.sampled_from([0.0, 1.0, 30.0, 1000.0]), st.booleans())
@example(edge(16, 3, "dla", "both", 0.6, 8, True, F32), 1000.0, True)
def test_finite_inputs_give_finite_outputs(drawn, decay, zero_tokens):
    """Strong decays (γ underflows to 0 inside a chunk), zero keys/values, β near 1."""
    case, initial, dtype, step = drawn
    t, _, _, _, level_start, S0, steps = setup(case, dtype, initial, step=step)
    if t["g"] is not None:
        t["g"] = t["g"] * decay
    if t["beta"] is not None:
        t["beta"] = torch.where(t["beta"] > 0.5, torch.ones((), dtype=dtype) - 1e-7, t["beta"])
    if zero_tokens:
        t["k"][:, ::3] = 0.0
        t["v"][:, 1::3] = 0.0
    o, S = run_forward(case, t, level_start, S0, dtype, steps)
    grads = readout_backward(torch.ones_like(o), torch.ones_like(S), t["q"], t["k"], t["v"], t["lam"], t["g"],
                             t["beta"], level_start, S0.to(dtype), case.dk**-0.5, case.chunk_size, steps)
    for x in (o, S, *grads):
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("transition", ["both", "g"])
def test_outputs_are_fresh_tensors(transition):
    for length in (1, 5):
        case = Case(length=length, levels=3, policy="dla", transition=transition, tau=0.6, chunk_size=8, **BASE)
        t, _, _, _, level_start, S0, steps = setup(case, torch.float64, initial=True)
        args = (t["q"], t["k"], t["v"], t["lam"], t["g"], t["beta"], level_start, S0, 0.5, 8, steps)
        outs = readout_forward(*args)
        outs += readout_backward(torch.ones_like(outs[0]), torch.ones_like(outs[1]), *args)
        inputs = [x for x in args if isinstance(x, torch.Tensor)]
        storages = [x.untyped_storage().data_ptr() for x in inputs]
        for i, out in enumerate(outs):
            assert out.untyped_storage().data_ptr() not in storages
            assert all(out.untyped_storage().data_ptr() != other.untyped_storage().data_ptr()
                       for other in outs[i + 1:])
