r"""CUDA kernels of the SSD's state pass (transitions without `β`), forward and backward: one
sequential program per `(batch·head, Dk tile, Dv tile)` walking the chunks, as fla's
`chunk_fwd_h` / `chunk_bwd_dh` and mamba's `ssd_state_passing`. Notation of `ssd.py`.

What it computes
================
Per chunk `c` of `C` tokens (chunk-local `G = cumsum(g)`, segment index `σ = cumsum(reset)`,
`w_j = [σ_j = σ_{C−1}] exp(G_{C−1} − G_j)`, `d_c = [σ_{C−1} = 0] exp(G_{C−1})`,
`ρ_i = [σ_i = 0] exp(G_i)`):

    forward:   h_0 = S0,   h_{c+1} = d_c h_c + Kᵀ (w ⊙ V)                      h [B,H,NC,Dk,Dv], S = h_NC
    backward:  D_{NC−1} = dS,   D_{c−1} = d_c D_c + scale · (ρ ⊙ λ0 ⊙ Q)ᵀ dO + dh_c,   dS0 = D_{−1}
               DHE [B,H,NC,Dk,Dv] holds D_c, the gradient of the state after chunk c

(`dO` terms only with `HAS_OUT`, the output stage's own `∂L/∂h_c`; `dh_c` only with `HAS_DH`, a
gradient of `h` from outside). The chunk-local scalars are recomputed from `g` and `reset` in
every kernel (a `[C]` cumsum), never stored.

Numerics: the state accumulates in float32 across chunks; `h` and `D` are stored in the inputs'
dtype (16-bit inputs: rounded once for the GEMMs that read them, as fla stores its chunk states;
float32 inputs: float32). The dots take the inputs' dtype (`w ⊙ V` and `ρλ0 ⊙ Q` rounded to it,
as fla) with float32 accumulation; float32 inputs use `input_precision="ieee"`. Offsets inside
one batch element and head are int32 (the entry points check `T·H·max(Dk, Dv) < 2³¹`), the bases
int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.triton_utils import interpreting, pow2

__all__ = ["chunk_scalars", "state_forward", "state_backward", "state_tiles", "dot_precision", "flag_pointers",
           "multiprocessors"]


@triton.jit
def chunk_scalars(G, R, T, H, t0, C: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr):
    """The chunk starting at token `t0` (`G`, `R` point at this batch element and head): rows,
    row mask, `G [C]`, `σ [C]`, `G_{C−1}`, `σ_{C−1}` and `[reset] [C]` (the padding beyond `T`
    has `g = 0` and no reset)."""
    rows = t0 + tl.arange(0, C)
    mt = rows < T
    off = rows * H
    if HAS_G:
        G_c = tl.cumsum(tl.load(G + off, mask=mt, other=0.0).to(tl.float32), axis=0)
    else:
        G_c = tl.zeros([C], dtype=tl.float32)
    if HAS_RESET:
        first = tl.load(R + off, mask=mt, other=0).to(tl.int32)
    else:
        first = tl.zeros([C], dtype=tl.int32)
    seg = tl.cumsum(first, axis=0)
    is_last = tl.arange(0, C) == C - 1
    G_last = tl.sum(tl.where(is_last, G_c, 0.0), axis=0)
    seg_last = tl.sum(tl.where(is_last, seg, 0), axis=0)
    return rows, mt, G_c, seg, G_last, seg_last, first


@triton.jit
def _state_fwd_kernel(K, V, G, R, S0, Hs, SF, T, H, NC,
                      DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, HAS_S0: tl.constexpr, PREC: tl.constexpr):
    """h [B,H,NC,Dk,Dv] (the state before each chunk) and SF [B,H,Dk,Dv] float32 (the last)."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first_token = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    K += first_token * DK
    V += first_token * DV
    G += first_token
    R += first_token
    Hs += i_bh.to(tl.int64) * NC * (DK * DV)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    m_kv = (ok[:, None] < DK) & (ov[None, :] < DV)
    tile = ok[:, None] * DV + ov[None, :]
    if HAS_S0:
        acc = tl.load(S0 + i_bh.to(tl.int64) * (DK * DV) + tile, mask=m_kv, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BK, BV], dtype=tl.float32)
    for c in range(NC):
        tl.store(Hs + c * (DK * DV) + tile, acc.to(Hs.dtype.element_ty), mask=m_kv)
        rows, mt, G_c, seg, G_last, seg_last, _ = chunk_scalars(G, R, T, H, c * C, C, HAS_G, HAS_RESET)
        tok = rows * H
        k = tl.load(K + tok[:, None] * DK + ok[None, :], mask=mt[:, None] & (ok[None, :] < DK), other=0.0)
        v = tl.load(V + tok[:, None] * DV + ov[None, :], mask=mt[:, None] & (ov[None, :] < DV), other=0.0)
        w = tl.where(seg == seg_last, tl.exp(G_last - G_c), 0.0)
        decay = tl.where(seg_last == 0, tl.exp(G_last), 0.0)
        acc = acc * decay + tl.dot(tl.trans(k), (v * w[:, None]).to(k.dtype), input_precision=PREC)
    tl.store(SF + i_bh.to(tl.int64) * (DK * DV) + tile, acc, mask=m_kv)


