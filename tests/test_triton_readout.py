"""The Triton readout without β (`dla.ops.readout.masked_triton`) against the oracles.

On the CPU the kernels run through the Triton interpreter (tiny shapes, float32,
`input_precision="ieee"`) against the materialized masked form in float64: forward output and
final slot states, and every gradient (`dq, dk, dv, dλ, dg, dS0`) against autograd of the
reference. Both sides get the same level map (`segment_naive` decides, `encode_level_map`
encodes; the reference re-derives the identical map from the same float64 `k, v`), so no
decision margin is involved. Outputs are allocated by `torch.empty`; the tests poison it with
NaN so that an element a kernel forgets to write shows.

On a GPU machine (`pytest -m gpu`) the same tests run on CUDA tensors, and further ones with long
sequences and production head sizes compare against the chunked torch path (`dla.ops.readout`)
in float64 on the device, on synthetic level maps (a random merge process for `dla`, the closed
forms for `fenwick` and `single`), in float32 and bfloat16. A compile test pushes every kernel
through Triton's GPU compiler and ptxas for sm_90 on any machine.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dla.ops.levels import EMPTY, encode_level_map
from dla.ops.reference import multistate_attention_materialized, segment_naive
from dla.ops.readout.masked_triton import masked_backward, masked_forward
from tests.strategies import Case, build, fenwick_levels, random_cache, relative_error

TOL32 = 1e-5  # SPEC §6, float32 with ieee dots
GRADS = ("q", "k", "v", "lam", "g")
EDGE = dict(batch=1, heads=2, dk=16, dv=32, score="token", inputs="piecewise", mean_regime=4.0, seed=5)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def poisoned_empty():
    """`torch.empty` returns NaN-filled floats (and extreme ints), so unwritten output shows."""
    real = torch.empty

    def empty(*size, **kw):
        x = real(*size, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-(2**30))

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real


def to_rank_order(S_oldest: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Oldest-first slots [B,H,K,Dk,Dv] with m live → rank order (rank r = slot m−1−r, zero
    beyond m)."""
    K = S_oldest.shape[2]
    r = torch.arange(K, device=m.device)
    idx = (m[..., None] - 1 - r).clamp(min=0)
    S = torch.gather(S_oldest, 2, idx[..., None, None].expand_as(S_oldest))
    return torch.where((r < m[..., None])[..., None, None], S, torch.zeros((), dtype=S.dtype))


@st.composite
def cases(draw, max_length=40):
    policy = draw(st.sampled_from(["dla", "fenwick", "single"]))
    length = draw(st.integers(1, max_length))
    levels = draw(st.integers(2, 6))
    return Case(
        batch=draw(st.integers(1, 2)), length=length, heads=draw(st.integers(1, 2)),
        dk=draw(st.sampled_from([16, 32])), dv=draw(st.sampled_from([16, 32])), levels=levels, policy=policy,
        transition=draw(st.sampled_from(["none", "g"])), score="token",
        tau=draw(st.sampled_from([0.0, 0.3, 0.6, 0.6, 1.0])),
        inputs=draw(st.sampled_from(["gaussian", "piecewise", "piecewise"])),
        mean_regime=draw(st.sampled_from([2.0, 4.0, 8.0])), seed=draw(st.integers(0, 2**31 - 1)),
    )


def setup(case: Case, initial: bool):
    """float64 inputs, the initial cache (Gaussian states in its live, non-empty slots) or None,
    the encoded level map, `S0` in rank order and the mask of live non-empty initial slots."""
    if case.policy == "fenwick":
        case = replace(case, levels=max(case.levels, fenwick_levels(case.length, 5 if initial else 0)))
    t = build(case)
    B, H, K = case.batch, case.heads, case.levels
    state = None
    m0 = torch.zeros(B, H, dtype=torch.int64)
    live = torch.zeros(B, H, K, dtype=torch.bool)
    if initial:
        state = random_cache(case, seed=case.seed + 1)
        gen = torch.Generator().manual_seed(case.seed + 2)
        slots = (torch.arange(K) < state.m[..., None]) & (state.n > 0)
        S = torch.randn(state.S.shape, generator=gen, dtype=torch.float64)
        state = state._replace(S=torch.where(slots[..., None, None], S, 0.0))
        m0 = state.m
        live = to_rank_order(slots[..., None, None].double(), m0)[..., 0, 0] > 0
    seg = segment_naive(t["k"], t["v"], levels=K, policy=case.policy, tau=case.tau, score=case.score,
                        initial_state=state)
    level_start = encode_level_map(seg.level, seg.initial_level, m0)
    if state is not None:
        S0 = to_rank_order(state.S, m0)
    else:
        S0 = torch.zeros(B, H, K, case.dk, case.dv, dtype=torch.float64)
    return case, t, state, level_start, S0, live


