"""The three float64 oracles agree with each other and with the SPEC's consequences (§2, §6)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from dla.ops.reference import (
    multistate_attention_materialized,
    multistate_attention_recurrent,
    recurrent_level_map,
)
from dla.ops.validation import POLICIES, SCORES
from tests.strategies import (
    FORGETFUL, TRANSITIONS, Case, build, cases, claims_decisions, fenwick_levels, information_close,
    naive_segmentation, options, random_cache, relative_error, tally_draw, well_conditioned,
)

EDGE = dict(batch=1, heads=1, dk=3, dv=2, transition="both", score="token", inputs="piecewise", mean_regime=4.0, seed=7)


def run_both(case: Case, t: dict, initial_state=None):
    kw = dict(g=t["g"], beta=t["beta"], output_final_state=True, initial_state=initial_state, **options(case))
    o_rec, s_rec = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], **kw)
    o_mat, s_mat = multistate_attention_materialized(t["q"], t["k"], t["v"], t["lam"], **kw)
    return (o_rec, s_rec), (o_mat, s_mat)


def assert_states_equal(a, b, tol=1e-10):
    """Equal caches; `I` sums per-token scores, each with √(rounding) near cos = 1 (I_TOL)."""
    assert torch.equal(a.m, b.m) and torch.equal(a.n, b.n) and torch.equal(a.step, b.step)
    assert information_close(a.I, b.I, b.n, torch.float64)
    for name in ("S", "Z", "zz", "N"):
        assert relative_error(getattr(a, name), getattr(b, name)) <= tol, name


@claims_decisions()
@given(cases())
@example(Case(length=1, levels=2, policy="dla", tau=0.6, chunk_size=4, **EDGE))  # T = 1
@example(Case(length=12, levels=12, policy="dla", tau=0.0, chunk_size=4, **EDGE))  # every token a boundary
@example(Case(length=12, levels=3, policy="dla", tau=10.0, chunk_size=4, **EDGE))  # all tokens merged
@example(Case(length=12, levels=2, policy="dla", tau=0.0, chunk_size=8, **EDGE))  # full cache from the first chunk
@example(Case(length=12, levels=3, policy="dla", tau=0.6, chunk_size=4, **{**EDGE, "score": "drift"}))
def test_recurrent_equals_materialized(case: Case):
    t = build(case)
    seg = naive_segmentation(case, t)
    assume(tally_draw(case.policy, seg, well_conditioned(seg)))
    (o_rec, s_rec), (o_mat, s_mat) = run_both(case, t)
    assert relative_error(o_rec, o_mat) <= 1e-10
    assert_states_equal(s_rec, s_mat)
    level, initial_level = recurrent_level_map(t["k"], t["v"], levels=case.levels, g=t["g"], beta=t["beta"],
                                               policy=case.policy, tau=case.tau, score=case.score)
    assert torch.equal(level, seg.level) and torch.equal(initial_level, seg.initial_level)


def base_model(t: dict, scale: float):
    """The single-state recurrence S_t = A_t S_{t−1} + w_t, o_t = S_tᵀ(scale·q_t)."""
    q, k, v, g, beta = t["q"], t["k"], t["v"], t["g"], t["beta"]
    B, T, H, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64)
    rows = []
    for i in range(T):
        kt, vt = k[:, i], v[:, i]
        if beta is not None:
            S = S - beta[:, i, :, None, None] * kt[..., :, None] * torch.einsum("bhd,bhde->bhe", kt, S)[..., None, :]
        if g is not None:
            S = torch.exp(g[:, i])[..., None, None] * S
        kbar = kt * beta[:, i, :, None] if beta is not None else kt
        S = S + kbar[..., :, None] * vt[..., None, :]
        rows.append(torch.einsum("bhde,bhd->bhe", S, scale * q[:, i]))
    return torch.stack(rows, dim=1)


@given(cases())
def test_unit_weights_reproduce_the_base_model(case: Case):
    t = build(case)
    t["lam"] = torch.ones_like(t["lam"])
    ref = base_model(t, case.dk**-0.5)
    kw = dict(g=t["g"], beta=t["beta"], **options(case))
    assert relative_error(multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], **kw), ref) <= 1e-10
    assert relative_error(multistate_attention_materialized(t["q"], t["k"], t["v"], t["lam"], **kw), ref) <= 1e-10


@given(st.integers(1, 10), st.integers(0, 3), st.integers(0, 2**31 - 1), st.sampled_from(SCORES))
def test_zero_threshold_gives_every_token_its_own_slot(length, spare, seed, score):
    case = Case(batch=2, length=length, heads=2, dk=3, dv=2, levels=max(2, length + spare), policy="dla",
                transition="none", score=score, tau=0.0, inputs="gaussian", mean_regime=4.0, seed=seed)
    t = build(case)
    _, state = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], output_final_state=True, **options(case))
    assert (state.m == length).all()
    assert (state.n[..., :length] == 1).all() and (state.n[..., length:] == 0).all()


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("zero", ["k", "v", "both"])
def test_zero_tokens_follow_the_eps_rule(score, zero):
    case = Case(batch=1, length=8, heads=2, dk=3, dv=2, levels=3, policy="dla", transition="g", score=score,
                tau=0.6, inputs="gaussian", mean_regime=4.0, seed=3)
    t = build(case)
    for name in ("k", "v") if zero == "both" else (zero,):
        t[name][:, ::2] = 0.0  # zero tokens, and zz = 0 when a block opens on one
    (o_rec, s_rec), (o_mat, s_mat) = run_both(case, t)
    for x in (o_rec, o_mat, s_rec.S, s_rec.I, s_rec.zz, s_mat.I):
        assert torch.isfinite(x).all()
    assert relative_error(o_rec, o_mat) <= 1e-10
    assert_states_equal(s_rec, s_mat)


@given(st.integers(0, 2**31 - 1), st.integers(2, 5), st.sampled_from(["token", "drift"]))
def test_cache_invariants_on_piecewise_stationary_inputs(seed, capacity, score):
    """At most K slots, chronological contiguous slots whose counts sum to t + 1, each step's
    partition a coarsening of the last one's plus the new token (merges only of neighbours)."""
    case = Case(batch=2, length=40, heads=2, dk=4, dv=3, levels=capacity, policy="dla",
                transition="none" if score == "token" else "g", score=score, tau=0.6, inputs="piecewise",
                mean_regime=4.0, seed=seed, log_decay=FORGETFUL)
    t = build(case)
    seg = naive_segmentation(case, t)
    level = seg.level
    T = case.length
    for row in range(T):
        lv = level[:, :, row, : row + 1]
        m = lv.amax(-1) + 1
        assert (m <= capacity).all()
        assert ((lv[..., 1:] <= lv[..., :-1]).all())  # older tokens never at a lower rank: chronological
        ranks = torch.arange(capacity)
        counts = (lv[..., None] == ranks).sum(-2)  # [B, H, K]
        assert (counts.sum(-1) == row + 1).all()
        assert ((counts > 0) == (ranks < m[..., None])).all()  # live ranks are exactly 0..m−1, none empty
        if row + 1 < T:  # a segment after the next step is a union of consecutive segments now
            nxt = level[:, :, row + 1, : row + 1]
            same_now = lv[..., :, None] == lv[..., None, :]
            assert (same_now <= (nxt[..., :, None] == nxt[..., None, :])).all()
    assert seg.boundaries.sum() > 0 and seg.absorbed.sum() > 0 and seg.capacity_merges.sum() > 0


