"""The backbone stage without β as a chunked SSD (`dla.ops.backbone.ssd`, its Triton kernels in
`ssd_states.py` / `ssd_output.py` behind `ssd_triton.py`) against the token-by-token reference
`dla.ops.backbone.naive.backbone_recurrent`.

* The torch kernel, float64, drawn by hypothesis: with and without `g`, resets drawn sparse and
  dense, at chunk starts, at chunk ends, at token 0, at every token and at the last only, with
  and without an initial state, `T` not a multiple of the chunk, chunk sizes 1 … 64: output,
  final state and every gradient (against autograd of the reference) within 1e-10; the stage
  pieces (`h` equals the reference state at each chunk start, and their backward); gradcheck.
* The Triton kernels through the interpreter (CPU, float32, IEEE dots, chunk 16 and 32) against
  the torch kernel in float64 within 1e-5, outputs allocated by `torch.empty` poisoned with NaN:
  forward, backward (also without `do` or `dS`), both stage pieces, with resets and `S0`.
* Every shipped launch configuration through Triton's GPU compiler and ptxas for sm_90.
* On a GPU (`pytest -m gpu`): the Triton kernels against the float64 torch path on the card up to
  T = 16384, Dk, Dv ∈ {64, 128}, float32 (≤ 1e-5) and bf16 (≤ 2e-2, and outputs in bf16 at most
  twice the error of the torch path on the same bf16 inputs, which computes in float32 and
  rounds its outputs to bf16: "plain PyTorch at its dtype").
* `perf/bench_ssd_gpu.py --smoke` end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dla.ops.backbone.naive import backbone_recurrent
from dla.ops.backbone.ssd import ssd_backward, ssd_chunk_states, ssd_chunk_states_backward, ssd_forward
from dla.ops.backbone.ssd_triton import (
    ssd_backward_triton, ssd_chunk_states_backward_triton, ssd_chunk_states_triton, ssd_forward_triton,
)
from tests.sm90 import compile_script
from tests.strategies import poisoned_empty, relative_error

RESETS = ("none", "sparse", "dense", "chunk_starts", "chunk_ends", "first", "every", "last")
TOL64, TOL32 = 1e-10, 1e-5
GRAD_NAMES = ("dq", "dk", "dv", "dlam0", "dg", "dS0")


@dataclass(frozen=True)
class SSDCase:
    batch: int = 1
    length: int = 9
    heads: int = 2
    dk: int = 3
    dv: int = 4
    chunk: int = 4
    decay: bool = True
    resets: str = "sparse"
    initial: bool = True
    seed: int = 0


def reset_mask(case: SSDCase, gen: torch.Generator) -> torch.Tensor | None:
    shape = (case.batch, case.length, case.heads)
    t = torch.arange(case.length)[None, :, None].expand(shape)
    some = torch.rand(shape, generator=gen) < 0.7  # per batch element and head, most of the pattern
    pattern = {"none": None, "sparse": torch.rand(shape, generator=gen) < 0.08,
               "dense": torch.rand(shape, generator=gen) < 0.5, "chunk_starts": (t % case.chunk == 0) & some,
               "chunk_ends": (t % case.chunk == case.chunk - 1) & some, "first": t == 0,
               "every": torch.ones(shape, dtype=torch.bool), "last": t == case.length - 1}[case.resets]
    return None if pattern is None else pattern.contiguous()


def build(case: SSDCase, dtype=torch.float64, device="cpu") -> dict:
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H = case.batch, case.length, case.heads

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = dict(q=randn(B, T, H, case.dk), k=randn(B, T, H, case.dk), v=randn(B, T, H, case.dv), lam0=randn(B, T, H),
             g=-2 * torch.rand(B, T, H, generator=gen, dtype=torch.float64) if case.decay else None,
             reset=reset_mask(case, gen), S0=randn(B, H, case.dk, case.dv) if case.initial else None)
    gate = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # as the layers make g
    return {n: (v.to(device=device, dtype=gate if n == "g" else dtype) if v is not None and v.is_floating_point() else
                (None if v is None else v.to(device))) for n, v in x.items()}


def args(x: dict) -> tuple:
    return x["q"], x["k"], x["v"], x["lam0"], x["g"], x["reset"], x["S0"]


def reference_grads(x: dict, do, dS, scale):
    """o, S and autograd's (dq, dk, dv, dλ0, dg, dS0) of the reference (None where absent)."""
    names = ("q", "k", "v", "lam0", "g", "S0")
    leaves = {n: x[n].detach().requires_grad_() for n in names if x[n] is not None}
    o, S = backbone_recurrent(leaves["q"], leaves["k"], leaves["v"], leaves["lam0"], g=leaves.get("g"),
                              reset=x["reset"], S0=leaves.get("S0"), scale=scale)
    loss = (o * do).sum() + (S * dS).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    by_name = dict(zip(leaves, grads))
    return o.detach(), S.detach(), tuple(by_name.get(n) for n in names)


