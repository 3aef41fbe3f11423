"""The public operator (SPEC §4): validation, then the ops `dla::segment` and `dla::readout`
that `dla.compile` registers over the kernels of `dla.ops`. It sits above both.

Everything here is traced by `torch.compile`: no branch on tensor values, no `.item()`, no
data-dependent shapes. The cache's slots are stored oldest first; the readout works in rank
order (newest first), and `reverse_live_slots` converts between the two.

Non-finite inputs stay causal. A chunked kernel multiplies a whole chunk's keys and values at
once, and `0 · NaN = NaN`: a NaN or inf in `k_t` or `v_t` (or `g_t`, `β_t`) would reach the
outputs of earlier tokens of its chunk, which the token-by-token reference keeps finite — and
right-padding with garbage would poison real tokens. So every token whose write or transition is
non-finite (a NaN or ±inf among `k_t, v_t, g_t, β_t`, or finite entries whose sum overflows: a
write that would overflow the state anyway) is replaced by one that writes nothing and keeps
the state (`k = v = 0`, `g = 0`, `β = 0`) before any kernel runs, and the outputs from the first
such token on, per sequence and head, are set to NaN afterwards, as the reference's are (its
state is non-finite from there); a final cache that took such a token is NaN in its float
fields. Outputs before it are exactly those of the clean prefix, on every path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.compile.ops import readout
from dla.ops.packing import check_cu_seqlens, from_rows, layout, to_rows
from dla.ops.state import MultiStateCache, empty_cache
from dla.ops.validation import validate


def reverse_live_slots(S: Tensor, m: Tensor) -> Tensor:
    """Slot i ↔ slot m − 1 − i for the live slots i < m, zeros elsewhere: oldest-first to rank
    order and back (an involution). S [B, H, K, ...], m [B, H]."""
    K = S.shape[2]
    index = m[..., None] - 1 - torch.arange(K, device=S.device)  # [B, H, K]
    live = index >= 0
    index = index.clamp(min=0).view(*index.shape, *([1] * (S.dim() - 3))).expand_as(S)
    return torch.where(live.view(*live.shape, *([1] * (S.dim() - 3))), torch.gather(S, 2, index), 0)


def multistate_attention(
    q, k, v, lam, *, g=None, beta=None, policy="dla", tau=0.6, score="drift", scale=None,
    chunk_size=64, initial_state=None, output_final_state=False, cu_seqlens=None, max_seqlen=None,
):
    """Multi-state linear attention over the level map of `policy` (SPEC §2, §4).

    q, k [B,T,H,Dk]; v [B,T,H,Dv]; lam [B,T,H,L] (L = K, the slot capacity); g, beta [B,T,H].
    Returns o [B,T,H,Dv], and with `output_final_state=True` also the `MultiStateCache` that
    `initial_state` accepts back.

    Packed sequences: with `cu_seqlens` (int32 `[N + 1]`, 0 first, `T` last, non-decreasing), the
    `B = 1` row holds `N` sequences back to back, each computed as its own call — from an empty
    cache, or from its row of an `initial_state` of `N` rows — and the final cache has one row per
    sequence. `max_seqlen` (an int; default `T`) bounds their lengths; the call does the work of
    `N · max_seqlen` tokens (`dla.ops.packing`). Bad offsets fail the call on the device, naming
    `cu_seqlens`, without a host synchronisation."""
    if cu_seqlens is not None:
        return _packed(q, k, v, lam, g, beta, policy, tau, score, scale, chunk_size, initial_state,
                       output_final_state, cu_seqlens, max_seqlen)
    p = validate(q, k, v, lam, g=g, beta=beta, policy=policy, tau=tau, score=score, scale=scale,
                 chunk_size=chunk_size, initial_state=initial_state)
    state = _start(initial_state, p, k)
    o, final = _attend(p, q, k, v, lam, g, beta, state, policy, score, float(tau), chunk_size,
                       fresh=initial_state is None, want_final=output_final_state)
    return (o, final) if output_final_state else o


def _attend(p, q, k, v, lam, g, beta, state: MultiStateCache, policy, score, tau, chunk_size, end=None, *,
            fresh: bool, want_final: bool):
    """`(o, final cache or None)` of one validated call; `end [B]`: rows that end early (padded
    rows of packed sequences: the final cache is the one after step `end − 1`). `fresh`: `state` is
    the empty cache (its slots zeros in either order); without `want_final` the final cache is
    neither assembled nor returned — its slot states are `[B,H,K,Dk,Dv]` float32, several copies
    of which a training step would otherwise allocate and drop."""
    k, v, g, beta, poisoned = _finite_writes(k, v, g, beta)
    length = p.length if end is None else end
    if policy == "single":
        o, final = _single(p, q, k, v, lam, g, beta, state, chunk_size, length, fresh=fresh, want_final=want_final)
    else:
        level_start, n, info, m, Z, zz, N = _segment(p, k, v, g, beta, state, policy, score, tau, chunk_size, end)
        S0 = state.S if fresh else reverse_live_slots(state.S, state.m)
        # a fresh call's step is zeros: passed as None, the readout's chunk starts are a constant
        o, S = readout(q, k, v, lam, g, beta, level_start, S0, p.scale, chunk_size, None if fresh else state.step,
                       final=want_final)
        final = None
        if want_final:
            S = reverse_live_slots(S, m)
            if not (policy == "dla" and score == "drift"):
                # N advanced in the segmentation only where a decision needed it; elsewhere it is
                # the norm of the slots' sum S^g, equal to the carried value up to rounding (SPEC §2)
                N = S.detach().sum(2).pow(2).sum((-2, -1))
            final = MultiStateCache(S=S, n=n, I=info, m=m, Z=Z, zz=zz, step=state.step + length, N=N)
    o = torch.where(poisoned[..., None], torch.nan, o)
    return o, (None if final is None else _poisoned_cache(final, poisoned[:, -1]))


def _packed(q, k, v, lam, g, beta, policy, tau, score, scale, chunk_size, initial_state, output_final_state,
            cu_seqlens, max_seqlen):
    """A packed call as padded rows (`dla.ops.packing`): sequence `n` is row `n`, followed by
    padding that writes nothing and keeps the state, which the segmentation is told to skip
    (`end`); outputs are gathered back, and an empty sequence's final cache is its initial one."""
    options = dict(g=g, beta=beta, policy=policy, tau=tau, score=score, scale=scale, chunk_size=chunk_size)
    validate(q, k, v, lam, **options, packed=True)
    length = check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], max_seqlen, q.device)
    rows = layout(cu_seqlens, q.shape[1], length)
    q, k, v, lam, g, beta = (to_rows(x, rows) for x in (q, k, v, lam, g, beta))
    p = validate(q, k, v, lam, **{**options, "g": g, "beta": beta}, initial_state=initial_state)
    state = _start(initial_state, p, k)
    # an empty sequence runs one padding token (every kernel needs one) and keeps its initial cache
    o, final = _attend(p, q, k, v, lam, g, beta, state, policy, score, float(tau), chunk_size,
                       end=rows.lengths.clamp(min=1), fresh=initial_state is None, want_final=output_final_state)
    o = from_rows(o, rows)
    if not output_final_state:
        return o
    empty = rows.lengths == 0
    kept = MultiStateCache(*(torch.where(empty.view(-1, *([1] * (new.dim() - 1))), old, new)
                             for old, new in zip(state, final)))
    return o, kept._replace(step=state.step + rows.lengths)


