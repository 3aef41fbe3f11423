r"""Chunked CPU readout (SPEC §3, phase 2) for transitions with `β` (DeltaNet, Gated DeltaNet):
the CPU kernels of `dla::readout` and `dla::readout_backward` (schemas in
`dla/compile/SCHEMAS.md`) with `β`, every slot carried through each chunk's transition product.
(Without `β` the stage takes the persistent objects of `objects.py`.) Plain torch, no autograd:
the backward is written out below.

What it computes
================
Per batch element and head (batched over `N = B·H`), the sequence is cut into chunks of `C`
tokens (the last one may be shorter). Inside a chunk positions are `1..C`, `G_t = Σ_{u≤t} g_u`
(chunk-local), `γ_t = exp(G_t)`, `ρ_s = γ_C/γ_s = exp(G_C − G_s)`,
`Γ[t,s] = exp(G_t − G_s)` for `s ≤ t` (0 above the diagonal). Without `g`: `G ≡ 0`.

    A_qk = QKᵀ ⊙ Γ                                  (lower triangle, diagonal included)
    A_kk = tril(diag(β)(KKᵀ ⊙ Γ), −1),   Tinv = (I + A_kk)⁻¹   (unit lower)
    M = Tinv diag(β),   Ã = A_qk M,   H = diag(γ) K
    Q̂ = diag(γ) Q − Ã H,   E = Kᵀ diag(ρ) M,   P_C = γ_C I − E H     [Dk×Dk]

(Derivation: a single state over the chunk is `S_t = γ_t S_0 + Σ_{s≤t} Γ[t,s] k_s u_sᵀ` with
`(I + A_kk) U = diag(β) V − diag(βγ) K S_0`; so `S_tᵀ q_t` has rows `Ã V + Q̂ S_0` and
`S_C = P_C S_0 + E V`. `Ã[t,s] = q_tᵀ (A_t ⋯ A_{s+1}) β_s k_s` is the chunk's diagonal block of
the SPEC's `A_base / scale`, `Q̂[t]ᵀ = q_tᵀ A_t ⋯ A_1`, column `s` of `E` is
`(A_C ⋯ A_{s+1}) β_s k_s` and `P_C = A_C ⋯ A_1`.)

Levels (`level_start [B,T,H,L]`, `ℓ_t(p) = level_of_by_search(level_start[t], p)`, `K = L` slots):
the old slots at the chunk start `c0` are the ranks `r` of row `c0 − 1` (for the first chunk,
the initial slots at pseudo-positions `−1 − r`), slot `r` starting at `pos_r` (`EMPTY`: nothing).

    Λ[t,s] = λ_t[ℓ_t(c0+s)]     for chunk tokens s ≤ t   (0 where ℓ = −1)
    W[t,r] = λ_t[ℓ_t(pos_r)]    for old slots            (0 where pos_r = EMPTY or ℓ = −1)

    o_t = scale · [ ((Ã ⊙ Λ) V)_t + Σ_r W[t,r] · S_rᵀ Q̂_t ]       [C×Dv]

the second term being one GEMM of depth `K·Dk` with the operand `X = W ⊗ Q̂` `[C, K·Dk]`.
At the chunk end (row `ce`, the chunk's last token) the new slot of rank `r'` collects the old
slots and chunk tokens that sit at level `r'` after `ce`:

    S'_{r'} = Σ_{r: ℓ_ce(pos_r) = r'} P_C S_r  +  Σ_{s: ℓ_ce(c0+s) = r'} E_s v_sᵀ

`S0 [B,H,K,Dk,Dv]` enters in rank order; the returned `S` is in the rank order of the map's
last row. Compute dtype: float64 for float64 `q`, float32 otherwise; `o` in `q`'s dtype, `S` in
the state dtype.

The backward
============
A forward pass recomputes the chunk-start slot states (a list); the reverse pass carries
`dS'` (gradient of the chunk-end states) and, per chunk, with `dÕ = scale · dO`:

    dV   = (Ã ⊙ Λ)ᵀ dÕ + [ dS'_{ℓ_ce(s)}ᵀ E_s ]_s
    dΛ   = (dÕ Vᵀ) ⊙ Ã,      dÃ = (dÕ Vᵀ) ⊙ Λ
    dX   = dÕ [S_0; …; S_{K−1}]ᵀ  [C, K, Dk]:   dQ̂ = Σ_r W[:,r] dX_r,   dW[t,r] = ⟨dX[t,r], Q̂_t⟩
    dλ_t[l] = Σ_{s: ℓ_t(s)=l} dΛ[t,s] + Σ_{r: ℓ_t(pos_r)=l} dW[t,r]          (scatter-add)
    dPS_r = dS'_{ℓ_ce(pos_r)},   dE_s = dS'_{ℓ_ce(s)} v_s
    dS_r  = P_Cᵀ dPS_r + X_rᵀ dÕ                  (carried to the previous chunk; dS0 at the end)
    dP = Σ_r dPS_r S_rᵀ,   dγ_C = tr dP,   dE −= dP Hᵀ,   dÃ −= dQ̂ Hᵀ
    dH = −Eᵀ dP − Ãᵀ dQ̂  → dK += diag(γ) dH,  dγ += rowsum(dH ⊙ K)
    dKρ = M dEᵀ,   dM = Kρ dE + A_qkᵀ dÃ   (Kρ = diag(ρ) K),   dA_qk = dÃ Mᵀ
    dβ_s += Σ_u dM[u,s] Tinv[u,s],   dTinv = dM diag(β)
    dA_kk = −strict_lower(Tinvᵀ dTinv Tinvᵀ),   dβ_t += Σ_s dA_kk[t,s] (KKᵀ⊙Γ)[t,s]
    Z_k = diag(β) dA_kk ⊙ Γ:  dK += Z_k K + Z_kᵀ K,   dΓ += diag(β) dA_kk ⊙ KKᵀ
    dQ = diag(γ) dQ̂ + (dA_qk ⊙ Γ) K,   dγ += rowsum(dQ̂ ⊙ Q)
    dK += diag(ρ) dKρ + (dA_qk ⊙ Γ)ᵀ Q,   dρ = rowsum(dKρ ⊙ K),   dΓ += dA_qk ⊙ QKᵀ
    dG = rowsum(dΓ⊙Γ) − colsum(dΓ⊙Γ) + dγ ⊙ γ − dρ ⊙ ρ,   dG_C += Σ_s dρ_s ρ_s + dγ_C γ_C
    dg_u = Σ_{t ≥ u} dG_t          (reverse cumsum inside the chunk)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.levels import EMPTY, initial_starts, running_min
from dla.ops.state import state_dtype

__all__ = ["chunked_forward", "chunked_backward"]


# --------------------------------------------------------------------------------------------
# Layout: [B, T, H, ...] → head-major [N = B·H, T, ...] in the compute dtype.
# --------------------------------------------------------------------------------------------


def heads(x: Tensor, dtype) -> Tensor:
    B, T, H = x.shape[:3]
    return x.to(dtype).transpose(1, 2).reshape(B * H, T, *x.shape[3:])


def unheads(x: Tensor, B: int, H: int, dtype) -> Tensor:
    N, T = x.shape[:2]
    return x.reshape(B, H, T, *x.shape[2:]).transpose(1, 2).to(dtype).contiguous()


class Inputs(NamedTuple):
    q: Tensor  # [N, T, Dk]
    k: Tensor
    v: Tensor  # [N, T, Dv]
    lam: Tensor  # [N, T, L]
    g: Tensor | None  # [N, T]
    beta: Tensor  # [N, T]
    starts: Tensor  # [N, T, L] int64
    S0: Tensor  # [N, K, Dk, Dv]


def _require_beta(name: str, beta) -> None:
    if beta is None:
        raise ValueError(f"{name}: beta is required (without β the readout takes dla.ops.readout.objects)")


def _prepare(q, k, v, lam, g, beta, level_start, S0) -> tuple[Inputs, torch.dtype]:
    cdt = state_dtype(q.dtype)
    B, T, H, Dk = q.shape
    L = lam.shape[-1]
    inputs = Inputs(
        q=heads(q, cdt), k=heads(k, cdt), v=heads(v, cdt), lam=heads(lam, cdt),
        g=None if g is None else heads(g, cdt), beta=heads(beta, cdt),
        starts=heads(level_start, torch.int64),
        S0=S0.to(cdt).reshape(B * H, L, Dk, v.shape[-1]),
    )
    return inputs, cdt


def level_of_by_search(starts: Tensor, positions: Tensor) -> Tensor:
    """`dla.ops.levels.level_of` by binary search: ℓ(p) = first r with starts[r] ≤ p = the
    number of r whose running minimum `min_{r' ≤ r} starts[r']` exceeds p (that minimum is
    non-increasing in r); −1 when it is L. starts [..., L], positions [..., P] → [..., P]."""
    L = starts.shape[-1]
    ascending = running_min(starts).flip(-1).contiguous()
    first = L - torch.searchsorted(ascending, positions.contiguous(), right=True)
    return torch.where(first < L, first, -1)


def _flat_index(index: Tensor, R: int) -> Tensor:
    """Rows index[n, p] of an [N, R, ...] tensor as rows of its [N·R, ...] view; an index R
    (dropped) is clamped to R − 1 — callers zero those rows."""
    N = index.shape[0]
    return (index.clamp(max=R - 1) + R * torch.arange(N, device=index.device)[:, None]).reshape(-1)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x [N, R, *rest], index [N, P] → x[n, index[n, p]] as [N, P, *rest] (0 where index = R)."""
    N, R = x.shape[:2]
    out = x.reshape(N * R, -1).index_select(0, _flat_index(index, R)).reshape(*index.shape, *x.shape[2:])
    if bool((index == R).any()):
        out = out * (index < R).to(x.dtype).reshape(*index.shape, *[1] * (x.dim() - 2))
    return out


