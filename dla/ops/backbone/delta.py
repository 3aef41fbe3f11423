r"""The chunked gated delta rule (WY/UT form) with a per-query weight and resets: the torch CPU
kernel of the backbone stage with `β` (DeltaNet, Gated DeltaNet; SPEC §2, §3.1), and the float64
oracle of its Triton kernels. Plain torch, batched over `N = B·H` and over chunks, the backward
written out (no autograd). `naive.py` holds the token-by-token reference it is tested against.

What it computes
================
Per batch element and head (SPEC §2, one state), with `reset_t` opening a new segment:

    S ← 0 if reset_t else A_t S,   A_t = a_t (I − β_t k_t k_tᵀ),  a_t = exp(g_t)  (1 without g)
    S ← S + β_t k_t v_tᵀ,          o_t = λ0_t · S_tᵀ (scale · q_t)

The sequence is cut into chunks of `C` tokens (the last one padded with `k = v = 0, β = 0,
g = 0`, which writes nothing and keeps the state). Inside a chunk, positions `1..C`:

    G_t = Σ_{u≤t} g_u (chunk-local),     σ_t = Σ_{u≤t} reset_u   (the token's segment in the chunk)
    keep_t = [σ_t = 0]   (the carried state reaches t),   last_s = [σ_s = σ_C],   κ = keep_C
    Γ[t,s] = exp(G_t − G_s) · [s ≤ t] · [σ_t = σ_s]       (a reset cuts every pair it separates)
    γ_t = keep_t · exp(G_t),   ρ_s = last_s · exp(G_C − G_s),   γ_C = κ · exp(G_C)

The UT (WY) form of the chunk, with `h` the state before it (`S0` for the first chunk):

    A_kk = tril(diag(β)(KKᵀ ⊙ Γ), −1),   T = (I + A_kk)⁻¹   (unit lower; blocks per segment)
    w = T diag(βγ) K   [C, Dk],   u = T diag(β) V   [C, Dv]
    U = u − w h                                         (the chunk's "new values")
    o = diag(λ0) · scale · [diag(γ) Q h + (QKᵀ ⊙ Γ) U]
    h' = γ_C h + Kᵀ diag(ρ) U                           (the state after the chunk)

(Derivation as in `dla.ops.readout`: the single state over the chunk is
`S_t = γ_t h + Σ_{s≤t} Γ[t,s] k_s U_sᵀ` with `(I + A_kk) U = diag(β) V − diag(βγ) K h`;
`Γ`, `γ`, `ρ`, `γ_C` carry the segment masks, so a segment that opens inside the chunk starts
from zero and the chunk end keeps only the last segment's tokens, plus `h` when the chunk has
no reset. Masks, never `g = −∞`, which would give NaN through the differences of `G`.)

The backward
============
With `dÕ = scale · diag(λ0) dO` and `dh'` the gradient of the state after the chunk:

    dλ0_t = scale · ⟨dO_t, γ_t (Q h)_t + ((QKᵀ ⊙ Γ) U)_t⟩
    dU   = (QKᵀ ⊙ Γ)ᵀ dÕ + diag(ρ) K dh'
    dh   = (diag(γ) Q)ᵀ dÕ + γ_C dh' − wᵀ dU                 (carried to the previous chunk)
    dQ   = diag(γ) dÕ hᵀ + (dA ⊙ Γ) K,   dA = dÕ Uᵀ
    dK   = (dA ⊙ Γ)ᵀ Q + diag(ρ) U dh'ᵀ (+ the WY terms),   dρ = rowsum((U dh'ᵀ) ⊙ K)
    dγ   = rowsum((dÕ hᵀ) ⊙ Q)
    dγ_C = ⟨dh', h⟩,   du = dU,   dw = −dU hᵀ
    WY:  dT = du (diag(β)V)ᵀ + dw (diag(βγ)K)ᵀ,   dV = diag(β) Tᵀ du,   dK += diag(βγ) Tᵀ dw
         dβ = rowsum((Tᵀ du) ⊙ V) + γ ⊙ rowsum((Tᵀ dw) ⊙ K),   dγ += β ⊙ rowsum((Tᵀ dw) ⊙ K)
         dA_kk = −strict_lower(Tᵀ dT Tᵀ),   dβ += rowsum(dA_kk ⊙ KKᵀ ⊙ Γ)
         Z = diag(β) dA_kk ⊙ Γ:   dK += (Z + Zᵀ) K,   dΓ += diag(β) dA_kk ⊙ KKᵀ
    dΓ += dA ⊙ QKᵀ
    dG = rowsum(dΓ ⊙ Γ) − colsum(dΓ ⊙ Γ) + dγ ⊙ γ − dρ ⊙ ρ,   dG_C += Σ_s dρ_s ρ_s + dγ_C γ_C
    dg_u = Σ_{t ≥ u} dG_t   (reverse cumsum inside the chunk)

The stage pieces `delta_chunk_states` / `delta_chunk_states_backward` are the state pass alone
(no `q`, no output): `h` before every chunk and the final state, and the gradients of `k, v, g,
β, S0` from gradients of those states — what the DLA readout with `β` builds on.

Shapes: `q, k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `lam0, g, beta, reset [B,T,H]`, `S0 [B,H,Dk,Dv]`.
Compute dtype: float64 for float64 `q`, float32 otherwise; `o` in `q`'s dtype, states in the
compute dtype, gradients typed like their inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.state import state_dtype

__all__ = ["delta_forward", "delta_backward", "delta_chunk_states", "delta_chunk_states_backward"]


# --------------------------------------------------------------------------------------------
# Layout: [B, T, H, ...] → [N = B·H, NC, C, ...] in the compute dtype, padded to NC·C tokens.
# --------------------------------------------------------------------------------------------


def _chunked(x: Tensor, C: int, dtype) -> Tensor:
    B, T, H = x.shape[:3]
    x = x.to(dtype).transpose(1, 2).reshape(B * H, T, *x.shape[3:])
    pad = -T % C
    if pad:
        x = torch.cat([x, x.new_zeros(B * H, pad, *x.shape[2:])], dim=1)
    return x.reshape(B * H, -1, C, *x.shape[2:])


def _unchunked(x: Tensor, B: int, H: int, T: int, dtype) -> Tensor:
    N, NC, C = x.shape[:3]
    x = x.reshape(N, NC * C, *x.shape[3:])[:, :T]
    return x.reshape(B, H, T, *x.shape[2:]).transpose(1, 2).to(dtype).contiguous()


def _check_chunk_size(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


class _Chunks(NamedTuple):
    """Every chunk's quantities, [N, NC, ...] (recomputed by the backward, never saved)."""

    k: Tensor  # [N, NC, C, Dk]
    v: Tensor  # [N, NC, C, Dv]
    beta: Tensor  # β [N, NC, C]
    gam: Tensor  # γ [N, NC, C]
    rho: Tensor  # ρ [N, NC, C]
    gam_C: Tensor  # γ_C [N, NC]
    Gam: Tensor  # Γ [N, NC, C, C] (0 above the diagonal and across segments)
    KK: Tensor  # KKᵀ
    T: Tensor  # (I + A_kk)⁻¹
    w: Tensor  # [N, NC, C, Dk]
    u: Tensor  # [N, NC, C, Dv]


