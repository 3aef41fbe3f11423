"""The CPU kernel of `dla::segment` (`dla.ops.segment.cpu.segment_cpu`) against `segment_naive`,
under every score and, for `drift`, every transition.

Decisions are thresholds, so the level map and the counts are compared exactly on
well-conditioned inputs only (SPEC §2: every `|I_t − τ| ≥ δ`, every chosen merge density below
the runner-up by `δ·runner-up`), and the draws are checked to be mostly well-conditioned so
the filter does not hollow the tests out (SPEC §6).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import NamedTuple

import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from dla.ops.levels import EMPTY, dense_level_map, encode_level_map
from dla.ops.reference import multistate_attention_recurrent, segment_naive
import dla.ops.segment.cpu as segment_module
from dla.ops.segment.cpu import segment_cpu as segment
from dla.ops.state import MultiStateCache, empty_cache, state_dtype
from dla.ops.validation import SCORES
from dla.run.synthetic import piecewise_stationary
from tests.strategies import (
    DELTA, EXACT, EXACT_BETA, FORGETFUL, GENTLE, I_TOL, TRANSITIONS, claims_decisions, decisive, designed_stream,
    fenwick_levels, relative_error, tally_draw, with_examples,
)

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Relative tolerances of Z and zz against the float64 oracle.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass(frozen=True)
class SegCase:
    batch: int
    length: int
    heads: int
    dk: int
    dv: int
    levels: int
    policy: str
    score: str
    tau: float
    inputs: str  # "gaussian" | "piecewise" | one of EXACT
    mean_regime: float
    seed: int
    chunk_size: int
    dtype: str  # "float32" | "float64"
    warm: int = 0  # tokens consumed before the call (0: empty cache)
    transition: str = "none"  # none | g | beta | both: what the backbone S^g of `drift` sees
    log_decay: tuple = GENTLE

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@st.composite
def seg_cases(draw, policies=("dla", "dla", "fenwick", "single"), min_length=1, max_length=32, warm=(0, 0, 3, 7)):
    """A `SegCase`; `dla` draws are `tests.strategies.decisive` (most reach capacity merges)."""
    policy = draw(st.sampled_from(policies))
    dtype = draw(st.sampled_from(["float32", "float64"]))
    score = draw(st.sampled_from(SCORES))
    # With dk or dv = 1 every block content Z is rank 1, and a token can nearly cancel it
    # (Z + k vᵀ ≈ 0): the state score's ‖Z + k vᵀ‖² = zz + 2c + ss then cancels, beyond the
    # I tolerance of either dtype (decisions stay well-conditioned; in float64 it takes long
    # Gaussian streams at a low τ, as the decisive draws are). Under `drift` a scalar S^g
    # (dk = dv = 1) makes every cosine ±1, where I = √(2 − 2cos) turns the rounding of cos
    # into its square root, beyond either tolerance.
    low = 2 if score in ("drift", "state") else 1
    dk = draw(st.integers(low, 5))
    dv = draw(st.integers(low, 4))
    w = draw(st.sampled_from(warm))
    transition = draw(st.sampled_from(TRANSITIONS))
    if policy == "dla":
        fields = draw(decisive(score, max_length, min_length, decay=transition in ("g", "both")))
    else:
        length = draw(st.integers(min_length, max_length))
        levels = draw(st.integers(2, 6))
        fields = dict(length=length, levels=max(levels, fenwick_levels(length, w)) if policy == "fenwick" else levels,
                      tau=0.6, inputs=draw(st.sampled_from(["gaussian", "piecewise"])), mean_regime=4.0,
                      log_decay=draw(st.sampled_from([GENTLE, FORGETFUL])))
    return SegCase(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=dk, dv=dv, policy=policy, score=score,
        seed=draw(st.integers(0, 2**31 - 1)), chunk_size=draw(st.sampled_from([1, 3, 4, 8, 64])), dtype=dtype,
        warm=w, transition=transition, **fields,
    )


class Inputs(NamedTuple):
    k: torch.Tensor
    v: torch.Tensor
    g: torch.Tensor | None
    beta: torch.Tensor | None


def stream(case: SegCase, length: int) -> Inputs:
    """`k, v` (Gaussian, piecewise-stationary or designed) and, by transition, `g ≤ 0` and
    `β ∈ (0, 1)` with l2-normalised keys, in the case's dtype."""
    gen = torch.Generator().manual_seed(case.seed)
    B, H = case.batch, case.heads
    if case.inputs in EXACT:
        k, v = designed_stream(case.inputs, B, length, H, case.dk, case.dv, case.transition in ("beta", "both"))
    elif case.inputs == "gaussian":
        k = torch.randn(B, length, H, case.dk, generator=gen, dtype=torch.float64)
        v = torch.randn(B, length, H, case.dv, generator=gen, dtype=torch.float64)
    else:
        k, v, _ = piecewise_stationary(B, length, H, case.dk, case.dv, mean_regime=case.mean_regime, noise=0.1,
                                       generator=gen, dtype=torch.float64)
    lo, hi = case.log_decay
    g = hi - (hi - lo) * torch.rand(B, length, H, generator=gen, dtype=torch.float64)
    beta = 0.05 + 0.9 * torch.rand(B, length, H, generator=gen, dtype=torch.float64)
    if case.inputs in EXACT:  # the designed inputs' transitions (tests.strategies.build)
        g, beta = torch.zeros_like(g), torch.full_like(beta, EXACT_BETA)
    if case.transition in ("beta", "both"):
        k = torch.nn.functional.normalize(k, dim=-1)
    dt = case.torch_dtype
    return Inputs(k.to(dt), v.to(dt), g.to(dt) if case.transition in ("g", "both") else None,
                  beta.to(dt) if case.transition in ("beta", "both") else None)


