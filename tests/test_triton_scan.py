"""The Triton chunked-scan readout (`dla.ops.readout.scan_triton`: transitions with β, with and
without g) against the oracles.

On the CPU the kernels run through the Triton interpreter (tiny shapes, float32,
`input_precision="ieee"`, chunk 16 so that sequences span several chunks and the backward's
checkpoint segments): output and final slot states against the materialized masked form in
float64; every gradient (`dq, dk, dv, dλ, dg, dβ, dS0`) against the CPU op's chunked backward in
float64 on drawn cases (it is held to autograd of the materialized form by tests/test_readout.py,
and is ~100× faster than that autograd) and against the autograd itself on fixed small cases.
Both sides get the same level map (as in `tests/test_triton_readout.py`, whose helpers this file
shares through `tests/readout_helpers.py`). Outputs are allocated by `torch.empty`, which the tests
poison with NaN. `dla.testing.triton_interpreter()` routes the op's CPU tensors to the Triton
launchers, so `opcheck` and a `fullgraph=True` compile of forward and backward cover that path in
CI.

On a GPU machine (`pytest -m gpu`) the small fixed tests also run on CUDA (the drawn ones stay on
the interpreter: each new shape recompiles the kernels on the card), and a fixed grid of long
sequences and production head sizes — every scan configuration the launcher picks (`Dv` tile
16 and 32, 4 and 8 warps, ieee / tf32 / tf32x3 dots; `Dk ≤ 128`) — is compared against
the chunked torch path (`dla.ops.readout`) in float64 on the device, in float32 and bfloat16
(SPEC §6: bf16 ≤ 2e-2 and at most twice the torch path's own bf16 error). A compile test pushes
both scan kernels through Triton's GPU compiler and ptxas for sm_90 on any machine.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dla.ops.readout.scan_triton import scan_backward, scan_forward
from dla.testing import triton_interpreter
from tests.readout_helpers import (
    DEVICES, TOL32, assert_matches_float64, cast, cotangents, cpu, f32, gpu_inputs, reference, setup,
    triton_args,
)
from tests.strategies import (
    Case, claims_decisions, kernel_cases, map_decisions, poisoned_empty, relative_error, tally_draw,
)

TRANSITIONS = ("beta", "both")

# The drawn tests run under the interpreter only: on the card every new (K, Dk, Dv) recompiles
# both scan kernels (seconds each), and the GPU budget goes to the fixed grid at the end.
INTERPRETER = [DEVICES[0]]
GRADS = ("q", "k", "v", "lam", "g", "beta")
EDGE = dict(batch=1, heads=2, dk=16, dv=16, score="token", inputs="piecewise", mean_regime=4.0, seed=7)


def cases(max_length=40):
    """`dla` maps that reach capacity merges (`tests.strategies.kernel_cases`) in most draws."""
    return kernel_cases(max_length, transitions=TRANSITIONS)


# --------------------------------------------------------------------------------------------
# Against the materialized form: tiny shapes, float32, ieee dots (the interpreter's chunk is 16)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", INTERPRETER)
@claims_decisions()
@settings(max_examples=3, derandomize=True)  # a handful of interpreter draws: the same ones on every run
@given(cases(max_length=34), st.booleans())
@example(Case(length=1, levels=2, policy="dla", transition="both", tau=0.6, **EDGE), True)  # T = 1
@example(Case(length=27, levels=4, policy="dla", transition="beta", tau=0.6, **EDGE), True)  # T % C ≠ 0, no g
@example(Case(length=33, levels=6, policy="fenwick", transition="both", tau=0.6, **EDGE), False)
@example(Case(length=19, levels=3, policy="single", transition="both", tau=0.6, **EDGE), True)
@example(Case(length=20, levels=20, policy="dla", transition="both", tau=0.0, **EDGE), False)  # every token a slot
@example(Case(length=30, levels=2, policy="dla", transition="beta", tau=0.0, **EDGE), True)  # full from the start
def test_forward_matches_materialized(device, case: Case, initial: bool):
    case, t, state, level_start, S0, _, _ = setup(case, initial)
    tally_draw(case.policy, map_decisions(level_start, None if state is None else state.m))
    with poisoned_empty():
        o, S = cpu(scan_forward(*triton_args(case, t, level_start, S0, device)))
    o_ref, S_ref = reference(case, t, state)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert relative_error(o, o_ref) <= TOL32
    assert relative_error(S, S_ref) <= TOL32


def chunked_grads(case: Case, t: dict, level_start, S0, do, dS) -> dict:
    """Gradients by the CPU op's kernel (`dla.ops.readout.readout_backward`, float64), which
    tests/test_readout.py holds to autograd of the materialized form; it is two orders of
    magnitude faster than that autograd, which keeps the drawn tests within CI's budget."""
    from dla.ops.readout.chunked import chunked_backward as readout_backward

    out = readout_backward(do, dS, t["q"], t["k"], t["v"], t["lam"], t["g"], t["beta"], level_start, S0,
                           case.dk**-0.5, 5)
    return dict(zip(GRADS + ("S0",), out))


