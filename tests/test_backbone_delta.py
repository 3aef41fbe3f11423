"""The chunked gated delta rule with λ0 and resets: the torch kernel (`dla.ops.backbone.delta`)
and the Triton stages (`dla.ops.backbone.delta_triton`) against the token-by-token reference
`backbone_recurrent` (`dla.ops.backbone.naive`).

* The torch kernel in float64 against the reference and autograd through it (≤ 1e-10): drawn
  shapes, chunk sizes (T rarely a multiple), with and without g, an initial state or none, and
  resets drawn sparse, dense, at every token, at chunk starts and ends, at token 0 and at the
  last token only; gradients also by `gradcheck`. The stage pieces (`delta_chunk_states` and
  its backward) against the reference run chunk by chunk.
* The Triton kernels through the interpreter (CPU tensors, float32, IEEE dots) against the torch
  kernel in float64 (≤ 1e-5), forward and backward, on NaN-poisoned fresh memory, with resets
  and S0, chunks of 16, 32 and 64 (the solve's 1, 2 and 4 row blocks). On a GPU machine
  (`pytest -m gpu`) the same on CUDA, and a grid of long sequences against the float64 torch
  path on the card (fp32 ≤ 1e-5; bf16 ≤ 2e-2 and at most twice the torch path's own bf16
  error, SPEC §6). Every shipped launch configuration compiles for sm_90 through Triton's
  compiler and ptxas without a GPU.
* `perf/bench_delta_gpu.py --smoke` runs end to end on the CPU.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dla.ops.backbone.delta import delta_backward, delta_chunk_states, delta_chunk_states_backward, delta_forward
from dla.ops.backbone.delta_triton import (
    delta_backward_triton, delta_chunk_states_backward_triton, delta_chunk_states_triton, delta_forward_triton,
)
from dla.ops.backbone.naive import backbone_recurrent
from tests.sm90 import compile_script
from tests.strategies import poisoned_empty, relative_error

TOL64, TOL32 = 1e-10, 1e-5
RESETS = ("none", "zeros", "sparse", "dense", "all", "first", "last", "chunk_starts", "chunk_ends")
GRADS = ("q", "k", "v", "lam0", "g", "beta", "S0")


@dataclass(frozen=True)
class DeltaCase:
    batch: int
    length: int
    heads: int
    dk: int
    dv: int
    chunk_size: int
    has_g: bool
    initial: bool
    resets: str  # one of RESETS
    seed: int


def reset_mask(case: DeltaCase, gen: torch.Generator) -> torch.Tensor | None:
    B, T, H, C = case.batch, case.length, case.heads, case.chunk_size
    t = torch.arange(T)[None, :, None].expand(B, T, H)
    draw = torch.rand(B, T, H, generator=gen)
    return {
        "none": None, "zeros": torch.zeros(B, T, H, dtype=torch.bool), "sparse": draw < 0.1, "dense": draw < 0.5,
        "all": torch.ones(B, T, H, dtype=torch.bool), "first": t == 0, "last": t == T - 1,
        "chunk_starts": t % C == 0, "chunk_ends": t % C == C - 1,
    }[case.resets]


def inputs(case: DeltaCase, dtype=torch.float64) -> dict:
    """q, k (l2-normalised), v, λ0, g (≤ 0) or None, β ∈ (0.05, 0.95), reset or None, S0 or None."""
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H = case.batch, case.length, case.heads

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {
        "q": randn(B, T, H, case.dk), "k": F.normalize(randn(B, T, H, case.dk), dim=-1), "v": randn(B, T, H, case.dv),
        "lam0": randn(B, T, H),
        "g": -0.5 * torch.rand(B, T, H, generator=gen, dtype=torch.float64) if case.has_g else None,
        "beta": 0.05 + 0.9 * torch.rand(B, T, H, generator=gen, dtype=torch.float64),
        "S0": randn(B, H, case.dk, case.dv) if case.initial else None,
    }
    x = {n: (v.to(dtype) if v is not None else None) for n, v in x.items()}
    x["reset"] = reset_mask(case, gen)
    return x


def cotangents(case: DeltaCase, dtype=torch.float64):
    gen = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen, dtype=torch.float64)
    dS = torch.randn(case.batch, case.heads, case.dk, case.dv, generator=gen, dtype=torch.float64)
    return do.to(dtype), dS.to(dtype)


def args(x: dict) -> tuple:
    return tuple(x[n] for n in ("q", "k", "v", "lam0", "g", "beta", "reset", "S0"))


def reference(x: dict, scale: float, grads=None):
    """`(o, S)` of `backbone_recurrent`; with `grads = (do, dS)` also the gradients of
    ⟨o, do⟩ + ⟨S, dS⟩ by autograd, keyed like GRADS (None where the input is absent)."""
    leaves = {n: (x[n].clone().requires_grad_(grads is not None) if x[n] is not None else None) for n in GRADS}
    o, S = backbone_recurrent(leaves["q"], leaves["k"], leaves["v"], leaves["lam0"], g=leaves["g"],
                              beta=leaves["beta"], reset=x["reset"], S0=leaves["S0"], scale=scale)
    if grads is None:
        return o.detach(), S.detach()
    do, dS = grads
    present = [n for n in GRADS if leaves[n] is not None]
    out = dict(zip(present, torch.autograd.grad((o * do).sum() + (S * dS).sum(), [leaves[n] for n in present])))
    return {n: out.get(n) for n in GRADS}


@st.composite
def cases(draw, max_length=40, max_dim=6, chunk_sizes=(1, 2, 3, 4, 5, 8, 16, 64)):
    return DeltaCase(
        batch=draw(st.integers(1, 2)), length=draw(st.integers(1, max_length)), heads=draw(st.integers(1, 2)),
        dk=draw(st.integers(1, max_dim)), dv=draw(st.integers(1, max_dim)),
        chunk_size=draw(st.sampled_from(chunk_sizes)), has_g=draw(st.booleans()), initial=draw(st.booleans()),
        resets=draw(st.sampled_from(RESETS)), seed=draw(st.integers(0, 2**31 - 1)),
    )


EDGE = dict(batch=1, heads=2, dk=3, dv=2, has_g=True, initial=True, seed=11)


# --------------------------------------------------------------------------------------------
# The torch kernel against the reference, float64
# --------------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(cases())
@example(DeltaCase(length=1, chunk_size=4, resets="none", **EDGE))  # T = 1
@example(DeltaCase(length=1, chunk_size=1, resets="all", **EDGE))  # T = 1, a reset at token 0
@example(DeltaCase(length=13, chunk_size=4, resets="all", **EDGE))  # every token a reset
@example(DeltaCase(length=13, chunk_size=4, resets="zeros", **EDGE))  # a reset mask without resets
@example(DeltaCase(length=13, chunk_size=4, resets="last", **EDGE))  # the last token only
@example(DeltaCase(length=13, chunk_size=4, resets="first", **EDGE))  # token 0 only: S0 is discarded
@example(DeltaCase(length=14, chunk_size=5, resets="chunk_starts", **EDGE))
@example(DeltaCase(length=14, chunk_size=5, resets="chunk_ends", **EDGE))
@example(replace(DeltaCase(length=20, chunk_size=64, resets="sparse", **EDGE), has_g=False, initial=False))
def test_torch_kernel_matches_reference(case: DeltaCase):
    x = inputs(case)
    scale = case.dk**-0.5
    o_ref, S_ref = reference(x, scale)
    o, S = delta_forward(*args(x), scale, case.chunk_size)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    assert relative_error(o, o_ref) <= TOL64
    assert relative_error(S, S_ref) <= TOL64
    do, dS = cotangents(case)
    ref = reference(x, scale, (do, dS))
    got = dict(zip(GRADS, delta_backward(do, dS, *args(x), scale, case.chunk_size)))
    for name in GRADS:
        if x[name] is None:
            assert got[name] is None, name
            continue
        assert got[name].dtype == x[name].dtype and got[name].shape == x[name].shape, name
        assert relative_error(got[name], ref[name]) <= TOL64, (name, relative_error(got[name], ref[name]))


@settings(max_examples=10)
@given(cases(max_length=24))
@example(DeltaCase(length=13, chunk_size=4, resets="sparse", **EDGE))
@example(DeltaCase(length=9, chunk_size=4, resets="chunk_starts", **EDGE))
def test_torch_kernel_without_cotangents(case: DeltaCase):
    """`do` or `dS` None means zero."""
    x = inputs(case)
    scale = case.dk**-0.5
    do, dS = cotangents(case)
    for cot in ((None, dS), (do, None)):
        ref = reference(x, scale, tuple(c if c is not None else torch.zeros_like(z) for c, z in zip(cot, (do, dS))))
        got = dict(zip(GRADS, delta_backward(*cot, *args(x), scale, case.chunk_size)))
        for name in GRADS:
            if x[name] is not None:
                assert relative_error(got[name], ref[name]) <= TOL64, name


class _Delta(torch.autograd.Function):
    """The torch kernel's forward and explicit backward as one autograd node, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, lam0, g, beta, S0, reset, scale, chunk_size):
        ctx.save_for_backward(q, k, v, lam0, g, beta, S0)
        ctx.reset, ctx.scale, ctx.chunk_size = reset, scale, chunk_size
        return delta_forward(q, k, v, lam0, g, beta, reset, S0, scale, chunk_size)

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, lam0, g, beta, S0 = ctx.saved_tensors
        dq, dk, dv, dlam0, dg, dbeta, dS0 = delta_backward(do, dS, q, k, v, lam0, g, beta, ctx.reset, S0, ctx.scale,
                                                           ctx.chunk_size)
        return dq, dk, dv, dlam0, dg, dbeta, dS0, None, None, None