def _add_rows(out: Tensor, index: Tensor, src: Tensor) -> None:
    """out[n, index[n, p]] += src[n, p] (out [N, R, *rest] contiguous, src [N, P, *rest]);
    rows with index = R are dropped."""
    N, R = out.shape[:2]
    if bool((index == R).any()):
        src = src * (index < R).to(src.dtype).reshape(*index.shape, *[1] * (src.dim() - 2))
    out.view(N * R, -1).index_add_(0, _flat_index(index, R), src.reshape(index.numel(), -1))


def _token_writes(c: "_Chunk", K: int) -> tuple[Tensor, Tensor]:
    """M_tok [N, K, C] (token s → its chunk-end rank) and E ⊙ M_tok as [N, K·Dk, C]: column s
    of E kept in the block of its rank, so that `· V` gives Σ_{s→r'} E_s v_sᵀ for every r' in
    one GEMM of depth C."""
    N, Dk, C = c.E.shape
    Mt = (c.end_tok[:, None, :] == torch.arange(K, device=c.E.device)[:, None]).to(c.E.dtype)
    return Mt, (c.E[:, None] * Mt[:, :, None, :]).reshape(N, K * Dk, C)


# --------------------------------------------------------------------------------------------
# One chunk: everything both passes need (recomputed in the backward, never saved).
# --------------------------------------------------------------------------------------------