@claims_decisions()
@given(cases(max_length=20), st.data())
def test_prefill_split_equals_one_call(case: Case, data):
    if case.policy == "fenwick":
        case = replace(case, levels=fenwick_levels(case.length))
    t = build(case)
    seg = naive_segmentation(case, t)
    assume(tally_draw(case.policy, seg, well_conditioned(seg)))
    a = data.draw(st.integers(0, case.length))
    kw = dict(g=None, beta=None, output_final_state=True, **options(case))
    o_one, s_one = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], **{**kw, "g": t["g"], "beta": t["beta"]})
    state, pieces = None, []
    for lo, hi in ((0, a), (a, case.length)):
        if hi == lo:
            continue
        part = {n: (x[:, lo:hi] if x is not None else None) for n, x in t.items()}
        for fn in (multistate_attention_recurrent, multistate_attention_materialized):
            o, s = fn(part["q"], part["k"], part["v"], part["lam"], **{**kw, "g": part["g"], "beta": part["beta"]},
                      initial_state=state)
            if fn is multistate_attention_recurrent:
                o_rec, s_rec = o, s
            else:
                assert relative_error(o, o_rec) <= 1e-10
                assert_states_equal(s, s_rec)
        pieces.append(o_rec)
        state = s_rec
    assert relative_error(torch.cat(pieces, dim=1), o_one) <= 1e-10
    assert_states_equal(state, s_one)