def level_map(k, v, *, capacity, g=None, beta=None, policy="dla", tau=0.6, score="drift", chunk_size=64,
              initial_state=None) -> Tensor:
    """The level map alone, `level_start [B,T,H,K]` (see `dla/compile/SCHEMAS.md`): where each
    level's segment starts after every step. A token `t` opened a new slot iff
    `level_start[:, t, :, 0] == t`. `drift` reads the transitions `g`, `beta` as the operator does."""
    B, T, H, _ = k.shape if isinstance(k, Tensor) and k.dim() == 4 else (0, 0, 0, 0)
    lam = k.new_zeros(()).expand(B, T, H, capacity) if isinstance(k, Tensor) else None
    p = validate(k, k, v, lam, g=g, beta=beta, policy=policy, tau=tau, score=score, chunk_size=chunk_size,
                 initial_state=initial_state)
    state = _start(initial_state, p, k)
    k, v, g, beta, _ = _finite_writes(k, v, g, beta)
    return _segment(p, k, v, g, beta, state, policy, score, float(tau), chunk_size)[0]


def _finite_writes(k, v, g, beta):
    """`(k, v, g, beta, poisoned)`: the tokens whose write or transition is non-finite made
    neutral (no write, state kept), and `poisoned [B,T,H]`, true from the first of them on (module
    doc)."""
    # one reading pass over k and v: a sum is non-finite iff an entry is (NaN, ±inf), or the
    # entries are so large that it overflows — a write that would overflow the state anyway;
    # per-element isfinite runs several passes over [B,T,H,D] in eager mode
    acc = torch.promote_types(k.dtype, torch.float32)
    write = k.sum(-1, dtype=acc) + v.sum(-1, dtype=acc)
    for x in (g, beta):
        if x is not None:
            write = write + x.to(acc)
    bad = ~torch.isfinite(write)
    k = torch.where(bad[..., None], 0, k)
    v = torch.where(bad[..., None], 0, v)
    g = None if g is None else torch.where(bad, 0, g)
    beta = None if beta is None else torch.where(bad, 0, beta)
    # the first bad position per (b, h) by a reduction: a cumsum along T, an outer dimension of
    # [B, T, H], runs far below memory speed on CUDA
    T = bad.shape[1]
    if T == 0:
        return k, v, g, beta, bad
    pos = torch.arange(T, device=bad.device)[:, None]
    first = torch.where(bad, pos, T).amin(1, keepdim=True)
    return k, v, g, beta, pos >= first


