"""CUDA kernel of `dla::segment` (SCHEMAS.md) in Triton: the level map and the final
segmentation state, same signature and outputs as the CPU kernel `dla.ops.segment.cpu.segment_cpu`.

`fenwick` and `single` are closed forms in plain torch (no token loop). `dla` under `drift`
takes its boundaries from the detection stage (`detect.py`, parallel over the sequence; its CUDA
products in `detect_triton.py`), then steps 2 and 3 below. `dla` under `token` and `state`
follows SPEC §2 "Structure worth using": boundaries depend only on the open block, so
segmentation splits into

1. **Boundary walk** (`_walk_kernel`). Per chunk of `C` tokens: the Gram
   `(K_c K_cᵀ) ⊙ (V_c V_cᵀ)`, `ss_t = ‖k_t‖²‖v_t‖²` and the base term `rowsum((K_c Z) ⊙ V_c)`
   against the open-block content `Z` at the chunk start (carried by the program). From a
   known block start `s0` every `c_t` of the chunk is a masked Gram row sum and every `zz_t` an
   exclusive prefix sum of `2c + ss`, so the walk *jumps* from boundary to boundary: one
   vectorised pass per boundary finds the first token with `I_t ≥ τ`. Runs of boundaries
   (every token its own block, as on Gaussian inputs) take one step: `I_t` against the block
   `{t − 1}` is precomputed for the whole chunk from the Gram's subdiagonal, and a boundary
   extends while it stays `≥ τ`. `Z` is brought to the chunk end by one masked `tl.dot` (it
   restarts at the chunk's last boundary); `zz` follows its update rule. Outputs per token:
   `I_t` and a boundary flag.

   Parallel over time by speculation: the sequence is cut into *pieces* of whole chunks; piece
   0 starts from the real initial state, piece `p > 0` from a boundary forced at its first
   token, so all `B·H·P` programs run at once. `_fixup_kernel` (one program per `(b, h)`,
   sequential over pieces) then replays each piece from its true incoming block until the true
   walk reaches a boundary that the speculative walk also has: from a common boundary on, the
   two walks see the same open block and compute the same numbers, so the rest of the piece
   (its flags, `I_t`, end `Z` and `zz`) is already right. On piecewise-stationary inputs that
   happens at the first regime change, so the sequential part is about one block per piece;
   a piece that never meets a common boundary is replayed whole (the worst case is the
   sequential walk).

2. **Merge scan** (`_merge_kernel`, one program per `(b, h)`, one warp): sequential over
   boundary events only. The events are compacted first (torch, no host sync): per event its
   token, `I_t`, and the count and float64 `I` sum of the tokens the block it closes absorbed.
   Per event: the absorbed tokens join the open slot; with a full cache, the `O(K)` argmin of
   `(I_i + I_{i+1}) / (n_i + n_{i+1})` (ties → smallest `i`) and the shift of the slot vectors
   (`n`, `I`, start positions, oldest first, in registers); then the append. The slot starts
   after every event go to a configuration row.

3. **Level map** (`_fill_kernel`, parallel over tokens): row `t` is the configuration after
   the events up to `t`, read in rank order `r = m − 1 − i`.

Decisions in the state dtype (float32 for 16/32-bit inputs, float64 for float64), `ε = 1e-12`,
radicands clamped at 0. Products that feed decisions keep float32 accuracy: float32 inputs use
`tl.dot(..., input_precision="tf32x3")` on the GPU (`"ieee"` in the interpreter); 16-bit
inputs multiply in their own dtype where products are exact (Gram, `Z` update) and take
`K_c Z` as two passes against a hi/lo split of the float32 `Z`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.levels import EMPTY
from dla.ops.segment.closed_form import segment_fenwick, segment_single
from dla.ops.segment.detect import readout_products
from dla.ops.segment.detect_triton import drift_scores_triton, readout_products_triton
from dla.ops.segment.ends import clear_padding, drop_padding_count, frozen
from dla.ops.segment.events import compact_events, open_block, segment_drift
from dla.ops.state import EPS, state_dtype
from dla.ops.triton_utils import interpreting, pow2
from dla.ops.validation import check_fenwick_levels, check_segment_options

_EPS = tl.constexpr(EPS)  # (kernels may read only constexpr globals)
_EMPTY = tl.constexpr(EMPTY)

__all__ = ["segment_triton"]




# --------------------------------------------------------------------------------------------
# dla: boundary walk
# --------------------------------------------------------------------------------------------


@triton.jit
def _tf32_hi(x):
    """x rounded to tf32 (10 mantissa bits), so that a tf32 dot takes it exactly."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x1000) & -8192
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _walk_range(k_base, v_base, info_base, flag_base, t_begin, t_end, cont, Z, zz, tau,
                stride_k, stride_v, Dk, Dv,
                SCORE_STATE: tl.constexpr, SYNC: tl.constexpr, DOT_MODE: tl.constexpr,
                PREC: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                FDT: tl.constexpr):
    """Walk tokens [t_begin, t_end) chunk by chunk, writing I_t and boundary flags.

    `cont != 0`: the open block `(Z, zz)` continues from before `t_begin`; otherwise a boundary
    is forced at `t_begin` (flag 1, I = 0). With `SYNC`, stop after the first boundary that the
    flags already stored (the speculative walk's) also have; returns (synced, Z, zz)."""
    idx = tl.arange(0, C)
    rows = idx[:, None]
    cols = idx[None, :]
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    kmask = dk[None, :] < Dk
    vmask = dv[None, :] < Dv
    synced = cont * 0
    t0 = t_begin
    while (t0 < t_end) & (synced == 0):
        nvalid = tl.minimum(t_end - t0, C)
        valid = idx < nvalid
        tok = (t0 + idx).to(tl.int64)
        kptr = k_base + tok[:, None] * stride_k + dk[None, :]
        vptr = v_base + tok[:, None] * stride_v + dv[None, :]
        Kc = tl.load(kptr, mask=valid[:, None] & kmask, other=0.0)
        Vc = tl.load(vptr, mask=valid[:, None] & vmask, other=0.0)
        if DOT_MODE == 0:
            G = tl.dot(Kc, tl.trans(Kc), input_precision=PREC) * tl.dot(Vc, tl.trans(Vc), input_precision=PREC)
        else:  # 16-bit inputs: products are exact in float32
            G = tl.dot(Kc, tl.trans(Kc)) * tl.dot(Vc, tl.trans(Vc))
        ss = tl.sum(Kc.to(FDT) * Kc.to(FDT), 1) * tl.sum(Vc.to(FDT) * Vc.to(FDT), 1)
        base = tl.zeros([C], FDT)
        if cont != 0:
            if DOT_MODE == 0:
                KZ = tl.dot(Kc, Z, input_precision=PREC)
            elif DOT_MODE == 1:  # bfloat16: Z = hi + lo in bfloat16
                Zhi = Z.to(tl.bfloat16)
                Zlo = (Z - Zhi.to(tl.float32)).to(tl.bfloat16)
                KZ = tl.dot(Kc, Zlo, acc=tl.dot(Kc, Zhi))
            else:  # float16 (exact in tf32): Z = hi + lo in tf32
                Zhi = _tf32_hi(Z)
                Kf = Kc.to(tl.float32)
                KZ = tl.dot(Kf, Z - Zhi, acc=tl.dot(Kf, Zhi, input_precision="tf32"), input_precision="tf32")
            base = tl.sum(KZ * Vc.to(FDT), 1)
        # I_t if token t − 1 opened a slot ({t − 1} is the block): runs of boundaries in one step
        prev = cols == rows - 1
        c_pair = tl.sum(tl.where(prev, G, 0.0), 1)
        zz_pair = tl.sum(tl.where(prev, ss[None, :], 0.0), 1)
        if SCORE_STATE:
            cos_pair = (zz_pair + c_pair) / tl.maximum(
                tl.sqrt(tl.maximum(zz_pair * (zz_pair + 2.0 * c_pair + ss), 0.0)), _EPS)
        else:
            cos_pair = c_pair / tl.maximum(tl.sqrt(tl.maximum(ss * zz_pair, 0.0)), _EPS)
        info_pair = tl.sqrt(tl.maximum(2.0 - 2.0 * cos_pair, 0.0))
        pair_stop = (info_pair < tau) | (idx >= nvalid)
        if SYNC:
            spec = tl.load(flag_base + tok, mask=valid, other=0).to(tl.int32)
        else:
            spec = tl.zeros([C], tl.int32)

        # jump from boundary to boundary; s0 = block start in the chunk, −1: opened before it
        # a boundary forced at token 0 (cont == 0) and the run of boundaries after it
        forced = cont == 0
        run_end = tl.min(tl.where((idx > 0) & pair_stop, idx, C), 0)
        run = forced & (idx < run_end)
        s0 = tl.where(forced, run_end - 1, -1)
        zz_start = tl.where(forced, 0.0, zz).to(FDT)
        infos = tl.where(run & (idx > 0), info_pair, 0.0).to(FDT)
        flags = tl.where(run, 1, 0)
        zz_end = zz_start
        last = s0 * 0 + C  # the last token this pass decided (the sync token, if any)
        hit = s0 * 0
        done = s0 * 0
        while done == 0:
            lo = tl.maximum(s0, 0)
            c = tl.sum(tl.where((cols >= lo) & (cols < rows), G, 0.0), 1)
            c = tl.where(s0 < 0, c + base, c)
            d = tl.where(idx == s0, ss, 2.0 * c + ss)
            d = tl.where((idx >= lo) & valid, d, 0.0)
            zzb = zz_start + (tl.cumsum(d, 0) - d)
            if SCORE_STATE:
                num = zzb + c
                rad = zzb * (zzb + 2.0 * c + ss)
            else:
                num = c
                rad = ss * zzb
            cos = num / tl.maximum(tl.sqrt(tl.maximum(rad, 0.0)), _EPS)
            info = tl.sqrt(tl.maximum(2.0 - 2.0 * cos, 0.0))
            later = (idx > s0) & valid
            t1 = tl.min(tl.where(later & (info >= tau), idx, C), 0)  # the next boundary
            infos = tl.where(later & (idx <= t1), info, infos)
            flags = tl.where(idx == t1, 1, flags)
            zz_end = zz_start + tl.sum(d, 0)
            hit = ((t1 < C) & (tl.sum(tl.where(idx == t1, spec, 0), 0) != 0)).to(tl.int32)
            # tokens after t1 keep opening slots while each differs enough from its predecessor
            after = (idx > t1) & (hit == 0)
            run_end = tl.min(tl.where(after & pair_stop, idx, C), 0)
            ts = tl.min(tl.where(after & (idx < run_end) & (spec != 0), idx, C), 0)
            run_end = tl.minimum(run_end, ts + 1)
            run = after & (idx < run_end)
            infos = tl.where(run, info_pair, infos)
            flags = tl.where(run, 1, flags)
            hit = hit | (ts < C).to(tl.int32)
            last = tl.where(ts < C, ts, t1)
            done = ((t1 >= C) | (hit != 0)).to(tl.int32)
            s0 = tl.where(done != 0, s0, tl.maximum(t1, run_end - 1))
            zz_start = tl.where(done != 0, zz_start, 0.0).to(FDT)

        wmask = valid & ((idx <= last) | (hit == 0))
        tl.store(info_base + tok, infos, mask=wmask)
        tl.store(flag_base + tok, flags.to(tl.int8), mask=wmask)
        # Z at the chunk end: restart at the last boundary, add the open block's tokens (reloaded
        # rather than kept live through the walk)
        inb = ((idx >= tl.maximum(s0, 0)) & valid)[:, None]
        Kb = tl.load(kptr, mask=inb & kmask, other=0.0)
        Vb = tl.load(vptr, mask=inb & vmask, other=0.0)
        if DOT_MODE == 0:
            Zc = tl.dot(tl.trans(Kb), Vb, input_precision=PREC)
        else:
            Zc = tl.dot(tl.trans(Kb), Vb).to(FDT)
        Z = tl.where(s0 < 0, Z, 0.0) + Zc
        zz = zz_end
        synced = hit
        cont = cont * 0 + 1
        t0 += C
    return synced, Z, zz


