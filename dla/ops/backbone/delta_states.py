r"""The chunked delta rule's state pass in Triton, forward and backward: the only sequential
stage. One program per (batch·head, `Dv` tile) walks the chunks in order, holding its `[Dk, BV]`
tile of the state in float32 registers. Notation of `delta.py`.

Forward, per chunk, with `h` the state before it (`S0` for the first chunk):

    store h;   U = u − w h   [C, BV] (stored);   h ← γ_C h + Kᵀ (diag(ρ) U)

and the final state at the end. Backward, in reverse, with `dS` the gradient of the state after
the chunk (the final state's gradient for the last chunk):

    store dS;   dU = dU_out + diag(ρ) K dS   [C, BV] (stored, float32)
    dS ← γ_C dS − wᵀ dU + (diag(γ λ0 · scale) Q)ᵀ dO + dh_ext

where `dU_out = (QKᵀ ⊙ Γ)ᵀ dÕ` comes from the output stage (`delta_output.py`), the `dO` term is
the output's direct read of `h`, and `dh_ext` [B,H,NC,Dk,Dv] is a gradient of the chunk-start
states from outside (the stage piece `delta_chunk_states`); each term is present when given.
`dS` at the end is dS0.

Products of the state (or its gradient) with `w` and `K` take the inputs' dtype as operands
(float32 for float32 inputs, `"ieee"`), accumulating in float32; `(diag(γ λ0 · scale) Q)ᵀ dO`
takes `"tf32"` (`delta_common.py`). `h` is `[B,H,NC,Dk,Dv]` in the dtype of the buffer given
(the inputs' dtype inside the pipeline, float32 for the stage piece's output), `U [B,T,H,Dv]`
in the inputs' dtype; the stored `dS` `[B,H,NC,Dk,Dv]` and `dU` are float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.backbone.delta_common import chunk_ends, chunk_gates, precisions
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["states_forward", "states_backward", "state_tile", "states_meta"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _states_fwd_kernel(K, W, U, G, RESET, S0, HS, UN, SF, T, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                       C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                       HAS_RESET: tl.constexpr, HAS_S0: tl.constexpr, STORE_U: tl.constexpr, PREC: tl.constexpr):
    pv = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    NC = tl.cdiv(T, C)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    dk_ = tl.arange(0, BK)
    dv_ = pv * BV + tl.arange(0, BV)
    tile = dk_[:, None] * DV + dv_[None, :]
    mt = (dk_[:, None] < DK) & (dv_[None, :] < DV)
    K += tok * DK
    W += tok * DK
    U += tok * DV
    HS += n * NC * DK * DV
    if HAS_S0:
        S = tl.load(S0 + n * DK * DV + tile, mask=mt, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(0, NC):
        tl.store(HS + c * DK * DV + tile, S.to(HS.dtype.element_ty), mask=mt)
        t = c * C + o
        inside = t < T
        mk = inside[:, None] & (dk_[None, :] < DK)
        mv = inside[:, None] & (dv_[None, :] < DV)
        w = tl.load(W + t[:, None] * (H * DK) + dk_[None, :], mask=mk, other=0.0)
        Un = tl.load(U + t[:, None] * (H * DV) + dv_[None, :], mask=mv, other=0.0).to(tl.float32)
        Un -= tl.dot(w, S.to(W.dtype.element_ty), input_precision=PREC)
        if STORE_U:
            tl.store(UN + tok * DV + t[:, None] * (H * DV) + dv_[None, :], Un.to(UN.dtype.element_ty), mask=mv)
        G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
        _, rho, gam_C = chunk_ends(G_, seg, C)
        kT = tl.load(K + t[None, :] * (H * DK) + dk_[:, None], mask=inside[None, :] & (dk_[:, None] < DK), other=0.0)
        S = gam_C * S + tl.dot(kT, (rho[:, None] * Un).to(K.dtype.element_ty), input_precision=PREC)
    tl.store(SF + n * DK * DV + tile, S, mask=mt)


@triton.jit
def _states_bwd_kernel(Q, K, W, DO, LAM, G, RESET, DUO, DHX, DSF, DHS, DU, DS0, scale, T, H: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, HAS_OUT: tl.constexpr, HAS_DHX: tl.constexpr,
                       HAS_DSF: tl.constexpr, PREC: tl.constexpr):
    pv = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    NC = tl.cdiv(T, C)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    dk_ = tl.arange(0, BK)
    dv_ = pv * BV + tl.arange(0, BV)
    tile = dk_[:, None] * DV + dv_[None, :]
    mt = (dk_[:, None] < DK) & (dv_[None, :] < DV)
    K += tok * DK
    W += tok * DK
    DU += tok * DV
    DHS += n * NC * DK * DV
    if HAS_DSF:
        dS = tl.load(DSF + n * DK * DV + tile, mask=mt, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(NC - 1, -1, -1):
        tl.store(DHS + c * DK * DV + tile, dS.to(DHS.dtype.element_ty), mask=mt)
        t = c * C + o
        inside = t < T
        mk = inside[:, None] & (dk_[None, :] < DK)
        mv = inside[:, None] & (dv_[None, :] < DV)
        G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
        gam, rho, gam_C = chunk_ends(G_, seg, C)
        kr = tl.load(K + t[:, None] * (H * DK) + dk_[None, :], mask=mk, other=0.0)
        dU = rho[:, None] * tl.dot(kr, dS.to(K.dtype.element_ty), input_precision=PREC)
        if HAS_OUT:
            dU += tl.load(DUO + tok * DV + t[:, None] * (H * DV) + dv_[None, :], mask=mv, other=0.0)
        tl.store(DU + t[:, None] * (H * DV) + dv_[None, :], dU, mask=mv)
        wT = tl.load(W + t[None, :] * (H * DK) + dk_[:, None], mask=inside[None, :] & (dk_[:, None] < DK), other=0.0)
        dS = gam_C * dS - tl.dot(wT, dU.to(W.dtype.element_ty), input_precision=PREC)
        if HAS_OUT:
            lam = tl.load(LAM + tok + t * H, mask=inside, other=0.0).to(tl.float32)
            qT = tl.load(Q + tok * DK + t[None, :] * (H * DK) + dk_[:, None],
                         mask=inside[None, :] & (dk_[:, None] < DK), other=0.0).to(tl.float32)
            do = tl.load(DO + tok * DV + t[:, None] * (H * DV) + dv_[None, :], mask=mv, other=0.0)
            dS += tl.dot(qT * (scale * gam * lam)[None, :], do.to(tl.float32), input_precision=PREC)
        if HAS_DHX:
            dS += tl.load(DHX + (n * NC + c) * DK * DV + tile, mask=mt, other=0.0)
    tl.store(DS0 + n * DK * DV + tile, dS, mask=mt)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def state_tile(heads: int, Dv: int, x: Tensor) -> int:
    """The `Dv` tile of the sequential programs: the largest of 64, 32, 16 (at most Dv rounded
    up to a power of two) that still gives at least one program per SM of the device, else 16
    — the pass is latency-bound when B·H is small (long sequences), and narrower tiles spread
    it over more SMs. Under the interpreter (CPU tensors) 16, so tests cross tile edges."""
    if interpreting(x):
        return 16
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    for BV in (64, 32):
        if BV <= pow2(Dv) and heads * triton.cdiv(Dv, BV) >= sms:
            return BV
    return 16


def states_meta(Dk: int, Dv: int, chunk_size: int, dtype: torch.dtype, BV: int) -> dict:
    """Launch parameters of both kernels: the whole of `Dk` in one tile (`Dk ≤ 256`), `Dv` in
    tiles of `BV` (`state_tile`); 8 warps once the state tile reaches 128 × 32 (at 4 warps
    ptxas spills it beside the [C, Dk] operands), but 4 for tiles 32 wide: on an H100 with
    Triton 3.6 the backward kernel at BK = 128, BV = 32 and 8 warps stopped with an illegal
    memory access (B = 4, T = 8192, H = 16, where `state_tile` first picks 32), and ran and
    matched the torch delta rule at 4 (`tests/test_backbone_delta.py`'s T = 8192 GPU case)."""
    BK = pow2(Dk)
    warps = 8 if BK * BV >= 128 * 32 and BV != 32 else 4
    return dict(C=chunk_size, BK=BK, BV=BV, PREC=precisions(dtype)[0], num_warps=warps, num_stages=2)


def states_forward(k: Tensor, w: Tensor, u: Tensor, g: Tensor | None, reset: Tensor | None, S0: Tensor | None,
                   chunk_size: int, states_dtype: torch.dtype, store_u: bool = True):
    """`(h [B,H,NC,Dk,Dv] in states_dtype, U [B,T,H,Dv] in k's dtype or None, S [B,H,Dk,Dv]
    float32)`. Inputs contiguous; `w, u` from `delta_wy.wy_forward`."""
    B, T, H, Dk = k.shape
    Dv = u.shape[-1]
    N, NC = B * H, triton.cdiv(T, chunk_size)
    meta = states_meta(Dk, Dv, chunk_size, k.dtype, state_tile(N, Dv, k))
    h = torch.empty(B, H, NC, Dk, Dv, dtype=states_dtype, device=k.device)
    U = torch.empty_like(u) if store_u else None
    S = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device)
    _states_fwd_kernel[(triton.cdiv(Dv, meta["BV"]), N)](
        k, w, u, g, None if reset is None else reset.view(torch.uint8), S0, h, U, S, T, H, Dk,
        Dv, HAS_G=g is not None, HAS_RESET=reset is not None, HAS_S0=S0 is not None, STORE_U=store_u, **meta)
    return h, U, S


