"""CPU kernel of `dla::segment` (SCHEMAS.md): the level map and the final segmentation state.

* `dla` (SPEC §2, §3): chunked boundary detection. Per chunk of `C` tokens, batched over
  `B·H`: the Gram `(K_c K_cᵀ) ⊙ (V_c V_cᵀ)`, the base term `rowsum((K_c Z) ⊙ V_c)` against the
  open-block content `Z` at the chunk start, `ss_t = ‖k_t‖²‖v_t‖²`, and suffix sums of the
  strictly lower Gram rows. The sequential part loops over the chunk's tokens in Python,
  vectorised over `B·H`: `c_t = [block opened before the chunk]·base_t + Σ_{s = max(block
  start, chunk start)}^{t−1} Gram[t, s]` is one lookup in those sums (no `Dk×Dv` work per
  token), then the score. A step where no row opens a block only accumulates the open block's
  `I` and `zz`; on an *event* (some row opens) the open slot is written back, full rows run the
  capacity merge scan (masks over the `K` slots), and the slot starts and live counts are
  snapshotted; each step's level-map row is gathered from its snapshot at the end. `Z` is
  brought to the chunk end by one masked GEMM (it restarts at a boundary); `zz` is carried by
  its update rule. Decisions are computed in the state dtype (float32 for float32 inputs,
  float64 for float64), `ε = 1e-12`, radicands clamped at 0.
* `fenwick` and `single`: closed form, vectorised, no token loop.

The kernel reads tensor values freely (it is opaque to the compiler), returns fresh tensors
and records no autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.levels import EMPTY
from dla.ops.state import state_dtype
from dla.ops.validation import check_fenwick_levels

EPS = 1e-12  # SPEC §2: floor of every cosine denominator

__all__ = ["segment"]


def segment(
    k: Tensor, v: Tensor, n0: Tensor, I0: Tensor, m0: Tensor, Z0: Tensor, zz0: Tensor, step0: Tensor,
    levels: int, policy: str, score: str, tau: float, chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`(level_start [B,T,H,L] int32, n [B,H,K] int64, I [B,H,K], m [B,H] int64, Z [B,H,Dk,Dv],
    zz [B,H])`, floats in the state dtype; see SCHEMAS.md for the encoding."""
    if policy not in ("dla", "fenwick", "single"):
        raise ValueError(f"policy must be one of ['dla', 'fenwick', 'single'], got {policy!r}")
    if score not in ("token", "state"):
        raise ValueError(f"score must be one of ['token', 'state'], got {score!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if policy == "dla" and levels < 2:
        raise ValueError(f"policy 'dla' needs levels (capacity K) >= 2, got {levels}")
    with torch.no_grad():
        if policy == "dla":
            return _segment_dla(k, v, n0, I0, m0, Z0, zz0, levels, score, float(tau), int(chunk_size))
        T = k.shape[1]
        if policy == "fenwick":
            check_fenwick_levels(levels, step0, T)
            return _segment_fenwick(k, v, n0, m0, Z0, zz0, step0, levels)
        return _segment_single(k, v, n0, m0, Z0, zz0, levels)


# --------------------------------------------------------------------------------------------
# dla
# --------------------------------------------------------------------------------------------


def _segment_dla(k, v, n0, I0, m0, Z0, zz0, K: int, score: str, tau: float, C: int):
    B, T, H, Dk = k.shape
    Dv = v.shape[-1]
    N, dev = B * H, k.device
    dt = state_dtype(k.dtype)
    kh = k.detach().to(dt).permute(0, 2, 1, 3).reshape(N, T, Dk)
    vh = v.detach().to(dt).permute(0, 2, 1, 3).reshape(N, T, Dv)

    # Per row (b, h), slots oldest first. n, I and starts are exact for the closed slots; the
    # open slot m − 1 is tracked by nbase (its count before step t is t + nbase) and cur_I,
    # and written back ("flushed") only at events (steps where some row opens a block) and at
    # the end.
    slot = torch.arange(K, device=dev)
    m = m0.reshape(N).to(torch.int64).clone()
    live = slot < m[:, None]
    n = torch.where(live, n0.reshape(N, K).to(torch.int64), 0)
    I = torch.where(live, I0.reshape(N, K).to(dt), 0.0)
    starts = torch.where(live, slot - m[:, None], EMPTY)  # first member; initial slot i at i − m0
    Z = Z0.reshape(N, Dk, Dv).to(dt).clone()
    zz = zz0.reshape(N).to(dt).clone()
    top = (m - 1).clamp(min=0)[:, None]
    has_open = m > 0
    # Start of the open block: the initial open block (Z0) sits before every chunk (−1);
    # rows with m0 = 0 get theirs from their first token.
    bstart = torch.full((N,), -1, dtype=torch.int64, device=dev)
    nbase = torch.where(has_open, n.gather(1, top).squeeze(1), 0)
    cur_I = torch.where(has_open, I.gather(1, top).squeeze(1), 0.0)
    two = torch.full((N,), 2.0, dtype=dt, device=dev)
    rows = torch.arange(N, device=dev)
    token_score = score == "token"

    # the level map: (starts, m) snapshots at events, and each step's snapshot index
    snaps_starts, snaps_m, snap_of = [starts], [m], []

    def flush(t: int, n, I):
        at_open = slot == (m - 1)[:, None]
        n = torch.where(at_open, (nbase + t)[:, None], n)
        I = torch.where(at_open, cur_I[:, None], I)
        return n, I

    for c0 in range(0, T, C):
        c1 = min(c0 + C, T)
        Cc = c1 - c0
        Kc, Vc = kh[:, c0:c1], vh[:, c0:c1]
        base = ((Kc @ Z) * Vc).sum(-1)  # [N, Cc]: k_tᵀ Z v_t against the block content at c0
        gram = torch.tril((Kc @ Kc.mT) * (Vc @ Vc.mT), diagonal=-1)  # [N, Cc, Cc], s < t only
        # suf[:, t, 1 + j] = Σ_{s=j}^{t−1} gram[t, s] (summed from t − 1 down: no cancellation);
        # suf[:, t, 0] adds the base term, for a block opened before the chunk.
        suf = gram.flip(-1).cumsum(-1).flip(-1)
        suf = torch.cat([(base + suf[..., 0])[..., None], suf], dim=-1).reshape(-1)  # flat [N·Cc·(Cc+1)]
        ss_c = ((Kc * Kc).sum(-1) * (Vc * Vc).sum(-1)).T.contiguous()  # [Cc, N]
        # flat index of suf[:, j, col] = row_base + col + j·(Cc + 1), col = 1 + block start − c0 or 0
        row_offset = rows * (Cc * (Cc + 1))
        row_base = row_offset + (bstart - (c0 - 1)).clamp(min=0)
        for t in range(c0, c1):
            j = t - c0
            c = suf.take(row_base + j * (Cc + 1))
            ss = ss_c[j]
            if token_score:
                denom = (ss * zz).clamp_(min=0).sqrt_().clamp_(min=EPS)
                info = torch.addcdiv(two, c, denom, value=-2).clamp_(min=0).sqrt_()
            else:
                info = _state_information(c, ss, zz)
            opens = info >= tau
            if t == 0:
                first = m == 0  # the first token of a sequence opens the first slot, unscored
                opens = opens | first
                info = info.masked_fill(first, 0.0)
            if not bool(opens.any()):  # every row absorbs t into its open block
                cur_I.add_(info)
                zz.add_(c, alpha=2).add_(ss)
                snap_of.append(len(snaps_m) - 1)
                continue
            n, I = flush(t, n, I)
            full = opens & (m == K)
            if bool(full.any()):
                n, I, starts = _capacity_merge(n, I, starts, full, slot)
                m = m - full.long()
            m = m + opens
            starts = starts.masked_fill((slot == (m - 1)[:, None]) & opens[:, None], t)
            cur_I = torch.where(opens, info, cur_I + info)
            zz = torch.where(opens, ss, torch.add(zz, c, alpha=2).add_(ss))
            bstart = bstart.masked_fill(opens, t)
            nbase = nbase.masked_fill(opens, -t)
            row_base = torch.where(opens, row_offset + (j + 1), row_base)
            snaps_starts.append(starts)
            snaps_m.append(m)
            snap_of.append(len(snaps_m) - 1)
        # Z at the chunk end: restart where a block opened inside the chunk, then add the open
        # block's tokens of this chunk (one masked GEMM).
        in_block = (torch.arange(c0, c1, device=dev)[None, :] >= bstart[:, None]).to(dt)  # [N, Cc]
        Z = torch.where((bstart >= c0)[:, None, None], 0.0, Z) + (Kc * in_block[..., None]).mT @ Vc
    n, I = flush(T, n, I)

    # rank r is the oldest-first slot m − 1 − r
    which = torch.tensor(snap_of, dtype=torch.int64, device=dev)
    start_rows = torch.stack(snaps_starts)[which]  # [T, N, K]
    m_rows = torch.stack(snaps_m)[which]  # [T, N]
    src = m_rows[..., None] - 1 - slot
    level_start = torch.where(src >= 0, start_rows.gather(-1, src.clamp(min=0)), EMPTY)
    level_start = level_start.to(torch.int32).reshape(T, B, H, K).permute(1, 0, 2, 3).contiguous()
    return (level_start, n.reshape(B, H, K), I.reshape(B, H, K), m.reshape(B, H),
            Z.reshape(B, H, Dk, Dv).contiguous(), zz.reshape(B, H))


def _state_information(c: Tensor, ss: Tensor, zz: Tensor) -> Tensor:
    """`I = √max(0, 2 − 2 cos)` for `score="state"`, `cos = (zz + c) / max(√(zz·(zz + 2c + ss)), ε)`.

    Where `cos > 0` and the denominator clears `ε`, `1 − cos` is evaluated in the algebraically
    identical form `(zz·ss − c²) / (D·(D + zz + c))` with `D = √(zz·(zz + 2c + ss))`: the `zz²`
    terms cancel exactly instead of numerically, so a small token against a large block keeps
    its relative accuracy in float32 (the literal form loses a factor `zz / ss`)."""
    num = zz + c
    D = (zz * (zz + 2 * c + ss)).clamp(min=0).sqrt()
    direct = 2 - 2 * num / D.clamp(min=EPS)
    stable = 2 * (zz * ss - c * c).clamp(min=0) / (D * (D + num))
    use_stable = (D >= EPS) & (num > 0)
    return torch.where(use_stable, stable, direct).clamp(min=0).sqrt()


def _capacity_merge(n, I, starts, full, slot):
    """On rows `full` (all K slots live) merge the adjacent pair with minimal
    (I_i + I_{i+1}) / (n_i + n_{i+1}) (ties → smallest i): slot i takes the sums and keeps its
    start, later slots move down by one. Slot K − 1 is left stale: the append that follows
    every capacity merge overwrites its start, and the next flush its n and I."""
    K = slot.shape[0]
    dens = (I[:, :-1] + I[:, 1:]) / (n[:, :-1] + n[:, 1:]).to(I.dtype)  # [N, K − 1]
    i = dens.argmin(-1, keepdim=True)  # first minimum
    shift = (slot >= i) & full[:, None]  # slots i.. take their right neighbour
    at = shift & (slot <= i)  # slot i adds its own
    src = (slot + shift).clamp_(max=K - 1)
    n = n.gather(1, src) + n * at
    I = I.gather(1, src) + I * at
    starts = torch.where(at, starts, starts.gather(1, src))
    return n, I, starts


# --------------------------------------------------------------------------------------------
# fenwick and single: closed form
# --------------------------------------------------------------------------------------------


def _bit_length(x: Tensor) -> Tensor:
    """bitlen of non-negative int64 values below 2**53 (exact through float64's exponent)."""
    return torch.frexp(x.to(torch.float64)).exponent.to(torch.int64)


def _untouched_dla_fields(I_like: Tensor, Z0: Tensor, zz0: Tensor, dt):
    """I, Z, zz for `fenwick` and `single`, as the references leave them: I zero, Z and zz
    those of the initial state."""
    return torch.zeros(I_like.shape, dtype=dt, device=I_like.device), Z0.to(dt).clone(), zz0.to(dt).clone()


def _segment_fenwick(k, v, n0, m0, Z0, zz0, step0, L: int):
    """Level ℓ ≥ 1 at absolute position p holds [(p>>ℓ)<<ℓ, ((p>>ℓ)<<ℓ) + 2^(ℓ−1)) iff bit ℓ−1 of p
    is set; level 0 holds p. An initial cache (slot i = level K−1−i at time step0 − 1, at
    pseudo-position −1 − level) is folded in: a level reaching back before step0 starts at the
    oldest non-empty initial bucket it contains."""
    B, T, H, _ = k.shape
    dev, dt, K = k.device, state_dtype(k.dtype), L
    step = step0.to(torch.int64).to(dev)  # [B]
    t = torch.arange(T, device=dev)
    lv = torch.arange(L, device=dev)
    p = step[:, None] + t  # [B, T] absolute positions
    lo = (p[..., None] >> lv) << lv  # [B, T, L] start of the aligned block of size 2^ℓ
    half = (1 << (lv - 1).clamp(min=0))  # 2^(ℓ−1)
    bit = ((p[..., None] >> (lv - 1).clamp(min=0)) & 1) == 1
    first_tok = torch.maximum(lo, step[:, None, None])  # first of this call's tokens in the level
    tok_ok = bit & (first_tok < lo + half) & (lv >= 1)
    tok_start = torch.where(tok_ok, first_tok - step[:, None, None], EMPTY)
    tok_start[..., 0] = t  # level 0 = {p}
    count = torch.where(tok_ok, lo + half - first_tok, 0)  # tokens of this call in each level
    count[..., 0] = 1

    # initial buckets: slot i < m0 with n0 > 0 holds level ℓ = K − 1 − i at time P = step0 − 1
    slot = torch.arange(K, device=dev)
    ell = K - 1 - slot  # [K]
    P = (step - 1).clamp(min=0)  # [B] (unused where no slot is live)
    rep = (P[:, None] >> ell) << ell  # [B, K] a member of bucket ℓ
    init_level = _bit_length(p[..., None] ^ rep[:, None, :])  # [B, T, K]
    valid = (slot < m0[..., None]) & (n0 > 0)  # [B, H, K]
    idx = torch.where(valid[:, :, None, :], init_level[:, None], L)  # [B, H, T, K]; L = nowhere
    init_start = torch.full((B, H, T, L + 1), EMPTY, dtype=torch.int64, device=dev)
    pseudo = (-1 - ell).expand(B, H, T, K)
    init_start.scatter_reduce_(-1, idx, pseudo, reduce="amin")
    init_start = init_start[..., :L]
    level_start = torch.where(init_start != EMPTY, init_start, tok_start[:, None])  # [B, H, T, L]
    level_start = level_start.to(torch.int32).permute(0, 2, 1, 3).contiguous()

    # final counts: slot i holds level K − 1 − i
    final = count[:, -1][:, None].expand(B, H, L).clone()  # [B, H, L] by level
    carried = torch.zeros(B, H, L + 1, dtype=torch.int64, device=dev)
    carried.scatter_add_(-1, idx[:, :, -1], torch.where(valid, n0.to(torch.int64), 0))
    n = (final + carried[..., :L]).flip(-1).contiguous()
    m = torch.full((B, H), K, dtype=torch.int64, device=dev)
    I, Z, zz = _untouched_dla_fields(n, Z0, zz0, dt)
    return level_start, n, I, m, Z, zz


def _segment_single(k, v, n0, m0, Z0, zz0, L: int):
    """Everything at rank 0: from the oldest non-empty initial slot (position i − m0) or token 0."""
    B, T, H, _ = k.shape
    dev, dt, K = k.device, state_dtype(k.dtype), L
    slot = torch.arange(K, device=dev)
    valid = (slot < m0[..., None]) & (n0 > 0)  # [B, H, K]
    oldest = torch.where(valid, slot - m0[..., None], 0).amin(-1)  # [B, H], 0 when none
    level_start = torch.full((B, T, H, L), EMPTY, dtype=torch.int32, device=dev)
    level_start[..., 0] = oldest[:, None, :].to(torch.int32)
    n = torch.zeros(B, H, K, dtype=torch.int64, device=dev)
    n[..., 0] = T + torch.where(valid, n0.to(torch.int64), 0).sum(-1)
    m = torch.ones(B, H, dtype=torch.int64, device=dev)
    I, Z, zz = _untouched_dla_fields(n, Z0, zz0, dt)
    return level_start, n, I, m, Z, zz
