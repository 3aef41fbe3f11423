r"""The chunked delta rule's output stage in Triton, and the chunk-parallel part of its backward.
Notation of `delta.py`; one program per chunk and head (and `Dv` tile for the output), all
chunks in parallel, `h` the state before the chunk, `dS` the gradient of the state after it.

Output:

    o = diag(λ0 · scale) [diag(γ) Q h + (QKᵀ ⊙ Γ) U]                                   [C, Dv]

The intra-chunk gradient of `U`, before the state pass (`delta_states.py`) adds its own:

    dU_out = (QKᵀ ⊙ Γ)ᵀ dÕ,   dÕ = diag(λ0 · scale) dO                              [C, Dv] float32

Then, with `dS` from the state pass (`_dqkwg_kernel`, all of `Dk` per program):

    dQ̃ = scale [diag(γ) dO hᵀ + (dO Uᵀ ⊙ Γ) K]:   dλ0 = rowsum(dQ̃ ⊙ Q),   dQ = diag(λ0) dQ̃
    dK = diag(ρ) U dSᵀ + (diag(λ0 · scale)(dO Uᵀ) ⊙ Γ)ᵀ Q          (float32, completed by the WY stage)
    dG = rowsum(dQ ⊙ Q) − rowsum(dK ⊙ K) + [t = last] (Σ_s ρ_s ⟨(U dSᵀ)_s, k_s⟩ + γ_C ⟨h, dS⟩)

(`dG` collects every gradient of the chunk-local `G` through `γ, ρ, γ_C` and the `Γ` of the
output; the WY stage adds its own and takes the reverse cumsum.) `dK` is computed as `dKᵀ`
`[Dk, C]` — `dS Uᵀ diag(ρ) + Qᵀ ds` with every dot operand a loaded tensor or a dot result used
untransposed — and stored through transposed addresses: no `tl.trans` of a register tensor that
came out of a dot, the pattern that Triton 3.4–3.7.0 miscompiles on Hopper (fla issue #640).
Without the output (the stage piece's backward), only the `dS` and gate terms remain. (fla's
`chunk_bwd_dqkwg` also forms `dw = −dU hᵀ`; here the WY stage does, from the float32 `dU` it
reads anyway, so `dw` is neither rounded nor stored.)

Shapes: `q, k [B,T,H,Dk]`, `U, dO, o [B,T,H,Dv]`, `lam0 [B,T,H]`, `h [B,H,NC,Dk,Dv]` in the
inputs' dtype, `dS [B,H,NC,Dk,Dv]` float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.backbone.delta_common import chunk_ends, chunk_gates, decay, precisions
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["output_forward", "output_dU", "output_backward", "output_meta"]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _output_fwd_kernel(Q, K, UN, HS, LAM, G, RESET, O, scale, T, H: tl.constexpr, DK: tl.constexpr,
                       DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                       HAS_RESET: tl.constexpr, PREC: tl.constexpr):
    pv = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    n = tl.program_id(2).to(tl.int64)
    NC = tl.cdiv(T, C)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    t = c * C + o
    inside = t < T
    dv_ = pv * BV + tl.arange(0, BV)
    mv = inside[:, None] & (dv_[None, :] < DV)
    Q += tok * DK
    K += tok * DK
    HS += (n * NC + c) * DK * DV
    acc = tl.zeros([C, BV], dtype=tl.float32)
    A = tl.zeros([C, C], dtype=tl.float32)
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        md = d < DK
        q = tl.load(Q + t[:, None] * (H * DK) + d[None, :], mask=inside[:, None] & md[None, :], other=0.0)
        kT = tl.load(K + t[None, :] * (H * DK) + d[:, None], mask=inside[None, :] & md[:, None], other=0.0)
        h = tl.load(HS + d[:, None] * DV + dv_[None, :], mask=md[:, None] & (dv_[None, :] < DV), other=0.0)
        acc += tl.dot(q, h, input_precision=PREC)
        A += tl.dot(q, kT, input_precision=PREC)
    G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
    gam, _, _ = chunk_ends(G_, seg, C)
    lam = tl.load(LAM + tok + t * H, mask=inside, other=0.0).to(tl.float32)
    Un = tl.load(UN + tok * DV + t[:, None] * (H * DV) + dv_[None, :], mask=mv, other=0.0).to(tl.float32)
    acc = gam[:, None] * acc + tl.dot(A * decay(G_, seg, C, False, False), Un, input_precision=PREC)
    tl.store(O + tok * DV + t[:, None] * (H * DV) + dv_[None, :], ((scale * lam)[:, None] * acc).to(
        O.dtype.element_ty), mask=mv)


@triton.jit
def _output_dU_kernel(Q, K, DO, LAM, G, RESET, DUO, scale, T, H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_G: tl.constexpr,
                      HAS_RESET: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    t = c * C + o
    inside = t < T
    Q += tok * DK
    K += tok * DK
    DO += tok * DV
    DUO += tok * DV
    At = tl.zeros([C, C], dtype=tl.float32)  # At[s, t] = k_s · q_t
    for k0 in range(0, DK, BK):
        d = k0 + tl.arange(0, BK)
        md = d < DK
        kr = tl.load(K + t[:, None] * (H * DK) + d[None, :], mask=inside[:, None] & md[None, :], other=0.0)
        qT = tl.load(Q + t[None, :] * (H * DK) + d[:, None], mask=inside[None, :] & md[:, None], other=0.0)
        At += tl.dot(kr, qT, input_precision=PREC)
    G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
    lam = tl.load(LAM + tok + t * H, mask=inside, other=0.0).to(tl.float32)
    At = At * decay(G_, seg, C, False, True) * (scale * lam)[None, :]
    for v0 in range(0, DV, BV):
        d = v0 + tl.arange(0, BV)
        mv = inside[:, None] & (d[None, :] < DV)
        do = tl.load(DO + t[:, None] * (H * DV) + d[None, :], mask=mv, other=0.0).to(tl.float32)
        tl.store(DUO + t[:, None] * (H * DV) + d[None, :], tl.dot(At, do, input_precision=PREC), mask=mv)


@triton.jit
def _dqkwg_kernel(Q, K, UN, HS, DHS, DO, LAM, G, RESET, DQ, DKP, DGP, DLAM, scale, T, H: tl.constexpr,
                  DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, HAS_OUT: tl.constexpr, PREC: tl.constexpr):
    c = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    NC = tl.cdiv(T, C)
    tok = (n // H) * T * H + n % H
    o = tl.arange(0, C)
    t = c * C + o
    inside = t < T
    dk_ = tl.arange(0, BK)
    md = dk_ < DK
    mk = inside[:, None] & md[None, :]
    mkT = md[:, None] & inside[None, :]
    K += tok * DK
    UN += tok * DV
    HS += (n * NC + c) * DK * DV
    DHS += (n * NC + c) * DK * DV
    dkT = tl.zeros([BK, C], dtype=tl.float32)  # (U dSᵀ)ᵀ, then dKᵀ
    hdS = 0.0
    dOh = tl.zeros([C, BK], dtype=tl.float32)
    DS = tl.zeros([C, C], dtype=tl.float32)  # dO Uᵀ
    for v0 in range(0, DV, BV):
        d = v0 + tl.arange(0, BV)
        mv = inside[:, None] & (d[None, :] < DV)
        mt = md[:, None] & (d[None, :] < DV)
        Un = tl.load(UN + t[:, None] * (H * DV) + d[None, :], mask=mv, other=0.0)
        h = tl.load(HS + dk_[:, None] * DV + d[None, :], mask=mt, other=0.0)
        dS = tl.load(DHS + dk_[:, None] * DV + d[None, :], mask=mt, other=0.0)
        dkT += tl.dot(dS, tl.trans(Un.to(tl.float32)), input_precision=PREC)
        hdS += tl.sum(h.to(tl.float32) * dS)
        if HAS_OUT:
            do = tl.load(DO + tok * DV + t[:, None] * (H * DV) + d[None, :], mask=mv, other=0.0)
            dOh += tl.dot(do, tl.trans(h), input_precision=PREC)
            DS += tl.dot(do, tl.trans(Un), input_precision=PREC)
    G_, seg = chunk_gates(G, RESET, tok, t, T, H, C, HAS_G, HAS_RESET)
    gam, rho, gam_C = chunk_ends(G_, seg, C)
    kT = tl.load(K + t[None, :] * (H * DK) + dk_[:, None], mask=mkT, other=0.0).to(tl.float32)
    dkT = dkT * rho[None, :]
    last = tl.sum(dkT * kT) + gam_C * hdS  # Σ_s ρ_s ⟨(U dSᵀ)_s, k_s⟩ + γ_C ⟨h, dS⟩
    if HAS_OUT:
        q = tl.load(Q + tok * DK + t[:, None] * (H * DK) + dk_[None, :], mask=mk, other=0.0).to(tl.float32)
        kr = tl.load(K + t[:, None] * (H * DK) + dk_[None, :], mask=mk, other=0.0).to(tl.float32)
        qT = tl.load(Q + tok * DK + t[None, :] * (H * DK) + dk_[:, None], mask=mkT, other=0.0).to(tl.float32)
        lam = tl.load(LAM + tok + t * H, mask=inside, other=0.0).to(tl.float32)
        DSG = DS * decay(G_, seg, C, False, False)
        dq = scale * (gam[:, None] * dOh + tl.dot(DSG, kr, input_precision=PREC))
        dlam = tl.sum(dq * q, axis=1)
        dq = lam[:, None] * dq
        dkT += tl.dot(qT, DSG * (scale * lam)[:, None], input_precision=PREC)
        tl.store(DQ + tok * DK + t[:, None] * (H * DK) + dk_[None, :], dq.to(DQ.dtype.element_ty), mask=mk)
        tl.store(DLAM + tok + t * H, dlam.to(DLAM.dtype.element_ty), mask=inside)
    tl.store(DKP + tok * DK + t[None, :] * (H * DK) + dk_[:, None], dkT, mask=mkT)
    if HAS_G:
        dG = tl.where(o == tl.minimum(T - c * C, C) - 1, last, 0.0) - tl.sum(dkT * kT, axis=0)
        if HAS_OUT:
            dG += lam * dlam
        tl.store(DGP + tok + t * H, dG, mask=inside)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def output_meta(Dk: int, Dv: int, chunk_size: int, dtype: torch.dtype) -> dict:
    """Launch parameters of the three kernels, a function of the shapes and the dtype only:
    `fwd`/`dU` tile `Dk` and `Dv` by at most 128 (8 warps for 128 × 128 tiles); `dqkwg` holds
    all of `Dk` (its row sums need it) and tiles `Dv` by at most 16, 8 warps for 64-token chunks
    or Dk ≥ 128. The `Dv` tile of `dqkwg` is a correctness bound, not a tuning: on an H100 with
    Triton 3.6 and 16-bit gated inputs, tiles of 32 or 64 at 8 warps and of 32 at 4 warps gave
    `dq, dk, dλ0, dg` 3–35% off the float64 path, while tiles of 16 at 8 warps (and of 32 at 2
    warps) came within 1.3× of the torch path's error (`perf/results/gpu_tests-h100.log`; one
    ungated case still misses, see `dla.ops.backbone`'s rule); the same Triton range miscompiles
    fla's `chunk_bwd_dqkwg` on Hopper for some block widths and warp counts (fla #640, #984)."""
    prec = precisions(dtype)[0]
    BK, BV = min(pow2(Dk), 128), min(pow2(Dv), 128)
    wide = 8 if BK * BV >= 128 * 128 else 4
    return dict(
        fwd=dict(C=chunk_size, BK=BK, BV=BV, PREC=prec, num_warps=wide, num_stages=2),
        dU=dict(C=chunk_size, BK=BK, BV=BV, PREC=prec, num_warps=wide, num_stages=2),
        dqkwg=dict(C=chunk_size, BK=pow2(Dk), BV=min(pow2(Dv), 16), PREC=prec,
                   num_warps=8 if pow2(Dk) >= 128 or chunk_size >= 64 else 4, num_stages=2),
    )