def piece(x: Inputs, lo: int, hi: int | None = None) -> Inputs:
    return Inputs(*(None if t is None else t[:, lo:hi] for t in x))


def cache_after(case: SegCase, x: Inputs, state: MultiStateCache | None = None) -> MultiStateCache:
    """The whole cache that `x` leaves (the recurrent reference, float64), in the case's state
    dtype: `drift` reads its slot states and `N`."""
    sdt = state_dtype(case.torch_dtype)
    B, T, H, _ = x.k.shape
    f64 = [None if t is None else t.double() for t in x]
    q, lam = torch.zeros_like(f64[0]), torch.ones(B, T, H, case.levels, dtype=torch.float64)
    if state is not None:
        state = state._replace(**{f: getattr(state, f).double() for f in ("S", "I", "Z", "zz", "N")})
    _, cache = multistate_attention_recurrent(q, f64[0], f64[1], lam, g=f64[2], beta=f64[3], policy=case.policy,
                                              tau=case.tau, score=case.score, initial_state=state,
                                              output_final_state=True)
    return cache._replace(**{f: getattr(cache, f).to(sdt) for f in ("S", "I", "Z", "zz", "N")})


def make_inputs(case: SegCase) -> tuple[Inputs, MultiStateCache]:
    """The call's inputs and the cache that `case.warm` tokens of the same stream left."""
    x = stream(case, case.warm + case.length)
    if case.warm == 0:
        state = empty_cache(case.batch, case.heads, case.levels, case.dk, case.dv, dtype=case.torch_dtype,
                            device="cpu")
    else:
        state = cache_after(case, piece(x, 0, case.warm))
    return piece(x, case.warm), state


def naive(case: SegCase, x: Inputs, state):
    return segment_naive(x.k, x.v, levels=case.levels, g=x.g, beta=x.beta, policy=case.policy, tau=case.tau,
                         score=case.score, initial_state=state)