class _Chunk(NamedTuple):
    q: Tensor  # [N, C, Dk]
    k: Tensor
    v: Tensor  # [N, C, Dv]
    beta: Tensor  # [N, C]
    gam: Tensor  # γ [N, C]
    rho: Tensor  # ρ = γ_C / γ [N, C]
    gam_C: Tensor  # γ_C [N]
    Gam: Tensor  # Γ [N, C, C] (0 above the diagonal)
    QK: Tensor  # QKᵀ [N, C, C]
    KK: Tensor  # KKᵀ
    Tinv: Tensor  # (I + A_kk)⁻¹
    M: Tensor  # Tinv diag(β)
    Aqk: Tensor  # QKᵀ ⊙ Γ
    At: Tensor  # Ã
    Qh: Tensor  # Q̂ [N, C, Dk]
    E: Tensor  # [N, Dk, C]
    P: Tensor  # P_C [N, Dk, Dk]
    Lam: Tensor  # Λ [N, C, C]
    lev_tok: Tensor  # ℓ_t(c0+s) [N, C, C], −1 where not a level (or s > t)
    W: Tensor  # [N, C, K]
    lev_old: Tensor  # ℓ_t(pos_r) [N, C, K], −1 where no weight
    end_old: Tensor  # new rank of old slot r at the chunk end [N, K], K where dropped
    end_tok: Tensor  # new rank of chunk token s at the chunk end [N, C], K where dropped