def _chunks(k, v, g, beta, reset, C: int, dtype) -> _Chunks:
    k, v, beta = _chunked(k, C, dtype), _chunked(v, C, dtype), _chunked(beta, C, dtype)
    N, NC = k.shape[:2]
    dev = k.device
    tri = torch.ones(C, C, dtype=torch.bool, device=dev).tril()
    if reset is None:
        same, keep, last = tri, torch.ones(N, NC, C, dtype=torch.bool, device=dev), None
    else:
        seg = _chunked(reset, C, torch.int64).cumsum(-1)
        same = tri & (seg[..., :, None] == seg[..., None, :])
        keep = seg == 0
        last = seg == seg[..., -1:]
    G = _chunked(g, C, dtype).cumsum(-1) if g is not None else torch.zeros(N, NC, C, dtype=dtype, device=dev)
    Gam = torch.exp(torch.where(same, G[..., :, None] - G[..., None, :], -torch.inf))
    gam = torch.where(keep, torch.exp(G), 0.0)
    rho = torch.exp(G[..., -1:] - G)
    if last is not None:
        rho = torch.where(last, rho, 0.0)
    gam_C = gam[..., -1]
    KK = k @ k.transpose(-1, -2)
    eye = torch.eye(C, dtype=dtype, device=dev)
    Akk = (beta[..., :, None] * KK * Gam).tril(-1)
    T = torch.linalg.solve_triangular(eye + Akk, eye.expand_as(Akk), upper=False, unitriangular=True)
    w = T @ ((beta * gam)[..., None] * k)
    u = T @ (beta[..., None] * v)
    return _Chunks(k, v, beta, gam, rho, gam_C, Gam, KK, T, w, u)