def fast(case: SegCase, x: Inputs, state, chunk_size=None):
    return segment(x.k, x.v, x.g, x.beta, state.S, state.n, state.I, state.m, state.Z, state.zz, state.N, state.step,
                   case.levels, case.policy, case.score, case.tau, chunk_size or case.chunk_size)


def well_conditioned(seg, case: SegCase) -> bool:
    """SPEC §2's margins, as `tests.strategies.well_conditioned`, except that at τ = 0 every
    scored token is a boundary on every path (I_t = √max(0, ·) ≥ 0 = τ), so |I_t − τ| is no
    margin there: a token with I_t ≈ 0 is not a decision that may flip. A designed input
    (`EXACT`) needs no margin: every path computes its edges exactly (`tests.strategies.comparable`)."""
    if case.inputs in EXACT:
        return True
    delta = DELTA[case.torch_dtype]
    boundaries = case.tau == 0 or bool((seg.boundary_margin >= delta).all())
    return boundaries and bool((seg.merge_margin >= delta).all())


def close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return relative_error(a, b) <= tol


def assert_final_state(out, ref_n, ref_I, ref_m, ref_Z, ref_zz, ref_N, dtype):
    """`ref_N`: the oracle's final `N` under `drift` with `dla`, `N0` otherwise (returned unchanged)."""
    _, n, I, m, Z, zz, N = out
    assert torch.equal(m, ref_m) and torch.equal(n, ref_n)
    rtol, atol = I_TOL[dtype]
    err = (I.double() - ref_I.double()).abs()
    assert (err <= rtol * ref_I.double().abs() + atol * ref_n).all(), ("I", I, ref_I)
    for name, got, want in (("Z", Z, ref_Z), ("zz", zz, ref_zz), ("N", N, ref_N)):
        assert close(got, want, TOL[dtype]), (name, relative_error(got, want))


def expected_N(case: SegCase, ref, state):
    return ref.N if (case.policy, case.score) == ("dla", "drift") else state.N