def _levels(starts: Tensor, prev_pos: Tensor, c0: int, lam: Tensor, K: int):
    """Λ, W and the chunk-end remaps from the chunk's rows of the level map."""
    N, C, L = starts.shape
    dev = starts.device
    pos = c0 + torch.arange(C, device=dev)
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    lev_tok = level_of_by_search(starts, pos.expand(N, C, C))
    lev_tok = torch.where(tri, lev_tok, -1)
    Lam = torch.where(lev_tok >= 0, torch.gather(lam, -1, lev_tok.clamp(min=0)), 0.0)
    live = (prev_pos != EMPTY)[:, None, :]  # [N, 1, K]
    lev_old = level_of_by_search(starts, prev_pos[:, None, :].expand(N, C, K))
    lev_old = torch.where(live, lev_old, -1)
    W = torch.where(lev_old >= 0, torch.gather(lam, -1, lev_old.clamp(min=0)), 0.0)
    end_old = torch.where(lev_old[:, -1] >= 0, lev_old[:, -1], K)
    end_tok = torch.where(lev_tok[:, -1] >= 0, lev_tok[:, -1], K)
    return Lam, lev_tok, W, lev_old, end_old, end_tok


def chunk_terms(x: Inputs, c0: int, c1: int, prev_pos: Tensor, need_levels: bool = True) -> _Chunk:
    q, k, v = x.q[:, c0:c1], x.k[:, c0:c1], x.v[:, c0:c1]
    N, C, Dk = k.shape
    K = x.S0.shape[1]
    dt, dev = k.dtype, k.device
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    if x.g is not None:
        G = x.g[:, c0:c1].cumsum(1)
        gam = torch.exp(G)
        Gam = torch.exp(torch.where(tri, G[:, :, None] - G[:, None, :], -torch.inf))
        rho = torch.exp(G[:, -1:] - G)
    else:
        gam = rho = torch.ones(N, C, dtype=dt, device=dev)
        Gam = tri.to(dt).expand(N, C, C)
    gam_C = gam[:, -1]
    QK = q @ k.transpose(1, 2)
    Aqk = QK * Gam
    beta = x.beta[:, c0:c1]
    KK = k @ k.transpose(1, 2)
    eye = torch.eye(C, dtype=dt, device=dev)
    Akk = (beta[:, :, None] * KK * Gam).tril(-1)
    Tinv = torch.linalg.solve_triangular(eye + Akk, eye.expand(N, C, C), upper=False, unitriangular=True)
    M = Tinv * beta[:, None, :]
    At = Aqk @ M
    Hk = gam[..., None] * k
    Qh = gam[..., None] * q - At @ Hk
    E = (rho[..., None] * k).transpose(1, 2) @ M
    P = gam_C[:, None, None] * torch.eye(Dk, dtype=dt, device=dev) - E @ Hk
    if need_levels:
        levels = _levels(x.starts[:, c0:c1], prev_pos, c0, x.lam[:, c0:c1], K)
    else:  # the state pass needs the chunk-end remaps only
        last = x.starts[:, c1 - 1 : c1]
        pos = c0 + torch.arange(C, device=dev)
        lev_tok = level_of_by_search(last, pos.expand(N, 1, C))[:, 0]
        lev_old = level_of_by_search(last, prev_pos[:, None, :])[:, 0]
        lev_old = torch.where(prev_pos != EMPTY, lev_old, -1)
        levels = (None, None, None, None, torch.where(lev_old >= 0, lev_old, K), torch.where(lev_tok >= 0, lev_tok, K))
    return _Chunk(q, k, v, beta, gam, rho, gam_C, Gam, QK, KK, Tinv, M, Aqk, At, Qh, E, P, *levels)


def _chunk_end(c: _Chunk, S: Tensor) -> Tensor:
    """S'_{r'} = Σ_{r→r'} P_C S_r + Σ_{s→r'} E_s v_sᵀ, in the new rank order [N, K, Dk, Dv]."""
    N, K, Dk, Dv = S.shape
    PS = c.P[:, None] @ S
    out = (_token_writes(c, K)[1] @ c.v).reshape(N, K, Dk, Dv)
    _add_rows(out, c.end_old, PS)
    return out


def _chunk_bounds(T: int, chunk_size: int):
    C = max(int(chunk_size), 1)
    return [(c0, min(c0 + C, T)) for c0 in range(0, T, C)]