@st.composite
def ssd_cases(draw, max_length=40, chunks=(1, 2, 3, 4, 8, 16, 64), dims=(1, 2, 3, 5, 8)):
    return SSDCase(batch=draw(st.integers(1, 2)), length=draw(st.integers(1, max_length)),
                   heads=draw(st.integers(1, 2)),
                   dk=draw(st.sampled_from(dims)), dv=draw(st.sampled_from(dims)), chunk=draw(st.sampled_from(chunks)),
                   decay=draw(st.booleans()), resets=draw(st.sampled_from(RESETS)), initial=draw(st.booleans()),
                   seed=draw(st.integers(0, 2**31 - 1)))


# --------------------------------------------------------------------------------------------
# The torch kernel against the reference, float64
# --------------------------------------------------------------------------------------------


@given(ssd_cases(), st.sampled_from(["both", "do", "dS"]))
@example(SSDCase(length=1, chunk=4, resets="none"), "both")  # T = 1
@example(SSDCase(length=1, chunk=1, resets="every"), "both")  # T = 1, a reset at token 0
@example(SSDCase(length=13, chunk=4, resets="every"), "both")  # every token a reset
@example(SSDCase(length=13, chunk=4, resets="none", decay=False), "both")  # no reset, no decay: linear attention
@example(SSDCase(length=13, chunk=4, resets="last"), "both")  # a reset at the last token only
@example(SSDCase(length=16, chunk=4, resets="chunk_starts"), "do")
@example(SSDCase(length=15, chunk=4, resets="chunk_ends"), "dS")
@example(SSDCase(length=12, chunk=64, resets="first", initial=True), "both")  # S0 discarded at once
@example(SSDCase(length=40, chunk=16, resets="dense", batch=2), "both")
def test_torch_kernel_matches_recurrent(case, cotangents):
    x = build(case)
    scale = 0.7
    gen = torch.Generator().manual_seed(case.seed + 1)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen, dtype=torch.float64)
    dS = torch.randn(case.batch, case.heads, case.dk, case.dv, generator=gen, dtype=torch.float64)
    do = do if cotangents != "dS" else torch.zeros_like(do)
    dS = dS if cotangents != "do" else torch.zeros_like(dS)
    o_ref, S_ref, grads_ref = reference_grads(x, do, dS, scale)
    o, S = ssd_forward(*args(x), scale, case.chunk)
    assert o.dtype == S.dtype == torch.float64
    assert relative_error(o, o_ref) <= TOL64
    assert relative_error(S, S_ref) <= TOL64
    grads = ssd_backward(None if cotangents == "dS" else do, None if cotangents == "do" else dS, *args(x), scale,
                         case.chunk)
    for name, a, b in zip(GRAD_NAMES, grads, grads_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, name
            assert relative_error(a, b) <= TOL64, (name, relative_error(a, b))
    if x["reset"] is not None and x["g"] is not None:  # S ← 0 discards a_t: no gradient reaches g there
        assert (grads[4][x["reset"]] == 0).all()


def state_before_chunks(x: dict, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's state before each chunk [B,H,NC,Dk,Dv] and the final state, with autograd."""
    B, T, H, Dk = x["k"].shape
    Dv = x["v"].shape[-1]
    S0 = x["S0"] if x["S0"] is not None else torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
    states = [S0]
    for start in range(chunk, T, chunk):
        part = {n: (x[n][:, :start] if x[n] is not None else None) for n in ("q", "k", "v", "lam0", "g", "reset")}
        states.append(backbone_recurrent(part["q"], part["k"], part["v"], part["lam0"], g=part["g"],
                                         reset=part["reset"], S0=x["S0"], scale=1.0)[1])
    final = backbone_recurrent(x["q"], x["k"], x["v"], x["lam0"], g=x["g"], reset=x["reset"], S0=x["S0"], scale=1.0)[1]
    return torch.stack(states, dim=2), final


@settings(max_examples=10)
@given(ssd_cases(max_length=24, chunks=(1, 3, 4, 8)))
@example(SSDCase(length=1, chunk=4, resets="none"))
@example(SSDCase(length=11, chunk=4, resets="chunk_starts"))
@example(SSDCase(length=12, chunk=4, resets="every", initial=True))
def test_stage_pieces_match_recurrent(case):
    """h is the reference state at each chunk start; the stage's backward is autograd's."""
    x = build(case)
    leaves = {n: x[n].detach().requires_grad_() for n in ("k", "v", "g", "S0") if x[n] is not None}
    xr = {**x, **leaves}
    h_ref, S_ref = state_before_chunks(xr, case.chunk)
    h, S = ssd_chunk_states(x["k"], x["v"], x["g"], x["reset"], x["S0"], case.chunk)
    assert h.shape == h_ref.shape
    assert relative_error(h, h_ref.detach()) <= TOL64 if h_ref.norm() > 0 else (h == 0).all()
    assert relative_error(S, S_ref.detach()) <= TOL64
    gen = torch.Generator().manual_seed(case.seed + 2)
    dh, dS = torch.randn(h.shape, generator=gen, dtype=torch.float64), torch.randn(S.shape, generator=gen,
                                                                                    dtype=torch.float64)
    grads_ref = dict(zip(leaves, torch.autograd.grad((h_ref * dh).sum() + (S_ref * dS).sum(), list(leaves.values()),
                                                     allow_unused=True)))
    dk, dv, dg, dS0 = ssd_chunk_states_backward(dh, dS, x["k"], x["v"], x["g"], x["reset"], x["S0"], case.chunk)
    for name, a in (("k", dk), ("v", dv), ("g", dg), ("S0", dS0)):
        b = grads_ref.get(name)
        assert (a is None) == (x[name] is None), name
        if a is not None:
            b = torch.zeros_like(a) if b is None else b
            assert relative_error(a, b) <= TOL64 if b.norm() > 0 else a.abs().max() <= TOL64, name


class _SSD(torch.autograd.Function):
    """`ssd_forward` with `ssd_backward` as its gradient, for gradcheck."""

    @staticmethod
    def forward(ctx, q, k, v, lam0, g, S0, reset, scale, chunk):
        ctx.save_for_backward(q, k, v, lam0, g, S0)
        ctx.reset, ctx.scale, ctx.chunk = reset, scale, chunk
        return ssd_forward(q, k, v, lam0, g, reset, S0, scale, chunk)

    @staticmethod
    def backward(ctx, do, dS):
        q, k, v, lam0, g, S0 = ctx.saved_tensors
        grads = ssd_backward(do, dS, q, k, v, lam0, g, ctx.reset, S0, ctx.scale, ctx.chunk)
        return (*grads[:5], grads[5], None, None, None)


SMALL = dict(heads=1, dk=2, dv=3)


@pytest.mark.parametrize("case,fast", [(SSDCase(length=11, chunk=4, resets="sparse", seed=1, **SMALL), False),
                                       (SSDCase(length=9, chunk=3, resets="chunk_starts", seed=2, **SMALL), True),
                                       (SSDCase(length=8, chunk=4, resets="none", decay=False, seed=3, **SMALL), True),
                                       (SSDCase(length=10, chunk=64, resets="dense", batch=2, seed=4, **SMALL), True)],
                         ids=str)
def test_gradcheck(case, fast):
    """Full gradcheck on one case, fast mode (random projections) on the others: the drawn
    comparison with autograd of the reference above covers every gradient element-wise."""
    x = build(case)
    inputs = tuple(None if x[n] is None else x[n].requires_grad_() for n in ("q", "k", "v", "lam0", "g", "S0"))
    assert torch.autograd.gradcheck(lambda *a: _SSD.apply(*a, x["reset"], 0.6, case.chunk), inputs, fast_mode=fast)


def test_errors_name_the_argument():
    x = build(SSDCase())
    with pytest.raises(ValueError, match="lam0"):
        ssd_forward(x["q"], x["k"], x["v"], x["lam0"][..., :1], x["g"], x["reset"], x["S0"], 1.0, 4)
    with pytest.raises(TypeError, match="reset"):
        ssd_forward(x["q"], x["k"], x["v"], x["lam0"], x["g"], x["reset"].float(), x["S0"], 1.0, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_forward(x["q"], x["k"], x["v"], x["lam0"], x["g"], x["reset"], x["S0"], 1.0, 0)
    with pytest.raises(ValueError, match="S0"):
        ssd_chunk_states(x["k"], x["v"], x["g"], x["reset"], x["S0"][..., :1], 4)
    x32 = build(SSDCase(), dtype=torch.float32)
    with pytest.raises(TypeError, match="float64 runs on"):
        ssd_forward_triton(*args(x), 1.0, 16)
    with pytest.raises(ValueError, match="chunk_size must be one of"):
        ssd_forward_triton(*args(x32), 1.0, 8)
    # past the state pass's int32 offsets (T·H·D = 2**31), as zero-stride views: no memory
    q, lam0 = torch.zeros(()).expand(1, 2**20, 16, 128), torch.zeros(()).expand(1, 2**20, 16)
    with pytest.raises(ValueError, match=r"ssd_forward_triton: the kernels index one batch element in int32"):
        ssd_forward_triton(q, q, q, lam0, lam0, None, None, 1.0, 64)


def test_empty_sequence():
    """T = 0: empty outputs, the initial state passes through, and so does its gradient."""
    x = build(SSDCase(length=1), dtype=torch.float32)
    x = {n: (v[:, :0] if v is not None and n != "S0" else v) for n, v in x.items()}
    do, dS = torch.zeros(1, 0, 2, 4), torch.randn(1, 2, 3, 4)
    for forward, backward in ((ssd_forward, ssd_backward), (ssd_forward_triton, ssd_backward_triton)):
        chunk = 16
        o, S = forward(*args(x), 1.0, chunk)
        assert o.shape == (1, 0, 2, 4) and torch.equal(S, x["S0"])
        dq, dk, dv, dlam0, dg, dS0 = backward(do, dS, *args(x), 1.0, chunk)
        assert dq.shape == dk.shape == (1, 0, 2, 3) and dlam0.shape == dg.shape == (1, 0, 2)
        assert torch.equal(dS0, dS)


# --------------------------------------------------------------------------------------------
# The Triton kernels (the interpreter on the CPU) against the torch kernel in float64
# --------------------------------------------------------------------------------------------


def cotangents(case: SSDCase, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(case.seed + 3)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen)
    dS = torch.randn(case.batch, case.heads, case.dk, case.dv, generator=gen)
    return do.to(device=device, dtype=dtype), dS.to(device)


def assert_triton_matches(case: SSDCase, dtype, device, *, with_do=True, with_dS=True):
    """Forward, backward and both stage pieces of the Triton path against the torch kernel in
    float64 on the same (rounded) inputs. float32: ≤ 1e-5. 16-bit: ≤ 2e-2, and outputs in that
    dtype at most twice the error of the torch kernel on the same inputs."""
    x = build(case, dtype=dtype, device=device)
    if x["S0"] is not None:
        x["S0"] = x["S0"].float()
    x64 = {n: (v.double() if v is not None and v.is_floating_point() else v) for n, v in x.items()}
    do, dS = cotangents(case, dtype, device)
    do, dS = (do if with_do else None), (dS if with_dS else None)
    scale = case.dk**-0.5
    dh = torch.randn(case.batch, case.heads, -(-case.length // case.chunk), case.dk, case.dv,
                     generator=torch.Generator().manual_seed(case.seed + 4)).to(device)
    with poisoned_empty():
        ours = dict(zip(("o", "S"), ssd_forward_triton(*args(x), scale, case.chunk)))
        ours.update(zip(GRAD_NAMES, ssd_backward_triton(do, dS, *args(x), scale, case.chunk)))
        ours.update(zip(("h", "S_states"), ssd_chunk_states_triton(x["k"], x["v"], x["g"], x["reset"], x["S0"],
                                                                   case.chunk)))
        ours.update(zip(("states_dk", "states_dv", "states_dg", "states_dS0"), ssd_chunk_states_backward_triton(
            dh, dS, x["k"], x["v"], x["g"], x["reset"], x["S0"], case.chunk)))

    def torch_path(y, do_, dS_):
        out = dict(zip(("o", "S"), ssd_forward(*args(y), scale, case.chunk)))
        out.update(zip(GRAD_NAMES, ssd_backward(do_, dS_, *args(y), scale, case.chunk)))
        out.update(zip(("h", "S_states"), ssd_chunk_states(y["k"], y["v"], y["g"], y["reset"], y["S0"], case.chunk)))
        out.update(zip(("states_dk", "states_dv", "states_dg", "states_dS0"), ssd_chunk_states_backward(
            dh, dS_, y["k"], y["v"], y["g"], y["reset"], y["S0"], case.chunk)))
        return out

    ref = torch_path(x64, None if do is None else do.double(), None if dS is None else dS.double())
    plain = torch_path(x, do, dS) if dtype != torch.float32 else None
    for name, b in ref.items():
        a = ours[name]
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        err = relative_error(a, b) if b.norm() > 0 else float(a.abs().max())
        if dtype == torch.float32:
            assert err <= TOL32, (name, err)
        else:
            assert err <= 2e-2, (name, err)
            if a.dtype == dtype and name != "h":  # h is stored in the inputs' dtype; the torch kernel keeps float32
                assert err <= 2 * relative_error(plain[name], b), (name, err, relative_error(plain[name], b))


INTERPRETER = dict(dk=16, dv=16, heads=2, batch=1)


@settings(max_examples=6)
@given(ssd_cases(max_length=40, chunks=(16, 32), dims=(16, 20, 32)), st.sampled_from(["both", "do", "dS"]))
@example(SSDCase(length=1, chunk=16, resets="none", **INTERPRETER), "both")  # T = 1
@example(SSDCase(length=37, chunk=16, resets="sparse", seed=5, **INTERPRETER), "both")  # 3 chunks, T % C ≠ 0
@example(SSDCase(length=20, chunk=16, resets="every", seed=6, **INTERPRETER), "both")
@example(SSDCase(length=33, chunk=16, resets="chunk_starts", decay=False, initial=False, seed=7, **INTERPRETER), "do")
@example(SSDCase(length=32, chunk=16, resets="chunk_ends", seed=8, **INTERPRETER), "dS")
@example(SSDCase(length=40, chunk=32, resets="dense", batch=2, dk=20, dv=32, seed=9), "both")  # Dk not a power of 2
@example(SSDCase(length=24, chunk=16, resets="none", decay=False, initial=False, seed=10, **INTERPRETER), "both")
def test_triton_interpreter_matches_torch(case, cotangent):
    assert_triton_matches(case, torch.float32, "cpu", with_do=cotangent != "dS", with_dS=cotangent != "do")


# --------------------------------------------------------------------------------------------
# The kernels as the GPU compiles them (ptxas for sm_90, no GPU needed)
# --------------------------------------------------------------------------------------------

COMPILE = r"""
import sys, torch
from dla.testing import compile_for_sm90
import dla.ops.backbone.ssd_output as O
import dla.ops.backbone.ssd_states as S

PTR = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32"}
SMS = 132  # an H100 SXM
seen = set()


# The pointer types the launchers pass: an absent tensor is stood in for by an input or a state
# of the inputs' dtype (`flag_pointers`, the launchers' dummies).
def pointer(name, fn, dtype, on):
    if name in ("G", "DG"):
        return "*fp32" if on["g"] else PTR[dtype]
    if name == "R":
        return "*u8" if on["reset"] else PTR[dtype]
    if name in ("SF", "DSF") or (name == "S0" and fn is S._state_fwd_kernel):  # S stands in for S0
        return "*fp32"
    if name == "DS0":
        return "*fp32" if on["s0"] else PTR[dtype]
    if name == "DH":  # the stage's own backward takes a float32 dh; otherwise the state gradients stand in
        return PTR[dtype] if on["out"] else "*fp32"
    return PTR[dtype]
for spec in sys.argv[1:]:
    dtype, dk, dv, C, flags = spec.split(":")
    dk, dv, C = int(dk), int(dv), int(C)
    on = {f: f in flags.split(",") for f in ("g", "reset", "s0", "out")}
    prec = S.dot_precision(getattr(torch, dtype))
    # both state tilings: many heads (short sequences) and few
    state = {S.state_tiles(dk, dv, 4096, SMS), S.state_tiles(dk, dv, 1, SMS)}
    tiles = O.output_tiles(dk, dv, C, interpreter=False)
    common = dict(DK=dk, DV=dv, C=C, HAS_G=on["g"], HAS_RESET=on["reset"], PREC=prec)
    jobs = []
    for bk, bv, warps in sorted(state):
        jobs.append((S._state_fwd_kernel, dict(common, BK=bk, BV=bv, HAS_S0=on["s0"]), warps, 3))
        jobs.append((S._state_bwd_kernel, dict(common, BK=bk, BV=bv, HAS_OUT=on["out"], HAS_DH=not on["out"],
                                               HAS_DSF=True, HAS_DS0=on["s0"]), warps, 3))
    fwd, bwd = tiles["fwd"], tiles["bwd"]
    if on["out"]:
        jobs.append((O._output_fwd_kernel, dict(common, BK=fwd["BK"], BV=fwd["BV"]), fwd["num_warps"], 2))
    jobs.append((O._output_bwd_kernel, dict(common, BK=bwd["BK"], BV=bwd["BV"], HAS_OUT=on["out"]), bwd["num_warps"],
                 2))
    for fn, meta, warps, stages in jobs:
        key = (fn.__name__, dtype, tuple(sorted(meta.items())), warps)
        if key in seen:
            continue
        seen.add(key)
        compile_for_sm90(fn, lambda a: "i32" if a in ("T", "H", "NC") else "fp32" if a == "scale"
                         else pointer(a, fn, dtype, on), meta, num_warps=warps, num_stages=stages)
        print(spec, fn.__name__, "compiled", flush=True)
"""

# Every configuration the launchers ship for the heads this package uses (Dk 64 / 128; wider Dv
# only adds tiles), chunk 64: all flags on; at the SPEC §7 shape also the plain backbone (no g,
# no reset, no S0) and the stage's own backward (no `dO`). The 16-bit kernels are the ones
# training runs; the float32 (IEEE) ones compile slowly (their dots become FMA loops).
COMPILE_SPECS_16 = ["bfloat16:128:128:64:g,reset,s0,out", "bfloat16:128:128:64:out", "bfloat16:128:128:64:g,reset,s0",
                    "bfloat16:64:64:64:g,reset,s0,out", "float16:128:128:64:g,reset,s0,out"]
COMPILE_SPECS_32 = ["float32:128:128:64:g,reset,s0,out", "float32:64:64:64:g,reset,s0,out"]


def compile_for_sm90(specs: list[str]) -> None:
    """Each kernel with its launcher's meta-parameters through Triton's GPU compiler and ptxas for
    the H100 (the interpreter accepts code that the compiler refuses)."""
    out = compile_script(COMPILE, *specs)
    for spec in specs:  # each spec compiles at least its output backward and one state kernel pair
        assert sum(line.startswith(spec + " ") for line in out.splitlines()) >= 3, (spec, out)


def test_kernels_compile_for_sm90():
    compile_for_sm90(COMPILE_SPECS_16)


@pytest.mark.slow
def test_float32_kernels_compile_for_sm90():
    compile_for_sm90(COMPILE_SPECS_32)


# --------------------------------------------------------------------------------------------
# GPU: long sequences against the float64 torch path on the device
# --------------------------------------------------------------------------------------------

GPU_CASES = [  # (batch, heads, T, Dk, Dv, chunk, decay, resets, S0, dtype)
    (1, 2, 16384, 128, 128, 64, True, "sparse", True, "bf16"),  # long: state tiles 32×32
    (1, 2, 16384, 128, 128, 64, False, "none", False, "bf16"),  # long, no decay (linear attention)
    (1, 2, 16384, 64, 64, 64, True, "sparse", True, "fp32"),
    (2, 4, 4096, 64, 64, 64, True, "dense", True, "fp32"),  # Dk = 64: the BK that fla #640 miscompiled
    (4, 32, 1024, 128, 128, 64, True, "sparse", True, "bf16"),  # 128 heads: state tiles 64×64
    (4, 32, 1024, 128, 128, 64, True, "sparse", True, "fp32"),
    (2, 4, 3000, 64, 128, 32, True, "chunk_starts", False, "bf16"),  # Dk ≠ Dv, chunk 32, T % C ≠ 0
    (1, 2, 2048, 128, 128, 64, False, "none", True, "fp32"),
    (1, 4, 8192, 64, 64, 16, True, "sparse", True, "bf16"),  # chunk 16
]


def gpu_case(batch, heads, T, Dk, Dv, chunk, decay, resets, initial) -> SSDCase:
    return SSDCase(batch=batch, length=T, heads=heads, dk=Dk, dv=Dv, chunk=chunk, decay=decay, resets=resets,
                   initial=initial, seed=T + Dk)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch,heads,T,Dk,Dv,chunk,decay,resets,initial,dtype", GPU_CASES)
def test_gpu_matches_float64(batch, heads, T, Dk, Dv, chunk, decay, resets, initial, dtype):
    case = gpu_case(batch, heads, T, Dk, Dv, chunk, decay, resets, initial)
    assert_triton_matches(case, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], "cuda")


# --------------------------------------------------------------------------------------------
# The benchmark script runs end to end
# --------------------------------------------------------------------------------------------


def test_bench_smoke(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "perf.bench_ssd_gpu", "--smoke", "--out", str(tmp_path),
                           "--lengths", "32"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    table = (tmp_path / "bench_ssd_gpu.md").read_text()
    assert "SMOKE RUN" in table and "FAILED" not in table
    assert (tmp_path / "bench_ssd_gpu.json").exists()
