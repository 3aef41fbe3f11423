r"""CUDA products of the `drift` detection in Triton: `p_t = r_tᵀ v_t` and `ρ_t = ‖r_t‖²` with
`r_t = S^{gᵀ}_{t−1} k_t`, the backbone's readout with `q := k` one step behind (`detect.py` has the
math and the torch form), and the scalar tail that turns them into `I_t` in one kernel.

Per chunk of `C` tokens (local `i, j`; `G` the chunk-local cumsum of `g`, `γ = exp(G)`,
`γ' = exp(G − g)`, `h` the chunk-start state):

1. `_prepare_kernel`, parallel over `(b·h, chunk)`: `M[i,j] = [j < i] exp(G_i − g_i − G_j) k_iᵀk_j`;
   with β the unit lower-triangular `(I + L)⁻¹`, `L[i,j] = [j < i] β_i exp(G_i − G_j) k_iᵀk_j`, by
   forward substitution row by row, then `W = (I + L)⁻¹ diag(βγ) K`, `U0 = (I + L)⁻¹ diag(β) V`
   (without β: `W = 0`, `U0 = V`). Stores `Q = diag(γ') K − M W` `[B·H, T, Dk]` and `R0 = M U0`
   `[B·H, T, Dv]` (and `W`, `U0` with β).
2. `_pass_kernel`, one program per `(b·h, Dv tile)`, sequential over chunks with `h`'s tile in
   registers from `Sg0`: `R = R0 + Q h` gives the tile's share of `p` and `ρ`; then
   `U = U0 − W h` and `h ← γ_C h + Σ_j exp(G_C − G_j) k_j u_jᵀ`. The columns of `S^g` evolve
   independently (every transition acts from the left), so tiles need no exchange; their
   shares of `p` and `ρ` are summed after. This is the backbone's state pass (the torch form
   takes its chunk-start states from `dla.ops.backbone`) with the readout fused in: `h` never
   leaves registers, where taking it from the backbone's Triton state pass would store
   `T/C · Dk · Dv` float32 values per stream (512 MB at SPEC §7's shapes) to read them once.

3. `_scores_kernel`, one program per `b·h`, sequential over blocks of the sequence: the scalar
   tail of `detect.drift_scores` — `κ_t = ‖k_t‖²`, `ν_t = ‖v_t‖²`, `N_t = a_t² N_{t−1} + b_t` (an
   associative scan over the block on `(a², b)`, carried across blocks), `cos`, `I_t` and the
   flags — in one launch where the torch form takes about a hundred (its recursive doubling is
   `log₂ T` passes over `[B, H, T]`). Decisions match the torch tail's wherever `I_t` is not
   within rounding of `τ` (the sums run in another order).

Every dot is `input_precision=PREC` on float32 operands, `"ieee"` from `launch_meta` (SPEC §2:
no TF32 or bf16 operands behind a score; `perf/sweep_drift_gpu.py` times `"tf32x3"` beside it);
16-bit inputs are upcast to float32 first. Every decay is a difference inside one chunk, `≤ 1`.
Shapes: `k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `g, beta [B,T,H]` or None, `Sg0 [B,H,Dk,Dv]`; the
products are `p, ρ [B,H,T]` float32, and the tail returns `dla.ops.segment.detect.Detection`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.segment.detect import Detection, norm_at_end
from dla.ops.state import EPS
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["readout_products_triton", "drift_scores_triton"]


@triton.jit
def _prepare_kernel(k_ptr, v_ptr, g_ptr, beta_ptr, q_ptr, r0_ptr, w_ptr, u0_ptr, T, H, Dk, Dv,
                    HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                    BV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    c = tl.program_id(1)
    b = bh // H
    h = bh % H
    idx = tl.arange(0, C)
    rows = idx[:, None]
    cols = idx[None, :]
    tok = (c * C + idx).to(tl.int64)
    valid = tok < T
    src = (b.to(tl.int64) * T + tok) * H + h  # token rows of k, v, g, beta [B, T, H, ·]
    dst = bh.to(tl.int64) * T + tok  # token rows of the outputs [B·H, T, ·]
    dk = tl.arange(0, BK)
    kmask = valid[:, None] & (dk[None, :] < Dk)
    Kc = tl.load(k_ptr + src[:, None] * Dk + dk[None, :], mask=kmask, other=0.0)
    if HAS_G:
        gc = tl.load(g_ptr + src, mask=valid, other=0.0)
    else:
        gc = tl.zeros([C], tl.float32)
    G = tl.cumsum(gc, 0)
    Gp = G - gc
    KK = tl.dot(Kc, tl.trans(Kc), input_precision=PREC)
    # (the exponent is positive above the diagonal: `where` keeps it out of every product)
    M = tl.where(rows > cols, tl.exp(Gp[:, None] - G[None, :]), 0.0) * KK
    Q = tl.exp(Gp)[:, None] * Kc
    if HAS_BETA:
        bc = tl.load(beta_ptr + src, mask=valid, other=0.0)
        # A = (I + L)⁻¹ by forward substitution: row i = e_i − Σ_{j<i} L[i,j] (row j), with the
        # strictly lower part kept in A (starting from −L) and the unit diagonal added last
        A = -tl.where(rows > cols, bc[:, None] * tl.exp(G[:, None] - G[None, :]), 0.0) * KK
        for i in range(1, C):
            at_i = idx == i
            a_i = tl.sum(tl.where(at_i[:, None], A, 0.0), 0)
            a_i = a_i + tl.sum(a_i[:, None] * A, 0) * (idx < i)
            A = tl.where(at_i[:, None], a_i[None, :], A)
        A = A + (rows == cols)
        W = tl.dot(A, (bc * tl.exp(G))[:, None] * Kc, input_precision=PREC)
        tl.store(w_ptr + dst[:, None] * Dk + dk[None, :], W, mask=kmask)
        Q = Q - tl.dot(M, W, input_precision=PREC)
    tl.store(q_ptr + dst[:, None] * Dk + dk[None, :], Q, mask=kmask)
    for j in range(0, Dv, BV):
        dv = j + tl.arange(0, BV)
        vmask = valid[:, None] & (dv[None, :] < Dv)
        Vc = tl.load(v_ptr + src[:, None] * Dv + dv[None, :], mask=vmask, other=0.0)
        if HAS_BETA:
            U0 = tl.dot(A, bc[:, None] * Vc, input_precision=PREC)
            tl.store(u0_ptr + dst[:, None] * Dv + dv[None, :], U0, mask=vmask)
        else:
            U0 = Vc
        tl.store(r0_ptr + dst[:, None] * Dv + dv[None, :], tl.dot(M, U0, input_precision=PREC), mask=vmask)


@triton.jit
def _pass_kernel(k_ptr, v_ptr, g_ptr, s0_ptr, q_ptr, r0_ptr, w_ptr, u0_ptr, p_ptr, rr_ptr, T, H, Dk, Dv, NC,
                 HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                 BV: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    vt = tl.program_id(1)
    b = bh // H
    h = bh % H
    idx = tl.arange(0, C)
    dk = tl.arange(0, BK)
    dv = vt * BV + tl.arange(0, BV)
    smask = (dk[:, None] < Dk) & (dv[None, :] < Dv)
    S = tl.load(s0_ptr + (bh.to(tl.int64) * Dk + dk[:, None]) * Dv + dv[None, :], mask=smask, other=0.0)
    part = (vt.to(tl.int64) * tl.num_programs(0) + bh) * T  # this tile's share of p and ρ
    for c in range(0, NC):
        tok = (c * C + idx).to(tl.int64)
        valid = tok < T
        src = (b.to(tl.int64) * T + tok) * H + h
        dst = bh.to(tl.int64) * T + tok
        kmask = valid[:, None] & (dk[None, :] < Dk)
        vmask = valid[:, None] & (dv[None, :] < Dv)
        Kc = tl.load(k_ptr + src[:, None] * Dk + dk[None, :], mask=kmask, other=0.0)
        Vc = tl.load(v_ptr + src[:, None] * Dv + dv[None, :], mask=vmask, other=0.0)
        Qc = tl.load(q_ptr + dst[:, None] * Dk + dk[None, :], mask=kmask, other=0.0)
        R = tl.load(r0_ptr + dst[:, None] * Dv + dv[None, :], mask=vmask, other=0.0)
        R = R + tl.dot(Qc, S, input_precision=PREC)
        tl.store(p_ptr + part + tok, tl.sum(R * Vc, 1), mask=valid)
        tl.store(rr_ptr + part + tok, tl.sum(R * R, 1), mask=valid)
        if HAS_BETA:
            Wc = tl.load(w_ptr + dst[:, None] * Dk + dk[None, :], mask=kmask, other=0.0)
            U = tl.load(u0_ptr + dst[:, None] * Dv + dv[None, :], mask=vmask, other=0.0)
            U = U - tl.dot(Wc, S, input_precision=PREC)
        else:
            U = Vc
        if HAS_G:
            G = tl.cumsum(tl.load(g_ptr + src, mask=valid, other=0.0), 0)
        else:
            G = tl.zeros([C], tl.float32)
        G_end = tl.sum(tl.where(idx == C - 1, G, 0.0), 0)  # padding tokens have g = 0
        to_end = tl.exp(G_end - G)[:, None] * Kc
        S = tl.exp(G_end) * S + tl.dot(tl.trans(to_end), U, input_precision=PREC)


def launch_meta(Dk: int, Dv: int, chunk_size: int, on_interpreter: bool) -> dict:
    """Blocks: the chunk a power of two in [16, 32] (the products do not depend on it beyond
    rounding); the pass kernel's `h` tile `BK × BV` at most 4K float32 values over 8 warps, and
    the smallest tile under the interpreter (tiny shapes then still cover several tiles). One
    pipeline stage: the IEEE dots stage their operands in shared memory.

    The IEEE dots run on the FMA units with every operand in registers, so the tile is sized to
    stay in them: at a chunk of 64 beside a 128 × 64 tile, `ptxas -v` shows the pass kernel
    spilling 17 KB per thread, and an H100 ran it an order of magnitude slower than at a chunk of
    32 beside a 128 × 32 tile. `perf/sweep_drift_gpu.py` verifies each candidate against the
    float64 products before timing it; these bounds are the ones it verified and found fastest
    for both transitions (`perf/results/sweep_drift-h100.md`)."""
    BK = pow2(Dk)
    BV = 16 if on_interpreter else max(16, min(pow2(Dv), 4096 // BK))
    warps = 1 if on_interpreter else (8 if BK * BV >= 64 * 64 else 4)
    return dict(C=min(32, pow2(chunk_size)), BK=BK, BV=BV, PREC="ieee", num_warps=warps, num_stages=1)


def readout_products_triton(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, Sg0: Tensor,
                            chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(p_t, ρ_t)`, `[B,H,T]` float32 (module doc)."""
    B, T, H, Dk = k.shape
    Dv, dev = v.shape[-1], k.device
    f32 = torch.float32
    meta = launch_meta(Dk, Dv, chunk_size, interpreting(k))
    C, BV = meta["C"], meta["BV"]
    NC, NV = triton.cdiv(T, C), triton.cdiv(Dv, BV)
    k, v = k.to(f32).contiguous(), v.to(f32).contiguous()
    gf = g.to(f32).contiguous() if g is not None else k  # (an unread placeholder pointer)
    bf = beta.to(f32).contiguous() if beta is not None else k
    S0 = Sg0.to(f32).contiguous()
    Q = torch.empty(B * H, T, Dk, dtype=f32, device=dev)
    R0 = torch.empty(B * H, T, Dv, dtype=f32, device=dev)
    W = torch.empty(B * H, T, Dk, dtype=f32, device=dev) if beta is not None else Q
    U0 = torch.empty(B * H, T, Dv, dtype=f32, device=dev) if beta is not None else R0
    p = torch.empty(NV, B * H, T, dtype=f32, device=dev)
    rr = torch.empty(NV, B * H, T, dtype=f32, device=dev)
    flags = dict(HAS_G=g is not None, HAS_BETA=beta is not None)
    _prepare_kernel[(B * H, NC)](k, v, gf, bf, Q, R0, W, U0, T, H, Dk, Dv, **flags, **meta)
    _pass_kernel[(B * H, NV)](k, v, gf, S0, Q, R0, W, U0, p, rr, T, H, Dk, Dv, NC, **flags, **meta)
    return p.sum(0).view(B, H, T), rr.sum(0).view(B, H, T)