@triton.jit
def _walk_kernel(k_ptr, v_ptr, Z0_ptr, zz0_ptr, m0_ptr, tau_ptr, info_ptr, flag_ptr, Zs_ptr, zzs_ptr,
                 T, H, Dk, Dv, piece, P,
                 SCORE_STATE: tl.constexpr, DOT_MODE: tl.constexpr, PREC: tl.constexpr,
                 C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FDT: tl.constexpr):
    """Speculative walk of piece `p` of stream `(b, h)`: piece 0 from the initial state, later
    pieces from a boundary forced at their first token. Stores the piece's end `Z`, `zz`."""
    bh = tl.program_id(0)
    p = tl.program_id(1)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    k_base = k_ptr + (b.to(tl.int64) * T * H + h) * Dk
    v_base = v_ptr + (b.to(tl.int64) * T * H + h) * Dv
    info_base = info_ptr + bh64 * T
    flag_base = flag_ptr + bh64 * T
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    zoff = dk[:, None] * Dv + dv[None, :]
    zmask = (dk[:, None] < Dk) & (dv[None, :] < Dv)
    tau = tl.load(tau_ptr).to(FDT)
    m0 = tl.load(m0_ptr + bh)
    cont = ((p == 0) & (m0 > 0)).to(tl.int32)
    Z = tl.load(Z0_ptr + bh64 * Dk * Dv + zoff, mask=zmask & (cont != 0), other=0.0).to(FDT)
    zz = tl.where(cont != 0, tl.load(zz0_ptr + bh).to(FDT), 0.0).to(FDT)
    t_begin = p * piece
    t_end = tl.minimum(t_begin + piece, T)
    synced, Z, zz = _walk_range(k_base, v_base, info_base, flag_base, t_begin, t_end, cont, Z, zz, tau,
                                H * Dk, H * Dv, Dk, Dv, SCORE_STATE, False, DOT_MODE, PREC, C, BK, BV, FDT)
    zs = bh64 * P + p
    tl.store(Zs_ptr + zs * Dk * Dv + zoff, Z, mask=zmask)
    tl.store(zzs_ptr + zs, zz)


