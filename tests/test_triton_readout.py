"""The dense path of the Triton readout without β (`dla.ops.readout.masked_triton`: the masked
quadratic kernels, which take the heads whose object plan is too dense or overflows the pool, and
calls of one chunk) against the oracles.

On the CPU the kernels run through the Triton interpreter (tiny shapes, float32,
`input_precision="ieee"`) against the materialized masked form in float64: forward output and
final slot states, and every gradient (`dq, dk, dv, dλ, dg, dS0`) against autograd of the
reference. Both sides get the same level map (`segment_naive` decides, `encode_level_map`
encodes; the reference re-derives the identical map from the same float64 `k, v`), so no
decision margin is involved. Outputs are allocated by `torch.empty`; the tests poison it with
NaN so that an element a kernel forgets to write shows.

On a GPU machine (`pytest -m gpu`) the same tests run on CUDA tensors, and further ones with long
sequences and production head sizes compare against the torch object path (`dla.ops.readout.objects`)
in float64 on the device, on synthetic level maps (a random merge process for `dla`, the closed
forms for `fenwick` and `single`), in float32 and bfloat16. A compile test pushes every kernel
through Triton's GPU compiler and ptxas for sm_90 on any machine.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dla.ops.levels import encode_level_map
from dla.ops.readout.masked_triton import masked_backward, masked_forward
from dla.ops.reference import segment_naive
from tests.readout_helpers import (
    DEVICES, TOL32, assert_matches_float64, cast, cotangents, cpu, dla_map, f32, fenwick_map, gpu_inputs,
    reference, setup, triton_args,
)
from tests.sm90 import compile_script
from tests.strategies import (
    Case, claims_decisions, kernel_cases, map_decisions, poisoned_empty, relative_error, tally_draw,
)

EDGE = dict(batch=1, heads=2, dk=16, dv=32, score="token", inputs="piecewise", mean_regime=4.0, seed=5)


def cases(max_length=40):
    """`dla` maps that reach capacity merges (`tests.strategies.kernel_cases`) in most draws."""
    return kernel_cases(max_length)


def assert_forward_matches_materialized(forward, case: Case, initial: bool, device):
    """`forward` (a launcher) on NaN-poisoned fresh memory against the materialized form, float32."""
    case, t, state, level_start, S0, _, _ = setup(case, initial)
    tally_draw(case.policy, map_decisions(level_start, None if state is None else state.m))
    with poisoned_empty():
        o, S = cpu(forward(*triton_args(case, t, level_start, S0, device)))
    o_ref, S_ref = reference(case, t, state)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert relative_error(o, o_ref) <= TOL32
    assert relative_error(S, S_ref) <= TOL32


# --------------------------------------------------------------------------------------------
# Against the materialized form: tiny shapes, float32, ieee dots
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@claims_decisions()
@settings(max_examples=3, derandomize=True)  # a handful of interpreter draws: the same ones on every run
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
@claims_decisions()
@settings(max_examples=3, derandomize=True)
@given(cases(max_length=36), st.booleans())
@example(Case(length=1, levels=2, policy="single", transition="g", tau=0.6, **EDGE), True)
@example(Case(length=35, levels=3, policy="dla", transition="g", tau=0.6, **EDGE), True)
@example(Case(length=21, levels=6, policy="fenwick", transition="g", tau=0.6, **EDGE), True)
@example(Case(length=18, levels=18, policy="dla", transition="none", tau=0.0, **EDGE), False)
def test_backward_matches_materialized(device, case: Case, initial: bool):
    case, t, state, level_start, S0, live, _ = setup(case, initial)
    tally_draw(case.policy, map_decisions(level_start, None if state is None else state.m))
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
    case, t, state, level_start, S0, live, _ = setup(case, True)
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
    case, t, _, level_start, S0, _, _ = setup(case, True)
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
def test_empty_sequence_returns_the_initial_state(device):
    case = Case(length=4, levels=3, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _, _ = setup(case, True)
    empty = {n: (x[:, :0] if x is not None else None) for n, x in t.items()}
    args = triton_args(case, empty, level_start[:, :0], S0, device)
    o, S = masked_forward(*args)
    assert o.shape == (1, 0, 2, case.dv) and torch.equal(S.cpu(), f32(S0))
    grads = masked_backward(torch.zeros(1, 0, 2, case.dv, device=device), f32(S0, device), *args)
    assert torch.equal(grads[-1].cpu(), f32(S0)) and grads[0].shape == (1, 0, 2, case.dk)


def test_rejects_beta_float64_and_unknown_precision():
    case = Case(length=3, levels=2, policy="single", transition="none", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _, _ = setup(case, False)
    args = list(triton_args(case, t, level_start, S0))
    with_beta = list(args)
    with_beta[5] = torch.full((1, 3, 2), 0.5)
    with pytest.raises(NotImplementedError, match="objects_delta_triton"):
        masked_forward(*with_beta)
    with pytest.raises(NotImplementedError, match="objects_delta_triton"):
        masked_backward(None, None, *with_beta)
    doubles = [t["q"], t["k"], t["v"], t["lam"]] + args[4:]
    with pytest.raises(TypeError, match="float64"):
        masked_forward(*doubles)
    with pytest.raises(ValueError, match="input_precision"):
        masked_forward(*args, input_precision="fp32")


@pytest.mark.parametrize("device", DEVICES[1:])
def test_tf32_dots_stay_within_the_tf32_tolerance(device):
    """SPEC §6: ≤ 1e-3 with TF32 dots — on the GPU only: the interpreter computes a TF32 dot in
    float32, where the bound tests nothing that the ieee tests at 1e-5 do not."""
    case = Case(length=20, levels=4, policy="dla", transition="g", tau=0.6, **EDGE)
    case, t, state, level_start, S0, _, _ = setup(case, True)
    o, S = cpu(masked_forward(*triton_args(case, t, level_start, S0, device), input_precision="tf32"))
    o_ref, S_ref = reference(case, t, state)
    assert relative_error(o, o_ref) <= 1e-3 and relative_error(S, S_ref) <= 1e-3


# --------------------------------------------------------------------------------------------
# The kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

COMPILE = r"""
import sys, torch
from dla.testing import compile_for_sm90
import dla.ops.readout.masked_triton as R