@pytest.mark.parametrize("has_g,resets,chunk_size", [
    (True, "sparse", 3), (False, "sparse", 3), (True, "all", 3), (True, "none", 4), (True, "chunk_starts", 1),
])
def test_backward_gradcheck(has_g, resets, chunk_size):
    case = DeltaCase(batch=1, length=7, heads=1, dk=3, dv=2, chunk_size=chunk_size, has_g=has_g, initial=True,
                     resets=resets, seed=5)
    x = inputs(case)
    if resets == "sparse":
        x["reset"] = torch.tensor([False, False, True, False, False, True, False])[None, :, None]
    leaves = [x[n].clone().requires_grad_() if x[n] is not None else None for n in GRADS]
    q, k, v, lam0, g, beta, S0 = leaves
    assert torch.autograd.gradcheck(
        lambda *a: _Delta.apply(*a, x["reset"], 0.7, chunk_size), (q, k, v, lam0, g, beta, S0))


def chunk_states_reference(x: dict, chunk_size: int):
    """The state before every chunk and the final state, by the reference run chunk by chunk."""
    B, T, H, _ = x["k"].shape
    S = x["S0"] if x["S0"] is not None else x["k"].new_zeros(B, H, x["k"].shape[-1], x["v"].shape[-1])
    states = []
    for c0 in range(0, T, chunk_size):
        states.append(S)
        part = slice(c0, min(c0 + chunk_size, T))
        piece = {n: (x[n][:, part] if x[n] is not None else None)
                 for n in ("q", "k", "v", "lam0", "g", "beta", "reset")}
        _, S = backbone_recurrent(piece["q"], piece["k"], piece["v"], piece["lam0"], g=piece["g"],
                                  beta=piece["beta"], reset=piece["reset"], S0=S, scale=1.0)
    return torch.stack(states, dim=2), S