def test_fenwick_levels_use_the_absolute_position():
    case = Case(batch=1, length=6, heads=1, dk=2, dv=2, levels=4, policy="fenwick", transition="none",
                score="token", tau=0.6, inputs="gaussian", mean_regime=4.0, seed=1)
    t = build(case)
    _, state = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], output_final_state=True, **options(case))
    assert int(state.step) == 6
    more = build(replace(case, length=2, seed=2))
    multistate_attention_recurrent(more["q"], more["k"], more["v"], more["lam"], initial_state=state, **options(case))
    with pytest.raises(ValueError, match="bitlen\\(step \\+ T - 1\\)"):
        far = build(replace(case, length=3, seed=2))  # positions 6..8: bitlen(8) = 4 levels needed, 4 given
        multistate_attention_recurrent(far["q"], far["k"], far["v"], far["lam"], initial_state=state, **options(case))


@pytest.mark.parametrize("score", SCORES)
def test_initial_state_continues_in_the_materialized_form_too(score):
    case = Case(batch=2, length=9, heads=2, dk=3, dv=2, levels=4, policy="dla", transition="both", score=score,
                tau=0.6, inputs="piecewise", mean_regime=3.0, seed=11)
    state = random_cache(case, seed=5)
    assert (state.m > 0).all()
    t = build(case)
    (o_rec, s_rec), (o_mat, s_mat) = run_both(case, t, initial_state=state)
    assert relative_error(o_rec, o_mat) <= 1e-10
    assert_states_equal(s_rec, s_mat)


# --------------------------------------------------------------------------------------------
# drift: the score of the decayed backbone state S^g (SPEC §2)
# --------------------------------------------------------------------------------------------

LATE = 16  # the first tokens of a window open slots whatever the content; boundaries from here on