def _flags(g, reset) -> dict:
    return dict(HAS_G=g is not None, HAS_RESET=reset is not None)


def _reset_bytes(reset: Tensor | None) -> Tensor | None:
    return None if reset is None else reset.view(torch.uint8)


def output_forward(q: Tensor, k: Tensor, U: Tensor, h: Tensor, lam0: Tensor, g, reset, scale: float,
                   chunk_size: int) -> Tensor:
    """o [B,T,H,Dv] in q's dtype. Inputs contiguous; `U, h` from `delta_states.states_forward`."""
    B, T, H, Dk = q.shape
    Dv = U.shape[-1]
    meta = output_meta(Dk, Dv, chunk_size, q.dtype)["fwd"]
    interpreting(q)
    out = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(Dv, meta["BV"]), triton.cdiv(T, chunk_size), B * H)
    _output_fwd_kernel[grid](q, k, U, h, lam0, g, _reset_bytes(reset), out, float(scale), T, H, Dk, Dv,
                             **_flags(g, reset), **meta)
    return out


def output_dU(q: Tensor, k: Tensor, do: Tensor, lam0: Tensor, g, reset, scale: float, chunk_size: int) -> Tensor:
    """dU_out = (QKᵀ ⊙ Γ)ᵀ dÕ [B,T,H,Dv] float32."""
    B, T, H, Dk = q.shape
    Dv = do.shape[-1]
    meta = output_meta(Dk, Dv, chunk_size, q.dtype)["dU"]
    interpreting(q)
    dU = torch.empty(B, T, H, Dv, dtype=torch.float32, device=q.device)
    _output_dU_kernel[(triton.cdiv(T, chunk_size), B * H)](q, k, do, lam0, g, _reset_bytes(reset), dU, float(scale),
                                                           T, H, Dk, Dv, **_flags(g, reset), **meta)
    return dU