def reference(case: Case, t: dict, state, *, grads=None):
    """Materialized `(o, S in rank order)`, with β where the case has it (the scan tests
    use this too); with `grads = (do, dS)` also the gradients of `⟨o, do⟩ + ⟨S, dS⟩` by
    autograd, keyed like `GRADS` (and `"beta"`) plus `"S0"` (rank order)."""
    leaves = {n: (x.clone().requires_grad_(grads is not None) if x is not None else None) for n, x in t.items()}
    if state is not None and grads is not None:
        state = state._replace(S=state.S.clone().requires_grad_(True))
    o, final = multistate_attention_materialized(
        leaves["q"], leaves["k"], leaves["v"], leaves["lam"], g=leaves["g"], beta=leaves.get("beta"),
        policy=case.policy, tau=case.tau, score=case.score, initial_state=state, output_final_state=True)
    S = to_rank_order(final.S, final.m)
    if grads is None:
        return o.detach(), S.detach()
    do, dS = grads
    names = [n for n in (*GRADS, "beta") if leaves.get(n) is not None]
    wrt = [leaves[n] for n in names] + ([state.S] if state is not None else [])
    out = torch.autograd.grad((o * do).sum() + (S * dS).sum(), wrt)
    result = dict(zip(names, out))
    if state is not None:
        result["S0"] = to_rank_order(out[-1], state.m)
    return result


def f32(x, device="cpu"):
    return None if x is None else x.to(device=device, dtype=torch.float32)


def triton_args(case: Case, t: dict, level_start, S0, device="cpu"):
    """The launchers' arguments (the masked readout's and the scan's take the same), β
    None where the case has none."""
    return (*(f32(t[n], device) for n in ("q", "k", "v", "lam", "g", "beta")), level_start.to(device),
            f32(S0, device), case.dk**-0.5, 16)


def cotangents(case: Case, S0):
    """`(do, dS)` drawn from the case's seed, float64."""
    gen = torch.Generator().manual_seed(case.seed + 3)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen, dtype=torch.float64)
    return do, torch.randn(S0.shape, generator=gen, dtype=torch.float64)


def assert_forward_matches_materialized(forward, case: Case, initial: bool, device):
    """`forward` (a launcher) on NaN-poisoned fresh memory against the materialized form, float32."""
    case, t, state, level_start, S0, _ = setup(case, initial)
    with poisoned_empty():
        o, S = cpu(forward(*triton_args(case, t, level_start, S0, device)))
    o_ref, S_ref = reference(case, t, state)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert relative_error(o, o_ref) <= TOL32
    assert relative_error(S, S_ref) <= TOL32


def cpu(xs):
    return [x.cpu() for x in xs]


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = [  # CPU tensors run through the interpreter; on a GPU machine the same tests run on CUDA
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETING or not torch.cuda.is_available(), reason="needs CUDA (and the interpreter off)")]),
]


