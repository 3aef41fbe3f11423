r"""CUDA kernels of the SSD's chunk-parallel part (transitions without `β`): the output, and every
gradient that a chunk computes from its own tokens and the states around it. One program per
chunk (and `Dv` tile, forward), as fla's `chunk_fwd_o` / `chunk_bwd_dqkwg` / `chunk_bwd_dv` and
mamba's `ssd_chunk_scan`. Notation of `ssd.py`; `h_c` and `D_c` come from `ssd_states.py`.

What it computes
================
Per chunk (`C` tokens, local `i, j`; `Γ ⊙ M` the decayed segment mask, `ρ`, `w`, `d_c` as in
`ssd.py`):

    forward   o_i   = λ0_i · scale · (ρ_i h_cᵀ q_i + Σ_j (Γ ⊙ M)[i,j] (q_i · k_j) v_j)        [C, Dv]
    backward  dq^u  = scale · (ρ ⊙ dO h_cᵀ + ((dO Vᵀ) ⊙ Γ ⊙ M) K)                              [C, Dk]
              dλ0_i = q_i · dq^u_i,   dq_i = λ0_i dq^u_i
              dk    = w ⊙ V D_cᵀ + ((V dOᵀ) ⊙ (Γ ⊙ M)ᵀ ⊙ scale·λ0ᵀ) Q                           [C, Dk]
              dv    = w ⊙ K D_c  + ((K Qᵀ)  ⊙ (Γ ⊙ M)ᵀ ⊙ scale·λ0ᵀ) dO                          [C, Dv]
              dG_i  = q_i · dq_i − k_i · dk_i + [i = last] (d_c ⟨D_c, h_c⟩ + Σ_j k_j · w_j D_c v_j)
              dg_j  = [¬reset_j] Σ_i M[i,j] dG_i                 (the segmented reverse cumsum)

(`last` the chunk's last real token.) Without `HAS_OUT` the backward keeps only the state
write's terms (`w`, `D_c`): the gradient of `ssd_chunk_states` alone.

The `[C, C]` products are formed in the orientation each GEMM consumes — `dO Vᵀ` for `dq`, `V dOᵀ`
and `K Qᵀ` for `dk` and `dv` — rather than transposing a GEMM's result: `tl.trans` of a dot's
output fed to another dot miscompiles on Hopper in Triton 3.4–3.7.0 (fla #640, triton #6124).
Loaded tiles are transposed freely (`tl.trans` of a load is a shared-memory operand view).
The backward program runs in three phases so that few tiles are live at once: `K Qᵀ` then `dv`;
`dO Vᵀ` and `V dOᵀ`; then `dq`, `dk` per `Dk` tile with the row sums of `dλ0` and `dG`. Its tile
loops are runtime loops: unrolled, the scheduler hoists loads across phases and ptxas spills more.

Numerics: GEMMs take the inputs' dtype (the `[C, C]` tiles are rounded to it after masking, as
FlashAttention and fla do) with float32 accumulation; float32 inputs use `input_precision="ieee"`.
`G` is chunk-local, so every exponent is bounded by one chunk's decay. Offsets inside one batch
element and head are int32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.backbone.ssd_states import chunk_scalars, dot_precision, flag_pointers
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["output_forward", "output_backward", "output_tiles"]


@triton.jit
def _output_fwd_kernel(Q, K, V, LAM, G, R, Hs, O, scale, T, H, NC,
                       DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, PREC: tl.constexpr):
    """O [B,T,H,Dv] in q's dtype: one program per (Dv tile, chunk, batch·head)."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first_token = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    Q += first_token * DK
    K += first_token * DK
    V += first_token * DV
    O += first_token * DV
    LAM += first_token
    G += first_token
    R += first_token
    Hs += (i_bh.to(tl.int64) * NC + i_c) * (DK * DV)
    rows, mt, G_c, seg, _, _, _ = chunk_scalars(G, R, T, H, i_c * C, C, HAS_G, HAS_RESET)
    tok = rows * H
    ov = i_v * BV + tl.arange(0, BV)
    m_v = mt[:, None] & (ov[None, :] < DV)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    scores = tl.zeros([C, C], dtype=tl.float32)
    for kk in tl.static_range(0, DK, BK):
        ok = kk + tl.arange(0, BK)
        q = tl.load(Q + tok[:, None] * DK + ok[None, :], mask=mt[:, None] & (ok[None, :] < DK), other=0.0)
        k = tl.load(K + tok[:, None] * DK + ok[None, :], mask=mt[:, None] & (ok[None, :] < DK), other=0.0)
        h = tl.load(Hs + ok[:, None] * DV + ov[None, :], mask=(ok[:, None] < DK) & (ov[None, :] < DV),
                    other=0.0)
        acc = tl.dot(q, h.to(q.dtype), acc, input_precision=PREC)
        scores = tl.dot(q, tl.trans(k), scores, input_precision=PREC)
    idx = tl.arange(0, C)
    mask = (idx[:, None] >= idx[None, :]) & (seg[:, None] == seg[None, :])
    scores = tl.where(mask, scores * tl.exp(tl.where(mask, G_c[:, None] - G_c[None, :], 0.0)), 0.0)
    rho = tl.where(seg == 0, tl.exp(G_c), 0.0)
    v = tl.load(V + tok[:, None] * DV + ov[None, :], mask=m_v, other=0.0)
    acc = tl.dot(scores.to(v.dtype), v, acc * rho[:, None], input_precision=PREC)
    lam = tl.load(LAM + tok, mask=mt, other=0.0).to(tl.float32)
    tl.store(O + tok[:, None] * DV + ov[None, :], (acc * (lam * scale)[:, None]).to(O.dtype.element_ty), mask=m_v)