@triton.jit
def _fixup_kernel(k_ptr, v_ptr, tau_ptr, info_ptr, flag_ptr, Zs_ptr, zzs_ptr,
                  T, H, Dk, Dv, piece, P,
                  SCORE_STATE: tl.constexpr, DOT_MODE: tl.constexpr, PREC: tl.constexpr,
                  C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, FDT: tl.constexpr):
    """Replay pieces 1..P−1 of stream `(b, h)` from their true incoming block until the true
    walk meets a speculative boundary; store true end states where it never does."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    k_base = k_ptr + (b.to(tl.int64) * T * H + h) * Dk
    v_base = v_ptr + (b.to(tl.int64) * T * H + h) * Dv
    info_base = info_ptr + bh64 * T
    flag_base = flag_ptr + bh64 * T
    dk = tl.arange(0, BK)
    dv = tl.arange(0, BV)
    zoff = dk[:, None] * Dv + dv[None, :]
    zmask = (dk[:, None] < Dk) & (dv[None, :] < Dv)
    tau = tl.load(tau_ptr).to(FDT)
    Z = tl.load(Zs_ptr + bh64 * P * Dk * Dv + zoff, mask=zmask, other=0.0)
    zz = tl.load(zzs_ptr + bh64 * P)
    one = tl.program_id(0) * 0 + 1
    p = one
    while p < P:  # (a while loop: the interpreter cannot range() over runtime scalars)
        t_begin = p * piece
        t_end = tl.minimum(t_begin + piece, T)
        synced, Zt, zzt = _walk_range(k_base, v_base, info_base, flag_base, t_begin, t_end, one, Z, zz, tau,
                                      H * Dk, H * Dv, Dk, Dv, SCORE_STATE, True, DOT_MODE, PREC, C, BK, BV, FDT)
        zs = bh64 * P + p
        if synced != 0:
            Z = tl.load(Zs_ptr + zs * Dk * Dv + zoff, mask=zmask, other=0.0)
            zz = tl.load(zzs_ptr + zs)
        else:
            Z = Zt
            zz = zzt
            tl.store(Zs_ptr + zs * Dk * Dv + zoff, Z, mask=zmask)
            tl.store(zzs_ptr + zs, zz)
        p += 1


# --------------------------------------------------------------------------------------------
# dla: merge scan and level map
# --------------------------------------------------------------------------------------------


@triton.jit
def _merge_kernel(E_ptr, pos_ptr, infoE_ptr, absN_ptr, absI_ptr, n0_ptr, I0_ptr, m0_ptr,
                  cfg_st_ptr, cfg_m_ptr, n_ptr, I_ptr, m_ptr, T, K,
                  BKS: tl.constexpr, FDT: tl.constexpr):
    """Merge scan of stream `bh` over its boundary events only. Event `e` (token pos[e], score
    infoE[e]) first adds the tokens its block absorbed (absN[e], absI[e]) to the open slot, then
    merges the least dense adjacent pair if the cache is full, then appends. The slot starts
    (oldest first) and `m` after event `e` go to row e + 1 of `cfg` (row 0: the initial state)."""
    bh = tl.program_id(0)
    bh64 = bh.to(tl.int64)
    slot = tl.arange(0, BKS)
    nxt = tl.minimum(slot + 1, BKS - 1)
    m = tl.load(m0_ptr + bh).to(tl.int32)
    live = slot < m
    n = tl.load(n0_ptr + bh64 * K + slot, mask=live, other=0).to(tl.int64)
    I = tl.load(I0_ptr + bh64 * K + slot, mask=live, other=0.0).to(FDT)
    st = tl.where(live, slot - m, _EMPTY)  # first member of each slot, oldest first
    ev = bh64 * (T + 1)
    cfg = cfg_st_ptr + ev * BKS
    tl.store(cfg + slot, st)
    tl.store(cfg_m_ptr + ev, m)
    E = tl.load(E_ptr + bh).to(tl.int32)
    pos = tl.load(pos_ptr + ev)
    ie = tl.load(infoE_ptr + ev)
    an = tl.load(absN_ptr + ev)
    ai = tl.load(absI_ptr + ev)
    e = E * 0
    while e < E:
        # the next event's data, loaded ahead (index e + 1 ≤ E ≤ T exists)
        pos_nx = tl.load(pos_ptr + ev + e + 1)
        ie_nx = tl.load(infoE_ptr + ev + e + 1)
        an_nx = tl.load(absN_ptr + ev + e + 1)
        ai_nx = tl.load(absI_ptr + ev + e + 1)
        open_slot = slot == m - 1
        n = tl.where(open_slot, n + an, n)
        I = tl.where(open_slot, I + ai, I)
        if m == K:  # capacity merge of the adjacent pair of least information density
            n_nx = tl.gather(n, nxt, 0)
            I_nx = tl.gather(I, nxt, 0)
            st_nx = tl.gather(st, nxt, 0)
            dens = (I + I_nx) / tl.maximum(n + n_nx, 1).to(FDT)  # padding slots hold n = 0
            dens = tl.where(slot < K - 1, dens, float("inf"))
            i = tl.argmin(dens, 0, tie_break_left=True)  # ties: the oldest pair
            n = tl.where(slot < i, n, tl.where(slot == i, n + n_nx, n_nx))
            I = tl.where(slot < i, I, tl.where(slot == i, I + I_nx, I_nx))
            st = tl.where(slot <= i, st, st_nx)  # the merged slot keeps the older start
            m = m - 1
        new = slot == m
        n = tl.where(new, 1, n)
        I = tl.where(new, ie, I)
        st = tl.where(new, pos, st)
        m = m + 1
        e += 1
        tl.store(cfg + e * BKS + slot, st)
        tl.store(cfg_m_ptr + ev + e, m)
        pos = pos_nx
        ie = ie_nx
        an = an_nx
        ai = ai_nx
    open_slot = slot == m - 1  # the tail: tokens absorbed after the last event
    n = tl.where(open_slot, n + an, n)
    I = tl.where(open_slot, I + ai, I)
    live = slot < m
    tl.store(n_ptr + bh64 * K + slot, tl.where(live, n, 0), mask=slot < K)
    tl.store(I_ptr + bh64 * K + slot, tl.where(live, I, 0.0), mask=slot < K)
    tl.store(m_ptr + bh, m.to(tl.int64))


@triton.jit
def _fill_kernel(row_ptr, cfg_st_ptr, cfg_m_ptr, level_ptr, T, H, K,
                 CT: tl.constexpr, BKS: tl.constexpr):
    """level_start[b, t, h, r] = start of the oldest-first slot m − 1 − r of the configuration
    after token t's event (`row[t]` = events so far), EMPTY for ranks ≥ m."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    bh64 = bh.to(tl.int64)
    tok = (tl.program_id(1) * CT + tl.arange(0, CT)).to(tl.int64)
    valid = tok < T
    rank = tl.arange(0, BKS)
    row = tl.load(row_ptr + bh64 * T + tok, mask=valid, other=0).to(tl.int64) + bh64 * (T + 1)
    m = tl.load(cfg_m_ptr + row, mask=valid, other=0)
    src = m[:, None] - 1 - rank[None, :]
    held = (src >= 0) & valid[:, None]
    val = tl.load(cfg_st_ptr + row[:, None] * BKS + src, mask=held, other=_EMPTY)
    out = level_ptr + ((b.to(tl.int64) * T + tok[:, None]) * H + h) * K + rank[None, :]
    tl.store(out, val, mask=valid[:, None] & (rank[None, :] < K))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _chunk(chunk_size: int) -> int:
    """The walk's chunk: a power of two in [16, 64] (decisions do not depend on it)."""
    return min(64, pow2(chunk_size))