@triton.jit
def _combine(a1, x1, a2, x2):
    """`x ← a x + b` twice: first `(a1, x1)`, then `(a2, x2)`."""
    return a1 * a2, x1 * a2 + x2


@triton.jit
def _scores_kernel(P, RR, K, V, G, BETA, N0, FIRST, INFO, FLAG, NALL, T, tau, H: tl.constexpr, DK: tl.constexpr,
                   DV: tl.constexpr, HAS_G: tl.constexpr, HAS_BETA: tl.constexpr, BT: tl.constexpr,
                   BK: tl.constexpr, BV: tl.constexpr, EPS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    b = n // H
    h = n % H
    row = n * T  # [B, H, T] rows of p, ρ and the outputs
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    carry = tl.load(N0 + n)
    first_unscored = tl.load(FIRST + n) != 0
    for t0 in range(0, T, BT):
        t = t0 + tl.arange(0, BT)
        m = t < T
        src = (b * T + t) * H + h  # token rows of k, v, g, β [B, T, H, ·]
        p = tl.load(P + row + t, mask=m, other=0.0)
        k = tl.load(K + src[:, None] * DK + dk[None, :], mask=m[:, None] & (dk[None, :] < DK), other=0.0)
        v = tl.load(V + src[:, None] * DV + dv[None, :], mask=m[:, None] & (dv[None, :] < DV), other=0.0)
        kappa = tl.sum(k * k, axis=1)
        nu = tl.sum(v * v, axis=1)
        if HAS_G:
            a = tl.exp(tl.load(G + src, mask=m, other=0.0))
        else:
            a = tl.full([BT], 1.0, tl.float32)
        if HAS_BETA:
            bt = tl.load(BETA + src, mask=m, other=0.0)
            rr = tl.load(RR + row + t, mask=m, other=0.0)
            bb = a * a * (bt * bt * kappa - 2 * bt) * rr + 2 * a * bt * (1 - bt * kappa) * p + bt * bt * kappa * nu
        else:
            bb = 2 * a * p + kappa * nu
        alpha = tl.where(m, a * a, 1.0)  # positions past T: identity steps
        A, X = tl.associative_scan((alpha, tl.where(m, bb, 0.0)), 0, _combine)
        N = X + A * carry
        tl.store(NALL + row + t, N, mask=m)
        tl.debug_barrier()  # N_{t−1} of the block's first token is the carry; of the others, just stored
        N_prev = tl.load(NALL + row + t - 1, mask=m & (t > t0), other=0.0)
        N_prev = tl.where(t == t0, carry, N_prev)
        if HAS_BETA:
            inner = a * (N_prev - bt * rr) + bt * p
        else:
            inner = a * N_prev + p
        cos = inner / tl.maximum(tl.sqrt(tl.maximum(N * N_prev, 0.0)), EPS)
        info = tl.sqrt(tl.maximum(2 - 2 * cos, 0.0))
        first = (t == 0) & first_unscored
        info = tl.where(first, 0.0, info)
        tl.store(INFO + row + t, info, mask=m)
        tl.store(FLAG + row + t, (info >= tau) | first, mask=m)
        carry = tl.sum(tl.where(t == tl.minimum(t0 + BT, T) - 1, N, 0.0), axis=0)


def scores_meta(Dk: int, Dv: int, on_interpreter: bool) -> dict:
    """The tail kernel's blocks: whole `k, v` rows, `BT` tokens so that a block of either holds
    at most 8K float32 values (16 tokens under the interpreter), 4 warps."""
    BK, BV = pow2(Dk, 1), pow2(Dv, 1)
    BT = 16 if on_interpreter else max(16, min(128, 8192 // max(BK, BV)))
    return dict(BT=BT, BK=BK, BV=BV, num_warps=4)


def drift_scores_triton(p: Tensor, rr: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None,
                        N0: Tensor, first_unscored: Tensor, tau: float, end: Tensor | None = None) -> Detection:
    """`detect.drift_scores` for float32 products (module doc, kernel 3): the same arguments and
    `Detection`."""
    B, H, T = p.shape
    Dk, Dv, dev, f32 = k.shape[-1], v.shape[-1], p.device, torch.float32
    info = torch.empty(B, H, T, dtype=f32, device=dev)
    flag = torch.empty(B, H, T, dtype=torch.bool, device=dev)
    N = torch.empty(B, H, T, dtype=f32, device=dev)
    if T == 0:
        return Detection(info=info, flag=flag, N=N0.to(f32).clone())
    k, v = k.to(f32).contiguous(), v.to(f32).contiguous()
    gf = g.to(f32).contiguous() if g is not None else p  # (an unread placeholder pointer)
    bf = beta.to(f32).contiguous() if beta is not None else p
    _scores_kernel[(B * H,)](p.contiguous(), rr.contiguous(), k, v, gf, bf, N0.to(f32).contiguous(),
                             first_unscored.to(torch.int8).contiguous(), info, flag, N, T, float(tau), H, Dk, Dv,
                             HAS_G=g is not None, HAS_BETA=beta is not None, EPS=EPS,
                             **scores_meta(Dk, Dv, interpreting(p)))
    return Detection(info=info, flag=flag, N=norm_at_end(N, end))