@settings(max_examples=15)
@given(cases(max_length=30))
@example(DeltaCase(length=13, chunk_size=4, resets="all", **EDGE))
@example(DeltaCase(length=12, chunk_size=4, resets="chunk_ends", **EDGE))
def test_chunk_states_match_reference(case: DeltaCase):
    x = inputs(case)
    leaves = {n: (x[n].clone().requires_grad_() if x[n] is not None else None) for n in GRADS}
    h_ref, S_ref = chunk_states_reference({**x, **leaves}, case.chunk_size)
    sargs = (x["k"], x["v"], x["g"], x["beta"], x["reset"], x["S0"], case.chunk_size)
    h, S = delta_chunk_states(*sargs)
    assert h.shape == h_ref.shape
    assert relative_error(h, h_ref.detach()) <= TOL64
    assert relative_error(S, S_ref.detach()) <= TOL64
    gen = torch.Generator().manual_seed(case.seed + 2)
    dh = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S.shape, generator=gen, dtype=torch.float64)
    names = [n for n in ("k", "v", "g", "beta", "S0") if x[n] is not None]
    ref = dict(zip(names, torch.autograd.grad((h_ref * dh).sum() + (S_ref * dS).sum(), [leaves[n] for n in names],
                                              allow_unused=True)))
    got = dict(zip(("k", "v", "g", "beta", "S0"), delta_chunk_states_backward(dh, dS, *sargs)))
    for name in names:
        expected = ref[name] if ref[name] is not None else torch.zeros_like(x[name])  # S0 unused after a reset at 0
        assert relative_error(got[name], expected) <= TOL64, name