@triton.jit
def _output_bwd_kernel(Q, K, V, DO, LAM, G, R, Hs, DHE, DQ, DK_, DV_, DLAM, DG, scale, T, H, NC,
                       DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       HAS_OUT: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, PREC: tl.constexpr):
    """dk, dv (and with HAS_OUT dq, dλ0; with HAS_G dg) of one chunk: one program per (chunk, batch·head)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    first_token = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    Q += first_token * DK
    K += first_token * DK
    DQ += first_token * DK
    DK_ += first_token * DK
    V += first_token * DV
    DO += first_token * DV
    DV_ += first_token * DV
    LAM += first_token
    DLAM += first_token
    G += first_token
    DG += first_token
    R += first_token
    Hs += (i_bh.to(tl.int64) * NC + i_c) * (DK * DV)
    DHE += (i_bh.to(tl.int64) * NC + i_c) * (DK * DV)
    t0 = i_c * C
    rows, mt, G_c, seg, G_last, seg_last, first = chunk_scalars(G, R, T, H, t0, C, HAS_G, HAS_RESET)
    tok = rows * H
    idx = tl.arange(0, C)
    # [j, i] orientation: M[i, j] with the key j on the rows
    mask_t = (idx[:, None] <= idx[None, :]) & (seg[:, None] == seg[None, :])
    w = tl.where(seg == seg_last, tl.exp(G_last - G_c), 0.0)
    if HAS_OUT:
        lam = tl.load(LAM + tok, mask=mt, other=0.0).to(tl.float32)
        # Γ[i, j] · scale · λ0_i on the [j, i] tiles
        weight_t = tl.exp(tl.where(mask_t, G_c[None, :] - G_c[:, None], 0.0)) * (lam * scale)[None, :]

        # phase 1: K Qᵀ, then dv
        kq = tl.zeros([C, C], dtype=tl.float32)
        for kk in range(0, DK, BK):
            ok = kk + tl.arange(0, BK)
            m_k = mt[:, None] & (ok[None, :] < DK)
            k = tl.load(K + tok[:, None] * DK + ok[None, :], mask=m_k, other=0.0)
            q = tl.load(Q + tok[:, None] * DK + ok[None, :], mask=m_k, other=0.0)
            kq = tl.dot(k, tl.trans(q), kq, input_precision=PREC)
        kq = tl.where(mask_t, kq * weight_t, 0.0).to(Q.dtype.element_ty)
    for vv in range(0, DV, BV):
        ov = vv + tl.arange(0, BV)
        m_v = mt[:, None] & (ov[None, :] < DV)
        dv = tl.zeros([C, BV], dtype=tl.float32)
        for kk in range(0, DK, BK):
            ok = kk + tl.arange(0, BK)
            k = tl.load(K + tok[:, None] * DK + ok[None, :], mask=mt[:, None] & (ok[None, :] < DK), other=0.0)
            dhe = tl.load(DHE + ok[:, None] * DV + ov[None, :], mask=(ok[:, None] < DK) & (ov[None, :] < DV),
                          other=0.0)
            dv = tl.dot(k, dhe.to(k.dtype), dv, input_precision=PREC)
        dv = dv * w[:, None]
        if HAS_OUT:
            do = tl.load(DO + tok[:, None] * DV + ov[None, :], mask=m_v, other=0.0)
            dv = tl.dot(kq, do, dv, input_precision=PREC)
        tl.store(DV_ + tok[:, None] * DV + ov[None, :], dv.to(DV_.dtype.element_ty), mask=m_v)

    # phase 2: dO Vᵀ and V dOᵀ
    if HAS_OUT:
        dov = tl.zeros([C, C], dtype=tl.float32)
        vdo = tl.zeros([C, C], dtype=tl.float32)
        for vv in range(0, DV, BV):
            ov = vv + tl.arange(0, BV)
            m_v = mt[:, None] & (ov[None, :] < DV)
            do = tl.load(DO + tok[:, None] * DV + ov[None, :], mask=m_v, other=0.0)
            v = tl.load(V + tok[:, None] * DV + ov[None, :], mask=m_v, other=0.0)
            dov = tl.dot(do, tl.trans(v), dov, input_precision=PREC)
            vdo = tl.dot(v, tl.trans(do), vdo, input_precision=PREC)
        mask = (idx[:, None] >= idx[None, :]) & (seg[:, None] == seg[None, :])
        gamma = tl.exp(tl.where(mask, G_c[:, None] - G_c[None, :], 0.0))
        dov = tl.where(mask, dov * gamma * scale, 0.0).to(Q.dtype.element_ty)
        vdo = tl.where(mask_t, vdo * weight_t, 0.0).to(Q.dtype.element_ty)
        rho = tl.where(seg == 0, tl.exp(G_c), 0.0) * scale
        dlam = tl.zeros([C], dtype=tl.float32)

    # phase 3: dq, dk per Dk tile; the row sums of dλ0 and dG
    dG = tl.zeros([C], dtype=tl.float32)
    kdk_state = tl.zeros([C], dtype=tl.float32)  # k_j · w_j D_c v_j
    inner = tl.zeros([BK], dtype=tl.float32)  # ⟨D_c, h_c⟩ by rows of the [Dk, Dv] tiles
    for kk in range(0, DK, BK):
        ok = kk + tl.arange(0, BK)
        m_k = mt[:, None] & (ok[None, :] < DK)
        dk = tl.zeros([C, BK], dtype=tl.float32)
        if HAS_OUT:
            dq = tl.zeros([C, BK], dtype=tl.float32)
        for vv in range(0, DV, BV):
            ov = vv + tl.arange(0, BV)
            m_v = mt[:, None] & (ov[None, :] < DV)
            m_s = (ok[:, None] < DK) & (ov[None, :] < DV)
            v = tl.load(V + tok[:, None] * DV + ov[None, :], mask=m_v, other=0.0)
            dhe = tl.load(DHE + ok[:, None] * DV + ov[None, :], mask=m_s, other=0.0)
            dk = tl.dot(v, tl.trans(dhe.to(v.dtype)), dk, input_precision=PREC)
            if HAS_OUT or HAS_G:
                h = tl.load(Hs + ok[:, None] * DV + ov[None, :], mask=m_s, other=0.0)
            if HAS_G:
                inner += tl.sum(h.to(tl.float32) * dhe.to(tl.float32), axis=1)
            if HAS_OUT:
                do = tl.load(DO + tok[:, None] * DV + ov[None, :], mask=m_v, other=0.0)
                dq = tl.dot(do, tl.trans(h.to(do.dtype)), dq, input_precision=PREC)
        k = tl.load(K + tok[:, None] * DK + ok[None, :], mask=m_k, other=0.0)
        dk = dk * w[:, None]
        kdk = tl.sum(k.to(tl.float32) * dk, axis=1)
        kdk_state += kdk
        dG -= kdk
        if HAS_OUT:
            q = tl.load(Q + tok[:, None] * DK + ok[None, :], mask=m_k, other=0.0)
            dq = tl.dot(dov, k, dq * rho[:, None], input_precision=PREC)
            qdq = tl.sum(q.to(tl.float32) * dq, axis=1)
            dlam += qdq
            dq = dq * lam[:, None]
            dk_out = tl.dot(vdo, q, input_precision=PREC)
            dG += qdq * lam - tl.sum(k.to(tl.float32) * dk_out, axis=1)
            dk += dk_out
            tl.store(DQ + tok[:, None] * DK + ok[None, :], dq.to(DQ.dtype.element_ty), mask=m_k)
        tl.store(DK_ + tok[:, None] * DK + ok[None, :], dk.to(DK_.dtype.element_ty), mask=m_k)
    if HAS_OUT:
        tl.store(DLAM + tok, dlam.to(DLAM.dtype.element_ty), mask=mt)
    if HAS_G:
        # ⟨D_c, h_{c+1}⟩ = d_c ⟨D_c, h_c⟩ + Σ_j k_j · w_j D_c v_j, at the chunk's last real token
        decay = tl.where(seg_last == 0, tl.exp(G_last), 0.0)
        end = decay * tl.sum(inner, axis=0) + tl.sum(kdk_state, axis=0)
        dG += tl.where(idx == tl.minimum(T - t0, C) - 1, end, 0.0)
        dg = tl.where(first == 0, tl.sum(tl.where(mask_t, dG[None, :], 0.0), axis=1), 0.0)
        tl.store(DG + tok, dg.to(DG.dtype.element_ty), mask=mt)

def output_tiles(Dk: int, Dv: int, C: int, interpreter: bool) -> dict:
    """Tiles and warps of both kernels, from the shapes alone. Forward: the whole `Dv` (≤ 128) per
    program, so `Q Kᵀ` is formed once per chunk. Backward: 64×64 tiles of `[Dk, Dv]` and 8 warps,
    the configuration of fewest spills under ptxas for sm_90 (the program holds three `[C, C]`
    tiles and two `[C, BK]` accumulators). The interpreter takes whole heads."""
    if interpreter:
        return dict(fwd=dict(BK=pow2(Dk), BV=pow2(Dv), num_warps=4), bwd=dict(BK=pow2(Dk), BV=pow2(Dv), num_warps=4))
    fwd_bv = min(128, pow2(Dv))
    return dict(fwd=dict(BK=min(64, pow2(Dk)), BV=fwd_bv, num_warps=8 if C * fwd_bv >= 64 * 128 else 4),
                bwd=dict(BK=min(64, pow2(Dk)), BV=min(64, pow2(Dv)), num_warps=8 if C >= 64 else 4))


def output_forward(q: Tensor, k: Tensor, v: Tensor, lam0: Tensor, g: Tensor | None, reset: Tensor | None, h: Tensor,
                   scale: float, chunk_size: int) -> Tensor:
    """o [B,T,H,Dv] in q's dtype from contiguous inputs and the chunk states `h [B,H,NC,Dk,Dv]`."""
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    NC = h.shape[2]
    cfg = output_tiles(Dk, Dv, chunk_size, interpreting(q))["fwd"]
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    gp, rp = flag_pointers(g, reset, q)
    grid = (triton.cdiv(Dv, cfg["BV"]), NC, B * H)
    _output_fwd_kernel[grid](q, k, v, lam0, gp, rp, h, o, float(scale), T, H, NC, DK=Dk, DV=Dv, C=chunk_size,
                             BK=cfg["BK"], BV=cfg["BV"], HAS_G=g is not None, HAS_RESET=reset is not None,
                             PREC=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=2)
    return o