def states_backward(q: Tensor | None, k: Tensor, w: Tensor, do: Tensor | None, lam0: Tensor | None, g, reset,
                    dU_out: Tensor | None, dh_ext: Tensor | None, dS: Tensor | None, scale: float, chunk_size: int,
                    Dv: int):
    """`(dS_after [B,H,NC,Dk,Dv], dU [B,T,H,Dv], dS0 [B,H,Dk,Dv])`, float32:
    the gradient of the state after each chunk, of `U`, and of S0. The output terms (`q, do,
    lam0, dU_out`) are all given or all None."""
    B, T, H, Dk = k.shape
    N, NC = B * H, triton.cdiv(T, chunk_size)
    meta = states_meta(Dk, Dv, chunk_size, k.dtype, state_tile(N, Dv, k))
    dSa = torch.empty(B, H, NC, Dk, Dv, dtype=torch.float32, device=k.device)
    dU = torch.empty(B, T, H, Dv, dtype=torch.float32, device=k.device)
    dS0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device)
    has_out = do is not None
    _states_bwd_kernel[(triton.cdiv(Dv, meta["BV"]), N)](
        q, k, w, do, lam0, g, None if reset is None else reset.view(torch.uint8), dU_out, dh_ext, dS, dSa, dU, dS0,
        float(scale), T, H, Dk, Dv, HAS_G=g is not None, HAS_RESET=reset is not None, HAS_OUT=has_out,
        HAS_DHX=dh_ext is not None, HAS_DSF=dS is not None, **meta)
    return dSa, dU, dS0