# --------------------------------------------------------------------------------------------
# The Triton kernels against the torch kernel in float64 (interpreter on the CPU; CUDA on a GPU)
# --------------------------------------------------------------------------------------------


INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETING or not torch.cuda.is_available(), reason="needs CUDA (and the interpreter off)")]),
]


def on(x: dict, device, dtype=torch.float32) -> dict:
    return {n: (v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if v is not None else None)
            for n, v in x.items()}


def assert_close_all(got: dict, ref: dict, tol: float):
    for name, expected in ref.items():
        if expected is None:
            assert got[name] is None, name
            continue
        out = got[name]
        assert out.shape == expected.shape, name
        assert torch.isfinite(out).all(), name
        err = relative_error(out.cpu(), expected.cpu())
        assert err <= tol, (name, err)


@st.composite
def triton_cases(draw, max_length=70):
    return DeltaCase(
        batch=draw(st.integers(1, 2)), length=draw(st.integers(1, max_length)), heads=draw(st.integers(1, 2)),
        dk=draw(st.sampled_from([16, 32, 20])), dv=draw(st.sampled_from([16, 32, 24])),
        chunk_size=draw(st.sampled_from([16, 32, 64])), has_g=draw(st.booleans()), initial=draw(st.booleans()),
        resets=draw(st.sampled_from(RESETS)), seed=draw(st.integers(0, 2**31 - 1)),
    )


TEDGE = dict(batch=1, heads=2, dk=16, dv=32, has_g=True, initial=True, seed=7)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=3)
@given(triton_cases())
@example(DeltaCase(length=1, chunk_size=16, resets="first", **TEDGE))  # T = 1
@example(DeltaCase(length=37, chunk_size=16, resets="all", **TEDGE))  # every token a reset
@example(DeltaCase(length=70, chunk_size=32, resets="chunk_starts", **TEDGE))  # 2 row blocks, partial chunk
@example(replace(DeltaCase(length=100, chunk_size=64, resets="sparse", **TEDGE), dk=20, dv=24))  # 4 row blocks
@example(replace(DeltaCase(length=33, chunk_size=16, resets="none", **TEDGE), has_g=False, initial=False))
@example(DeltaCase(length=40, chunk_size=16, resets="last", **TEDGE))
def test_triton_matches_torch_kernel(device, case: DeltaCase):
    """Forward and backward in float32 on poisoned memory, against the torch kernel in float64."""
    x64 = inputs(case)
    x = on(x64, device)
    scale = case.dk**-0.5
    do, dS = cotangents(case)
    o_ref, S_ref = delta_forward(*args(x64), scale, case.chunk_size)
    ref = dict(zip(GRADS, delta_backward(do, dS, *args(x64), scale, case.chunk_size)))
    with poisoned_empty():
        o, S = delta_forward_triton(*args(x), scale, case.chunk_size)
        got = dict(zip(GRADS, delta_backward_triton(do.to(device, torch.float32), dS.to(device, torch.float32),
                                                    *args(x), scale, case.chunk_size)))
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close_all({"o": o, "S": S}, {"o": o_ref, "S": S_ref}, TOL32)
    assert_close_all(got, ref, TOL32)
    for name in GRADS:
        if x[name] is not None:
            assert got[name].dtype == x[name].dtype, name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("missing", ["do", "dS"])