def output_backward(q: Tensor | None, k: Tensor, v: Tensor, do: Tensor | None, lam0: Tensor | None, g: Tensor | None,
                    reset: Tensor | None, h: Tensor | None, dhe: Tensor, scale: float, chunk_size: int):
    """`(dq, dk, dv, dlam0, dg)` of one backward pass over every chunk. `q, do, lam0` all given
    (the output's gradients and the state write's) or all None (the state write's alone: `dq`,
    `dlam0` None); `h` is needed where `do` or `g` is given; `dg` None without `g`."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    NC = dhe.shape[2]
    cfg = output_tiles(Dk, Dv, chunk_size, interpreting(k))["bwd"]
    has_out = do is not None
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq = torch.empty_like(q) if has_out else None
    dlam = torch.empty_like(lam0) if has_out else None
    dg = torch.empty_like(g) if g is not None else None
    gp, rp = flag_pointers(g, reset, k)
    _output_bwd_kernel[(NC, B * H)](
        q if has_out else k, k, v, do if has_out else v, lam0 if has_out else k, gp, rp, dhe if h is None else h, dhe,
        dq if has_out else dk, dk, dv, dlam if has_out else dk, dk if dg is None else dg, float(scale), T, H, NC,
        DK=Dk, DV=Dv, C=chunk_size, BK=cfg["BK"], BV=cfg["BV"], HAS_OUT=has_out, HAS_G=g is not None,
        HAS_RESET=reset is not None, PREC=dot_precision(k.dtype), num_warps=cfg["num_warps"], num_stages=2)
    return dq, dk, dv, dlam, dg