def _poisoned_cache(cache: MultiStateCache, rows: Tensor) -> MultiStateCache:
    """The cache's float fields NaN on the `(b, h)` rows that took a non-finite token."""
    def nan_where(x: Tensor) -> Tensor:
        return torch.where(rows.view(*rows.shape, *([1] * (x.dim() - 2))), torch.nan, x)

    return cache._replace(S=nan_where(cache.S), I=nan_where(cache.I), Z=nan_where(cache.Z), zz=nan_where(cache.zz),
                          N=nan_where(cache.N))


def _single(p, q, k, v, lam, g, beta, state: MultiStateCache, chunk_size, length, *, fresh: bool, want_final: bool):
    """`single` is the backbone itself (`dla::backbone`): no segmentation, every initial slot at
    rank 0 (SPEC §2), read with `λ_t[0]`. The final cache holds one slot; `I`, `Z`, `zz` stay as
    the initial cache had them, as for `fenwick`; `N` is the norm of the final state (nothing is
    decided by it here: equal to the carried value up to rounding, SPEC §2)."""
    live = torch.arange(p.levels, device=q.device) < state.m[..., None]  # [B, H, K]
    S0 = state.S[:, :, 0] if fresh else (state.S * live[..., None, None]).sum(2)
    o, S = torch.ops.dla.backbone(q, k, v, lam[..., 0], g, beta, S0, p.scale, chunk_size)
    if not want_final:
        return o, None
    slot0 = torch.arange(p.levels, device=q.device) == 0
    tokens = length if isinstance(length, int) else length.view(-1, 1, 1)
    n = torch.where(slot0, tokens + (state.n * live).sum(-1, keepdim=True), 0)
    final = MultiStateCache(S=S[:, :, None] * slot0[:, None, None].to(S.dtype), n=n, I=torch.zeros_like(state.I),
                            m=torch.ones_like(state.m), Z=state.Z, zz=state.zz, step=state.step + length,
                            N=S.detach().pow(2).sum((-2, -1)))
    return o, final


def _start(initial_state, p, like: Tensor) -> MultiStateCache:
    if initial_state is not None:
        return initial_state
    return empty_cache(p.batch, p.heads, p.levels, p.dk, p.dv, dtype=like.dtype, device=like.device)


def _segment(p, k, v, g, beta, state, policy, score, tau, chunk_size, end=None):
    """Segmentation sees the writes and transitions only (never q or λ) and carries no gradient
    (SPEC §2)."""
    g = None if g is None else g.detach()
    beta = None if beta is None else beta.detach()
    return torch.ops.dla.segment(k.detach(), v.detach(), g, beta, state.S.detach(), state.n, state.I, state.m,
                                 state.Z, state.zz, state.N, state.step, p.levels, policy, score, tau, chunk_size,
                                 end)