@triton.jit
def _state_bwd_kernel(Q, DO, LAM, G, R, DH, DSF, DHE, DS0, scale, T, H, NC,
                      DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      HAS_OUT: tl.constexpr, HAS_DH: tl.constexpr, HAS_DSF: tl.constexpr, HAS_DS0: tl.constexpr,
                      HAS_G: tl.constexpr, HAS_RESET: tl.constexpr, PREC: tl.constexpr):
    """DHE [B,H,NC,Dk,Dv] (D_c) and DS0 [B,H,Dk,Dv] float32 (D_{−1}), walking the chunks backwards."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    first_token = (i_bh // H).to(tl.int64) * T * H + i_bh % H
    Q += first_token * DK
    DO += first_token * DV
    LAM += first_token
    G += first_token
    R += first_token
    DHE += i_bh.to(tl.int64) * NC * (DK * DV)
    DH += i_bh.to(tl.int64) * NC * (DK * DV)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    m_kv = (ok[:, None] < DK) & (ov[None, :] < DV)
    tile = ok[:, None] * DV + ov[None, :]
    if HAS_DSF:
        acc = tl.load(DSF + i_bh.to(tl.int64) * (DK * DV) + tile, mask=m_kv, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BK, BV], dtype=tl.float32)
    for i in range(NC):
        c = NC - 1 - i
        state = c * (DK * DV) + tile
        tl.store(DHE + state, acc.to(DHE.dtype.element_ty), mask=m_kv)
        rows, mt, G_c, seg, G_last, seg_last, _ = chunk_scalars(G, R, T, H, c * C, C, HAS_G, HAS_RESET)
        acc = acc * tl.where(seg_last == 0, tl.exp(G_last), 0.0)
        if HAS_OUT:
            tok = rows * H
            q = tl.load(Q + tok[:, None] * DK + ok[None, :], mask=mt[:, None] & (ok[None, :] < DK), other=0.0)
            do = tl.load(DO + tok[:, None] * DV + ov[None, :], mask=mt[:, None] & (ov[None, :] < DV), other=0.0)
            lam = tl.load(LAM + tok, mask=mt, other=0.0).to(tl.float32)
            rho = tl.where(seg == 0, tl.exp(G_c), 0.0) * lam * scale
            acc += tl.dot(tl.trans((q * rho[:, None]).to(do.dtype)), do, input_precision=PREC)
        if HAS_DH:
            acc += tl.load(DH + state, mask=m_kv, other=0.0).to(tl.float32)
    if HAS_DS0:
        tl.store(DS0 + i_bh.to(tl.int64) * (DK * DV) + tile, acc, mask=m_kv)


def dot_precision(dtype: torch.dtype) -> str:
    """IEEE dots for float32 inputs (exact to float32 rounding); 16-bit operands use the tensor
    cores whatever the flag says."""
    return "ieee" if dtype == torch.float32 else "tf32"


def state_tiles(Dk: int, Dv: int, N: int, sms: int | None) -> tuple[int, int, int]:
    """`(BK, BV, num_warps)` of the state pass for `N = B·H` heads on a GPU of `sms`
    multiprocessors (None: the interpreter, which takes the whole state in one tile). Its
    programs each walk every chunk, so the tile is what sets the parallelism: 64×64 where
    `N·⌈Dk/64⌉·⌈Dv/64⌉` programs give every SM two, else 32×32 (four times as many programs:
    long sequences, few heads)."""
    if sms is None:
        return pow2(Dk), pow2(Dv), 4
    if N * triton.cdiv(Dk, 64) * triton.cdiv(Dv, 64) >= 2 * sms:
        return min(64, pow2(Dk)), min(64, pow2(Dv)), 4
    return min(32, pow2(Dk)), min(32, pow2(Dv)), 2


def multiprocessors(x: Tensor) -> int | None:
    """The SM count of `x`'s GPU, None when a launch over `x` runs through the interpreter."""
    return None if interpreting(x) else torch.cuda.get_device_properties(x.device).multi_processor_count