def check_grads(got: dict, ref: dict, has_g: bool):
    for name in GRADS + ("S0",):
        if name == "g" and not has_g:
            assert torch.equal(got["g"], torch.zeros_like(got["g"]))
            continue
        assert got[name].dtype == torch.float32 and got[name].shape == ref[name].shape, name
        assert torch.isfinite(got[name]).all(), name
        assert relative_error(got[name], ref[name]) <= TOL32, (name, relative_error(got[name], ref[name]))


def triton_grads(case, t, level_start, S0, do, dS, device):
    with poisoned_empty():
        args = triton_args(case, t, level_start, S0, device)
        grads = scan_backward(f32(do, device), f32(dS, device), *args)
    return dict(zip(GRADS + ("S0",), cpu(grads)))


@pytest.mark.parametrize("device", INTERPRETER)
@claims_decisions()
@settings(max_examples=4, derandomize=True)
@given(cases(max_length=36), st.booleans())
@example(Case(length=1, levels=2, policy="single", transition="beta", tau=0.6, **EDGE), True)
@example(Case(length=70, levels=3, policy="dla", transition="both", tau=0.6, **EDGE), True)  # 5 chunks, 3 segments
@example(Case(length=21, levels=6, policy="fenwick", transition="beta", tau=0.6, **EDGE), True)
@example(Case(length=18, levels=18, policy="dla", transition="both", tau=0.0, **EDGE), False)
@example(Case(length=29, levels=4, policy="dla", transition="both", tau=10.0, **EDGE), True)  # all merged
@example(Case(length=40, levels=2, policy="dla", transition="beta", tau=0.0, **EDGE), True)  # capacity merges
def test_backward_matches_chunked_float64(device, case: Case, initial: bool):
    case, t, state, level_start, S0, _, _ = setup(case, initial)
    tally_draw(case.policy, map_decisions(level_start, None if state is None else state.m))
    do, dS = cotangents(case, S0)
    got = triton_grads(case, t, level_start, S0, do, dS, device)
    check_grads(got, chunked_grads(case, t, level_start, S0, do, dS), t["g"] is not None)
    if not initial:  # no position of the map is an initial slot: dS0 is the zero carry
        assert torch.equal(got["S0"], torch.zeros_like(got["S0"]))


@pytest.mark.parametrize("device", INTERPRETER)
@pytest.mark.parametrize("case", [
    Case(length=13, levels=3, policy="dla", transition="both", tau=0.6, **EDGE),
    Case(length=17, levels=5, policy="fenwick", transition="beta", tau=0.6, **EDGE),
], ids=["dla-both", "fenwick-beta"])
def test_backward_matches_materialized_autograd(device, case: Case):
    """The oracle itself (autograd of the materialized form) on a few small cases."""
    case, t, state, level_start, S0, live, _ = setup(case, True)
    do, dS = cotangents(case, S0)
    got = triton_grads(case, t, level_start, S0, do, dS, device)
    ref = reference(case, t, state, grads=(do, dS))
    for name in GRADS:
        if name in ref:
            assert relative_error(got[name], ref[name]) <= TOL32, name
    mask = live[..., None, None]  # live non-empty initial slots (see test_triton_readout)
    assert relative_error(torch.where(mask, got["S0"], 0.0), torch.where(mask, ref["S0"], 0.0)) <= TOL32


@pytest.mark.parametrize("device", INTERPRETER)
def test_backward_in_head_groups(device, monkeypatch):
    """The backward scan launched for a few heads at a time (scratch reused between launches, as
    on the card when B·H is large) gives the same gradients."""
    import dla.ops.readout.scan_triton as D

    monkeypatch.setattr(D, "_heads_per_launch", lambda N, nv, dev: 3)  # 4 heads: launches of 3 and 1
    case = Case(length=40, levels=4, policy="dla", transition="both", tau=0.6, **{**EDGE, "batch": 2})
    case, t, _, level_start, S0, _, _ = setup(case, True)
    do, dS = cotangents(case, S0)
    got = triton_grads(case, t, level_start, S0, do, dS, device)
    check_grads(got, chunked_grads(case, t, level_start, S0, do, dS), True)


