r"""The backbone stage without `β` as a chunked SSD in plain torch: the CPU kernel, and the float64
oracle of the Triton kernels (`ssd_triton.py`). Explicit backward, no autograd; batched over `B·H`.

What it computes (SPEC §2, §3.1; `naive.py` token by token)
===========================================================
Per batch element and head, with `keep_t = 0` where `reset_t` (the token opens a new segment)
and `a_t = exp(g_t)` (1 without `g`):

    S_t = keep_t · a_t · S_{t−1} + k_t v_tᵀ,   S_{−1} = S0
    o_t = λ0_t · S_tᵀ (scale · q_t)

In chunks of `C` tokens (the last may be short; padded with `k = v = q = 0`, `g = 0`, no reset,
which leaves the state unchanged). Within chunk `c`, with local positions `i, j = 0..C−1` and `h_c`
the state before the chunk:

    G_i = Σ_{j≤i} g_j                         (chunk-local cumsum)
    Γ[i,j] = exp(G_i − G_j)                   (≤ 1 for j ≤ i, as g ≤ 0)
    σ_i = Σ_{j≤i} reset_j                     (segment index inside the chunk)
    M[i,j] = [j ≤ i] [σ_i = σ_j]              (segment mask: no reset in (j, i])
    ρ_i = [σ_i = 0] exp(G_i)                  (the carried state is visible until the first reset)
    w_j = [σ_j = σ_{C−1}] exp(G_{C−1} − G_j)  (what reaches the chunk's end)
    d_c = [σ_{C−1} = 0] exp(G_{C−1})          (keep flag × decay of the carried state)

    h_0 = S0,   h_{c+1} = d_c h_c + Σ_j w_j k_j v_jᵀ         (`ssd_chunk_states`; S = h_NC)
    o_i = λ0_i · scale · (ρ_i h_cᵀ q_i + Σ_j (Γ ⊙ M)[i,j] (q_i · k_j) v_j)

`g = −∞` at a reset would give `exp(−∞ + ∞)` = NaN in `Γ`; the mask and the keep flag never form
such a difference.

Backward. With `dO` the output gradient and `D_c = ∂L/∂h_{c+1}` (the gradient of the state after
chunk `c`, from `D_{NC−1} = dS` down):

    dq^u_i = scale · (ρ_i h_c dO_i + Σ_j (Γ ⊙ M)[i,j] (dO_i · v_j) k_j)
    dλ0_i  = q_i · dq^u_i   (= dO_i · o_i / λ0_i),      dq_i = λ0_i dq^u_i
    dk_j   = scale · Σ_i (Γ ⊙ M)[i,j] λ0_i (dO_i · v_j) q_i + w_j D_c v_j
    dv_j   = scale · Σ_i (Γ ⊙ M)[i,j] λ0_i (q_i · k_j) dO_i + w_j D_cᵀ k_j
    D_{c−1} = d_c D_c + scale · Σ_i ρ_i λ0_i q_i dO_iᵀ  (+ ∂L/∂h_c given from outside),
    dS0 = D_{−1}

The decay. `L` depends on `G` through `Γ`, `ρ`, `w` and `d`, each an exponential of a difference,
so `∂L/∂G_i` collects, term by term: `q_i · dq_i` (the rows of `Γ` and `ρ`), `− k_i · dk_i` (the
columns of `Γ` and `w`), and at the chunk's last token the end-of-chunk term, since `G_{C−1}`
scales the whole new state:

    dG_i = q_i · dq_i − k_i · dk_i + [i = C−1] ⟨D_c, h_{c+1}⟩,
    ⟨D_c, h_{c+1}⟩ = d_c ⟨D_c, h_c⟩ + Σ_j k_j · (w_j D_c v_j)

and `dg_j = Σ_{i≥j} dG_i` within the chunk (`G` is chunk-local: a chunk talks to the next only
through `h`). With resets: shifting `G_i` by the same amount for all `i ≥ r`, `r` a reset, changes
nothing (every pair it touches is masked, `ρ` is 0 there, `w` and `G_{C−1}` shift together, `d_c =
0`), so `Σ_{i≥r} dG_i = 0` exactly and the sum may stop at the next reset:

    dg_j = [¬reset_j] Σ_{i ≥ j, σ_i = σ_j} dG_i = [¬reset_j] (Mᵀ dG)_j

which is the plain reverse cumsum without its cancelling tail (`dg` at a reset is exactly 0, as in
the reference, where `S ← 0` discards `a_t`).

Shapes: `q, k [B,T,H,Dk]`, `v [B,T,H,Dv]`, `lam0 [B,T,H]`, `g [B,T,H]` or None, `reset [B,T,H]` bool
or None, `S0 [B,H,Dk,Dv]` or None (zero), `h [B,H,NC,Dk,Dv]`. Computed in float64 for float64
inputs and in float32 otherwise; `o` in `q`'s dtype, states in float32 (float64 for float64
inputs), gradients in their inputs' dtypes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ssd_forward", "ssd_backward", "ssd_chunk_states", "ssd_chunk_states_backward", "check_ssd_args",
           "state_dtype"]


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 states for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_ssd_args(name: str, k: Tensor, v: Tensor, g: Tensor | None, reset: Tensor | None, S0: Tensor | None,
                   chunk_size: int, q: Tensor | None = None, lam0: Tensor | None = None) -> None:
    """Shapes and dtypes of the SSD stage's arguments; raises naming the argument."""
    if k.dim() != 4:
        raise ValueError(f"{name}: k must be [B,T,H,Dk], got shape {tuple(k.shape)}")
    B, T, H, Dk = k.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"{name}: v must be [B,T,H,Dv] = [{B},{T},{H},Dv], got shape {tuple(v.shape)}")
    if q is not None and tuple(q.shape) != tuple(k.shape):
        raise ValueError(f"{name}: q must have k's shape {tuple(k.shape)}, got {tuple(q.shape)}")
    for arg, x in (("lam0", lam0), ("g", g), ("reset", reset)):
        if x is not None and tuple(x.shape) != (B, T, H):
            raise ValueError(f"{name}: {arg} must be [B,T,H] = [{B},{T},{H}], got shape {tuple(x.shape)}")
    if reset is not None and reset.dtype != torch.bool:
        raise TypeError(f"{name}: reset must be torch.bool, got {reset.dtype}")
    floats = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
    if k.dtype not in floats:
        raise TypeError(f"{name}: k must be one of {floats}, got {k.dtype}")
    for arg, x in (("q", q), ("v", v), ("lam0", lam0)):
        if x is not None and x.dtype != k.dtype:
            raise TypeError(f"{name}: {arg} must have k's dtype {k.dtype}, got {x.dtype}")
    if g is not None and g.dtype not in (torch.float32, k.dtype):
        raise TypeError(f"{name}: g must be float32 or {k.dtype}, got {g.dtype}")
    if S0 is not None and tuple(S0.shape) != (B, H, Dk, v.shape[-1]):
        raise ValueError(f"{name}: S0 must be [B,H,Dk,Dv] = [{B},{H},{Dk},{v.shape[-1]}], got {tuple(S0.shape)}")
    for arg, x in (("q", q), ("v", v), ("lam0", lam0), ("g", g), ("reset", reset), ("S0", S0)):
        if x is not None and x.device != k.device:
            raise ValueError(f"{name}: {arg} must be on k's device {k.device}, got {x.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")


