r"""The persistent-object readout in torch (SPEC §3.1), transitions without `β`: the CPU kernel of
`dla::readout` and `dla::readout_backward` (SCHEMAS.md), and the float64 oracle of the Triton
kernels (`objects_triton.py`). Explicit backward, no autograd; batched over `N = B·H`.

What it computes
================
Per row, `G_t = Σ_{u≤t} g_u` over the call (`G_p = 0` for the initial slots' pseudo-positions
`p < 0`; `G ≡ 0` without `g`), every difference formed so that its exponent is ≤ 0. With the plan
of `plan.py` (chunks `[cs_c, cs_{c+1})` aligned to `step + t`, the partition `P_c` that chunk `c`
reads, objects `S̄_E` anchored at their last member `e_E`):

    construction, at each c, of the elements new in P_c:
        S̄_E = Σ_{parents j ∈ P_{c−1}} exp(G_e − G_{e_j}) S̄_j
              + Σ_{s ∈ chunk c−1, s ∈ E} exp(G_e − G_s) k_s v_sᵀ
    readout of chunk c, every t ∈ [cs_c, cs_{c+1}), with ω[t,E] = λ_t[ℓ_t(a_E)] · exp(G_t − G_{e_E}):
        o_t = scale · [ Σ_{s ∈ chunk, s ≤ t} λ_t[ℓ_t(s)] (q_t·k_s) exp(G_t − G_s) v_s
                        + Σ_{E ∈ P_c} ω[t,E] S̄_Eᵀ q_t ]
    final state, rank r of the last row: S_r = exp(G_{T−1} − G_{e_E}) S̄_E,  E = E_{NC,r}

The initial slots are the objects `0..L−1`, `S̄ = S0` (rank order), anchored at `−1`.

The backward
============
With `dÕ = scale · dO` and `D_E` the gradient of `S̄_E`:

    U[t,E] = dÕ_t S̄_Eᵀ [Dk]:   dq_t += Σ_E ω[t,E] U[t,E],   dω[t,E] = U[t,E]·q_t
    dλ_t[ℓ_t(a_E)] += dω[t,E] exp(G_t − G_{e_E}),   dG_t += Σ_E dω[t,E] ω[t,E]
    D_E += Σ_{t reading E} ω[t,E] q_t dÕ_tᵀ,   D_E += exp(G_{T−1} − G_{e_E}) dS_r (final rank r)
    dG_{T−1} += Σ_r ⟨dS_r, S_r⟩

then down the merge tree in reverse creation order (a child is created after its parents):

    D_j += exp(G_e − G_{e_j}) D_E                                (every parent j of E)
    dk_s += exp(G_e − G_s) D_E v_s,   dv_s += exp(G_e − G_s) D_Eᵀ k_s
    dG_s −= k_s · (exp(G_e − G_s) D_E v_s)

`dS0 = D` of the initial slots, and the intra-chunk part is the masked form's (`dA = dÕ vᵀ`,
`dG_t += Σ_s dA⊙A`, `dG_s −= Σ_t dA⊙A`); `dg_u = Σ_{t≥u} dG_t`. No term involves an anchor `G_e`:
in every path from a token `s` to a query `t` (or to the final state) the anchors cancel —
`ω[t,E] S̄_E = λ_t Σ_{s∈E} exp(G_t − G_s) k_s v_sᵀ` — so the gradient of `G` comes from the queries
(`dω·ω`), the tokens (`−k·dk`) and the final state alone.

Compute dtype: float64 for float64 inputs, float32 otherwise; `G` and its differences in float64.
Outputs: `o` in `q`'s dtype, `S` and `dS0` in the state dtype, gradients in their inputs' dtypes.
The object pool is sized from the plan (a host read: this is an opaque op's kernel).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.readout.chunked import level_of_by_search
from dla.ops.readout.plan import Plan, build_plan, chunk_count
from dla.ops.state import state_dtype

__all__ = ["objects_forward", "objects_backward"]


def _heads(x: Tensor, dtype) -> Tensor:
    B, T, H = x.shape[:3]
    return x.to(dtype).transpose(1, 2).reshape(B * H, T, *x.shape[3:])


def _unheads(x: Tensor, B: int, H: int, dtype) -> Tensor:
    return x.reshape(B, H, *x.shape[1:]).transpose(1, 2).to(dtype).contiguous()


class _Call(NamedTuple):
    q: Tensor  # [N, T, Dk] compute dtype
    k: Tensor
    v: Tensor  # [N, T, Dv]
    lam: Tensor  # [N, T, L]
    G: Tensor  # [N, T + 1] float64: G_{−1} = 0 at index 0, G_t at t + 1
    starts: Tensor  # [N, T, L] int64
    plan: Plan
    C: int


def _prepare(q, k, v, lam, g, level_start, step, chunk_size: int) -> tuple[_Call, torch.dtype]:
    cd = state_dtype(q.dtype)
    B, T, H, _ = q.shape
    N = B * H
    G = torch.zeros(N, T + 1, dtype=torch.float64, device=q.device)
    if g is not None:
        G[:, 1:] = _heads(g, torch.float64).cumsum(1)
    plan = build_plan(level_start, step, chunk_size)
    call = _Call(_heads(q, cd), _heads(k, cd), _heads(v, cd), _heads(lam, cd), G,
                 _heads(level_start, torch.int64), plan, int(chunk_size))
    return call, cd


def _G_at(G: Tensor, positions: Tensor) -> Tensor:
    """G_p for positions p ≥ −1 (pseudo-positions p < −1 also read G_{−1} = 0): [N, ...]."""
    flat = (positions.reshape(positions.shape[0], -1) + 1).clamp(min=0, max=G.shape[1] - 1)
    return torch.gather(G, 1, flat).reshape(positions.shape)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x [N, T, ...] gathered at index [N, C] → [N, C, ...]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index]


def _tokens(call: _Call, c: int) -> tuple[Tensor, Tensor]:
    """Positions `[N, C]` of chunk c's tokens (clamped) and which are real."""
    cs = call.plan.starts
    pos = cs[:, c, None] + torch.arange(call.C, device=cs.device)
    return pos.clamp(max=call.q.shape[1] - 1), pos < cs[:, c + 1, None]