def _states(c: _Chunks, S0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """h [N, NC, Dk, Dv] (the state before each chunk), U [N, NC, C, Dv], the final state."""
    N, NC, C, Dk = c.k.shape
    h = c.k.new_empty(N, NC, Dk, c.v.shape[-1])
    U = torch.empty_like(c.u)
    S = S0
    for j in range(NC):
        h[:, j] = S
        U[:, j] = c.u[:, j] - c.w[:, j] @ S
        S = c.gam_C[:, j, None, None] * S + (c.rho[:, j, :, None] * c.k[:, j]).transpose(1, 2) @ U[:, j]
    return h, U, S


def _inputs_S0(S0: Tensor | None, N: int, Dk: int, Dv: int, dtype, device) -> Tensor:
    if S0 is None:
        return torch.zeros(N, Dk, Dv, dtype=dtype, device=device)
    return S0.to(dtype).reshape(N, Dk, Dv)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def delta_forward(q, k, v, lam0, g, beta, reset, S0, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,Dk,Dv] in the state dtype)`; see the module doc."""
    C = _check_chunk_size(chunk_size)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    cdt = state_dtype(q.dtype)
    c = _chunks(k, v, g, beta, reset, C, cdt)
    h, U, S = _states(c, _inputs_S0(S0, B * H, Dk, Dv, cdt, q.device))
    qc, lam = _chunked(q, C, cdt), _chunked(lam0, C, cdt)
    Aqk = (qc @ c.k.transpose(-1, -2)) * c.Gam
    o = (scale * lam)[..., None] * (c.gam[..., None] * (qc @ h) + Aqk @ U)
    return _unchunked(o, B, H, T, q.dtype), S.reshape(B, H, Dk, Dv)


@torch.no_grad()
def delta_chunk_states(k, v, g, beta, reset, S0, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(h [B,H,NC,Dk,Dv], S [B,H,Dk,Dv])`: the state before each chunk and after the last, in
    the state dtype (no output, no λ0)."""
    C = _check_chunk_size(chunk_size)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    cdt = state_dtype(k.dtype)
    c = _chunks(k, v, g, beta, reset, C, cdt)
    h, _, S = _states(c, _inputs_S0(S0, B * H, Dk, Dv, cdt, k.device))
    return h.reshape(B, H, -1, Dk, Dv), S.reshape(B, H, Dk, Dv)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


class _Grads(NamedTuple):
    """Chunk-layout gradients that the pieces below accumulate, [N, NC, C, ...]."""

    dk: Tensor
    dv: Tensor
    dbeta: Tensor
    dgam: Tensor  # dγ
    drho: Tensor  # dρ
    dgam_C: Tensor  # dγ_C [N, NC]
    dGam: Tensor  # dΓ [N, NC, C, C]


def _zero_grads(c: _Chunks) -> _Grads:
    z = c.beta.new_zeros
    N, NC, C = c.beta.shape
    return _Grads(torch.zeros_like(c.k), torch.zeros_like(c.v), z(N, NC, C), z(N, NC, C), z(N, NC, C), z(N, NC),
                  z(N, NC, C, C))


def _states_backward(c: _Chunks, h: Tensor, U: Tensor, dh: Tensor | None, dU: Tensor | None, dS: Tensor,
                     grads: _Grads) -> Tensor:
    """The reverse state pass. `dh` [N, NC, Dk, Dv] and `dU` are the gradients of the
    chunk-start states and of `U` from outside the pass (None: zero), `dS` that of the final
    state; accumulates the pass's own gradients (through `U, ρ, γ_C, k` and the WY form) into
    `grads` and returns dS0."""
    NC = h.shape[1]
    dSa = torch.empty_like(h)  # the gradient of the state after each chunk
    dU = torch.zeros_like(U) if dU is None else dU.clone()
    for j in reversed(range(NC)):
        dSa[:, j] = dS
        dU[:, j] += (c.rho[:, j, :, None] * c.k[:, j]) @ dS
        dS = c.gam_C[:, j, None, None] * dS - c.w[:, j].transpose(1, 2) @ dU[:, j]
        if dh is not None:
            dS = dS + dh[:, j]
    UdS = U @ dSa.transpose(-1, -2)  # [N, NC, C, Dk]
    grads.dk.add_(c.rho[..., None] * UdS)
    grads.drho.add_((UdS * c.k).sum(-1))
    grads.dgam_C.add_((dSa * h).sum((-1, -2)))
    _wy_backward(c, dU, -(dU @ h.transpose(-1, -2)), grads)
    return dS


def _wy_backward(c: _Chunks, du: Tensor, dw: Tensor, grads: _Grads) -> None:
    """Through `u = T diag(β) V`, `w = T diag(βγ) K` and `T = (I + A_kk)⁻¹`."""
    vb = c.beta[..., None] * c.v
    kb = (c.beta * c.gam)[..., None] * c.k
    Tt = c.T.transpose(-1, -2)
    dT = du @ vb.transpose(-1, -2) + dw @ kb.transpose(-1, -2)
    dvb = Tt @ du
    dkb = Tt @ dw
    kdkb = (dkb * c.k).sum(-1)
    grads.dv.add_(c.beta[..., None] * dvb)
    grads.dk.add_((c.beta * c.gam)[..., None] * dkb)
    grads.dbeta.add_((dvb * c.v).sum(-1) + c.gam * kdkb)
    grads.dgam.add_(c.beta * kdkb)
    dAkk = -(Tt @ dT @ Tt).tril(-1)
    grads.dbeta.add_((dAkk * c.KK * c.Gam).sum(-1))
    dB = c.beta[..., :, None] * dAkk
    Z = dB * c.Gam
    grads.dk.add_((Z + Z.transpose(-1, -2)) @ c.k)
    grads.dGam.add_(dB * c.KK)


def _gate_gradient(c: _Chunks, grads: _Grads) -> Tensor:
    """dg [N, NC, C] from dΓ, dγ, dρ, dγ_C (every one a function of the chunk-local G)."""
    Zg = grads.dGam * c.Gam
    dG = Zg.sum(-1) - Zg.sum(-2) + grads.dgam * c.gam - grads.drho * c.rho
    dG[..., -1] += (grads.drho * c.rho).sum(-1) + grads.dgam_C * c.gam_C
    return dG.flip(-1).cumsum(-1).flip(-1)


def _finish(c: _Chunks, grads: _Grads, k, v, g, beta, B: int, H: int, T: int):
    """(dk, dv, dg, dβ) in the inputs' layout and dtypes."""
    return (_unchunked(grads.dk, B, H, T, k.dtype), _unchunked(grads.dv, B, H, T, v.dtype),
            _unchunked(_gate_gradient(c, grads), B, H, T, g.dtype) if g is not None else None,
            _unchunked(grads.dbeta, B, H, T, beta.dtype))