def flag_pointers(g: Tensor | None, reset: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """The pointers behind `g` and `reset` (a `uint8` view of the bool mask); `like` stands in
    for an absent one, which the kernels never read."""
    return (like if g is None else g), (like if reset is None else reset.view(torch.uint8))


def state_forward(k: Tensor, v: Tensor, g: Tensor | None, reset: Tensor | None, S0: Tensor | None,
                  chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(h [B,H,NC,Dk,Dv] in k's dtype, S [B,H,Dk,Dv] float32)`: contiguous inputs, `g` float32
    or k's dtype, `reset` bool, `S0` float32 or None."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    NC = triton.cdiv(T, chunk_size)
    BK, BV, warps = state_tiles(Dk, Dv, B * H, multiprocessors(k))
    h = torch.empty(B, H, NC, Dk, Dv, dtype=k.dtype, device=k.device)
    S = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device)
    gp, rp = flag_pointers(g, reset, k)
    grid = (triton.cdiv(Dk, BK), triton.cdiv(Dv, BV), B * H)
    _state_fwd_kernel[grid](k, v, gp, rp, S if S0 is None else S0, h, S, T, H, NC, DK=Dk, DV=Dv, C=chunk_size,
                            BK=BK, BV=BV, HAS_G=g is not None, HAS_RESET=reset is not None, HAS_S0=S0 is not None,
                            PREC=dot_precision(k.dtype), num_warps=warps, num_stages=3)
    return h, S


def state_backward(q: Tensor | None, do: Tensor | None, lam0: Tensor | None, dh: Tensor | None,
                   dS: Tensor | None, k: Tensor, v: Tensor, g: Tensor | None, reset: Tensor | None,
                   with_dS0: bool, scale: float, chunk_size: int) -> tuple[Tensor, Tensor | None]:
    """`(DHE [B,H,NC,Dk,Dv] in k's dtype, dS0 [B,H,Dk,Dv] float32 or None)`. The output stage's
    term needs `q, do, lam0` (all or none); `dh` is a gradient of `h` from outside; `dS` that of
    the final state. `k, v` give shapes and dtype only."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    NC = triton.cdiv(T, chunk_size)
    BK, BV, warps = state_tiles(Dk, Dv, B * H, multiprocessors(k))
    dhe = torch.empty(B, H, NC, Dk, Dv, dtype=k.dtype, device=k.device)
    dS0 = torch.empty(B, H, Dk, Dv, dtype=torch.float32, device=k.device) if with_dS0 else None
    gp, rp = flag_pointers(g, reset, k)
    has_out = do is not None
    grid = (triton.cdiv(Dk, BK), triton.cdiv(Dv, BV), B * H)
    _state_bwd_kernel[grid](q if has_out else k, do if has_out else v, lam0 if has_out else k, gp, rp,
                            dhe if dh is None else dh, dhe if dS is None else dS, dhe, dhe if dS0 is None else dS0,
                            float(scale), T, H, NC, DK=Dk, DV=Dv, C=chunk_size, BK=BK, BV=BV, HAS_OUT=has_out,
                            HAS_DH=dh is not None, HAS_DSF=dS is not None, HAS_DS0=with_dS0, HAS_G=g is not None,
                            HAS_RESET=reset is not None, PREC=dot_precision(k.dtype), num_warps=warps, num_stages=3)
    return dhe, dS0
