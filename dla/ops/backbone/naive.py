"""The backbone stage's reference: one state, token by token, in float64 (SPEC §2, §3.1).

    S ← 0 where reset_t (the token opens a new segment), else S ← A_t S,
        A_t = a_t (I − β_t k_t k_tᵀ),  a_t = exp(g_t)  (factors present only when given)
    S ← S + k̄_t v_tᵀ,   k̄_t = β_t k_t  (k_t without β)
    o_t = λ0_t · S_tᵀ (scale · q_t)

Without resets this is the plain backbone (the `single` policy: linear attention, Mamba-2's
SSD, DeltaNet, Gated DeltaNet) read with the per-query weight `λ_t[0]`; with resets it is DLA's
open block, which restarts at every boundary. Shapes: `q, k [B,T,H,Dk]`, `v [B,T,H,Dv]`,
`lam0, g, beta, reset [B,T,H]`, `S0 [B,H,Dk,Dv]` (the state before token 0; discarded by a
reset). Returns `o [B,T,H,Dv]` in `q`'s dtype and the final state `[B,H,Dk,Dv]` in float64.
Slow on purpose; outputs keep autograd, so it is also the gradient oracle.
"""

from __future__ import annotations

import torch
from torch import Tensor


def backbone_recurrent(q: Tensor, k: Tensor, v: Tensor, lam0: Tensor, *, g: Tensor | None = None,
                       beta: Tensor | None = None, reset: Tensor | None = None, S0: Tensor | None = None,
                       scale: float) -> tuple[Tensor, Tensor]:
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    f64 = torch.float64
    S = torch.zeros(B, H, Dk, Dv, dtype=f64, device=q.device) if S0 is None else S0.to(f64)
    rows = []
    for t in range(T):
        kt, vt = k[:, t].to(f64), v[:, t].to(f64)  # [B, H, D]
        if beta is not None:
            bt = beta[:, t].to(f64)[..., None]
            S = S - bt[..., None] * kt[..., :, None] * torch.einsum("bhk,bhkv->bhv", kt, S)[..., None, :]
            kt = bt * kt
        if g is not None:
            S = torch.exp(g[:, t].to(f64))[..., None, None] * S
        if reset is not None:
            S = torch.where(reset[:, t][..., None, None], torch.zeros_like(S), S)
        S = S + kt[..., :, None] * vt[..., None, :]
        read = torch.einsum("bhk,bhkv->bhv", scale * q[:, t].to(f64), S)
        rows.append(lam0[:, t].to(f64)[..., None] * read)
    o = torch.stack(rows, dim=1) if rows else q.new_zeros(B, 0, H, Dv, dtype=f64)
    return o.to(q.dtype), S