R.interpreting = lambda x: False  # the GPU's launch configurations, from CPU tensors
dtype, D, L, has_g = getattr(torch, sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
z = torch.zeros(1, 4, 1, D, dtype=dtype)
lam = torch.zeros(1, 4, 1, L, dtype=dtype)
x = R._Prepared(z, z, z, lam, torch.zeros(1, 4, 1) if has_g else None, torch.zeros(1, 4, 1, L, dtype=torch.int32),
                torch.zeros(1, 1, L, D, D), None)
ptr = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}[dtype]
inputs = {"Q", "K", "V", "LAM", "DO", "O", "DQ", "DLAM", "DK_", "DV_"}
ints = {"CM", "MODE"}
kernels = {"fwd": R._fwd_kernel, "dq": R._bwd_dq_kernel, "dkv": R._bwd_dkv_kernel, "fwd_initial": R._fwd_initial_kernel,
           "state": R._state_kernel, "bwd_initial": R._bwd_initial_kernel, "bwd_final": R._bwd_final_kernel,
           "ds0": R._bwd_ds0_kernel}
for name, fn in kernels.items():
    quadratic = name in ("fwd", "dq", "dkv")
    for extra in ([False, True] if quadratic else [None]):
        meta = x.meta(name)
        options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
        if extra is not None:
            meta["EXTRA"] = extra
        compile_for_sm90(fn, lambda a: "fp32" if a == "scale" else "i32" if a in ("T", "H") else ptr if a in inputs
                         else "*i32" if a in ints else "*fp32", meta, **options)
        print(name, extra, "compiled", flush=True)
"""


@pytest.mark.parametrize("dtype,D,L,has_g", [
    ("bfloat16", 128, 32, 1),  # the benchmark's configuration
    pytest.param("float32", 32, 6, 0, marks=pytest.mark.slow),
])
def test_kernels_compile_for_sm90(dtype, D, L, has_g):
    """Every kernel, with the launchers' meta-parameters, through Triton's GPU compiler and
    ptxas for the H100 (the interpreter accepts code that the compiler refuses)."""
    assert compile_script(COMPILE, dtype, str(D), str(L), str(has_g), timeout=600).count("compiled") == 11


# --------------------------------------------------------------------------------------------
# Synthetic level maps (long sequences), checked on the CPU against the dense maps
# --------------------------------------------------------------------------------------------


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
# GPU: long sequences against the torch object path in float64 on the device
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
    assert_matches_float64(lambda *a: masked_forward(*a, scale, 64), lambda do, dS, *a: masked_backward(do, dS, *a, scale, 64),
                           x, do.to(dtype), dS, ls, S0, scale)