def _default_piece(T: int, streams: int, C: int, device: torch.device) -> int:
    """Tokens per speculative piece (whole chunks). The walk costs about T/P chunks per program,
    the sequential fix-up about 1.5 chunks per piece on piecewise-stationary inputs: P ≈
    √(chunks / 1.5) balances them, capped by the programs that fill the GPU (a few per SM, to
    hide the walk's latency) and by pieces of at least 4 chunks."""
    if device.type != "cuda":
        return T
    chunks = -(-T // C)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    pieces = max(1, min(-(-4 * sms // streams), int((chunks / 1.5) ** 0.5), chunks // 4))
    return -(-chunks // pieces) * C


def dla_walk(k: Tensor, v: Tensor, m0: Tensor, Z0: Tensor, zz0: Tensor, score: str, tau: float,
             chunk_size: int, piece: int | None = None):
    """The boundary walk alone: `(info [B,H,T], flag [B,H,T] int8, Z [B,H,Dk,Dv], zz [B,H])` —
    `I_t` of every token (0 where the first token opens an empty cache), 1 where it opens a
    slot, and the final open block. `piece`: tokens per speculative piece (rounded up to whole
    chunks); the default fills the GPU."""
    B, T, H, Dk = k.shape
    Dv, dev = v.shape[-1], k.device
    dt = state_dtype(k.dtype)
    C = _chunk(chunk_size)
    piece = _default_piece(T, B * H, C, dev) if piece is None else int(piece)
    piece = max(C, -(-piece // C) * C)
    P = -(-T // piece)
    if k.dtype in (torch.float32, torch.float64):
        dot_mode, prec = 0, ("ieee" if dt == torch.float64 or interpreting(k) else "tf32x3")
    else:
        dot_mode, prec = (1 if k.dtype == torch.bfloat16 else 2), "ieee"
    BK, BV = pow2(Dk), pow2(Dv)
    k, v = k.contiguous(), v.contiguous()
    Z0 = Z0.to(dt).contiguous()
    zz0 = zz0.to(dt).contiguous()
    m0 = m0.to(torch.int64).contiguous()
    # a fill on the device, not a host-to-device copy: a CUDA graph (compiled decode) can capture it
    tau_t = torch.full((1,), tau, dtype=dt, device=dev)
    info = torch.empty(B, H, T, dtype=dt, device=dev)
    flag = torch.empty(B, H, T, dtype=torch.int8, device=dev)
    Zs = torch.empty(B, H, P, Dk, Dv, dtype=dt, device=dev)
    zzs = torch.empty(B, H, P, dtype=dt, device=dev)
    meta = dict(SCORE_STATE=score == "state", DOT_MODE=dot_mode, PREC=prec, C=C, BK=BK, BV=BV,
                FDT=tl.float64 if dt == torch.float64 else tl.float32,
                num_warps=8 if BK * BV >= 64 * 64 else 4)
    _walk_kernel[(B * H, P)](k, v, Z0, zz0, m0, tau_t, info, flag, Zs, zzs, T, H, Dk, Dv, piece, P, **meta)
    if P > 1:
        _fixup_kernel[(B * H,)](k, v, tau_t, info, flag, Zs, zzs, T, H, Dk, Dv, piece, P, **meta)
    return info, flag, Zs[:, :, P - 1], zzs[:, :, P - 1]


def segment_dla(k: Tensor, v: Tensor, n0: Tensor, I0: Tensor, m0: Tensor, Z0: Tensor, zz0: Tensor,
                levels: int, score: str, tau: float, chunk_size: int, piece: int | None = None,
                end: Tensor | None = None):
    """`dla` under `token` or `state`: the boundary walk, the merge scan over boundary events, the
    level map. `end [B]`: rows that end early (`ends.py`); the walk may flag padding and restart
    its open block there, so the final block is taken from the cleared flags instead."""
    info, flag, Z, zz = dla_walk(k, v, m0, Z0, zz0, score, tau, chunk_size, piece)
    if end is not None:
        info, flag = clear_padding(info, flag, end)
        Z, zz = open_block(k, v, flag, Z0, info.dtype)
    level_start, n, I, m = merge_events(info, flag, n0, I0, m0, levels)
    if end is not None:
        n = drop_padding_count(n, m, k.shape[1], end)
    return level_start, n, I, m, Z.contiguous(), zz.contiguous()


def merge_events(info: Tensor, flag: Tensor, n0: Tensor, I0: Tensor, m0: Tensor, levels: int):
    """Steps 2 and 3 from the per-token `info, flag [B,H,T]`: `(level_start [B,T,H,K] int32,
    n [B,H,K], I [B,H,K], m [B,H])`."""
    B, H, T = info.shape
    K, dev, BH = int(levels), info.device, B * H
    dt = info.dtype
    fdt = tl.float64 if dt == torch.float64 else tl.float32
    ev = compact_events(info.reshape(BH, T), flag.reshape(BH, T))
    E, row, pos = ev.count.contiguous(), ev.row.to(torch.int32).contiguous(), ev.pos.to(torch.int32).contiguous()
    infoE, absN, absI = ev.info.contiguous(), ev.absorbed_n.contiguous(), ev.absorbed_I.contiguous()

    BKS = pow2(K, 2)
    cfg_st = torch.empty(BH, T + 1, BKS, dtype=torch.int32, device=dev)
    cfg_m = torch.empty(BH, T + 1, dtype=torch.int32, device=dev)
    n = torch.empty(B, H, K, dtype=torch.int64, device=dev)
    I = torch.empty(B, H, K, dtype=dt, device=dev)
    m = torch.empty(B, H, dtype=torch.int64, device=dev)
    _merge_kernel[(BH,)](E, pos, infoE, absN, absI, n0.to(torch.int64).contiguous(), I0.to(dt).contiguous(),
                         m0.to(torch.int64).contiguous(), cfg_st, cfg_m, n, I, m, T, K,
                         BKS=BKS, FDT=fdt, num_warps=1)
    level_start = torch.empty(B, T, H, K, dtype=torch.int32, device=dev)
    CT = 64
    _fill_kernel[(BH, triton.cdiv(T, CT))](row, cfg_st, cfg_m, level_start, T, H, K, CT=CT, BKS=BKS, num_warps=4)
    return level_start, n, I, m


def segment_triton(k: Tensor, v: Tensor, g: Tensor | None, beta: Tensor | None, S0: Tensor, n0: Tensor,
                   I0: Tensor, m0: Tensor, Z0: Tensor, zz0: Tensor, N0: Tensor, step0: Tensor, levels: int,
                   policy: str, score: str, tau: float, chunk_size: int, end: Tensor | None = None):
    """`dla::segment` on the GPU: `(level_start [B,T,H,L] int32, n [B,H,K] int64, I [B,H,K],
    m [B,H] int64, Z [B,H,Dk,Dv], zz [B,H], N [B,H])`, floats in the state dtype (SCHEMAS.md; `N`
    advances under `drift` with `dla` only, as in the CPU kernel)."""
    check_segment_options(levels, policy, score, chunk_size)
    with torch.no_grad():
        k, v = k.detach().contiguous(), v.detach().contiguous()
        n0, I0, m0 = n0.contiguous(), I0.contiguous(), m0.contiguous()
        Z0, zz0, step0 = Z0.contiguous(), zz0.contiguous(), step0.contiguous()
        if policy == "dla" and score == "drift":
            # float64 products and tail are torch on any device; below it the Triton ones
            wide = k.dtype == torch.float64
            products = readout_products if wide else readout_products_triton
            return frozen(segment_drift(k, v, g, beta, S0, n0, I0, m0, Z0, N0, levels, float(tau),
                                        int(chunk_size), products, merge_events, end,
                                        None if wide else drift_scores_triton), end)
        N = N0.to(state_dtype(k.dtype)).clone()
        if policy == "dla":
            return frozen((*segment_dla(k, v, n0, I0, m0, Z0, zz0, levels, score, float(tau), int(chunk_size),
                                        end=end), N), end)
        if policy == "fenwick":
            # the check reads `step` on the host, which a CUDA graph being captured (the compiled
            # decode step) cannot do; there the request was bounded up front (generate.max_context)
            if not (k.is_cuda and torch.cuda.is_current_stream_capturing()):
                check_fenwick_levels(levels, step0, k.shape[1] if end is None else int(end.max()))
            return frozen((*segment_fenwick(k, v, n0, m0, Z0, zz0, step0, levels, end), N), end)
        return frozen((*segment_single(k, v, n0, m0, Z0, zz0, levels, end), N), end)