EDGE = dict(batch=1, heads=2, dk=3, dv=2, score="token", inputs="piecewise", mean_regime=4.0, seed=7, policy="dla")
EDGE_CASES = {
    "T = 1": SegCase(length=1, levels=2, tau=0.6, chunk_size=4, dtype="float64", **EDGE),
    "T = 1 after a cache": SegCase(length=1, levels=3, tau=0.6, chunk_size=4, dtype="float32", warm=7, **EDGE),
    "every token a boundary": SegCase(length=12, levels=12, tau=0.0, chunk_size=4, dtype="float64", **EDGE),
    "every token a boundary, float32": SegCase(length=10, levels=11, tau=0.0, chunk_size=3, dtype="float32", **EDGE),
    "all tokens merged": SegCase(length=13, levels=3, tau=10.0, chunk_size=4, dtype="float32", **EDGE),
    "all tokens merged, state score": SegCase(**{**EDGE, "score": "state"}, length=13, levels=3, tau=10.0,
                                              chunk_size=8, dtype="float64"),
    "full cache from the first chunk": SegCase(length=12, levels=2, tau=0.0, chunk_size=8, dtype="float64", **EDGE),
    "full cache from the first chunk, float32": SegCase(**{**EDGE, "inputs": "gaussian"}, length=19, levels=3,
                                                        tau=0.6, chunk_size=8, dtype="float32"),
    "T = 1 after a cache, drift": SegCase(**{**EDGE, "score": "drift"}, length=1, levels=3, tau=0.3, chunk_size=4,
                                          dtype="float32", warm=7, transition="both", log_decay=FORGETFUL),
    "every token a boundary, drift": SegCase(**{**EDGE, "score": "drift"}, length=12, levels=12, tau=0.0,
                                             chunk_size=4, dtype="float64", transition="g"),
    "all tokens merged, drift": SegCase(**{**EDGE, "score": "drift"}, length=13, levels=3, tau=10.0, chunk_size=4,
                                        dtype="float32", transition="beta"),
    "full cache from the first chunk, drift": SegCase(**{**EDGE, "score": "drift", "inputs": "gaussian"}, length=19,
                                                      levels=3, tau=0.6, chunk_size=8, dtype="float32",
                                                      transition="both", log_decay=FORGETFUL),
}
# Decisions exactly on the rule's edges (tests.strategies.designed_stream): "repeated" at τ = 0,
# every I_t = 0 = τ and every capacity merge a tie of zero densities; "alternating" at τ = 2,
# I_t = 2 = τ (under `state` at the stream's second token only).
EXACT_CASES = {
    "I = τ = 0 and zero-density ties": SegCase(**{**EDGE, "inputs": "repeated"}, length=12, levels=3, tau=0.0,
                                              chunk_size=4, dtype="float32"),
    "I = τ = 0 and ties, state score, after a cache": SegCase(**{**EDGE, "inputs": "repeated", "score": "state"},
                                                              length=9, levels=4, tau=0.0, chunk_size=3,
                                                              dtype="float64", warm=3),
    "I = τ = 0 and ties, drift": SegCase(**{**EDGE, "inputs": "repeated", "score": "drift"}, length=10, levels=3,
                                        tau=0.0, chunk_size=4, dtype="float32", warm=3, transition="both"),
    "I = τ = 2": SegCase(**{**EDGE, "inputs": "alternating"}, length=11, levels=4, tau=2.0, chunk_size=4,
                        dtype="float64"),
    "I = τ = 2, state score": SegCase(**{**EDGE, "inputs": "alternating", "score": "state"}, length=6, levels=3,
                                     tau=2.0, chunk_size=8, dtype="float32"),
    "I = τ = 2, drift, after a cache": SegCase(**{**EDGE, "inputs": "alternating", "score": "drift"}, length=9,
                                              levels=3, tau=2.0, chunk_size=1, dtype="float64", warm=3,
                                              transition="g"),
}


@claims_decisions()
@given(seg_cases())
@with_examples(EDGE_CASES.values())
@with_examples(EXACT_CASES.values())
@example(SegCase(length=9, levels=5, tau=0.6, chunk_size=4, dtype="float64", warm=7,
                 **{**EDGE, "policy": "fenwick"}))  # fenwick continuing from step 7
@example(SegCase(length=5, levels=4, tau=0.6, chunk_size=3, dtype="float32", warm=3,
                 **{**EDGE, "policy": "single"}))
def test_segment_equals_segment_naive(case: SegCase):
    x, state = make_inputs(case)
    ref = naive(case, x, state)
    assume(tally_draw(case.policy, ref, well_conditioned(ref, case)))
    inputs = [t for t in (*x, *state) if t is not None]
    out = fast(case, x, state)
    level_start = out[0]
    B, T, H, K = case.batch, case.length, case.heads, case.levels
    sdt = state_dtype(case.torch_dtype)
    assert level_start.shape == (B, T, H, K) and level_start.dtype == torch.int32
    for t, dtype, shape in zip(out[1:], (torch.int64, sdt, torch.int64, sdt, sdt, sdt),
                               ((B, H, K), (B, H, K), (B, H), (B, H, case.dk, case.dv), (B, H), (B, H))):
        assert t.dtype == dtype and t.shape == shape
    for t in out:  # fresh tensors, never views of an input
        assert all(t.untyped_storage().data_ptr() != y.untyped_storage().data_ptr() for y in inputs)

    level, initial = dense_level_map(level_start, state.m)
    assert torch.equal(level, ref.level)
    # an empty Fenwick bucket of the initial cache holds no token: the map cannot place it
    carried = (state.n > 0)[:, :, None, :]
    assert torch.equal(torch.where(carried, initial, -1), ref.initial_level)
    assert torch.equal(level_start, encode_level_map(ref.level, ref.initial_level, state.m))
    assert_final_state(out, ref.n, ref.I, ref.m, ref.Z, ref.zz, expected_N(case, ref, state), case.torch_dtype)