class _Chunks(NamedTuple):
    """The chunk-local quantities of the module doc, `N = B·H` rows, `NC` chunks of `C` tokens."""

    C: int
    NC: int
    gamma: Tensor  # [N, NC, C, C] Γ ⊙ M
    mask: Tensor  # [N, NC, C, C] M (bool)
    rho: Tensor  # [N, NC, C] ρ
    w: Tensor  # [N, NC, C]
    decay: Tensor  # [N, NC] d_c
    keep_grad: Tensor  # [N, NC, C] [¬reset_j] (bool)


def _tokens(x: Tensor, C: int, dtype: torch.dtype) -> Tensor:
    """[B,T,H,...] → [B·H, NC, C, ...] in `dtype`, the last chunk padded with zeros."""
    B, T, H = x.shape[:3]
    x = x.to(dtype).movedim(2, 1).reshape(B * H, T, *x.shape[3:])
    pad = -T % C
    if pad:
        x = torch.cat([x, x.new_zeros(B * H, pad, *x.shape[2:])], dim=1)
    return x.reshape(B * H, (T + pad) // C, C, *x.shape[2:])


def _untokens(x: Tensor, B: int, T: int, H: int, dtype: torch.dtype) -> Tensor:
    """Inverse of `_tokens`: [B·H, NC, C, ...] → [B,T,H,...] in `dtype`."""
    x = x.reshape(B, H, -1, *x.shape[3:])[:, :, :T]
    return x.movedim(1, 2).to(dtype).contiguous()


def _chunks(g: Tensor | None, reset: Tensor | None, B: int, T: int, H: int, C: int, dtype: torch.dtype,
            device: torch.device) -> _Chunks:
    zeros = torch.zeros(B, T, H, dtype=dtype, device=device)
    G = torch.cumsum(_tokens(zeros if g is None else g, C, dtype), dim=-1)
    seg = torch.cumsum(_tokens(torch.zeros_like(zeros, dtype=torch.int32) if reset is None else reset, C,
                               torch.int32), dim=-1)
    NC = G.shape[1]
    causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    mask = causal & (seg[..., :, None] == seg[..., None, :])
    gamma = torch.exp(torch.where(mask, G[..., :, None] - G[..., None, :], 0.0)) * mask
    last, seg_last = G[..., -1:], seg[..., -1:]
    rho = torch.exp(G) * (seg == 0)
    w = torch.exp(last - G) * (seg == seg_last)
    decay = (torch.exp(last) * (seg_last == 0))[..., 0]
    first = _tokens(torch.zeros_like(zeros, dtype=torch.bool) if reset is None else reset, C, torch.bool)
    return _Chunks(C, NC, gamma, mask, rho, w, decay, ~first)


def _states(kc: Tensor, vc: Tensor, ch: _Chunks, S0: Tensor) -> tuple[Tensor, Tensor]:
    """h [N, NC, Dk, Dv] (the state before each chunk) and the final state [N, Dk, Dv]."""
    writes = torch.einsum("nctk,nct,nctv->nckv", kc, ch.w, vc)
    h = torch.empty_like(writes)
    S = S0
    for c in range(ch.NC):
        h[:, c] = S
        S = ch.decay[:, c, None, None] * S + writes[:, c]
    return h, S


def _states_backward(kc: Tensor, vc: Tensor, ch: _Chunks, h: Tensor, S: Tensor, dh: Tensor | None,
                     dS: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The state pass's backward: `(dk, dv, dG, dS0)` in chunk layout, `dG` before the cumsum.
    `dh [N, NC, Dk, Dv]` is ∂L/∂h_c from outside (None: zero), `dS` that of the final state `S`."""
    D = torch.empty_like(h)
    acc = dS
    for c in reversed(range(ch.NC)):
        D[:, c] = acc
        acc = ch.decay[:, c, None, None] * acc
        if dh is not None:
            acc = acc + dh[:, c]
    dk = ch.w[..., None] * torch.einsum("nckv,nctv->nctk", D, vc)
    dv = ch.w[..., None] * torch.einsum("nckv,nctk->nctv", D, kc)
    kdk = (kc * dk).sum(-1)
    # ⟨D_c, h_{c+1}⟩ = d_c ⟨D_c, h_c⟩ + Σ_j k_j · dk_j, with h_{c+1} the next state (S after the last)
    following = torch.cat([h[:, 1:], S[:, None]], dim=1)
    dG = -kdk
    dG[..., -1] += (D * following).sum((-2, -1))
    return dk, dv, dG, acc


def _dg(dG: Tensor, ch: _Chunks) -> Tensor:
    """dg_j = [¬reset_j] Σ_{i ≥ j, σ_i = σ_j} dG_i (module doc)."""
    return torch.einsum("ncij,nci->ncj", ch.mask.to(dG.dtype), dG) * ch.keep_grad


def _prepare(k, v, g, reset, S0, chunk_size):
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    cd = state_dtype(k.dtype)
    C = min(chunk_size, max(T, 1))
    ch = _chunks(g, reset, B, T, H, C, cd, k.device)
    S0c = torch.zeros(B * H, Dk, Dv, dtype=cd, device=k.device) if S0 is None else S0.to(cd).reshape(B * H, Dk, Dv)
    return ch, _tokens(k, C, cd), _tokens(v, C, cd), S0c, cd


def ssd_chunk_states(k: Tensor, v: Tensor, g: Tensor | None, reset: Tensor | None, S0: Tensor | None,
                     chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(h [B,H,NC,Dk,Dv], S [B,H,Dk,Dv])`: the state before each chunk and the final state, in
    the state dtype (module doc; `NC = ⌈T / chunk_size⌉`)."""
    check_ssd_args("ssd_chunk_states", k, v, g, reset, S0, chunk_size)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    ch, kc, vc, S0c, _ = _prepare(k, v, g, reset, S0, chunk_size)
    h, S = _states(kc, vc, ch, S0c)
    return h.reshape(B, H, ch.NC, Dk, Dv), S.reshape(B, H, Dk, Dv)


def ssd_chunk_states_backward(dh: Tensor | None, dS_final: Tensor | None, k: Tensor, v: Tensor, g: Tensor | None,
                              reset: Tensor | None, S0: Tensor | None,
                              chunk_size: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """`(dk, dv, dg, dS0)` of `ssd_chunk_states` for the gradients `dh` of `h` and `dS_final` of
    `S` (either may be None: zero); `dg` None without `g`, `dS0` None without `S0`."""
    check_ssd_args("ssd_chunk_states_backward", k, v, g, reset, S0, chunk_size)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    ch, kc, vc, S0c, cd = _prepare(k, v, g, reset, S0, chunk_size)
    h, S = _states(kc, vc, ch, S0c)
    dhc = None if dh is None else dh.to(cd).reshape(B * H, ch.NC, Dk, Dv)
    dSc = torch.zeros_like(S) if dS_final is None else dS_final.to(cd).reshape(B * H, Dk, Dv)
    dk, dv, dG, dS0 = _states_backward(kc, vc, ch, h, S, dhc, dSc)
    return (_untokens(dk, B, T, H, k.dtype), _untokens(dv, B, T, H, v.dtype),
            None if g is None else _untokens(_dg(dG, ch), B, T, H, g.dtype),
            None if S0 is None else dS0.reshape(B, H, Dk, Dv).to(S0.dtype))


def ssd_forward(q: Tensor, k: Tensor, v: Tensor, lam0: Tensor, g: Tensor | None, reset: Tensor | None,
                S0: Tensor | None, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,Dk,Dv] in the state dtype)` (module doc)."""
    check_ssd_args("ssd_forward", k, v, g, reset, S0, chunk_size, q=q, lam0=lam0)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    ch, kc, vc, S0c, cd = _prepare(k, v, g, reset, S0, chunk_size)
    qc, lc = _tokens(q, ch.C, cd), _tokens(lam0, ch.C, cd)
    h, S = _states(kc, vc, ch, S0c)
    scores = torch.einsum("ncik,ncjk->ncij", qc, kc) * ch.gamma
    o = ch.rho[..., None] * torch.einsum("ncik,nckv->nciv", qc, h) + torch.einsum("ncij,ncjv->nciv", scores, vc)
    o = (scale * lc)[..., None] * o
    return _untokens(o, B, T, H, q.dtype), S.reshape(B, H, Dk, Dv)


def ssd_backward(do: Tensor | None, dS: Tensor | None, q: Tensor, k: Tensor, v: Tensor, lam0: Tensor,
                 g: Tensor | None, reset: Tensor | None, S0: Tensor | None, scale: float, chunk_size: int):
    """`(dq, dk, dv, dlam0, dg, dS0)` of `ssd_forward` for the gradients `do` of `o` and `dS` of
    `S` (either may be None: zero); `dg` None without `g`, `dS0` None without `S0`."""
    check_ssd_args("ssd_backward", k, v, g, reset, S0, chunk_size, q=q, lam0=lam0)
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    ch, kc, vc, S0c, cd = _prepare(k, v, g, reset, S0, chunk_size)
    qc, lc = _tokens(q, ch.C, cd), _tokens(lam0, ch.C, cd)
    doc = torch.zeros_like(vc) if do is None else _tokens(do, ch.C, cd)
    h, S = _states(kc, vc, ch, S0c)
    dSc = torch.zeros_like(S) if dS is None else dS.to(cd).reshape(B * H, Dk, Dv)
    weighted = lc[..., None] * doc  # λ0_i dO_i
    # ∂L/∂h_c through the chunk's own outputs
    dh = scale * torch.einsum("nci,ncik,nciv->nckv", ch.rho, qc, weighted)
    dk, dv, dG, dS0 = _states_backward(kc, vc, ch, h, S, dh, dSc)
    dp = torch.einsum("nciv,ncjv->ncij", doc, vc) * ch.gamma  # (dO_i · v_j)(Γ ⊙ M)[i,j]
    dqu = scale * (ch.rho[..., None] * torch.einsum("nciv,nckv->ncik", doc, h)
                   + torch.einsum("ncij,ncjk->ncik", dp, kc))
    dlam = (qc * dqu).sum(-1)
    dq = lc[..., None] * dqu
    dk_out = scale * torch.einsum("ncij,nci,ncik->ncjk", dp, lc, qc)
    scores = torch.einsum("ncik,ncjk->ncij", qc, kc) * ch.gamma
    dv = dv + scale * torch.einsum("ncij,nciv->ncjv", scores, weighted)
    dG = dG + (qc * dq).sum(-1) - (kc * dk_out).sum(-1)
    dk = dk + dk_out
    return (_untokens(dq, B, T, H, q.dtype), _untokens(dk, B, T, H, k.dtype), _untokens(dv, B, T, H, v.dtype),
            _untokens(dlam, B, T, H, lam0.dtype), None if g is None else _untokens(_dg(dG, ch), B, T, H, g.dtype),
            None if S0 is None else dS0.reshape(B, H, Dk, Dv).to(S0.dtype))
