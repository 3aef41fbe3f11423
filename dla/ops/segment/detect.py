r"""Boundary detection for the `drift` score (SPEC §2): per token `I_t` and the boundary flag, a
parallel function of the sequence alone — it never depends on the segmentation, `K` or merges.

What it computes
================
Per batch element and head, `S^g` is the single-state backbone `S^g_t = A_t S^g_{t−1} + w_t`
(`A_t = a_t (I − β_t k_t k_tᵀ)`, `a_t = exp(g_t)`, `w_t = β_t k_t v_tᵀ`; the factors only where
given) from `S^g_{−1} = Sg0`, the sum of the initial cache's live slots. With

    r_t = S^{gᵀ}_{t−1} k_t    (the backbone's readout with q := k, one step behind)
    p_t = r_tᵀ v_t,   ρ_t = ‖r_t‖²,   κ_t = ‖k_t‖²,   ν_t = ‖v_t‖²

`N_t = ‖S^g_t‖²_F` is a scalar linear recurrence, `N_t = a_t² N_{t−1} + b_t`, `N_{−1} = N0` as
given, and `⟨S^g_t, S^g_{t−1}⟩ = x_t`:

    without β:  b_t = 2a p_t + κν,                               x_t = a N_{t−1} + p_t
    with β:     b_t = a²(β²κ − 2β) ρ_t + 2aβ(1 − βκ) p_t + β²κν,   x_t = a (N_{t−1} − β ρ_t) + β p_t

    cos_t = x_t / max(√(N_t N_{t−1}), ε),   I_t = √max(0, 2 − 2 cos_t),   flag_t = I_t ≥ τ

except the first token of a call on an empty cache (`m0 = 0`), which opens the first slot
unscored (`I = 0`, flag set).

`r_t` in chunks of `C` tokens. Within a chunk (local positions `i, j`), `G_i = Σ_{j≤i} g_j`,
`γ_i = exp(G_i)`, `γ'_i = exp(G_i − g_i)` (the decay from the chunk start to step `i − 1`), `h` the
chunk-start state, `u_j` the pseudo-values (`v_j` without β; with β the WY/UT form,
`U = (I + L)⁻¹ diag(β)(V − diag(γ) K h)`, `L[i,j] = β_i exp(G_i − G_j) k_iᵀk_j` for `j < i`):

    r_i = γ'_i hᵀ k_i + Σ_{j<i} exp(G_i − g_i − G_j) (k_iᵀ k_j) u_j

— every decay a difference inside one chunk, `≤ 1`. Both terms are linear in `h`:
`U = U0 − W h` with `U0 = (I + L)⁻¹ diag(β) V`, `W = (I + L)⁻¹ diag(βγ) K`, so with
`M[i,j] = [j < i] exp(G_i − g_i − G_j) k_iᵀ k_j`

    R = R0 + Q h,    R0 = M U0,    Q = diag(γ') K − M W    (W = 0 without β)

`R0` and `Q` are parallel over chunks; `h` is the chunk-start state of the backbone stage
(`chunk_start_states`: `dla.ops.backbone`'s chunked SSD or delta rule, without resets). The `N`
recurrence runs over all `T` at once by recursive doubling (`linear_recurrence`): `log₂ T` passes
of products of `a²`, which only shrink, so nothing overflows at any `T`.

Kernels. The torch form here (`readout_products`) serves CPU tensors and float64 everywhere
(float64 products are IEEE on every device). CUDA tensors in float32 or 16 bits (upcast to float32)
take `detect_triton.py`, whose dots are `input_precision="ieee"`: SPEC §2 forbids TF32 and bf16
operands in the products behind a score, and torch's CUDA matmul may use TF32 by a process-wide
switch. The tail (`drift_scores`) is elementwise torch and a recursive doubling; on CUDA below
float64 one Triton kernel computes it (`detect_triton.drift_scores_triton`), the same steps in
another summation order.

Shapes: `k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `g, beta [B,T,H]` or None, `Sg0 [B,H,Dk,Dv]`, `N0 [B,H]`,
`m0 [B,H]`; results `[B,H,T]` and `[B,H]` in the state dtype (float64 for float64 inputs, float32
otherwise).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from dla.ops.backbone.delta import delta_chunk_states
from dla.ops.backbone.ssd import ssd_chunk_states
from dla.ops.state import EPS, state_dtype

__all__ = ["Detection", "detect_drift", "drift_scores", "readout_products", "chunk_start_states", "linear_recurrence"]


class Detection(NamedTuple):
    info: Tensor  # [B, H, T] I_t; 0 for the unscored first token of an empty cache
    flag: Tensor  # [B, H, T] bool: token t opens a slot
    N: Tensor  # [B, H] ‖S^g‖²_F after the last token, by its update rule


def detect_drift(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, Sg0: Tensor, N0: Tensor,
                 m0: Tensor, tau: float, chunk_size: int, products: Callable, end: Tensor | None = None,
                 scores: Callable | None = None) -> Detection:
    """`I_t`, the boundary flags and the final `N` under `drift` (module doc). `products` computes
    `(p_t, ρ_t)` from `(k, v, g, beta, Sg0, chunk_size)`: `readout_products` or, in the CUDA
    kernel, `detect_triton.readout_products_triton`; `scores` the tail, `drift_scores` (None) or
    `detect_triton.drift_scores_triton`. `end [B]`: `N` after step `end − 1` (rows that end
    early, `dla.ops.segment.ends`)."""
    p, rr = products(k, v, g, beta, Sg0, chunk_size)
    return (scores or drift_scores)(p, rr, k, v, g, beta, N0, m0 == 0, tau, end)


def drift_scores(p: Tensor, rr: Tensor, k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None,
                 N0: Tensor, first_unscored: Tensor, tau: float, end: Tensor | None = None) -> Detection:
    """The scalar tail: `N` by its recurrence, `cos`, `I`, the flags, from `p_t` and `ρ_t = ‖r_t‖²`
    (`[B,H,T]`). `first_unscored [B,H]`: the call's first token opens the first slot unscored.
    `end [B]`: the final `N` is read after step `end − 1` (the doubling gives step `t` the same
    operations whatever follows it)."""
    dt = p.dtype
    kappa = _heads_first(k.to(dt).pow(2).sum(-1))
    nu = _heads_first(v.to(dt).pow(2).sum(-1))
    a = _heads_first(g.to(dt)).exp() if g is not None else torch.ones_like(p)
    if beta is None:
        b = 2 * a * p + kappa * nu
    else:
        bt = _heads_first(beta.to(dt))
        b = a * a * (bt * bt * kappa - 2 * bt) * rr + 2 * a * bt * (1 - bt * kappa) * p + bt * bt * kappa * nu
    N0 = N0.to(dt)
    N = linear_recurrence(a * a, b, N0)
    N_prev = torch.cat([N0[..., None], N[..., :-1]], -1)
    inner = a * N_prev + p if beta is None else a * (N_prev - bt * rr) + bt * p
    cos = inner / (N * N_prev).clamp(min=0).sqrt().clamp(min=EPS)
    info = (2 - 2 * cos).clamp(min=0).sqrt()
    first = torch.zeros_like(info, dtype=torch.bool)
    first[..., 0] = first_unscored
    info = info.masked_fill(first, 0.0)
    return Detection(info=info, flag=(info >= tau) | first, N=norm_at_end(N, end))


def norm_at_end(N: Tensor, end: Tensor | None) -> Tensor:
    """`N [B,H,T]` after the last step, or after step `end − 1` of each row (`end [B]`)."""
    if end is None:
        return N[..., -1].clone()
    return N.gather(-1, (end.to(N.device) - 1).view(-1, 1, 1).expand(*N.shape[:2], 1))[..., 0]


def linear_recurrence(alpha: Tensor, b: Tensor, x0: Tensor) -> Tensor:
    """`x_t = alpha_t x_{t−1} + b_t` along the last dimension from `x_{−1} = x0`, by recursive
    doubling: after the pass of stride `s`, `x_t` holds the sum over its last `2s` terms and
    `alpha_t` their product. With `0 ≤ alpha ≤ 1` the products only shrink (no overflow)."""
    x = b.clone()
    x[..., 0] += alpha[..., 0] * x0
    A = alpha.clone()
    T, s = x.shape[-1], 1
    while s < T:
        x[..., s:] = x[..., s:] + A[..., s:] * x[..., :-s]
        A[..., s:] = A[..., s:] * A[..., :-s]
        s *= 2
    return x


def _heads_first(x: Tensor) -> Tensor:
    """[B, T, H] → [B, H, T]."""
    return x.permute(0, 2, 1)


# --------------------------------------------------------------------------------------------
# r_t in chunks, in torch
# --------------------------------------------------------------------------------------------


class _Chunks(NamedTuple):
    """One call's chunk quantities, [N = B·H, NC, C, ...] in the state dtype; padding tokens have
    `k = v = 0`, `g = β = 0`, which leave the state unchanged (the backbone pads alike)."""

    k: Tensor  # [N, NC, C, Dk]
    v: Tensor  # [N, NC, C, Dv]
    G: Tensor  # [N, NC, C] chunk-local cumsum of g
    g: Tensor  # [N, NC, C]
    U0: Tensor  # [N, NC, C, Dv] pseudo-values at h = 0
    W: Tensor | None  # [N, NC, C, Dk] U = U0 − W h (None without β)


def _chunks(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, C: int) -> _Chunks:
    B, T, H, Dk = k.shape
    dt = state_dtype(k.dtype)
    NC = -(-T // C)

    def chunked(x: Tensor | None, tail: tuple) -> Tensor | None:
        if x is None:
            return None
        x = x.to(dt).transpose(1, 2).reshape(B * H, T, *tail)
        x = torch.nn.functional.pad(x, (0, 0) * len(tail) + (0, NC * C - T))
        return x.view(B * H, NC, C, *tail)

    kc, vc = chunked(k, (Dk,)), chunked(v, (v.shape[-1],))
    gc = chunked(g, ()) if g is not None else kc.new_zeros(B * H, NC, C)
    G = gc.cumsum(-1)
    if beta is None:
        return _Chunks(kc, vc, G, gc, vc, None)
    bc = chunked(beta, ())
    L = torch.tril(bc[..., :, None] * torch.exp(G[..., :, None] - G[..., None, :]) * (kc @ kc.mT), -1)
    eye = torch.eye(C, dtype=dt, device=k.device)
    rhs = torch.cat([bc[..., None] * vc, (bc * torch.exp(G))[..., None] * kc], -1)
    UW = torch.linalg.solve_triangular(eye + L, rhs, upper=False, unitriangular=True)
    return _Chunks(kc, vc, G, gc, UW[..., : vc.shape[-1]], UW[..., vc.shape[-1]:])


def chunk_start_states(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, S0: Tensor,
                       chunk_size: int) -> Tensor:
    """`h [B,H,NC,Dk,Dv]`: the backbone's state before each chunk from `S0`, in the state dtype —
    the backbone stage's own chunked forward without resets (`ssd_chunk_states` without β, the
    delta rule's `delta_chunk_states` with it)."""
    if beta is None:
        return ssd_chunk_states(k, v, g, None, S0, chunk_size)[0]
    return delta_chunk_states(k, v, g, beta, None, S0, chunk_size)[0]


def readout_products(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, Sg0: Tensor,
                     chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(p_t, ρ_t)`, `[B,H,T]` in the state dtype: `R = R0 + Q h` per chunk (module doc)."""
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    C = int(chunk_size)
    c = _chunks(k, v, g, beta, C)
    h = chunk_start_states(k, v, g, beta, Sg0, C).view(B * H, -1, Dk, Dv)
    Gp = c.G - c.g  # G_{i−1} in chunk terms
    M = torch.tril(torch.exp(Gp[..., :, None] - c.G[..., None, :]), -1) * (c.k @ c.k.mT)
    Q = torch.exp(Gp)[..., None] * c.k
    if c.W is not None:
        Q = Q - M @ c.W
    R = M @ c.U0 + Q @ h
    p = (R * c.v).sum(-1).view(B, H, -1)[..., :T]
    rr = R.pow(2).sum(-1).view(B, H, -1)[..., :T]
    return p, rr