def test_triton_without_cotangents(device, missing):
    case = DeltaCase(length=45, chunk_size=16, resets="sparse", **TEDGE)
    x64 = inputs(case)
    x = on(x64, device)
    do, dS = cotangents(case)
    do, dS = (None, dS) if missing == "do" else (do, None)
    ref = dict(zip(GRADS, delta_backward(do, dS, *args(x64), 0.25, 16)))
    with poisoned_empty():
        got = dict(zip(GRADS, delta_backward_triton(*(c.to(device, torch.float32) if c is not None else None
                                                      for c in (do, dS)), *args(x), 0.25, 16)))
    assert_close_all(got, ref, TOL32)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=2)
@given(triton_cases(max_length=50))
@example(DeltaCase(length=50, chunk_size=16, resets="sparse", **TEDGE))
@example(replace(DeltaCase(length=29, chunk_size=32, resets="first", **TEDGE), has_g=False))
def test_triton_chunk_states_match_torch_kernel(device, case: DeltaCase):
    x64 = inputs(case)
    x = on(x64, device)
    sargs64 = (x64["k"], x64["v"], x64["g"], x64["beta"], x64["reset"], x64["S0"], case.chunk_size)
    sargs = (x["k"], x["v"], x["g"], x["beta"], x["reset"], x["S0"], case.chunk_size)
    h_ref, S_ref = delta_chunk_states(*sargs64)
    gen = torch.Generator().manual_seed(case.seed + 2)
    dh = torch.randn(h_ref.shape, generator=gen, dtype=torch.float64)
    dS = torch.randn(S_ref.shape, generator=gen, dtype=torch.float64)
    ref = dict(zip(("k", "v", "g", "beta", "S0"), delta_chunk_states_backward(dh, dS, *sargs64)))
    with poisoned_empty():
        h, S = delta_chunk_states_triton(*sargs)
        got = dict(zip(("k", "v", "g", "beta", "S0"), delta_chunk_states_backward_triton(
            dh.to(device, torch.float32), dS.to(device, torch.float32), *sargs)))
    assert h.dtype == torch.float32 and h.shape == h_ref.shape
    assert_close_all({"h": h, "S": S}, {"h": h_ref, "S": S_ref}, TOL32)
    assert_close_all(got, ref, TOL32)


@pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("chunk_size, has_g", [(16, True), (64, False)])
def test_wy_forward_bfloat16_products_keep_the_float32_results(chunk_size, has_g):
    """bfloat16 inputs take `w = T diag(βγ) K`, `u = T diag(β) V` as split products (16 bits of
    T): w and u are the float32 path's rounded to bfloat16 but for a few rounding ties (within
    a sixth of the rounding's own error here); a dropped lo half leaves T 8 bits and moves them
    by more than the rounding itself."""
    from dla.ops.backbone.delta_wy import wy_forward

    gen = torch.Generator().manual_seed(3)
    B, T, H, D = 1, 80, 2, 32
    k = F.normalize(torch.randn(B, T, H, D, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, generator=gen).bfloat16()
    g = -torch.rand(B, T, H, generator=gen) * 0.2 if has_g else None
    beta = torch.rand(B, T, H, generator=gen)
    with poisoned_empty():
        _, w, u = wy_forward(k, v, g, beta, None, chunk_size)
        _, w32, u32 = wy_forward(k.float(), v.float(), g, beta, None, chunk_size)
    assert w.dtype == u.dtype == torch.bfloat16
    for ours, full in ((w, w32), (u, u32)):
        assert relative_error(ours, full.bfloat16()) < 0.5 * relative_error(full.bfloat16(), full)


def test_triton_refuses_bad_arguments():
    case = DeltaCase(length=5, chunk_size=16, resets="none", **TEDGE)
    x = on(inputs(case), "cpu")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_forward_triton(*args(x), 0.25, 8)
    with pytest.raises(TypeError, match="k must be"):
        delta_forward_triton(*args(on(inputs(case), "cpu", torch.float64)), 0.25, 16)
    with pytest.raises(ValueError, match="chunk_size"):
        delta_forward(*args(x), 0.25, 0)
    # a sequence past the state pass's int32 offsets (T·H·D = 2**31), as zero-stride views: no memory
    T, H, D = 2**20, 16, 128
    q, k, v = (torch.zeros(()).expand(1, T, H, D) for _ in range(3))
    lam0, g, beta = (torch.zeros(()).expand(1, T, H) for _ in range(3))
    with pytest.raises(ValueError, match=r"int32: .* got T=1048576, H=16, Dk=128, Dv=128"):
        delta_forward_triton(q, k, v, lam0, g, beta, None, None, 0.25, 64)
    with pytest.raises(ValueError, match="int32"):
        delta_backward_triton(q, None, q, k, v, lam0, g, beta, None, None, 0.25, 64)


# --------------------------------------------------------------------------------------------
# GPU: long sequences and production head sizes against the float64 torch path on the card
# --------------------------------------------------------------------------------------------

GPU_CASES = [  # (B, H, T, Dk, Dv, g, resets, S0, dtype): both head sizes, fp32 (IEEE) and bf16, the
    # state pass's Dv tiles (`state_tile`, by B·H on a 132-SM card: 16 up to B·H·Dv/32 < 132, 32 for
    # (4, 16, ·, ·, 128), 64 from B·H·Dv/64 ≥ 132), T not a multiple of the chunk
    (1, 2, 16384, 128, 128, True, "sparse", True, "bf16"),
    (1, 2, 16384, 128, 128, True, "sparse", True, "fp32"),
    (2, 4, 2048, 64, 64, True, "dense", True, "bf16"),
    (2, 4, 2048, 64, 64, True, "dense", True, "fp32"),
    (1, 2, 4096, 64, 128, False, "sparse", True, "bf16"),  # DeltaNet: no decay, rounding compounds
    (1, 2, 4096, 128, 128, False, "sparse", True, "bf16"),
    (1, 2, 4096, 128, 64, False, "none", False, "fp32"),
    (4, 16, 1000, 128, 64, True, "none", False, "bf16"),
    (8, 16, 520, 128, 128, True, "chunk_ends", True, "bf16"),
    (16, 16, 2048, 128, 128, True, "sparse", True, "bf16"),  # SPEC §7's shape at T = 2048
    (4, 16, 8192, 128, 128, True, "sparse", True, "bf16"),  # T = 8192: a Dv tile of 32, where the
    # backward state pass at 8 warps stopped with an illegal address on an H100 (4 warps since)
]


def gpu_inputs(B, H, T, Dk, Dv, has_g, resets, initial, seed=0) -> dict:
    """perf/inputs.py's Gated DeltaNet inputs (piecewise k, v; l2-normalised q, k; β = sigmoid;
    λ0 = softplus) in float64 on the card, resets at ~2% of tokens ("sparse") or half ("dense")."""
    from perf.inputs import layer_inputs

    t = layer_inputs(B, T, H, Dk, Dv, 2, backbone="gdn", dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    rate = {"none": 0.0, "sparse": 0.02, "dense": 0.5}.get(resets)
    reset = (torch.rand(B, T, H, generator=gen) < rate) if rate is not None else (torch.arange(T) % 64 == 63)[
        None, :, None].expand(B, T, H).contiguous()
    x = dict(q=t["q"], k=t["k"], v=t["v"], lam0=t["lam"][..., 0].contiguous(), g=t["g"].double() if has_g else None,
             beta=t["beta"].double(), reset=reset if resets != "none" else None,
             S0=0.1 * torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64) if initial else None)
    return {n: (v.cuda() if v is not None else None) for n, v in x.items()}


def assert_matches_float64_on_gpu(x64: dict, dtype, do64, dS64, scale):
    """Ours against the torch kernel in float64 on the card: fp32 within TOL32; 16-bit within
    2e-2 and, for 16-bit outputs, at most twice the error of the torch kernel on the same
    (rounded) inputs, whose outputs are rounded like ours (SPEC §6)."""
    x = {n: (v.to(dtype if n in ("q", "k", "v", "lam0") else torch.float32) if v is not None and v.is_floating_point()
             else v) for n, v in x64.items()}
    rounded = {n: (v.double() if v is not None and v.is_floating_point() else v) for n, v in x.items()}
    do, dS = do64.to(dtype), dS64.float()
    names = ("o", "S", *(f"d{n}" for n in GRADS))
    ref = (*delta_forward(*args(rounded), scale, 64), *delta_backward(do.double(), dS.double(), *args(rounded), scale,
                                                                       64))
    with poisoned_empty():
        ours = (*delta_forward_triton(*args(x), scale, 64), *delta_backward_triton(do, dS, *args(x), scale, 64))
    torch_path = (*delta_forward(*args(x), scale, 64), *delta_backward(do, dS, *args(x), scale, 64))
    for name, a, b, t in zip(names, ours, ref, torch_path):
        if b is None:
            assert a is None, name
            continue
        assert torch.isfinite(a).all(), name
        err = relative_error(a, b)
        if dtype == torch.float32:
            assert err <= TOL32, (name, err)
            continue
        err_torch = relative_error(t, b)
        assert err <= 2e-2, (name, err)
        if a.dtype == dtype:  # float32 outputs (S, dg, dβ, dS0) are held to 2e-2 only
            assert err <= 2 * err_torch, (name, err, err_torch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("B,H,T,Dk,Dv,has_g,resets,initial,dtype", GPU_CASES)
def test_gpu_matches_float64(B, H, T, Dk, Dv, has_g, resets, initial, dtype):
    x = gpu_inputs(B, H, T, Dk, Dv, has_g, resets, initial)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64).cuda()
    dS = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64).cuda()
    assert_matches_float64_on_gpu(x, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype], do, dS, Dk**-0.5)