@pytest.mark.parametrize("device", DEVICES)
def test_missing_cotangents_and_empty_sequence(device):
    """`do`/`dS` may be None (zero); T = 0 returns the initial state and its cotangent."""
    case = Case(length=19, levels=3, policy="dla", transition="both", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _, _ = setup(case, True)
    args = triton_args(case, t, level_start, S0, device)
    B, T, H, Dv = case.batch, case.length, case.heads, case.dv
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, Dv, generator=gen).to(device)
    dS = torch.randn(S0.shape, generator=gen).to(device)
    both = scan_backward(do, dS, *args)
    no_do = scan_backward(None, dS, *args)
    no_dS = scan_backward(do, None, *args)
    for a, b, c in zip(both, no_do, no_dS):
        assert relative_error((b + c).cpu(), a.cpu()) <= TOL32
    zero = scan_backward(None, None, *args)
    assert all(torch.equal(x, torch.zeros_like(x)) for x in zero)
    empty = {n: (x[:, :0] if x is not None else None) for n, x in t.items()}
    eargs = triton_args(case, empty, level_start[:, :0], S0, device)
    o, S = scan_forward(*eargs)
    assert o.shape == (B, 0, H, Dv) and torch.equal(S.cpu(), f32(S0))
    grads = scan_backward(torch.zeros(B, 0, H, Dv, device=device), f32(S0, device), *eargs)
    assert torch.equal(grads[-1].cpu(), f32(S0)) and grads[0].shape == (B, 0, H, case.dk)


def test_rejects_no_beta_float64_unknown_precision_and_wide_keys():
    case = Case(length=3, levels=2, policy="single", transition="beta", tau=0.6, **EDGE)
    case, t, _, level_start, S0, _, _ = setup(case, False)
    args = list(triton_args(case, t, level_start, S0))
    without_beta = list(args)
    without_beta[5] = None
    with pytest.raises(ValueError, match="beta is required"):
        scan_forward(*without_beta)
    doubles = [t["q"], t["k"], t["v"], t["lam"]] + args[4:]
    with pytest.raises(TypeError, match="float64"):
        scan_forward(*doubles)
    with pytest.raises(ValueError, match="input_precision"):
        scan_backward(None, None, *args, input_precision="fp32")
    wide = torch.zeros(1, 3, 2, 256)
    with pytest.raises(ValueError, match="Dk"):
        scan_forward(wide, wide, *args[2:])


# --------------------------------------------------------------------------------------------
# The registered ops with the Triton kernels on CPU tensors: opcheck, autograd, fullgraph compile
# --------------------------------------------------------------------------------------------