@st.composite
def drift_cases(draw, transition: str):
    """Decay-driven piecewise-stationary inputs under `drift`: the memory forgets within a few
    tokens (with `g`), so a regime change moves `S^g` and opens a slot well after the start.
    Without `g` the state grows and `drift` opens slots early only: Gaussian inputs, a low
    threshold and a small capacity, so that those early slots still fill it."""
    if transition in ("g", "both"):
        fields = dict(levels=draw(st.integers(2, 4)), inputs="piecewise",
                      tau=draw(st.sampled_from([0.3, 0.6, 0.6, 1.0])), mean_regime=draw(st.sampled_from([2.0, 4.0])))
    else:
        fields = dict(levels=draw(st.integers(2, 3)), inputs="gaussian", tau=0.3, mean_regime=4.0)
    return Case(
        batch=draw(st.integers(1, 2)), length=draw(st.integers(24, 40)), heads=draw(st.integers(1, 2)),
        dk=draw(st.integers(2, 5)), dv=draw(st.integers(1, 4)), policy="dla", transition=transition, score="drift",
        seed=draw(st.integers(0, 2**31 - 1)), log_decay=FORGETFUL, **fields,
    )


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_drift_references_agree(transition):
    """Under `drift`, for every transition: the recurrent reference (closed forms, `N` carried,
    an initial cache's `N` as given) equals the materialized form and `segment_naive` (explicit
    `S^g`, RMSNorm definition) — outputs, final caches, level maps — and a prefill split equals
    one call. With `g` most draws open slots at positions ≥ LATE; most draws are
    well-conditioned and reach capacity merges (`claims_decisions`)."""
    late = []

    @claims_decisions(well_share=0.9)
    @settings(max_examples=10, database=None, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(drift_cases(transition), st.booleans(), st.data())
    def check(case, with_state, data):
        t = build(case)
        state = random_cache(case, seed=case.seed % 1000) if with_state else None
        seg = naive_segmentation(case, t, state)
        late.append(bool((seg.info[..., LATE:] >= case.tau).any()))
        if not tally_draw(case.policy, seg, well_conditioned(seg)):
            return
        (o_rec, s_rec), (o_mat, s_mat) = run_both(case, t, initial_state=state)
        assert relative_error(o_rec, o_mat) <= 1e-10
        assert_states_equal(s_rec, s_mat)
        assert relative_error(s_rec.N, seg.N) <= 1e-10
        level, initial_level = recurrent_level_map(t["k"], t["v"], levels=case.levels, g=t["g"], beta=t["beta"],
                                                   tau=case.tau, initial_state=state)
        assert torch.equal(level, seg.level) and torch.equal(initial_level, seg.initial_level)

        a = data.draw(st.integers(1, case.length - 1))
        head = {n: (x[:, :a] if x is not None else None) for n, x in t.items()}
        tail = {n: (x[:, a:] if x is not None else None) for n, x in t.items()}
        (o_a, s_a), _ = run_both(case, head, initial_state=state)
        (o_b, s_b), (o_b_mat, s_b_mat) = run_both(case, tail, initial_state=s_a)
        assert relative_error(torch.cat([o_a, o_b], dim=1), o_rec) <= 1e-10
        assert_states_equal(s_b, s_rec)
        assert relative_error(o_b_mat, o_b) <= 1e-10
        assert_states_equal(s_b_mat, s_b)

    check()
    if transition in ("g", "both"):
        assert sum(late) >= 0.8 * len(late), f"{sum(late)} of {len(late)} draws open a slot at t >= {LATE}"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_initial_N_is_used_as_given_and_carried_by_its_rule(transition, policy):
    """With or without β, `N_t` is affine in `N_{t−1}` with slope `a_t²` (SPEC §2), so moving an
    initial cache's `N` by `d` moves the final one by `Π a_t² · d` under every policy: the cache's
    `N` is taken as given and carried, never recomputed from its slots."""
    levels = fenwick_levels(9, offset=5) if policy == "fenwick" else 4
    case = Case(batch=2, length=9, heads=2, dk=3, dv=2, levels=levels, policy=policy, transition=transition,
                score="drift", tau=0.6, inputs="piecewise", mean_regime=3.0, seed=4)
    state = random_cache(case, seed=8)
    t = build(case)
    kw = dict(g=t["g"], beta=t["beta"], output_final_state=True, **options(case))
    d = 10 * (state.N + 1)
    _, s0 = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], initial_state=state, **kw)
    moved = state._replace(N=state.N + d)
    _, s1 = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], initial_state=moved, **kw)
    slope = torch.exp(2 * t["g"].sum(1)) if t["g"] is not None else torch.ones_like(d)
    assert relative_error(s1.N - s0.N, slope * d) <= 1e-10
    _, s_mat = multistate_attention_materialized(t["q"], t["k"], t["v"], t["lam"], initial_state=state, **kw)
    assert relative_error(s0.N, s_mat.N) <= 1e-10  # carried N ≡ ‖Σ slots‖² of the explicit final slots