def _next_prev_pos(x: Inputs, c1: int) -> Tensor:
    return x.starts[:, c1 - 1]


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def chunked_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,K,Dk,Dv] in the state dtype)`; see the module doc."""
    _require_beta("chunked_forward", beta)
    B, T, H, Dk = q.shape
    Dv, K = v.shape[-1], lam.shape[-1]
    x, cdt = _prepare(q, k, v, lam, g, beta, level_start, S0)
    N = B * H
    S = x.S0
    prev_pos = initial_starts(K, q.device).to(torch.int64).expand(N, K)
    o = torch.empty(N, T, Dv, dtype=cdt, device=q.device)
    for c0, c1 in _chunk_bounds(T, chunk_size):
        c = chunk_terms(x, c0, c1, prev_pos)
        C = c1 - c0
        X = (c.W[..., None] * c.Qh[:, :, None, :]).reshape(N, C, K * Dk)
        o[:, c0:c1] = scale * ((c.At * c.Lam) @ c.v + X @ S.reshape(N, K * Dk, Dv))
        S = _chunk_end(c, S)
        prev_pos = _next_prev_pos(x, c1)
    S_out = S.reshape(B, H, K, Dk, Dv).clone() if T == 0 else S.reshape(B, H, K, Dk, Dv)
    return unheads(o, B, H, q.dtype), S_out.contiguous()


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def chunked_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)`, shaped and typed like the inputs; `dg` is float32
    zeros `[B,T,H]` when `g` is absent. `do` or `dS` may be None (zero)."""
    _require_beta("chunked_backward", beta)
    B, T, H, Dk = q.shape
    Dv, K = v.shape[-1], lam.shape[-1]
    x, cdt = _prepare(q, k, v, lam, g, beta, level_start, S0)
    N, dev = B * H, q.device
    bounds = _chunk_bounds(T, chunk_size)

    # 1. forward over the chunks, keeping the chunk-start slot states
    first_pos = initial_starts(K, dev).to(torch.int64).expand(N, K)
    states, prev = [], []
    S, prev_pos = x.S0, first_pos
    for c0, c1 in bounds:
        states.append(S)
        prev.append(prev_pos)
        S = _chunk_end(chunk_terms(x, c0, c1, prev_pos, need_levels=False), S)
        prev_pos = _next_prev_pos(x, c1)

    # 2. reverse pass carrying dS
    dOt = heads(do, cdt) * scale if do is not None else torch.zeros(N, T, Dv, dtype=cdt, device=dev)
    dSc = dS.to(cdt).reshape(N, K, Dk, Dv) if dS is not None else torch.zeros(N, K, Dk, Dv, dtype=cdt, device=dev)
    dq = torch.zeros(N, T, Dk, dtype=cdt, device=dev)
    dk, dv = torch.zeros_like(dq), torch.zeros(N, T, Dv, dtype=cdt, device=dev)
    dlam = torch.zeros(N, T, K, dtype=cdt, device=dev)
    dg = torch.zeros(N, T, dtype=cdt, device=dev)
    dbeta = torch.zeros(N, T, dtype=cdt, device=dev)
    for (c0, c1), S, prev_pos in zip(reversed(bounds), reversed(states), reversed(prev)):
        c = chunk_terms(x, c0, c1, prev_pos)
        dSc = _chunk_backward(c, S, dOt[:, c0:c1], dSc, x.g is not None,
                              dq[:, c0:c1], dk[:, c0:c1], dv[:, c0:c1], dlam[:, c0:c1], dg[:, c0:c1],
                              dbeta[:, c0:c1])

    f32 = torch.float32
    return (
        unheads(dq, B, H, q.dtype), unheads(dk, B, H, k.dtype), unheads(dv, B, H, v.dtype),
        unheads(dlam, B, H, lam.dtype),
        unheads(dg, B, H, g.dtype) if g is not None else torch.zeros(B, T, H, dtype=f32, device=dev),
        unheads(dbeta, B, H, beta.dtype),
        dSc.reshape(B, H, K, Dk, Dv).to(S0.dtype).clone(),
    )


def _rowsum(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _chunk_backward(c: _Chunk, S: Tensor, dOt: Tensor, dSn: Tensor, has_g: bool,
                    dq: Tensor, dk: Tensor, dv: Tensor, dlam: Tensor, dg: Tensor, dbeta: Tensor) -> Tensor:
    """Accumulates the chunk's input gradients into the given views; returns dS at the chunk
    start (rank order of the old slots)."""
    N, K, Dk, Dv = S.shape
    C = c.k.shape[1]
    # readout: o/scale = (Ã ⊙ Λ) V + X S_flat
    dv += (c.At * c.Lam).transpose(1, 2) @ dOt
    dAL = dOt @ c.v.transpose(1, 2)  # [N, C, C]
    dAt = dAL * c.Lam
    dLam = dAL * c.At
    X = c.W[..., None] * c.Qh[:, :, None, :]  # [N, C, K, Dk]
    dX = (dOt @ S.reshape(N, K * Dk, Dv).transpose(1, 2)).reshape(N, C, K, Dk)
    dQh = (c.W[..., None] * dX).sum(2)
    dW = (dX * c.Qh[:, :, None, :]).sum(-1)  # [N, C, K]
    dS = (X.reshape(N, C, K * Dk).transpose(1, 2) @ dOt).reshape(N, K, Dk, Dv)
    # λ: scatter-add over levels (masked entries add 0 at level 0)
    dlam.scatter_add_(-1, c.lev_tok.clamp(min=0), torch.where(c.lev_tok >= 0, dLam, 0.0))
    dlam.scatter_add_(-1, c.lev_old.clamp(min=0), torch.where(c.lev_old >= 0, dW, 0.0))
    # chunk end: S' = remap(P_C S) + remap(E_s v_sᵀ)
    dPS = _rows(dSn, c.end_old)
    dSn_flat = dSn.reshape(N, K * Dk, Dv)
    Mt, EM = _token_writes(c, K)  # [N, K, C], [N, K·Dk, C]
    dE = ((dSn_flat @ c.v.transpose(1, 2)).reshape(N, K, Dk, C) * Mt[:, :, None, :]).sum(1)  # [N, Dk, C]
    dv += EM.transpose(1, 2) @ dSn_flat
    gam, rho, Gam = c.gam, c.rho, c.Gam
    dgam = _rowsum(dQh, c.q)
    dq += gam[..., None] * dQh
    dS += c.P.transpose(1, 2)[:, None] @ dPS
    dP = (dPS @ S.transpose(2, 3)).sum(1)  # Σ_r dPS_r S_rᵀ [N, Dk, Dk]
    dgam_C = dP.diagonal(dim1=1, dim2=2).sum(-1)
    Hk = gam[..., None] * c.k
    dE = dE - dP @ Hk.transpose(1, 2)
    dAt = dAt - dQh @ Hk.transpose(1, 2)
    dH = -(c.E.transpose(1, 2) @ dP) - c.At.transpose(1, 2) @ dQh  # [N, C, Dk]
    dk += gam[..., None] * dH
    dgam = dgam + _rowsum(dH, c.k)
    Kr = rho[..., None] * c.k
    dKr = c.M @ dE.transpose(1, 2)
    dM = Kr @ dE + c.Aqk.transpose(1, 2) @ dAt
    dAqk = dAt @ c.M.transpose(1, 2)
    dbeta += (dM * c.Tinv).sum(1)
    dTinv = dM * c.beta[:, None, :]
    dAkk = -(c.Tinv.transpose(1, 2) @ dTinv @ c.Tinv.transpose(1, 2)).tril(-1)
    dbeta += (dAkk * c.KK * Gam).sum(2)
    dB = c.beta[:, :, None] * dAkk
    Zk = dB * Gam
    dk += Zk @ c.k + Zk.transpose(1, 2) @ c.k
    dGam = dB * c.KK + dAqk * c.QK
    Zq = dAqk * Gam
    dq += Zq @ c.k
    dk += rho[..., None] * dKr + Zq.transpose(1, 2) @ c.q
    if has_g:
        drho = _rowsum(dKr, c.k)
        Zg = dGam * Gam
        dG = Zg.sum(2) - Zg.sum(1) + dgam * gam - drho * rho
        dG[:, -1] += (drho * rho).sum(1) + dgam_C * c.gam_C
        dg += dG.flip(1).cumsum(1).flip(1)
    return dS