def test_registered_op_opcheck_and_fullgraph_compile():
    """`dla::readout` with its Triton kernels on CPU tensors (`dla.testing.triton_interpreter()`):
    opcheck, and the compiled loss's gradients against the chunked float64 path; with β the
    stage's rule takes the scan."""
    ops = torch.ops.dla
    case = Case(length=18, levels=3, policy="dla", transition="both", tau=0.6, **EDGE)
    case, t, state, level_start, S0, _, _ = setup(case, True)
    q, k, v, lam, g, beta, ls, S0f, scale, C = triton_args(case, t, level_start, S0)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, lam, g, beta, S0f)]
    do = torch.randn(case.batch, case.length, case.heads, case.dv)
    dS = torch.randn(S0f.shape)
    with triton_interpreter():
        torch.library.opcheck(ops.readout.default, (*leaves[:6], ls, leaves[6], scale, C),
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.library.opcheck(ops.readout_backward.default, (do, dS, q, k, v, lam, g, beta, ls, S0f, scale, C),
                              test_utils=("test_schema", "test_faketensor"))

    def loss(q, k, v, lam, g, beta, S0):
        o, S = ops.readout(q, k, v, lam, g, beta, ls, S0, scale, C)
        return (o * do).sum() + (S * dS).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    names = [n for n, x in zip(GRADS + ("S0",), leaves) if x is not None]
    with triton_interpreter():
        value = compiled(*leaves)
        got = torch.autograd.grad(value, [x for x in leaves if x is not None])
    ref = chunked_grads(case, t, level_start, S0, do.double(), dS.double())
    for name, x in zip(names, got):
        assert relative_error(x, ref[name]) <= TOL32, name
    o_ref, S_ref = reference(case, t, state)
    assert abs(float(value.detach()) - float((o_ref * do.double()).sum() + (S_ref * dS.double()).sum())) <= 1e-4 * (
        1 + abs(float(value.detach())))


# --------------------------------------------------------------------------------------------
# The kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

COMPILE = r"""
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import dla.ops.readout.scan_triton as R

for spec in sys.argv[1:]:
    D, K, N, dtype, has_g = spec.split(":")
    meta, _ = R._meta(int(D), int(D), int(K), int(N), getattr(torch, dtype), None, has_g == "g")
    options = dict(num_warps=meta.pop("num_warps"), num_stages=meta.pop("num_stages"))
    for fn in (R._fwd_scan_kernel, R._bwd_scan_kernel):
        sig = {a.name: "constexpr" if a.is_constexpr else "i32" if a.name in ("NC", "R")
               else "*i32" if a.name in ("EOLD", "ETOK") else "*fp32" for a in fn.params}
        triton.compile(ASTSource(fn=fn, signature=sig, constexprs=meta), target=GPUTarget("cuda", 90, 32),
                       options=options)
        print(spec, fn.__name__, "compiled", flush=True)
"""


def test_kernels_compile_for_sm90():
    """Both scan kernels with the launcher's meta-parameters for the benchmark's shapes (8 warps,
    Dv tile 16, tf32 and tf32x3 dots) through Triton's GPU compiler and ptxas (the interpreter
    accepts code that the compiler refuses). The GPU grid runs every configuration on the card."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton wheel ships no ptxas")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    # the ieee variant differs by the dots' flag only (and compiles slowly); with and without g
    # the recursions take tf32 or tf32x3
    specs = ["128:32:16:bfloat16:g", "128:32:16:bfloat16:none"]
    done = subprocess.run([sys.executable, "-c", COMPILE, *specs], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("compiled") == 2 * len(specs)


# --------------------------------------------------------------------------------------------
# GPU: long sequences against the chunked torch path in float64 on the device
# --------------------------------------------------------------------------------------------

GPU_CASES = [  # (policy, B, H, T, Dk, Dv, K, has_g, initial, dtype): every scan configuration the
    # launcher ships — 4 / 8 warps (Dk < 128 / = 128) × Dv tile 16 / 32 (N·Dv/32 < / ≥ 128) × ieee
    # (float32) / tf32, recursions tf32x3 without g and tf32 with g (16-bit) — with few distinct
    # (K, Dk, Dv): each is a compile
    ("dla", 1, 2, 2048, 64, 128, 16, False, True, "fp32"),  # 4 warps, tile 16, ieee; no decay
    ("single", 1, 2, 2048, 128, 128, 16, True, True, "fp32"),  # 8 warps, tile 16, ieee
    ("dla", 8, 16, 200, 128, 128, 16, False, False, "fp32"),  # 8 warps, tile 32, ieee
    ("fenwick", 8, 16, 256, 64, 64, 16, True, False, "fp32"),  # 4 warps, tile 32, ieee
    ("dla", 1, 2, 16384, 128, 128, 32, True, True, "bf16"),  # 8 warps, tile 16, tf32; long, K = 32
    ("fenwick", 1, 2, 16384, 128, 256, 16, False, False, "bf16"),  # long, Dv = 256 (paper preset), no decay
    ("dla", 1, 2, 4096, 128, 256, 16, True, False, "bf16"),
    ("dla", 8, 16, 256, 128, 128, 16, True, True, "bf16"),  # 8 warps, tile 32
    ("single", 1, 2, 3000, 64, 64, 16, False, False, "bf16"),  # 4 warps, tile 16; no decay: rounding compounds
    ("dla", 8, 16, 256, 64, 64, 8, True, True, "bf16"),  # 4 warps, tile 32, K = 8
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy,B,H,T,Dk,Dv,K,has_g,initial,dtype", GPU_CASES)
def test_gpu_matches_chunked_float64(policy, B, H, T, Dk, Dv, K, has_g, initial, dtype):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    t, ls, S0 = gpu_inputs(policy, T, Dk, Dv, K, has_g, initial, B=B, H=H, with_beta=True)
    scale = Dk**-0.5
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64).cuda()
    dS = torch.randn(S0.shape, generator=gen, dtype=torch.float64).cuda()
    x = cast(t, dtype)  # q, k, v, λ in dtype; g, β in float32 (as gates usually are)
    assert_matches_float64(lambda *a: scan_forward(*a, scale, 64), lambda do, dS, *a: scan_backward(do, dS, *a, scale, 64),
                           x, do.to(dtype), dS, ls, S0, scale)