def _initial_gradient(dS0: Tensor, S0: Tensor | None, B: int, H: int) -> Tensor | None:
    return None if S0 is None else dS0.reshape(B, H, *dS0.shape[1:]).to(S0.dtype).contiguous()


@torch.no_grad()
def delta_backward(do, dS, q, k, v, lam0, g, beta, reset, S0, scale: float, chunk_size: int):
    """`(dq, dk, dv, dlam0, dg, dbeta, dS0)`, shaped and typed like the inputs; `dg` is None
    without g and `dS0` without S0. `do` or `dS` may be None (zero)."""
    C = _check_chunk_size(chunk_size)
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    N, cdt, dev = B * H, state_dtype(q.dtype), q.device
    c = _chunks(k, v, g, beta, reset, C, cdt)
    h, U, _ = _states(c, _inputs_S0(S0, N, Dk, Dv, cdt, dev))
    grads = _zero_grads(c)
    qc, lam = _chunked(q, C, cdt), _chunked(lam0, C, cdt)
    NC = qc.shape[1]
    if do is not None:
        dOc = _chunked(do, C, cdt)
        QK = qc @ c.k.transpose(-1, -2)
        Aqk = QK * c.Gam
        dOh = dOc @ h.transpose(-1, -2)  # dO hᵀ [N, NC, C, Dk]
        dlam = scale * ((dOh * qc).sum(-1) * c.gam + ((dOc @ U.transpose(-1, -2)) * Aqk).sum(-1))
        dOt = (scale * lam)[..., None] * dOc  # dÕ
        dQh = (scale * lam)[..., None] * dOh
        dA = dOt @ U.transpose(-1, -2)
        dAG = dA * c.Gam
        dq = c.gam[..., None] * dQh + dAG @ c.k
        grads.dk.add_(dAG.transpose(-1, -2) @ qc)
        grads.dgam.add_((dQh * qc).sum(-1))
        grads.dGam.add_(dA * QK)
        dU = Aqk.transpose(-1, -2) @ dOt
        dh = (c.gam[..., None] * qc).transpose(-1, -2) @ dOt
    else:
        dq, dlam = torch.zeros_like(qc), torch.zeros_like(lam)
        dU = dh = None
    dSf = torch.zeros(N, Dk, Dv, dtype=cdt, device=dev) if dS is None else dS.to(cdt).reshape(N, Dk, Dv)
    dS0 = _states_backward(c, h, U, dh, dU, dSf, grads)
    dk, dv, dg, dbeta = _finish(c, grads, k, v, g, beta, B, H, T)
    return (_unchunked(dq, B, H, T, q.dtype), dk, dv, _unchunked(dlam, B, H, T, lam0.dtype), dg, dbeta,
            _initial_gradient(dS0, S0, B, H))


@torch.no_grad()
def delta_chunk_states_backward(dh, dS, k, v, g, beta, reset, S0, chunk_size: int):
    """`(dk, dv, dg, dbeta, dS0)` from `dh [B,H,NC,Dk,Dv]` (gradients of the chunk-start states
    that `delta_chunk_states` returns) and `dS` (of the final state); either may be None."""
    C = _check_chunk_size(chunk_size)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    N, cdt, dev = B * H, state_dtype(k.dtype), k.device
    c = _chunks(k, v, g, beta, reset, C, cdt)
    h, U, _ = _states(c, _inputs_S0(S0, N, Dk, Dv, cdt, dev))
    grads = _zero_grads(c)
    dh = dh.to(cdt).reshape(N, -1, Dk, Dv) if dh is not None else None
    dSf = torch.zeros(N, Dk, Dv, dtype=cdt, device=dev) if dS is None else dS.to(cdt).reshape(N, Dk, Dv)
    dS0 = _states_backward(c, h, U, dh, None, dSf, grads)
    dk, dv, dg, dbeta = _finish(c, grads, k, v, g, beta, B, H, T)
    return dk, dv, dg, dbeta, _initial_gradient(dS0, S0, B, H)