def test_edge_examples_are_well_conditioned_and_what_they_claim():
    """The `@example`s above must not be dropped by the margin filter, and the designed ones must
    put decisions exactly on the edges."""
    for name, case in EDGE_CASES.items():
        x, state = make_inputs(case)
        ref = naive(case, x, state)
        assert well_conditioned(ref, case), name
        if name.startswith("every token"):
            assert (ref.m == case.length).all() and (ref.n[..., : case.length] == 1).all(), name
        if name.startswith("all tokens merged"):
            assert (ref.m == 1).all() and (ref.boundaries == 0).all(), name
        if name.startswith("full cache"):  # a capacity merge inside the first chunk
            first = naive(case, piece(x, 0, case.chunk_size), state)
            assert first.capacity_merges.sum() > 0, name
    for name, case in EXACT_CASES.items():
        x, state = make_inputs(case)
        ref = naive(case, x, state)
        if case.inputs == "repeated":  # every token opens, and the merges tie
            assert int(ref.boundaries.sum()) == case.batch * case.heads * (case.length - (case.warm == 0)), name
            assert int(ref.capacity_merges.sum()) > 0 and (ref.I == 0).all(), name
        else:
            assert bool((ref.info == case.tau).any()), name


@claims_decisions()
@given(seg_cases(min_length=2, warm=(0,)), st.integers(0, 2**16), st.sampled_from([0, 5, 13]))
@example(SegCase(length=12, levels=3, tau=0.6, chunk_size=4, dtype="float64", **EDGE), 5, 0)
@example(SegCase(length=12, levels=3, tau=0.0, chunk_size=4, dtype="float32", **EDGE), 4, 0)  # full cache at the cut
@example(SegCase(length=11, levels=5, tau=0.6, chunk_size=3, dtype="float64", **{**EDGE, "policy": "fenwick"}), 6, 13)
def test_split_equals_one_call(case: SegCase, cut: int, step0: int):
    """`x[:a]` then `x[a:]` from the first call's final state equals one call on `x`: the final
    state, and the level map with the second call's initial slots mapped back to the segments
    they summarise (slot i ↔ the first member of rank m_a − 1 − i in the first call's last row)."""
    a = 1 + cut % (case.length - 1)
    step0 = step0 if case.policy == "fenwick" else 0  # fenwick reads absolute positions step0 + t
    if case.policy == "fenwick":
        case = replace(case, levels=max(case.levels, fenwick_levels(case.length, step0)))
    x = stream(case, case.length)
    B, H, K, T = case.batch, case.heads, case.levels, case.length
    state0 = empty_cache(B, H, K, case.dk, case.dv, dtype=case.torch_dtype, device="cpu")._replace(
        step=torch.full((B,), step0, dtype=torch.int64))
    ref = naive(case, x, state0)
    assume(tally_draw(case.policy, ref, well_conditioned(ref, case)))

    one = fast(case, x, state0)
    first = fast(case, piece(x, 0, a), state0)
    _, n_a, I_a, m_a, Z_a, zz_a, N_a = first
    # `drift` reads the slot states, which the readout keeps (here: the reference's)
    S_a = cache_after(case, piece(x, 0, a), state0).S
    state_a = MultiStateCache(S=S_a, n=n_a, I=I_a, m=m_a, Z=Z_a, zz=zz_a, step=state0.step + a, N=N_a)
    second = fast(case, piece(x, a), state_a)
    assert_final_state(second, *one[1:], case.torch_dtype)

    no_slots = torch.zeros(B, H, dtype=torch.int64)
    level_one, _ = dense_level_map(one[0], no_slots)
    level_first, _ = dense_level_map(first[0], no_slots)
    assert torch.equal(level_first, level_one[:, :, :a, :a])
    level_second, initial_second = dense_level_map(second[0], m_a)
    assert torch.equal(level_second, level_one[:, :, a:, a:])
    slot = torch.arange(K)
    rank = (m_a[..., None] - 1 - slot).clamp(min=0)  # [B, H, K] rank of oldest-first slot i
    starts = first[0][:, -1].long()  # [B, H, L] by rank
    member = torch.gather(starts, -1, rank)  # first member of slot i, a position of the first call
    carried = (slot < m_a[..., None]) & (n_a > 0)
    assert (member[carried] >= 0).all() and (member[carried] < a).all()
    index = member.clamp(0, a - 1)[:, :, None, :].expand(B, H, T - a, K)
    expected = torch.where(carried[:, :, None, :], torch.gather(level_one[:, :, a:], -1, index), -1)
    assert torch.equal(torch.where(carried[:, :, None, :], initial_second, -1), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("zero", ["k", "v", "both"])
def test_zero_tokens_follow_the_eps_rule(zero, score, dtype):
    case = SegCase(batch=1, length=11, heads=2, dk=3, dv=2, levels=3, policy="dla", score=score, tau=0.6,
                   inputs="gaussian", mean_regime=4.0, seed=3, chunk_size=4, dtype=str(dtype).split(".")[-1],
                   transition="g")
    x, state = make_inputs(case)
    k, v = x.k.clone(), x.v.clone()
    for t in (k, v) if zero == "both" else ((k,) if zero == "k" else (v,)):
        t[:, ::2] = 0.0  # zero tokens: zz = 0 when a block opens on one, and S^g = 0 at the start
    x = x._replace(k=k, v=v)
    ref = naive(case, x, state)
    assert well_conditioned(ref, case)
    out = fast(case, x, state)
    for t in out[1:]:
        assert not t.is_floating_point() or torch.isfinite(t).all()
    assert torch.equal(out[0], encode_level_map(ref.level, ref.initial_level, state.m))
    assert_final_state(out, ref.n, ref.I, ref.m, ref.Z, ref.zz, expected_N(case, ref, state), dtype)


@pytest.mark.parametrize("score", ["token", "drift"])
@pytest.mark.parametrize("threads", [1, 2])
def test_chunking_and_grouping_do_not_change_the_result(monkeypatch, threads, score):
    """Chunk sizes, and chunk groups (the Gram precomputed for several chunks at once), only
    regroup sums; the caller's intra-op thread count survives the call."""
    case = SegCase(batch=2, length=50, heads=2, dk=4, dv=3, levels=4, policy="dla", score=score, tau=0.6,
                   inputs="piecewise", mean_regime=6.0, seed=5, chunk_size=1, dtype="float64", transition="both",
                   log_decay=FORGETFUL)
    x, state = make_inputs(case)
    assert well_conditioned(naive(case, x, state), case)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = [fast(case, x, state, chunk_size=c) for c in (1, 7, 16, 64)]
        monkeypatch.setattr(segment_module, "_GROUP_ELEMENTS", 1)  # one chunk per group
        outs += [fast(case, x, state, chunk_size=c) for c in (7, 16)]
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(previous)
    for out in outs[1:]:
        assert torch.equal(out[0], outs[0][0]) and torch.equal(out[1], outs[0][1])
        for x, y in zip(out[2:], outs[0][2:]):
            assert close(x, y, 1e-12)


def test_state_score_keeps_float32_accuracy_in_long_blocks():
    """In a long block the state score's 1 − cos is ~ss/zz: the literal (zz + c)/√(zz·(zz+2c+ss))
    loses it to float32 rounding (I off by ~1% here), the cancellation-free form keeps it. The
    float64 kernel, tied to the oracle above, is the reference."""
    case = SegCase(batch=1, length=300, heads=2, dk=4, dv=4, levels=4, policy="dla", score="state", tau=0.6,
                   inputs="piecewise", mean_regime=3000.0, seed=2, chunk_size=64, dtype="float64")
    x, state = make_inputs(case)
    ref = fast(case, x, state)
    single = replace(case, dtype="float32")
    x32, state32 = make_inputs(single)
    out = fast(single, x32, state32)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    assert ((out[2].double() - ref[2]).abs() <= 1e-4 * ref[2].abs()).all(), (out[2], ref[2])


def test_single_and_fenwick_closed_forms_at_a_glance():
    """Spot values of the encoding: positions, pseudo-positions of initial slots, EMPTY gaps."""
    case = SegCase(batch=1, length=6, heads=1, dk=2, dv=2, levels=5, policy="fenwick", score="token", tau=0.6,
                   inputs="gaussian", mean_regime=4.0, seed=1, chunk_size=4, dtype="float64", warm=5)
    x, state = make_inputs(case)
    # after positions 0..4: level 3 = {0..3}, level 0 = {4}; slot i holds level K − 1 − i
    assert state.n[0, 0].tolist() == [0, 4, 0, 0, 1] and state.m.tolist() == [[5]]
    level_start, n, _, m, _, _, _ = fast(case, x, state)
    rows = level_start[0, :, 0].tolist()
    # p = 5 (101): {5}, {4} (initial level-0 slot at −1), –, {0..3} (initial level-3 slot at −4), –
    assert rows[0] == [0, -1, EMPTY, -4, EMPTY]
    # p = 10 (1010): {10}, –, {8, 9}, –, {0..7} (from the initial level-3 slot)
    assert rows[5] == [5, EMPTY, 3, EMPTY, -4]
    assert n[0, 0].tolist() == [8, 0, 2, 0, 1] and m.tolist() == [[5]]

    single = replace(case, policy="single", warm=3)
    x, state = make_inputs(single)
    level_start, n, _, m, _, _, _ = fast(single, x, state)
    assert (level_start[..., 0] == -1).all() and (level_start[..., 1:] == EMPTY).all()
    assert n[0, 0].tolist() == [3 + 6, 0, 0, 0, 0] and m.tolist() == [[1]]


def test_fenwick_needs_enough_levels_for_the_absolute_position():
    case = SegCase(batch=1, length=3, heads=1, dk=2, dv=2, levels=4, policy="fenwick", score="token", tau=0.6,
                   inputs="gaussian", mean_regime=4.0, seed=1, chunk_size=4, dtype="float64")
    x, state = make_inputs(case)
    fast(case, x, state._replace(step=torch.tensor([5])))  # positions 5..7: bitlen 3 < 4
    with pytest.raises(ValueError, match="bitlen"):
        fast(case, x, state._replace(step=torch.tensor([6])))  # position 8: bitlen 4


class _CountOps(TorchDispatchMode):
    """Counts the aten ops a call dispatches, and those whose output holds ≥ `large` elements."""

    def __init__(self, large: int):
        super().__init__()
        self.large, self.ops, self.big = large, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        self.big += any(isinstance(x, torch.Tensor) and x.numel() >= self.large for x in pytree.tree_leaves(out))
        return out


@pytest.mark.parametrize("inputs,score,per_token", [("gaussian", "token", 80), ("piecewise", "token", 25),
                                                    ("piecewise", "state", 45), ("gaussian", "drift", 70),
                                                    ("piecewise", "drift", 10)])
def test_token_loop_stays_a_few_small_ops(inputs, score, per_token):
    """The sequential part costs a few small ops per token (machine-independent, unlike a
    timing): Gaussian inputs make every token an event with a capacity merge in every row;
    piecewise-stationary ones mostly absorb (under `drift` the loop visits events only). Work of
    `Dk·Dv` size or more happens per chunk or per call only (the Gram, base term, suffix sums and
    the masked GEMM; `drift`'s detection), never per token."""
    case = SegCase(batch=2, length=256, heads=4, dk=16, dv=16, levels=4, policy="dla", score=score, tau=0.6,
                   inputs=inputs, mean_regime=32.0, seed=0, chunk_size=64, dtype="float32",
                   transition="g" if score == "drift" else "none", log_decay=FORGETFUL)
    x, state = make_inputs(case)
    rows = case.batch * case.heads
    with _CountOps(large=rows * case.dk * case.dv) as count:
        out = fast(case, x, state)
    if score != "state":
        assert (out[3] == case.levels).all()
    assert count.ops <= per_token * case.length, count.ops / case.length
    chunks = case.length // case.chunk_size
    # one big op per token would add 64 per chunk; `drift` adds the backbone's state pass (a few
    # ops per chunk) and the detection's passes over [B, H, T] (per call)
    per_chunk = 70 if score == "drift" else 60
    assert count.big <= per_chunk * chunks, count.big / chunks


# --------------------------------------------------------------------------------------------
# drift: detection, merge scan over events
# --------------------------------------------------------------------------------------------

LATE = 16  # the first tokens of a window open slots whatever the content; boundaries from here on


@st.composite
def drift_cases(draw, transition: str):
    """Decay-driven piecewise-stationary inputs (the memory forgets within a few tokens where
    `g` is given, so regime changes open slots late in the sequence), with or without a cache.
    Without `g` the state grows and `drift` opens slots early only: Gaussian inputs, a low
    threshold and a small capacity, so that those early slots still fill it."""
    if transition in ("g", "both"):
        fields = dict(length=draw(st.integers(20, 48)), levels=draw(st.integers(2, 4)), inputs="piecewise",
                      tau=draw(st.sampled_from([0.3, 0.6, 0.6, 1.0])), mean_regime=draw(st.sampled_from([2.0, 4.0])))
    else:
        fields = dict(length=draw(st.integers(12, 24)), levels=draw(st.integers(2, 3)), inputs="gaussian", tau=0.3,
                      mean_regime=4.0)
    return SegCase(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=draw(st.integers(2, 5)),
        dv=draw(st.integers(2, 4)), policy="dla", score="drift", seed=draw(st.integers(0, 2**31 - 1)),
        chunk_size=draw(st.sampled_from([1, 4, 16, 64])), dtype=draw(st.sampled_from(["float32", "float64"])),
        warm=draw(st.sampled_from([0, 5])), transition=transition, log_decay=FORGETFUL, **fields,
    )


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_drift_equals_segment_naive_for_every_transition(transition):
    """The CPU kernel under `drift` against the oracle (explicit `S^g`, RMSNorm definition):
    level map, final state and `N`, float32 and float64, with and without a cache; most draws
    are well-conditioned and reach capacity merges (`claims_decisions`), all of them absorb
    tokens too, and with `g` most open slots at positions ≥ LATE."""
    late, absorbed = [], []

    @claims_decisions(well_share=0.9)
    @settings(max_examples=12, database=None, derandomize=True, deadline=None)
    @given(drift_cases(transition))
    def check(case):
        x, state = make_inputs(case)
        ref = naive(case, x, state)
        late.append(bool((ref.info[..., LATE:] >= case.tau).any()))
        if not tally_draw(case.policy, ref, well_conditioned(ref, case)):
            return
        absorbed.append(int(ref.absorbed.sum()) > 0)
        out = fast(case, x, state)
        assert torch.equal(out[0], encode_level_map(ref.level, ref.initial_level, state.m))
        assert_final_state(out, ref.n, ref.I, ref.m, ref.Z, ref.zz, ref.N, case.torch_dtype)

    check()
    assert all(absorbed), f"{sum(absorbed)} of {len(absorbed)} compared draws absorb a token"
    if transition in ("g", "both"):
        assert sum(late) >= 0.8 * len(late), f"{sum(late)} of {len(late)} draws open a slot at t >= {LATE}"