def _previous(call: _Call, c: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`(ids, a, e, valid)` of P_{c−1}, `[N, L]` each (the initial slots for c = 0)."""
    p = call.plan
    if c == 0:
        N, L = p.read.shape[0], p.read.shape[-1]
        init = -1 - torch.arange(L, device=p.read.device)
        ids = torch.arange(L, device=p.read.device).expand(N, L)
        return ids, init.expand(N, L), init.expand(N, L), torch.ones(N, L, dtype=torch.bool, device=ids.device)
    return p.read[:, c - 1].long(), p.first[:, c - 1], p.last[:, c - 1], p.read[:, c - 1] >= 0


class _Build(NamedTuple):
    """How the objects new at chunk c are made, compacted to the `M` most any row creates there:
    `value = Wp · S̄_parents + Σ_s Wt k_s v_sᵀ`."""

    ids: Tensor  # [N, M] ids created at c (0 where `new` is false)
    new: Tensor  # [N, M]
    parent_ids: Tensor  # [N, L] ids of P_{c−1}
    Wp: Tensor  # [N, M, L] exp(G_e − G_{e_j}) on parent pairs
    pos: Tensor  # [N, C] chunk c − 1's positions
    Wt: Tensor  # [N, M, C] exp(G_e − G_s) for s ∈ E, s in chunk c − 1
    kc: Tensor  # [N, C, Dk] chunk c − 1's keys
    vc: Tensor  # [N, C, Dv]


def _build_terms(call: _Call, c: int, cd) -> _Build | None:
    """None when no row creates an object at c (a host read: this is the CPU kernel)."""
    p = call.plan
    M = int(p.new_count[:, c].max())
    if M == 0:
        return None
    ids = p.new_ids[:, c, :M].long()
    new = ids >= 0
    ids = ids.clamp(min=0)
    a, e = torch.gather(p.obj_first, 1, ids).long(), torch.gather(p.obj_last, 1, ids).long()
    lo, hi = torch.gather(p.par_lo, 1, ids).long(), torch.gather(p.par_hi, 1, ids).long()
    pid, pa, pe, pvalid = _previous(call, c)
    ranks = torch.arange(pid.shape[1], device=ids.device)
    inside = (lo[..., None] <= ranks) & (ranks <= hi[..., None]) & pvalid[:, None, :] & new[..., None]
    Ge = _G_at(call.G, e)
    Wp = torch.where(inside, torch.exp((Ge[..., :, None] - _G_at(call.G, pe)[:, None, :]).clamp(max=0)), 0.0)
    if c == 0:
        pos = torch.zeros(p.read.shape[0], call.C, dtype=torch.int64, device=a.device)
        Wt = torch.zeros(*new.shape, call.C, dtype=torch.float64, device=a.device)
    else:
        pos, real = _tokens(call, c - 1)
        tlo, thi = torch.gather(p.tok_lo, 1, ids).long(), torch.gather(p.tok_hi, 1, ids).long()
        member = real[:, None, :] & (tlo[..., None] <= pos[:, None, :]) & (pos[:, None, :] < thi[..., None])
        member &= new[..., None]
        Gs = _G_at(call.G, pos)
        Wt = torch.where(member, torch.exp((Ge[..., None] - Gs[:, None, :]).clamp(max=0)), 0.0)
    return _Build(ids, new, pid, Wp.to(cd), pos, Wt.to(cd), _rows(call.k, pos), _rows(call.v, pos))


def _gather_objects(pool: Tensor, ids: Tensor) -> Tensor:
    """pool [N, P, Dk, Dv] at ids [N, L] (any value where an id is masked out later)."""
    return pool[torch.arange(pool.shape[0], device=pool.device)[:, None], ids.clamp(min=0)]


def _flat(x: Tensor) -> Tensor:
    """[N, R, Dk, Dv] → [N, R, Dk·Dv]."""
    return x.reshape(*x.shape[:2], -1)


def _build(call: _Call, pool: Tensor, c: int, cd) -> None:
    b = _build_terms(call, c, cd)
    if b is None:
        return
    N, M = b.ids.shape
    Dk, Dv = pool.shape[-2:]
    value = (b.Wp @ _flat(_gather_objects(pool, b.parent_ids))).view(N, M, Dk, Dv)
    if c > 0:  # Σ_s Wt[m, s] k_s v_sᵀ for every m: one GEMM of depth C
        wk = (b.Wt[..., None] * b.kc[:, None]).transpose(2, 3).reshape(N, M * Dk, -1)
        value = value + (wk @ b.vc).view(N, M, Dk, Dv)
    n = torch.arange(N, device=pool.device)[:, None].expand_as(b.ids)
    pool[n[b.new], b.ids[b.new]] = value[b.new]


class _Read(NamedTuple):
    """Chunk c's readout terms."""

    pos: Tensor  # [N, C] query positions (clamped)
    real: Tensor  # [N, C]
    A: Tensor  # [N, C, C] (q_t·k_s) exp(G_t − G_s), s ≤ t in the chunk
    Gam: Tensor  # [N, C, C] exp(G_t − G_s) on those pairs
    Lam: Tensor  # [N, C, C] λ_t[ℓ_t(s)]
    lev_tok: Tensor  # [N, C, C] ℓ_t(s), −1 where not a pair
    ids: Tensor  # [N, L] objects of P_c
    omega: Tensor  # [N, C, L] ω[t, E]
    decay: Tensor  # [N, C, L] exp(G_t − G_{e_E})
    lev_obj: Tensor  # [N, C, L] ℓ_t(a_E), −1 where no weight


def _read_terms(call: _Call, c: int, cd) -> _Read:
    p = call.plan
    pos, real = _tokens(call, c)
    N, C = pos.shape
    starts = _rows(call.starts, pos)  # [N, C, L]
    lam = _rows(call.lam, pos)
    q, k = _rows(call.q, pos), _rows(call.k, pos)
    Gt = _G_at(call.G, pos)
    pair = real[:, :, None] & real[:, None, :] & torch.ones(C, C, dtype=torch.bool, device=pos.device).tril()
    Gam = torch.where(pair, torch.exp((Gt[:, :, None] - Gt[:, None, :]).clamp(max=0)), 0.0).to(cd)
    lev_tok = torch.where(pair, level_of_by_search(starts, pos[:, None, :].expand(N, C, C)), -1)
    Lam = torch.where(lev_tok >= 0, torch.gather(lam, -1, lev_tok.clamp(min=0)), 0.0)
    A = (q @ k.transpose(1, 2)) * Gam
    ids = p.read[:, c].long()
    valid = (ids >= 0)[:, None, :] & real[:, :, None]
    lev_obj = torch.where(valid, level_of_by_search(starts, p.first[:, c, None, :].expand(N, C, -1)), -1)
    Ge = _G_at(call.G, p.last[:, c])
    decay = torch.where(lev_obj >= 0, torch.exp((Gt[:, :, None] - Ge[:, None, :]).clamp(max=0)), 0.0).to(cd)
    omega = torch.where(lev_obj >= 0, torch.gather(lam, -1, lev_obj.clamp(min=0)), 0.0) * decay
    return _Read(pos, real, A, Gam, Lam, lev_tok, ids, omega, decay, lev_obj)


def _scatter_rows(out: Tensor, r: _Read, rows: Tensor) -> None:
    """out[n, pos] = rows for the real positions of the chunk."""
    n = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(r.pos)
    out[n[r.real], r.pos[r.real]] = rows[r.real]


def _add_rows(out: Tensor, r: _Read, rows: Tensor) -> None:
    n = torch.arange(out.shape[0], device=out.device)[:, None].expand_as(r.pos)
    out.index_put_((n[r.real], r.pos[r.real]), rows[r.real], accumulate=True)


def _final(call: _Call, pool: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(S [N, L, Dk, Dv], ids, decay [N, L])` of the final state, rank order."""
    p = call.plan
    ids = p.read[:, -1].long()
    G_last = call.G[:, -1:]
    decay = torch.where(ids >= 0, torch.exp((G_last - _G_at(call.G, p.last[:, -1])).clamp(max=0)), 0.0).to(pool.dtype)
    return decay[..., None, None] * _gather_objects(pool, ids), ids, decay


def _construct(call: _Call, S0: Tensor, cd, reader=None) -> Tensor:
    """The object pool [N, P, Dk, Dv]; `reader(c, pool)` runs after each chunk's construction."""
    p = call.plan
    N, L = p.read.shape[0], p.read.shape[-1]
    P = L + int(p.created.max())
    Dk, Dv = call.k.shape[-1], call.v.shape[-1]
    pool = torch.zeros(N, P, Dk, Dv, dtype=cd, device=call.q.device)
    pool[:, :L] = S0.to(cd).reshape(N, L, Dk, Dv)
    for c in range(chunk_count(call.q.shape[1], call.C) + 1):
        _build(call, pool, c, cd)
        if reader is not None and c < p.read.shape[1] - 1:
            reader(c, pool)
    return pool


@torch.no_grad()
def objects_forward(q, k, v, lam, g, level_start, S0, scale: float, chunk_size: int, step) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,K,Dk,Dv] in the state dtype)`; see the module doc.
    `S0 [B,H,K,Dk,Dv]` in rank order, `step [B]` int64 (tokens before the call)."""
    B, T, H, _ = q.shape
    Dv = v.shape[-1]
    cd = state_dtype(q.dtype)
    if T == 0:
        return q.new_empty(B, 0, H, Dv), S0.to(cd).clone()
    call, cd = _prepare(q, k, v, lam, g, level_start, step, chunk_size)
    o = torch.zeros(B * H, T, Dv, dtype=cd, device=q.device)

    def read(c: int, pool: Tensor) -> None:
        r = _read_terms(call, c, cd)
        vc = _rows(call.v, r.pos)
        qc = _rows(call.q, r.pos)
        objects = _gather_objects(pool, r.ids)  # [N, L, Dk, Dv]
        X = (r.omega[..., None] * qc[:, :, None, :]).flatten(2)  # X = W ⊗ q [N, C, L·Dk]
        rows = (r.A * r.Lam) @ vc + X @ objects.flatten(1, 2)
        _scatter_rows(o, r, scale * rows)

    pool = _construct(call, S0, cd, read)
    S = _final(call, pool)[0]
    return _unheads(o, B, H, q.dtype), S.reshape(B, H, *S.shape[1:]).contiguous()


@torch.no_grad()
def objects_backward(do, dS, q, k, v, lam, g, level_start, S0, scale: float, chunk_size: int, step):
    """`(dq, dk, dv, dlam, dg, dS0)`: gradients shaped and typed like the inputs, `dg` None
    without `g`, `dS0` in the state dtype. `do` or `dS` may be None (zero)."""
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    cd = state_dtype(q.dtype)
    if T == 0:
        dS0 = torch.zeros(S0.shape, dtype=cd, device=q.device) if dS is None else dS.to(cd).clone()
        dg = None if g is None else g.new_zeros(g.shape)
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), lam.new_zeros(lam.shape), dg, dS0
    call, cd = _prepare(q, k, v, lam, g, level_start, step, chunk_size)
    p = call.plan
    N, NC = B * H, p.read.shape[1] - 1
    dO = torch.zeros(N, T, Dv, dtype=cd, device=q.device) if do is None else _heads(do, cd) * scale
    pool = _construct(call, S0, cd)
    D = torch.zeros_like(pool)
    dq, dk = torch.zeros(N, T, Dk, dtype=cd, device=q.device), torch.zeros(N, T, Dk, dtype=cd, device=q.device)
    dv = torch.zeros(N, T, Dv, dtype=cd, device=q.device)
    dlam = torch.zeros(N, T, L, dtype=cd, device=q.device)
    dG = torch.zeros(N, T, dtype=torch.float64, device=q.device)
    rows_n = torch.arange(N, device=q.device)[:, None]

    for c in range(NC):
        r = _read_terms(call, c, cd)
        qc, kc, vc = _rows(call.q, r.pos), _rows(call.k, r.pos), _rows(call.v, r.pos)
        dOc = torch.where(r.real[..., None], _rows(dO, r.pos), 0.0)
        # intra-chunk: o += (A ⊙ Λ) V
        AL = r.A * r.Lam
        dAL = dOc @ vc.transpose(1, 2)
        dA = dAL * r.Lam
        dLam = dAL * r.A
        dlam_c = torch.zeros(N, call.C, L, dtype=cd, device=q.device)
        dlam_c.scatter_add_(-1, r.lev_tok.clamp(min=0), torch.where(r.lev_tok >= 0, dLam, 0.0))
        dAG = dA * r.Gam
        dq_c = dAG @ kc
        dk_c = dAG.transpose(1, 2) @ qc
        dv_c = AL.transpose(1, 2) @ dOc
        flow = (dA * r.A).double()
        dG_c = flow.sum(2) - flow.sum(1)
        # objects: o += Σ_E ω S̄_Eᵀ q
        objects = _gather_objects(pool, r.ids)
        L_, Dk_ = objects.shape[1:3]
        U = (dOc @ objects.flatten(1, 2).transpose(1, 2)).view(N, -1, L_, Dk_)  # [N, C, L, Dk]
        dq_c = dq_c + (r.omega[..., None] * U).sum(2)
        domega = (U * qc[:, :, None, :]).sum(-1)
        dlam_c.scatter_add_(-1, r.lev_obj.clamp(min=0), torch.where(r.lev_obj >= 0, domega * r.decay, 0.0))
        dG_c = dG_c + (domega * r.omega).double().sum(-1)
        valid = r.ids >= 0
        X = (r.omega[..., None] * qc[:, :, None, :]).flatten(2)  # [N, C, L·Dk]
        Dc = (X.transpose(1, 2) @ dOc).view_as(objects)
        D.index_put_((rows_n.expand_as(r.ids)[valid], r.ids[valid]), Dc[valid], accumulate=True)
        for out, rows in ((dq, dq_c), (dk, dk_c), (dv, dv_c), (dlam, dlam_c)):
            _add_rows(out, r, rows)
        _add_rows(dG, r, dG_c)

    # the final state
    S, ids, decay = _final(call, pool)
    if dS is not None:
        dSc = dS.to(cd).reshape(N, L, Dk, Dv)
        valid = ids >= 0
        D.index_put_((rows_n.expand_as(ids)[valid], ids[valid]), (decay[..., None, None] * dSc)[valid], accumulate=True)
        dG[:, -1] += (dSc * S).sum((1, 2, 3)).double()

    # down the merge tree, newest chunk first
    for c in range(NC, -1, -1):
        b = _build_terms(call, c, cd)
        if b is None:
            continue
        M = b.ids.shape[1]
        Dn = torch.where(b.new[..., None, None], _gather_objects(D, b.ids), 0.0)  # [N, M, Dk, Dv]
        if c > 0:
            Dvs = (b.vc @ Dn.permute(0, 3, 1, 2).reshape(N, Dv, M * Dk)).view(N, -1, M, Dk)
            dk_s = (b.Wt.transpose(1, 2)[..., None] * Dvs).sum(2)  # Σ_E Wt[E, s] D_E v_s
            kD = (b.kc @ Dn.transpose(1, 2).reshape(N, Dk, M * Dv)).view(N, -1, M, Dv)
            dv_s = (b.Wt.transpose(1, 2)[..., None] * kD).sum(2)  # Σ_E Wt[E, s] D_Eᵀ k_s
            real = (b.Wt != 0).any(1)  # tokens that some new object holds
            n = rows_n.expand_as(b.pos)
            dk.index_put_((n[real], b.pos[real]), dk_s[real], accumulate=True)
            dv.index_put_((n[real], b.pos[real]), dv_s[real], accumulate=True)
            dG.index_put_((n[real], b.pos[real]), -(b.kc * dk_s).sum(-1).double()[real], accumulate=True)
        push = (b.Wp.transpose(1, 2) @ _flat(Dn)).view(N, -1, Dk, Dv)  # to the parents in P_{c−1}
        has = (b.Wp != 0).any(1)
        D.index_put_((rows_n.expand_as(b.parent_ids)[has], b.parent_ids[has]), push[has], accumulate=True)

    dS0 = D[:, :L].reshape(B, H, L, Dk, Dv).to(cd)
    dg = None
    if g is not None:
        dg = _unheads(dG.flip(1).cumsum(1).flip(1), B, H, g.dtype)
    return (_unheads(dq, B, H, q.dtype), _unheads(dk, B, H, k.dtype), _unheads(dv, B, H, v.dtype),
            _unheads(dlam, B, H, lam.dtype), dg, dS0.contiguous())