def output_backward(q: Tensor | None, k: Tensor, U: Tensor, h: Tensor, dS: Tensor, do: Tensor | None,
                    lam0: Tensor | None, g, reset, scale: float, chunk_size: int):
    """`(dq in q's dtype, dk_part float32, dG_part float32 or None, dlam0 in lam0's dtype)` of
    the module doc; `dS` from `delta_states.states_backward`. Without the output (`q, do, lam0`
    None) `dq` and `dlam0` are None."""
    B, T, H, Dk = k.shape
    Dv = U.shape[-1]
    meta = output_meta(Dk, Dv, chunk_size, k.dtype)["dqkwg"]
    interpreting(k)
    has_out = do is not None
    dq = torch.empty_like(q) if has_out else None
    dlam = torch.empty_like(lam0) if has_out else None
    dk = torch.empty(B, T, H, Dk, dtype=torch.float32, device=k.device)
    dG = torch.empty(B, T, H, dtype=torch.float32, device=k.device) if g is not None else None
    _dqkwg_kernel[(triton.cdiv(T, chunk_size), B * H)](
        q, k, U, h, dS, do, lam0, g, _reset_bytes(reset), dq, dk, dG, dlam, float(scale), T, H, Dk, Dv,
        HAS_OUT=has_out, **_flags(g, reset), **meta)
    return dq, dk, dG, dlam