# --------------------------------------------------------------------------------------------
# The kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

# `perf.sm90_resources.backbone_kernels` compiles each kernel at the launchers' parameters, here
# with every optional input present and absent; a spec is dtype:D:chunk:state tiles
COMPILE = r"""
import sys
from perf.sm90_resources import backbone_kernels

for spec in sys.argv[1:]:
    dtype, D, C, tiles = spec.split(":")
    for label, _ in backbone_kernels(f"{D}:1:{C}:1:{dtype}:g", tiles=[int(t) for t in tiles.split(",")],
                                     optional=(True, False)):
        print(label, "compiled", flush=True)
"""


def compile_for_sm90(specs: list[str]) -> None:
    kernels_per_spec = [2 * (5 + 2 * len(spec.split(":")[3].split(","))) for spec in specs]
    assert compile_script(COMPILE, *specs, timeout=1800).count("compiled") == sum(kernels_per_spec)


def test_kernels_compile_for_sm90():
    """Every kernel with the launchers' parameters at the benchmark's shapes (bf16, chunk 64,
    Dk = Dv = 128; the state pass at each `Dv` tile `state_tile` can pick), with every optional
    input present and absent, through Triton's GPU compiler and ptxas: the interpreter accepts
    code that the compiler refuses. The other shipped configurations: the slow test below."""
    compile_for_sm90(["bfloat16:128:64:16,32,64"])


@pytest.mark.slow
def test_kernels_compile_for_sm90_other_configurations():
    """bf16 at Dk = Dv = 64, chunks of 16 and 32, float16, and float32 with IEEE dots (the GPU
    tests' configuration); about 4 minutes on 2 cores with a cold Triton cache."""
    compile_for_sm90(["bfloat16:64:64:16,32,64", "bfloat16:128:16:16", "bfloat16:128:32:16", "float16:128:64:32",
                      "float32:128:64:16,32,64", "float32:64:64:16,32,64"])


# --------------------------------------------------------------------------------------------
# The benchmark script, end to end on the CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not INTERPRETING, reason="the smoke run needs the Triton interpreter")
def test_bench_smoke(tmp_path):
    from perf.bench_delta_gpu import main

    assert main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench_delta.json").read_text())
    assert [v["ok"] for v in results["verify"]] == [True, True]
    assert [r["T"] for r in results["rows"]] == [16, 32]
    assert all(r["ours_fwd_bwd"] > 0 and r["ours_resets_fwd_bwd"] > 0 for r in results["rows"])
    assert "| 32 |" in (tmp_path / "bench_delta.md").read_text()
