"""The Triton segmentation (`dla.ops.segment.triton_walk.segment_triton`, the CUDA kernel of
`dla::segment`) and the Triton products of the `drift` detection (`detect_triton.py`) against
the float64 oracle `segment_naive` and the torch detection (SPEC §2, §6).

Without a GPU the kernels run through the Triton interpreter (tests/conftest.py), at tiny shapes
in float32; with one, the same tests run compiled on it, and the `gpu` tests add large shapes,
16-bit inputs and the CPU kernel `dla.ops.segment.segment` as the reference."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dla.ops.levels import EMPTY, dense_level_map, encode_level_map
from dla.ops.reference import segment_naive
from dla.ops.segment.cpu import segment_cpu
from dla.ops.segment.detect import detect_drift, drift_scores, readout_products
from dla.ops.segment.detect_triton import drift_scores_triton, readout_products_triton
from dla.ops.state import MultiStateCache, empty_cache
from dla.ops.segment.triton_walk import dla_walk, segment_dla, segment_triton
from dla.ops.validation import SCORES
from dla.run.synthetic import piecewise_stationary
from tests.sm90 import compile_script
from tests.strategies import (
    DELTA, TRANSITIONS, Case, build, claims_decisions, comparable, decisive, fenwick_levels, information_close,
    naive_segmentation, poisoned_empty, random_cache, relative_error, tally_draw, well_conditioned,
    with_examples,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = dict(deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
BASE = dict(batch=1, heads=1, dk=16, dv=16, transition="none", score="token", inputs="piecewise",
            mean_regime=4.0, seed=3, chunk_size=16)


def cache_args(state: MultiStateCache, device=DEVICE):
    """The cache as `dla::segment` takes it after `k, v, g, beta`."""
    return [x.to(device) for x in (state.S, state.n, state.I, state.m, state.Z, state.zz, state.N, state.step)]


def initial(case: Case, with_state: bool, seed: int) -> MultiStateCache:
    if with_state:
        return random_cache(case, seed=seed, dtype=torch.float32)
    return empty_cache(case.batch, case.heads, case.levels, case.dk, case.dv, dtype=torch.float32, device="cpu")


def run_triton(case: Case, t: dict, state: MultiStateCache, piece=None):
    """`segment_triton`, or with `piece` the token/state walk in speculative pieces (then `N` is
    the cache's, which that walk never advances)."""
    k, v = t["k"].to(DEVICE), t["v"].to(DEVICE)
    g, beta = (None if t.get(n) is None else t[n].to(DEVICE) for n in ("g", "beta"))
    if piece is None:
        out = segment_triton(k, v, g, beta, *cache_args(state), case.levels, case.policy, case.score, case.tau,
                             case.chunk_size)
    else:
        _, n0, I0, m0, Z0, zz0, N0, _ = cache_args(state)
        out = (*segment_dla(k, v, n0, I0, m0, Z0, zz0, case.levels, case.score, case.tau, case.chunk_size,
                            piece=piece), N0)
    return [x.cpu() for x in out]


def assert_matches_naive(case: Case, t: dict, state: MultiStateCache, seg, out, dtype=torch.float32) -> None:
    level_start, n, I, m, Z, zz, N = out
    drift = (case.policy, case.score) == ("dla", "drift")
    assert N.dtype == dtype
    assert relative_error(N, seg.N if drift else state.N) <= (1e-10 if dtype == torch.float64 else 1e-5)
    assert level_start.dtype == torch.int32 and level_start.shape == (case.batch, case.length, case.heads, case.levels)
    assert n.dtype == torch.int64 and m.dtype == torch.int64
    assert I.dtype == Z.dtype == zz.dtype == dtype
    # the encoding is unique: each rank starts at its first member, EMPTY beyond the live ranks
    assert torch.equal(level_start, encode_level_map(seg.level, seg.initial_level, state.m))
    level, initial_level = dense_level_map(level_start, state.m)
    assert torch.equal(level, seg.level)
    counted = (torch.arange(case.levels) < state.m[..., None]) & (state.n > 0)  # initial slots holding tokens
    assert torch.equal(torch.where(counted[:, :, None, :], initial_level, -1), seg.initial_level)
    assert torch.equal(m, seg.m) and torch.equal(n, seg.n)
    if dtype == torch.float64:
        for got, ref in ((I, seg.I), (Z, seg.Z), (zz, seg.zz)):
            assert relative_error(got, ref) <= 1e-10
        return
    # I sums float32 scores; I_t = √(2 − 2cos) near 0 carries √(cos's rounding) ≲ 1e-3 per token
    assert ((I.double() - seg.I.double()).abs() <= 1e-4 * seg.I.double().abs() + 1e-3 * seg.n).all()
    assert relative_error(Z, seg.Z) <= 1e-5
    assert relative_error(zz, seg.zz) <= 1e-5


@st.composite
def dla_draws(draw):
    """`(case, with a cache, piece)`: `token` and `state` draws that reach capacity merges
    (`tests.strategies.decisive`), and the designed inputs whose decisions sit on the edges."""
    score = draw(st.sampled_from(["token", "token", "state"]))
    case = Case(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=16, dv=16, policy="dla",
        transition="none", score=score, seed=draw(st.integers(0, 2**31 - 1)), chunk_size=16,
        **draw(decisive(score, 40)),
    )
    return case, draw(st.booleans()), draw(st.sampled_from([None, 16, 32]))


EXACT_DRAWS = [  # I = τ and ties of merge densities (tests.strategies.designed_stream), one piece and several
    (Case(length=37, levels=3, policy="dla", tau=0.0, **{**BASE, "inputs": "repeated", "heads": 2}), True, 16),
    (Case(length=20, levels=4, policy="dla", tau=0.0, **{**BASE, "inputs": "repeated", "score": "state"}), False,
     None),
    (Case(length=35, levels=3, policy="dla", tau=2.0, **{**BASE, "inputs": "alternating"}), False, 16),
    (Case(length=12, levels=2, policy="dla", tau=2.0, **{**BASE, "inputs": "alternating", "score": "state"}), False,
     None),
]


def test_dla_matches_naive():
    """Level map and final state equal the oracle's on well-conditioned draws, Gaussian and
    piecewise-stationary, with and without an initial state, in one piece or several (the
    speculative walk and its fix-up), and on the designed inputs; the draws are mostly
    well-conditioned and reach capacity merges (`claims_decisions`)."""

    @claims_decisions(well_share=0.9)
    @settings(max_examples=36, **FAST)
    @given(dla_draws())
    @with_examples(EXACT_DRAWS)
    def check(draw):
        case, with_state, piece = draw
        t = build(case, torch.float32)
        state = initial(case, with_state, seed=case.seed % 1000)
        seg = segment_naive(t["k"], t["v"], levels=case.levels, policy="dla", tau=case.tau, score=case.score,
                            initial_state=state)
        if tally_draw(case.policy, seg, comparable(case, seg, torch.float32)):
            assert_matches_naive(case, t, state, seg, run_triton(case, t, state, piece))

    check()


EDGES = {
    "T=1": Case(length=1, levels=2, policy="dla", tau=0.6, **BASE),
    "T not a multiple of the chunk": Case(length=37, levels=4, policy="dla", tau=0.6, **BASE),
    "all tokens merged": Case(length=35, levels=3, policy="dla", tau=10.0, **BASE),
    "every token a boundary": Case(length=20, levels=20, policy="dla", tau=0.0, **BASE),
    "full cache from the first chunk": Case(length=33, levels=2, policy="dla", tau=0.0, **BASE),
    "state score": Case(length=40, levels=3, policy="dla", tau=0.3, **{**BASE, "score": "state"}),
    "gaussian": Case(length=40, levels=5, policy="dla", tau=0.6, **{**BASE, "inputs": "gaussian"}),
}


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("piece", [None, 16])
@pytest.mark.parametrize("name", list(EDGES))
def test_dla_edge_cases(name, piece, with_state):
    case = EDGES[name]
    t = build(case, torch.float32)
    state = initial(case, with_state, seed=11)
    seg = segment_naive(t["k"], t["v"], levels=case.levels, policy="dla", tau=case.tau, score=case.score,
                        initial_state=state)
    assert well_conditioned(seg, torch.float32)
    assert_matches_naive(case, t, state, seg, run_triton(case, t, state, piece))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dk,dv", [(5, 3), (20, 33)])
def test_float64_and_padded_head_dims(dtype, dk, dv):
    """float64 inputs decide in float64 (state dtype float64); head dims that are no power of two
    are padded and masked."""
    case = Case(batch=2, length=37, heads=2, dk=dk, dv=dv, levels=4, policy="dla", transition="none", score="token",
                tau=0.6, inputs="piecewise", mean_regime=4.0, seed=1, chunk_size=16)
    t = build(case, dtype)
    state = random_cache(case, seed=3, dtype=dtype)
    seg = segment_naive(t["k"], t["v"], levels=case.levels, tau=case.tau, score=case.score, initial_state=state)
    assert well_conditioned(seg, dtype)
    for piece in (None, 16):
        assert_matches_naive(case, t, state, seg, run_triton(case, t, state, piece), dtype)


@pytest.mark.parametrize("inputs,score,with_state", [("gaussian", "token", False), ("piecewise", "token", True),
                                                     ("piecewise", "state", False), ("gaussian", "state", True)])
def test_pieces_give_the_same_result(inputs, score, with_state):
    """The speculative walk plus its fix-up reproduces the one-piece walk exactly, whatever the
    conditioning: after a common boundary both compute the same numbers in the same order."""
    case = Case(batch=1, length=56, heads=2, dk=16, dv=16, levels=4, policy="dla", transition="none", score=score,
                tau=0.6 if score == "token" else 0.2, inputs=inputs, mean_regime=8.0, seed=5, chunk_size=16)
    t = build(case, torch.float32)
    state = initial(case, with_state, 4)
    whole = run_triton(case, t, state, piece=10**6)
    for piece in (16, 32):
        split = run_triton(case, t, state, piece=piece)
        for a, b in zip(whole, split):
            assert torch.equal(a, b)


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("angles,opened,spec_flags", [
    # the common boundary is the next one the true walk finds (t = 24)
    ([0.0] * 16 + [30.0] * 4 + [55.0] * 4 + [180.0] * 16, [0, 20, 24], {16: 1, 20: 0, 24: 1, 32: 1}),
    # the common boundary (t = 21) sits in a run of boundaries after the missed one
    ([0.0] * 16 + [30.0] * 4 + [55.0] + [145.0] * 19, [0, 20, 21], {16: 1, 20: 0, 21: 1, 32: 1}),
])
def test_fixup_walks_past_a_boundary_the_speculation_missed(monkeypatch, angles, opened, spec_flags):
    """Designed streams (v fixed, so the token score is the angle between k_t and the block's
    key sum; boundary iff the angle ≥ 2·asin(τ/2) ≈ 34.9°): 16 tokens at 0°, then in the second
    piece 4 at 30° and one or more at 55°. The true block (0° and 30°) points near 6°, so the
    first 55° token opens a slot; the speculative block of the second piece (opened at its first
    30° token) absorbs it. The fix-up must replay that piece past its own boundary to a common
    one; the third piece never meets one (all absorbed) and is replayed whole."""
    import dla.ops.segment.triton_walk as tseg

    rad = torch.tensor(angles) * torch.pi / 180
    k = torch.zeros(1, len(angles), 1, 16)
    k[0, :, 0, 0], k[0, :, 0, 1] = torch.cos(rad), torch.sin(rad)
    v = torch.zeros(1, len(angles), 1, 16)
    v[..., 0] = 1.0
    case = Case(length=len(angles), levels=3, policy="dla", tau=0.6, **BASE)
    state = initial(case, False, 0)
    seg = segment_naive(k, v, levels=3, policy="dla", tau=0.6, score="token", initial_state=state)
    assert well_conditioned(seg, torch.float32)
    assert [t for t in range(len(angles)) if t == 0 or int(seg.level[0, 0, t, t - 1]) != 0] == opened
    args = (k.to(DEVICE), v.to(DEVICE), state.m.to(DEVICE), state.Z.to(DEVICE), state.zz.to(DEVICE), "token", 0.6, 16)
    with monkeypatch.context() as patch:  # the speculative flags alone
        patch.setattr(tseg, "_fixup_kernel", _NoLaunch())
        spec = tseg.dla_walk(*args, piece=16)[1][0, 0].cpu()
    assert {t: int(spec[t]) for t in spec_flags} == spec_flags
    assert_matches_naive(case, {"k": k, "v": v}, state, seg, run_triton(case, {"k": k, "v": v}, state, piece=16))


@pytest.mark.parametrize("K", [2, 3, 5])
def test_capacity_merge_ties_pick_the_oldest_pair(K):
    """Equal densities (an exact tie, so no margin): the pair (0, 1) merges, as in the oracle."""
    case = Case(length=1, levels=K, policy="dla", tau=0.0, **BASE)
    t = build(case, torch.float32)
    state = empty_cache(1, 1, K, 16, 16, dtype=torch.float32, device="cpu")
    state = state._replace(n=torch.full((1, 1, K), 2), I=torch.full((1, 1, K), 0.5), m=torch.full((1, 1), K),
                           Z=torch.ones(1, 1, 16, 16))
    state = state._replace(zz=state.Z.pow(2).sum((-1, -2)))
    seg = segment_naive(t["k"], t["v"], levels=K, policy="dla", tau=0.0, score="token", initial_state=state)
    out = run_triton(case, t, state)
    assert torch.equal(out[0], encode_level_map(seg.level, seg.initial_level, state.m))
    assert torch.equal(out[1], seg.n) and torch.equal(out[3], seg.m)


@st.composite
def closed_form_draws(draw):
    policy = draw(st.sampled_from(["fenwick", "single"]))
    T = draw(st.integers(1, 40))
    with_state = draw(st.booleans())
    levels = draw(st.integers(2, 6))
    if policy == "fenwick":
        levels = max(levels, fenwick_levels(T, offset=5 if with_state else 0))
    case = Case(batch=draw(st.integers(1, 2)), length=T, heads=draw(st.integers(1, 2)), dk=16, dv=16, levels=levels,
                policy=policy, transition="none", score="token", tau=0.6, inputs="gaussian", mean_regime=4.0,
                seed=draw(st.integers(0, 2**31 - 1)), chunk_size=16)
    return case, with_state


@settings(max_examples=20, **FAST)
@given(closed_form_draws())
def test_closed_forms_match_naive(draw):
    case, with_state = draw
    t = build(case, torch.float32)
    state = initial(case, with_state, seed=case.seed % 1000)
    seg = naive_segmentation(case, t, state)
    assert_matches_naive(case, t, state, seg, run_triton(case, t, state))


def test_fenwick_with_a_carried_step_beyond_its_levels_is_refused():
    case = Case(length=8, levels=4, policy="fenwick", tau=0.6, **BASE)
    t = build(case, torch.float32)
    state = initial(case, False, 0)._replace(step=torch.tensor([10]))
    with pytest.raises(ValueError, match="fenwick"):
        run_triton(case, t, state)
    with pytest.raises(ValueError, match="policy"):
        run_triton(replace(case, policy="dense"), t, state)


# --------------------------------------------------------------------------------------------
# drift: the detection's Triton products, then the merge and fill kernels
# --------------------------------------------------------------------------------------------


def detection_inputs(transition: str, B: int, T: int, H: int, Dk: int, Dv: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(B, T, H, Dk, generator=gen)
    if transition in ("beta", "both"):
        k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) if transition in ("g", "both") else None
    beta = torch.rand(B, T, H, generator=gen) if transition in ("beta", "both") else None
    return k, v, g, beta, torch.randn(B, H, Dk, Dv, generator=gen)


@pytest.mark.parametrize("transition", TRANSITIONS)
@pytest.mark.parametrize("B,T,H,Dk,Dv,chunk", [(2, 37, 2, 5, 40, 16), (1, 70, 1, 16, 16, 32), (1, 1, 2, 3, 2, 64)])
def test_detection_products_match_the_torch_form(transition, B, T, H, Dk, Dv, chunk):
    """`p_t = r_tᵀ v_t` and `ρ_t = ‖r_t‖²` from the Triton kernels (NaN-poisoned outputs) against
    the torch form in float64, with an initial state: `T` not a multiple of the chunk, head dims
    that are no power of two, several `Dv` tiles, a single token."""
    k, v, g, beta, S0 = detection_inputs(transition, B, T, H, Dk, Dv, seed=T + Dv)
    f64 = [None if x is None else x.double() for x in (k, v, g, beta, S0)]
    p_ref, rr_ref = readout_products(*f64, chunk)
    with poisoned_empty():
        p, rr = readout_products_triton(*(None if x is None else x.to(DEVICE) for x in (k, v, g, beta, S0)), chunk)
    assert p.dtype == rr.dtype == torch.float32 and p.shape == rr.shape == (B, H, T)
    assert relative_error(p.cpu(), p_ref) <= 1e-5 and relative_error(rr.cpu(), rr_ref) <= 1e-5


@st.composite
def drift_draws(draw, transition: str):
    case = Case(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=16, dv=16, policy="dla",
        transition=transition, score="drift", seed=draw(st.integers(0, 2**31 - 1)), chunk_size=16,
        **draw(decisive("drift", 40, decay=transition in ("g", "both"))),
    )
    return case, draw(st.booleans())


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_drift_matches_naive(transition):
    """`dla` under `drift` through the Triton products, merge and fill kernels: level map, final
    state and `N` equal the oracle's on well-conditioned draws, with and without a cache, and on
    the designed inputs (I = τ = 0 with ties of merge densities, I = τ = 2); the draws are
    mostly well-conditioned and reach capacity merges (`claims_decisions`)."""
    exact = dict(BASE, score="drift", transition=transition)

    @claims_decisions(well_share=0.8)
    @settings(max_examples=6, **FAST)
    @given(drift_draws(transition))
    @example((Case(length=21, levels=3, policy="dla", tau=0.0, **{**exact, "inputs": "repeated"}), False))
    @example((Case(length=18, levels=3, policy="dla", tau=2.0, **{**exact, "inputs": "alternating"}), False))
    def check(draw):
        case, with_state = draw
        t = build(case, torch.float32)
        state = initial(case, with_state, seed=case.seed % 1000)
        seg = naive_segmentation(case, t, state)
        if not tally_draw(case.policy, seg, comparable(case, seg, torch.float32)):
            return
        with poisoned_empty():
            out = run_triton(case, t, state)
        assert_matches_naive(case, t, state, seg, out)

    check()


# --------------------------------------------------------------------------------------------
# GPU: large shapes, 16-bit inputs, against the CPU kernel
# --------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inputs", ["gaussian", "piecewise"])
def test_16bit_inputs_match_naive(dtype, inputs):
    """The 16-bit dot paths (exact products; hi/lo split of Z) against the oracle on the same
    16-bit values."""
    checked = 0
    # Gaussian streams make every token a boundary and merge densities nearly tie, so fewer of
    # them are well-conditioned: draw shorter ones, and more of them
    length, seeds = (48, range(24)) if inputs == "gaussian" else (96, range(6))
    for seed in seeds:
        if checked == 6:
            break
        case = Case(batch=2, length=length, heads=2, dk=32, dv=16, levels=5, policy="dla", transition="none",
                    score="token", tau=0.6, inputs=inputs, mean_regime=8.0, seed=seed, chunk_size=16)
        t = {name: x.to(dtype) for name, x in build(case, torch.float32).items() if name in ("k", "v")}
        state = initial(case, seed % 2 == 1, seed)
        seg = segment_naive(t["k"].float(), t["v"].float(), levels=case.levels, tau=case.tau, score=case.score,
                            initial_state=state)
        if not well_conditioned(seg, torch.float32):
            continue
        for piece in (None, 32):
            assert_matches_naive(case, t, state, seg, run_triton(case, t, state, piece))
        checked += 1
    assert checked >= 4


def _first_divergences(k, v, state, K, score, tau, chunk, ours, theirs):
    """Compare two segmentations stream by stream up to their first differing level row; return
    (tokens compared, well-conditioned divergences). At the first difference the decision is
    judged from the agreed history in float64: the boundary margin |I_t − τ| from the open block
    rebuilt exactly, the merge margin from the slots of the agreed row before."""
    B, T, H, _ = k.shape
    delta = DELTA[torch.float32]
    ls_a, ls_b = ours[0].cpu().long(), theirs[0].cpu().long()
    m0, Z0, zz0 = (x.to(k.device) for x in (state.m, state.Z, state.zz))
    infos = dla_walk(k, v, m0, Z0, zz0, score, tau, chunk)[0].double().cpu()  # I_t of the Triton walk
    k64, v64 = k.double().cpu(), v.double().cpu()
    compared, bad = 0, []
    for b in range(B):
        for h in range(H):
            rows_a, rows_b = ls_a[b, :, h], ls_b[b, :, h]
            differ = (rows_a != rows_b).any(-1).nonzero()
            if differ.numel() == 0:
                compared += T
                continue
            t = int(differ[0])
            compared += t
            m0 = int(state.m[b, h])
            start = int(rows_a[t - 1, 0]) if t > 0 else (-1 if m0 > 0 else t)
            if t == 0 and m0 == 0:
                bad.append((b, h, t, "first token"))
                continue
            lo = max(start, 0)
            Zb = (k64[b, lo:t, h].T @ v64[b, lo:t, h]) + (state.Z[b, h].double() if start < 0 else 0.0)
            zz = float(Zb.pow(2).sum())
            kt, vt = k64[b, t, h], v64[b, t, h]
            c, ss = float(kt @ Zb @ vt), float(kt @ kt) * float(vt @ vt)
            if score == "token":
                cos = c / max((ss * zz) ** 0.5, 1e-12)
            else:
                cos = (zz + c) / max(max(zz * (zz + 2 * c + ss), 0.0) ** 0.5, 1e-12)
            info = max(0.0, 2 - 2 * cos) ** 0.5
            if abs(info - tau) < delta:
                continue  # ill-conditioned boundary decision
            opens_a, opens_b = int(rows_a[t, 0]) == t, int(rows_b[t, 0]) == t
            if opens_a != opens_b:
                bad.append((b, h, t, "boundary", info))
                continue
            # both open a slot: the capacity merge differs; slots from the agreed row t − 1
            prev = rows_a[t - 1] if t > 0 else -1 - torch.arange(K)
            live = prev != EMPTY
            if int(live.sum()) < K:
                bad.append((b, h, t, "append"))
                continue
            pos = torch.arange(t)
            level = (prev[None, :] <= pos[:, None]).float().argmax(-1)  # rank of each token < t
            n = torch.stack([(level == r).sum() for r in range(K)]).double()
            I = torch.stack([infos[b, h, :t][level == r].sum() for r in range(K)])
            init_rank = (prev[None, :] <= (torch.arange(K) - m0)[:, None]).float().argmax(-1)  # slot i → rank
            for i in range(m0):
                r = int(init_rank[i])
                n[r] += float(state.n[b, h, i])
                I[r] += float(state.I[b, h, i])
            n, I = n.flip(0), I.flip(0)  # oldest first
            dens = (I[:-1] + I[1:]) / (n[:-1] + n[1:])
            best = dens.sort().values
            margin = float((best[1] - best[0]) / best[1]) if K > 2 else float("inf")
            if margin < delta:
                continue  # ill-conditioned merge
            bad.append((b, h, t, "merge", margin))
    return compared, bad


GPU_CASES = [
    # T, Dk, Dv, K, dtype, inputs, score
    (2048, 64, 64, 8, torch.float32, "gaussian", "token"),
    (4096, 128, 128, 16, torch.float32, "piecewise", "token"),
    (16384, 128, 128, 16, torch.bfloat16, "piecewise", "token"),
    (8192, 64, 128, 32, torch.bfloat16, "gaussian", "token"),
    (4096, 128, 64, 32, torch.bfloat16, "piecewise", "state"),
    (16384, 64, 64, 8, torch.float32, "piecewise", "state"),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,Dk,Dv,K,dtype,inputs,score", GPU_CASES)
def test_large_shapes_match_the_cpu_kernel(T, Dk, Dv, K, dtype, inputs, score):
    """Against the CPU kernel on the same inputs: level maps agree up to the first decision
    that is ill-conditioned (SPEC §2); streams that agree throughout also agree on the final state."""

    B, H, chunk, tau = 2, 4, 64, 0.6
    gen = torch.Generator().manual_seed(T + K)
    if inputs == "gaussian":
        k, v = torch.randn(B, T, H, Dk, generator=gen), torch.randn(B, T, H, Dv, generator=gen)
    else:

        k, v, _ = piecewise_stationary(B, T, H, Dk, Dv, mean_regime=64.0, noise=0.1, generator=gen)
    k, v = k.to(dtype), v.to(dtype)
    state = empty_cache(B, H, K, Dk, Dv, dtype=torch.float32, device="cpu")
    args = (K, "dla", score, tau, chunk)
    theirs = segment_cpu(k, v, None, None, *cache_args(state, "cpu"), *args)
    ours = segment_triton(k.cuda(), v.cuda(), None, None, *cache_args(state, "cuda"), *args)
    compared, bad = _first_divergences(k.cuda(), v.cuda(), state, K, score, tau, chunk, ours, theirs)
    assert not bad, bad[:5]
    # Gaussian inputs make every token a boundary and the merged slots' densities nearly equal,
    # so an ill-conditioned merge (where the two kernels may part) comes early there
    share = 0.5 if inputs == "piecewise" else 0.02
    assert compared >= share * B * H * T, f"only {compared} of {B * H * T} tokens compared"
    same = (ours[0].cpu() == theirs[0]).all(-1).all(1)  # [B, H] streams that agree throughout
    ours_cpu = [x.cpu() for x in ours]
    assert torch.equal(ours_cpu[3][same], theirs[3][same]) and torch.equal(ours_cpu[1][same], theirs[1][same])
    if same.any():
        # I sums √(2 − 2cos) per token, whose float32 rounding near cos = 1 is ~1e-3 a token
        assert information_close(ours_cpu[2][same], theirs[2][same], theirs[1][same], torch.float32)
        for i in (4, 5):
            assert relative_error(ours_cpu[i][same], theirs[i][same]) <= 1e-3


@settings(max_examples=25, **FAST)
@given(T=st.integers(1, 90), transition=st.sampled_from(TRANSITIONS), first=st.booleans(), ends=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_drift_tail_kernel_matches_the_torch_tail(T, transition, first, ends, seed):
    """The scalar tail in one Triton kernel (`drift_scores_triton`, through the interpreter) against
    `drift_scores` in float64 on the same float32 products: `N` (every step, through `end`, and
    across the kernel's blocks of 16 tokens) within float32 rounding, `I_t²` within 1e-5, and the
    flags equal wherever `|I_t − τ| ≥ δ`; the first token unscored where asked."""
    B, H, Dk, Dv = 2, 2, 8, 12
    gen = torch.Generator().manual_seed(seed)
    k, v, _ = piecewise_stationary(B, T, H, Dk, Dv, mean_regime=6.0, noise=0.1, generator=gen)
    if transition in ("beta", "both"):
        k = torch.nn.functional.normalize(k, dim=-1)
    g = -torch.rand(B, T, H, generator=gen) if transition in ("g", "both") else None
    beta = torch.rand(B, T, H, generator=gen) if transition in ("beta", "both") else None
    S0 = 0.1 * torch.randn(B, H, Dk, Dv, generator=gen)
    p, rr = readout_products(k, v, g, beta, S0, 16)
    N0, unscored = S0.pow(2).sum((-2, -1)), torch.tensor([[first, False], [True, first]])
    end = torch.randint(1, T + 1, (B,), generator=gen) if ends else None
    tau = 0.6
    with poisoned_empty():
        det = drift_scores_triton(p, rr, k, v, g, beta, N0, unscored, tau, end)
    ref = drift_scores(*(None if x is None else x.double() for x in (p, rr, k, v, g, beta, N0)), unscored, tau, end)
    assert relative_error(det.N, ref.N) <= 1e-5
    # I = √(2 − 2cos): its square, not I near 0, carries float32 rounding evenly
    assert float((det.info.double().square() - ref.info.square()).abs().max()) <= 1e-5
    well = (ref.info - tau).abs() >= DELTA[torch.float32]
    assert torch.equal(det.flag[well], ref.flag[well])
    assert bool((det.info[..., 0][unscored] == 0).all())
    assert bool(det.flag[..., 0][unscored].all())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("B,H,T,Dk,Dv,transition,dtype", [
    (2, 4, 4096, 128, 128, "both", torch.float32),  # 8 warps, Dv tile 64, every branch
    (4, 8, 2048, 128, 128, "none", torch.float32),
    (2, 4, 4096, 64, 128, "g", torch.bfloat16),  # 8 warps, tile 64 (BK·BV = 64·128)
    (1, 4, 16384, 128, 256, "both", torch.bfloat16),  # long, Dv = 256 (paper preset): 4 tiles
    (2, 4, 2048, 32, 64, "beta", torch.float16),  # 4 warps
])
def test_drift_detection_on_the_gpu(B, H, T, Dk, Dv, transition, dtype):
    """The Triton products (16-bit inputs upcast) against the torch form in float64 on the
    device on the same values, ≤ 1e-5; with the Triton tail, the boundary flags equal the float64 ones wherever
    `|I_t − τ| ≥ δ`, at nearly every token; `N` within float32 rounding."""

    gen = torch.Generator().manual_seed(T + Dv)
    k, v, _ = piecewise_stationary(B, T, H, Dk, Dv, mean_regime=64.0, noise=0.1, generator=gen)
    if transition in ("beta", "both"):
        k = torch.nn.functional.normalize(k, dim=-1)
    g = -1.2 * torch.rand(B, T, H, generator=gen) if transition in ("g", "both") else None
    beta = torch.rand(B, T, H, generator=gen) if transition in ("beta", "both") else None
    S0 = 0.1 * torch.randn(B, H, Dk, Dv, generator=gen)
    k, v = k.to(dtype).cuda(), v.to(dtype).cuda()
    g, beta = (None if x is None else x.cuda() for x in (g, beta))
    S0, m0 = S0.cuda(), torch.ones(B, H, dtype=torch.int64, device="cuda")
    N0 = S0.pow(2).sum((-2, -1))
    f64 = [None if x is None else x.double() for x in (k, v, g, beta, S0)]
    p, rr = readout_products_triton(k, v, g, beta, S0, 64)
    p64, rr64 = readout_products(*f64, 64)
    assert relative_error(p, p64) <= 1e-5 and relative_error(rr, rr64) <= 1e-5
    tau = 0.6
    det = detect_drift(k, v, g, beta, S0, N0, m0, tau, 64, readout_products_triton, scores=drift_scores_triton)
    ref = detect_drift(*f64[:4], f64[4], N0.double(), m0, tau, 64, readout_products)
    well = (ref.info - tau).abs() >= DELTA[torch.float32]
    assert bool(well.float().mean() >= 0.99), float(well.float().mean())
    assert torch.equal(det.flag[well], ref.flag[well])
    assert relative_error(det.N, ref.N) <= 1e-4


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("T,Dk,Dv,K,transition,dtype", [(4096, 128, 128, 16, "both", torch.float32),
                                                          (8192, 64, 128, 32, "g", torch.bfloat16)])
def test_drift_segmentation_matches_the_cpu_kernel(T, Dk, Dv, K, transition, dtype):
    """The CUDA segmentation under `drift` against the CPU kernel on the same inputs: the streams
    whose boundaries agree (all but ill-conditioned ones) also agree on the level map and counts,
    unless a capacity merge ties within rounding."""

    B, H, tau = 2, 4, 0.6
    gen = torch.Generator().manual_seed(T + K)
    k, v, _ = piecewise_stationary(B, T, H, Dk, Dv, mean_regime=32.0, noise=0.1, generator=gen)
    if transition in ("beta", "both"):
        k = torch.nn.functional.normalize(k, dim=-1)
    g = -1.2 * torch.rand(B, T, H, generator=gen)
    beta = torch.rand(B, T, H, generator=gen) if transition in ("beta", "both") else None
    k, v = k.to(dtype), v.to(dtype)
    state = empty_cache(B, H, K, Dk, Dv, dtype=torch.float32, device="cpu")
    args = (K, "dla", "drift", tau, 64)
    theirs = segment_cpu(k.float(), v.float(), g, beta, *cache_args(state, "cpu"), *args)
    ours = [x.cpu() for x in segment_triton(k.cuda(), v.cuda(), g.cuda(), None if beta is None else beta.cuda(),
                                            *cache_args(state, "cuda"), *args)]
    opened = lambda ls: ls[..., 0] == torch.arange(T)[None, :, None]  # noqa: E731
    same_flags = (opened(ours[0]) == opened(theirs[0])).all(1)  # [B, H]
    same = (ours[0] == theirs[0]).all(-1).all(1)
    assert bool(same_flags.float().mean() >= 0.5) and bool(same.float().mean() >= 0.5), (same_flags, same)
    assert torch.equal(ours[1][same], theirs[1][same]) and torch.equal(ours[3][same], theirs[3][same])
    assert relative_error(ours[6], theirs[6]) <= 1e-4


# --------------------------------------------------------------------------------------------
# The detection kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

# `perf.sm90_resources --stages drift` compiles each detection kernel with and without β at the
# spec's gate and exits non-zero past Hopper's shared memory
COMPILE = r"""
import sys
from perf.sm90_resources import main
sys.exit(main([*sys.argv[1:], "--check-shared", "--stages", "drift"]))
"""


@pytest.mark.slow
def test_detection_kernels_compile_for_sm90():
    """The detection kernels with the launchers' meta-parameters through Triton's GPU compiler and
    ptxas, within an H100's shared memory: 8 warps at `Dk = Dv = 128` with `g`, 4 warps at 64
    without it, each with β and without (so every branch is taken and skipped); and the tail
    kernel at each. The GPU tests run every configuration on the card."""
    specs = ["128:32:64:16:float32:g", "64:16:64:16:float32:none"]
    assert compile_script(COMPILE, *specs).count("compiled") == 6 * len(specs)