# --------------------------------------------------------------------------------------------
# Against the materialized form: tiny shapes, float32, ieee dots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=6)
@given(cases(), st.booleans())
@example(Case(length=1, levels=2, policy="dla", transition="g", tau=0.6, **EDGE), True)  # T = 1
@example(Case(length=32, levels=3, policy="fenwick", transition="none", tau=0.6, **EDGE), False)  # T = 2 tiles
@example(Case(length=20, levels=20, policy="dla", transition="g", tau=0.0, **EDGE), False)  # every token a slot
@example(Case(length=33, levels=2, policy="dla", transition="none", tau=0.0, **EDGE), True)  # full from the start
@example(Case(length=30, levels=4, policy="dla", transition="g", tau=10.0, **EDGE), True)  # all merged
@example(Case(length=37, levels=4, policy="single", transition="g", tau=0.6, **EDGE), True)
def test_forward_matches_materialized(device, case: Case, initial: bool):
    assert_forward_matches_materialized(masked_forward, case, initial, device)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=6)
@given(cases(max_length=36), st.booleans())
@example(Case(length=1, levels=2, policy="single", transition="g", tau=0.6, **EDGE), True)
@example(Case(length=35, levels=3, policy="dla", transition="g", tau=0.6, **EDGE), True)
@example(Case(length=21, levels=6, policy="fenwick", transition="g", tau=0.6, **EDGE), True)
@example(Case(length=18, levels=18, policy="dla", transition="none", tau=0.0, **EDGE), False)
def test_backward_matches_materialized(device, case: Case, initial: bool):
    case, t, state, level_start, S0, live = setup(case, initial)
    do, dS = cotangents(case, S0)
    with poisoned_empty():
        args = triton_args(case, t, level_start, S0, device)
        grads = masked_backward(f32(do, device), f32(dS, device), *args)
    dq, dk, dv, dlam, dg, dbeta, dS0 = cpu(grads)
    ref = reference(case, t, state, grads=(do, dS))
    got = dict(q=dq, k=dk, v=dv, lam=dlam, g=dg)
    for name in ref:
        if name == "S0":
            continue
        assert got[name].dtype == torch.float32 and got[name].shape == ref[name].shape, name
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name], ref[name]) <= TOL32, name
    if t["g"] is None:
        assert torch.equal(dg, torch.zeros_like(dg))
    assert torch.equal(dbeta, torch.zeros(case.batch, case.length, case.heads))
    assert torch.isfinite(dS0).all()
    if state is not None:
        # empty fenwick levels of the initial cache are not members of any level in the
        # materialized form; the map's ranges give them the weight of the level around them,
        # so their (zero) states get a gradient there: compare live non-empty slots
        mask = live[..., None, None]
        assert relative_error(torch.where(mask, dS0, 0.0), torch.where(mask, ref["S0"], 0.0)) <= TOL32
    else:  # no position of the map is an initial slot
        assert torch.equal(dS0, torch.zeros_like(dS0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unrolled", [1, 6])
def test_levels_beyond_the_unrolled_ones(device, unrolled, monkeypatch):
    """The levels a row meets in a tile go to the unrolled key loop (first NL) or to the EXTRA
    pass (the rest): every split gives the same result. τ = 0 makes every token a slot, so rows
    meet many levels per tile."""
    import dla.ops.readout.masked_triton as kernels

    config = kernels._config
    monkeypatch.setattr(kernels, "_config", lambda dk, dv, interpreted: {**config(dk, dv, interpreted), "NL": unrolled})
    case = Case(length=24, levels=6, policy="dla", transition="g", tau=0.0, **EDGE)
    case, t, state, level_start, S0, live = setup(case, True)
    args = triton_args(case, t, level_start, S0, device)
    o, S = cpu(masked_forward(*args))
    o_ref, S_ref = reference(case, t, state)
    assert relative_error(o, o_ref) <= TOL32 and relative_error(S, S_ref) <= TOL32
    gen = torch.Generator().manual_seed(4)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64)
    grads = cpu(masked_backward(f32(do, device), f32(dS, device), *args))
    ref = reference(case, t, state, grads=(do, dS))
    for name, got in zip(("q", "k", "v", "lam", "g"), grads):
        assert relative_error(got, ref[name]) <= TOL32, name


@pytest.mark.parametrize("device", DEVICES)
def test_missing_cotangents_and_expanded_gradients(device):
    """`do`/`dS` may be None (zero) or arrive expanded with stride 0."""
    case = Case(length=19, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _ = setup(case, True)
    args = triton_args(case, t, level_start, S0, device)
    B, T, H, Dv = case.batch, case.length, case.heads, case.dv
    do = torch.ones(1, 1, 1, 1, device=device).expand(B, T, H, Dv)
    dS = torch.ones(1, 1, 1, 1, 1, device=device).expand(S0.shape)
    expanded = masked_backward(do, dS, *args)
    dense = masked_backward(do.contiguous(), dS.contiguous(), *args)
    for a, b in zip(expanded, dense):
        assert torch.equal(a, b)
    no_do = masked_backward(None, dS.contiguous(), *args)
    no_dS = masked_backward(do.contiguous(), None, *args)
    for a, b, c in zip(dense, no_do, no_dS):
        assert relative_error(b + c, a) <= TOL32
    zero = masked_backward(None, None, *args)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in zero)


@pytest.mark.parametrize("device", DEVICES)
def test_diagonal_blocks_of_one_chunk_are_the_whole_readout(device):
    """`intra_chunk_forward/backward` (the chunked scan's intra-chunk part) with one chunk
    covering the call equal the full masked kernels without a carried state, dG's reverse cumsum
    being dg; a band the tiles do not divide is refused. (With several chunks they are held to
    the oracles through tests/test_triton_scan.py.)"""
    from dla.ops.readout.masked_triton import intra_chunk_backward, intra_chunk_forward

    case = Case(length=29, levels=4, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _ = setup(case, False)
    q, k, v, lam, g, _, ls, S0f, scale, _ = triton_args(case, t, level_start, S0, device)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen).to(device)
    band = 64  # a multiple of the tiles on the card (64) and in the interpreter (16), beyond T
    with poisoned_empty():
        o = intra_chunk_forward(q, k, v, lam, g, ls, scale, band)
        dq, dk, dv, dlam, dG = intra_chunk_backward(do, q, k, v, lam, g, ls, scale, band)
        ref_o, _ = masked_forward(q, k, v, lam, g, None, ls, S0f, scale, 64)
        ref = masked_backward(do, None, q, k, v, lam, g, None, ls, S0f, scale, 64)
    assert relative_error(o.cpu(), ref_o.cpu()) <= TOL32
    dg = dG.flip(1).cumsum(1).flip(1)
    for got, want in zip((dq, dk, dv, dlam, dg), ref[:5]):
        assert got.dtype == torch.float32 and relative_error(got.cpu(), want.cpu()) <= TOL32
    with pytest.raises(ValueError, match="band 24"):
        intra_chunk_forward(q, k, v, lam, g, ls, scale, 24)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_sequence_returns_the_initial_state(device):
    case = Case(length=4, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _ = setup(case, True)
    empty = {n: (x[:, :0] if x is not None else None) for n, x in t.items()}
    args = triton_args(case, empty, level_start[:, :0], S0, device)
    o, S = masked_forward(*args)
    assert o.shape == (1, 0, 2, case.dv) and torch.equal(S.cpu(), f32(S0))
    grads = masked_backward(torch.zeros(1, 0, 2, case.dv, device=device), f32(S0, device), *args)
    assert torch.equal(grads[-1].cpu(), f32(S0)) and grads[0].shape == (1, 0, 2, case.dk)


def test_rejects_beta_float64_and_unknown_precision():
    case = Case(length=3, levels=2, policy="single", transition="none", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _ = setup(case, False)
    args = list(triton_args(case, t, level_start, S0))
    with_beta = list(args)
    with_beta[5] = torch.full((1, 3, 2), 0.5)
    with pytest.raises(NotImplementedError, match="scan_triton"):
        masked_forward(*with_beta)
    with pytest.raises(NotImplementedError, match="scan_triton"):
        masked_backward(None, None, *with_beta)
    doubles = [t["q"], t["k"], t["v"], t["lam"]] + args[4:]
    with pytest.raises(TypeError, match="float64"):
        masked_forward(*doubles)
    with pytest.raises(ValueError, match="input_precision"):
        masked_forward(*args, input_precision="fp32")


@pytest.mark.parametrize("device", DEVICES)
def test_tf32_dots_stay_within_the_tf32_tolerance(device):
    """SPEC §6: ≤ 1e-3 with TF32 dots (under the interpreter they are float32)."""
    case = Case(length=20, levels=4, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, state, level_start, S0, _ = setup(case, True)
    o, S = cpu(masked_forward(*triton_args(case, t, level_start, S0, device), input_precision="tf32"))
    o_ref, S_ref = reference(case, t, state)
    assert relative_error(o, o_ref) <= 1e-3 and relative_error(S, S_ref) <= 1e-3


# --------------------------------------------------------------------------------------------
# The kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

COMPILE = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dla.ops.readout.masked_triton as R

R.interpreting = lambda x: False  # the GPU's launch configurations, from CPU tensors
dtype, D, L, has_g = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
z = torch.zeros(1, 4, 1, D, dtype=dtype)
lam = torch.zeros(1, 4, 1, L, dtype=dtype)
x = R._Prepared(z, z, z, lam, torch.zeros(1, 4, 1) if has_g else None, torch.zeros(1, 4, 1, L, dtype=torch.int32),
                torch.zeros(1, 1, L, D, D), None)
ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
inputs = {"Q", "K", "V", "LAM", "DO", "O", "DQ", "DLAM", "DK_", "DV_"}
kernels = {"fwd": R._fwd_kernel, "dq": R._bwd_dq_kernel, "dkv": R._bwd_dkv_kernel, "fwd_initial": R._fwd_initial_kernel,
           "state": R._state_kernel, "bwd_initial": R._bwd_initial_kernel, "bwd_final": R._bwd_final_kernel,
           "ds0": R._bwd_ds0_kernel}
for name, fn in kernels.items():
    quadratic = name in ("fwd", "dq", "dkv")  # each also in the scan's diagonal-block mode (BAND = 64)
    for extra, band in ([(False, 0), (True, 0), (False, 64), (True, 64)] if quadratic else [(None, None)]):
        meta = x.meta(name)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
        if extra is not None:
            meta["EXTRA"], meta["BAND"] = extra, band
        sig = {p.name: "constexpr" if p.is_constexpr else "fp32" if p.name == "scale" else "i32" if p.name in ("T", "H")
               else ptr if p.name in inputs else "*i32" if p.name == "CM" else "*fp32" for p in fn.params}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta), target=GPUTarget("cuda", 90, 32),
                       options=options)
        print(name, extra, band, "compiled", flush=True)
"""


@pytest.mark.parametrize("dtype,D,L,has_g", [("bfloat16", 128, 32, 1), ("float32", 32, 6, 0)])
def test_kernels_compile_for_sm90(dtype, D, L, has_g):
    """Every kernel, with the launchers' meta-parameters, through Triton's GPU compiler and
    ptxas for the H100 (the interpreter accepts code that the compiler refuses)."""
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel ships no ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", COMPILE, dtype, str(D), str(L), str(has_g)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 17


# --------------------------------------------------------------------------------------------
# Synthetic level maps (long sequences), checked on the CPU against the dense maps
# --------------------------------------------------------------------------------------------


def fenwick_map(B: int, T: int, H: int, K: int, device="cpu") -> torch.Tensor:
    """Closed-form fenwick map from position 0: level r ≥ 1 holds the s with bitlen(t ⊕ s) = r,
    i.e. [(t ≫ r) ≪ r, …) when bit r − 1 of t is set."""
    t = torch.arange(T, device=device)[:, None]
    r = torch.arange(K, device=device)[None, :]
    rm1 = (r - 1).clamp(min=0)
    start = torch.where(r == 0, t, torch.where(((t >> rm1) & 1) == 1, (t >> r) << r, EMPTY))
    return start.to(torch.int32)[None, :, None, :].expand(B, T, H, K).contiguous()


def single_map(B: int, T: int, H: int, K: int, initial: bool, device="cpu") -> torch.Tensor:
    start = torch.full((B, T, H, K), EMPTY, dtype=torch.int32, device=device)
    start[..., 0] = -1 if initial else 0
    return start


def dla_map(B: int, T: int, H: int, K: int, m0: int, p_boundary: float, seed: int) -> torch.Tensor:
    """A random `dla`-like map: a boundary opens a slot with probability `p_boundary` (always on
    an empty cache), a full cache first merges a random adjacent pair; `m0` initial slots."""
    gen = torch.Generator().manual_seed(seed)
    N = B * H
    idx = torch.arange(K)
    starts = torch.where(idx < m0, -1 - idx, EMPTY).expand(N, K).clone()  # rank order
    m = torch.full((N,), m0)
    rows = torch.empty(T, N, K, dtype=torch.int64)
    for t in range(T):
        boundary = (torch.rand(N, generator=gen) < p_boundary) | (m == 0)
        full = boundary & (m == K)
        j = (torch.rand(N, generator=gen) * (K - 1)).long()  # merge ranks j (newer) and j + 1
        merged = torch.where(idx < j[:, None], starts, torch.cat([starts[:, 1:], starts[:, -1:]], 1))
        starts = torch.where(full[:, None], merged, starts)
        shifted = torch.cat([torch.full((N, 1), t), starts[:, :-1]], 1)
        starts = torch.where(boundary[:, None], shifted, starts)
        m = m + boundary.long() - full.long()
        rows[t] = starts
    return rows.view(T, B, H, K).permute(1, 0, 2, 3).to(torch.int32).contiguous()


def test_synthetic_maps_are_consistent():
    """fenwick's closed form equals segment_naive's; the random dla map keeps SPEC §2's cache
    invariants (at most K slots, contiguous chronological segments that only merge)."""
    from dla.ops.levels import dense_level_map

    T, K = 23, 6
    k = torch.randn(1, T, 1, 2, dtype=torch.float64)
    seg = segment_naive(k, k, levels=K, policy="fenwick")
    encoded = encode_level_map(seg.level, seg.initial_level, torch.zeros(1, 1, dtype=torch.long))
    assert torch.equal(fenwick_map(1, T, 1, K), encoded)
    m0 = 2
    ls = dla_map(2, 40, 1, 4, m0, 0.3, seed=1)
    level, initial = dense_level_map(ls, torch.full((2, 1), m0))
    for t in range(40):
        lv = torch.cat([initial[:, :, t, :m0], level[:, :, t, : t + 1]], -1)  # chronological
        assert (lv >= 0).all() and (lv.amax(-1) < 4).all()
        assert (lv[..., 1:] <= lv[..., :-1]).all() and (lv[..., -1] == 0).all()
        if t + 1 < 40:
            nxt = torch.cat([initial[:, :, t + 1, :m0], level[:, :, t + 1, : t + 1]], -1)
            same = lv[..., :, None] == lv[..., None, :]
            assert (same <= (nxt[..., :, None] == nxt[..., None, :])).all()


# --------------------------------------------------------------------------------------------
# GPU: long sequences against the chunked torch path in float64 on the device
# --------------------------------------------------------------------------------------------

GPU_CASES = [  # (policy, T, Dk, Dv, K, has_g, initial)
    ("dla", 1000, 64, 64, 8, True, True),
    ("dla", 4096, 128, 128, 16, True, False),
    ("dla", 16384, 128, 128, 32, True, True),
    ("dla", 4096, 64, 128, 32, False, True),
    ("fenwick", 4096, 128, 128, 16, True, False),
    ("fenwick", 16384, 64, 64, 16, False, False),
    ("single", 2048, 128, 128, 8, True, True),
    ("single", 16384, 128, 128, 8, True, False),
]


def gpu_inputs(policy, T, Dk, Dv, K, has_g, initial, B=1, H=2, seed=0, with_beta=False, dev="cuda"):
    """float64 inputs of the GPU grids (this file's and tests/test_triton_scan.py's, which also
    draws β), the synthetic level map and S0, on `dev`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    lam = torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) + 0.1
    g = -0.5 * torch.rand(B, T, H, generator=gen, dtype=torch.float64) if has_g else None
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05 if with_beta else None
    m0 = min(3, K) if initial and policy == "dla" else int(initial)
    if policy == "dla":
        ls = dla_map(B, T, H, K, m0, 1 / 16, seed)
    elif policy == "fenwick":
        ls = fenwick_map(B, T, H, K)
    else:
        ls = single_map(B, T, H, K, initial)
    S0 = torch.randn(B, H, K, Dk, Dv, generator=gen, dtype=torch.float64) * (torch.arange(K) < m0)[:, None, None]
    t = dict(q=q, k=k, v=v, lam=lam, g=g, **({"beta": beta} if with_beta else {}))
    return {n: (x.to(dev) if x is not None else None) for n, x in t.items()}, ls.to(dev), S0.to(dev)


def cast(t: dict, dtype):
    """q, k, v, λ in `dtype`, g in float32 (as gates usually are)."""
    return {n: None if x is None else x.float() if n == "g" else x.to(dtype) for n, x in t.items()}


def assert_matches_chunked_float64(forward_triton, backward_triton, x: dict, do_x, dS, ls, S0, scale):
    """A Triton readout's forward and backward against the torch chunked path in float64 on the
    same (rounded) inputs `x` (q, k, v, λ, g, β; g/β may be None): float32 within TOL32; 16-bit
    inputs within 2e-2 and at most twice the error of the torch chunked path on the same inputs
    (SPEC §6), whose outputs are rounded to the inputs' dtype like ours."""
    from dla.ops.readout.chunked import chunked_backward as readout_backward
    from dla.ops.readout.chunked import chunked_forward as readout_forward

    x = {"beta": None, **x}
    x64 = {n: (v.double() if v is not None else None) for n, v in x.items()}
    ref_args = (x64["q"], x64["k"], x64["v"], x64["lam"], x64["g"], x64["beta"], ls, S0)
    o_ref, S_ref = readout_forward(*ref_args, scale, 64)
    grads_ref = readout_backward(do_x.double(), dS, *ref_args, scale, 64)
    args = (x["q"], x["k"], x["v"], x["lam"], x["g"], x["beta"], ls, S0.float(), scale, 64)
    with poisoned_empty():
        o, S = forward_triton(*args)
        grads = backward_triton(do_x, dS.float(), *args)
    names = ("dq", "dk", "dv", "dlam", "dg", "dbeta", "dS0")
    absent = {n for n, gate in (("dg", "g"), ("dbeta", "beta")) if x[gate] is None}
    outs = dict(o=(o, o_ref), S=(S, S_ref))
    outs.update({n: (a, b) for n, a, b in zip(names, grads, grads_ref) if n not in absent})
    if x["q"].dtype == torch.float32:
        for name, (a, b) in outs.items():
            assert torch.isfinite(a).all(), name
            assert relative_error(a, b) <= TOL32, (name, relative_error(a, b))
        return
    o_t, S_t = readout_forward(*args)
    grads_t = readout_backward(do_x, dS.float(), *args)
    torch_outs = dict(o=o_t, S=S_t, **dict(zip(names, grads_t)))
    for name, (a, b) in outs.items():
        assert torch.isfinite(a).all(), name
        err, err_torch = relative_error(a, b), relative_error(torch_outs[name], b)
        assert err <= 2e-2, (name, err)
        if a.dtype == torch.bfloat16:  # float32 outputs (S, dg, dβ, dS0) are held to 2e-2 only
            assert err <= 2 * err_torch, (name, err, err_torch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy,T,Dk,Dv,K,has_g,initial", GPU_CASES)
def test_gpu_matches_chunked_float64(policy, T, Dk, Dv, K, has_g, initial, dtype):
    t, ls, S0 = gpu_inputs(policy, T, Dk, Dv, K, has_g, initial)
    scale = Dk**-0.5
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(1, T, 2, Dv, generator=gen, dtype=torch.float64).cuda()
    dS = torch.randn(S0.shape, generator=gen, dtype=torch.float64).cuda()
    # inputs rounded to the tested dtype, so the float64 reference sees exactly what the kernel sees
    x = cast(t, dtype)
    assert_matches_chunked_float64(masked_forward, masked_backward, x, do.to(dtype), dS, ls, S0,
                                   scale)
