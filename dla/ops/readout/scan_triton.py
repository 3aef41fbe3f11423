r"""CUDA kernels of `dla::readout` and `dla::readout_backward` (SCHEMAS.md) for transitions with
`β` (DeltaNet, Gated DeltaNet): the chunked scan of SPEC §3, linear in T. (Without `β` the stage
takes the persistent objects of `objects_triton.py`.) Same signatures and outputs as the CPU
kernel `dla.ops.readout.chunked`, whose module doc derives the algebra used here.

What it computes
================
Per batch element and head the call is cut into chunks of `C` tokens (the last one padded with
`q = k = v = 0, β = 0, g = 0`, which adds nothing and leaves the transition unchanged). With the
chunk-local quantities of `dla.ops.readout.chunked` (`γ, ρ, Γ`; `Tinv = (I + tril(diag(β)(KKᵀ⊙Γ), −1))⁻¹`
— the UT solve, shared by all slots; `M = Tinv diag(β)`, `Ã = (QKᵀ⊙Γ) M`, `H = diag(γ) K`,
`Q̂ = diag(γ) Q − Ã H`, `E = Kᵀ diag(ρ) M`, `P_C = γ_C I − E H`; the level weights `Λ`, `W` and
the chunk-end remaps of old slots `r → e_r` and chunk tokens `s → ε_s`, rank `K` = dropped):

    o_t    = scale · [ ((Ã ⊙ Λ) V)_t + Σ_r W[t,r] · S_rᵀ Q̂_t ]                         [C, Dv]
    S'_{r'} = P_C · Σ_{r: e_r = r'} S_r  +  Σ_{s: ε_s = r'} E_s v_sᵀ                  [K, Dk, Dv]

Every slot carries its own state through the chunk's transition product `P_C` (`K·Dk²·Dv` per
chunk; slots that merge at the chunk end are summed first, `P_C` being linear), and every query
reads every slot (`K·Dk·Dv` per token). Backward, with `dÕ = scale · dO` and `dS'` the gradient of the chunk-end states (new rank
order), per chunk in reverse:

    dX_r  = dÕ S_rᵀ:   dQ̂ = Σ_r W[:,r] ⊙ dX_r,   dW[t,r] = ⟨dX_r[t], Q̂_t⟩
    dS_r  = P_Cᵀ dS'_{e_r} + (W[:,r] ⊙ Q̂)ᵀ dÕ                 (carried to the previous chunk)
    dP_C  = Σ_r dS'_{e_r} S_rᵀ,   dE_s = dS'_{ε_s} v_s,   dv_s += E_sᵀ dS'_{ε_s}

and the rest (through `Ã, Q̂, E, P_C` to `q, k, v, λ, g, β`) is chunk-local, as written out in
`dla.ops.readout` (`_chunk_backward`, β branch).

Kernels and work split
======================
The sequential part runs in Triton, only over chunks: one program per (batch·head, `Dv` tile)
keeps the chunk loop, reading and writing every slot's state tile (`[Dk, BV]`, float32) in a
global scratch buffer that stays in L2. `_fwd_scan_kernel` adds the slots' read-out to `o` and
moves the states to the chunk end; `_bwd_scan_kernel` first walks forward storing the
chunk-start states every `R ≈ √(#chunks)` chunks, then walks the segments backwards, recomputing
each segment's chunk-start states from its checkpoint and applying the reverse step above —
`dQ̂, dW, dE, dP_C` are sums over `Dv`, so the `Dv` tiles add them with float32 atomics; `dv`'s
state part and the carried `dS` belong to the tile. No saved tensor grows with `T·K·Dk·Dv`:
scratch is `(#checkpoints + R + 1)` sets of slot states for the heads of one launch (the
backward scan is launched for about two programs per SM of heads at a time), freed when the op
returns.

The chunk-parallel part — the UT solve, `Ã, Q̂, E, P_C`, the level weights, the intra-chunk
`(Ã ⊙ Λ) V` and the chunk-local backward — is batched over all chunks at once (in blocks, to
bound memory) with the torch code of `dla.ops.readout`, which this file calls on chunk-major
views (positions made chunk-relative), so both paths share one derivation.

Numerics: chunk-local algebra in float32 (torch, IEEE); the scan's dots on float32 operands,
`input_precision` `"ieee"` for float32 inputs (SPEC §6 tests) and `"tf32"` for 16-bit inputs,
except the recursions through `P_C` without `g` (`"tf32x3"`: their rounding compounds over
chunks, nothing decays it; see `_precisions`). float64 runs on the CPU path.
"""

from __future__ import annotations

import math
import torch
import triton
import triton.language as tl
from torch import Tensor

from dla.ops.levels import EMPTY, initial_starts
from dla.ops.readout.chunked import Inputs, chunk_terms, heads, unheads
from dla.ops.state import state_dtype
from dla.ops.triton_utils import interpreting, pow2

__all__ = ["scan_forward", "scan_backward"]


# --------------------------------------------------------------------------------------------
# The scan (sequential over chunks)
# --------------------------------------------------------------------------------------------


@triton.jit
def _new_slot(DST, r, ET, rows, v, etok, lo, hi, has_old, run, P, dv_, DK: tl.constexpr, DV: tl.constexpr,
              BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr, PREC_P: tl.constexpr):
    """Writes new slot r: Σ_{s: ε_s = r} E_s v_sᵀ, plus P_C · run (its old slots' sum) when
    has_old — in blocks of BH rows of Dk, so that P_C is never held whole in registers."""
    tok = (r >= lo) & (r <= hi)
    sel = (etok == r)[:, None]
    for h in tl.static_range(0, BK, BH):
        dh = h + tl.arange(0, BH)
        acc = tl.zeros([BH, BV], dtype=tl.float32)
        if has_old:
            pm = tl.load(P + dh[:, None] * DK + tl.arange(0, BK)[None, :],
                         mask=(dh[:, None] < DK) & (tl.arange(0, BK)[None, :] < DK), other=0.0)
            acc = tl.dot(pm, run, input_precision=PREC_P)
        if tok:
            et = tl.load(ET + rows[:, None] * DK + dh[None, :], mask=sel & (dh[None, :] < DK), other=0.0)
            acc += tl.dot(tl.trans(et), v, input_precision=PREC)
        tl.store(DST + r * DK * DV + dh[:, None] * DV + dv_[None, :], acc,
                 mask=(dh[:, None] < DK) & (dv_[None, :] < DV))


@triton.jit
def _step(SRC, DST, P, ET, V, EOLD, ETOK, QH, W, rows, dk_, dv_, K: tl.constexpr, DK: tl.constexpr,
          DV: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr,
          READ: tl.constexpr, PREC: tl.constexpr, PREC_P: tl.constexpr):
    """One chunk on this program's Dv tile, every old slot read once: returns (with READ) the
    slots' read-out Σ_r W[:,r] ⊙ Q̂ S_r [C, BV], and writes DST[r'] = P_C · Σ_{r: e_r = r'} SRC[r]
    + Σ_{s: ε_s = r'} E_s v_sᵀ for all K new slots, each exactly once, in order. Old slots
    with e_r = K (no slot: empty levels) carry nothing; the others have non-decreasing e_r (a
    level holds a range of positions, and the old slots are in position order), so each new
    slot's old slots are consecutive: when a group ends (a new e_r, or the sentinel r = K), the
    new slots from the group's own up to the next group's are written (one call site, so the
    kernels stay small)."""
    tile = dk_[:, None] * DV + dv_[None, :]
    m2 = (dk_[:, None] < DK) & (dv_[None, :] < DV)
    v = tl.load(V + rows[:, None] * DV + dv_[None, :], mask=dv_[None, :] < DV, other=0.0)
    etok = tl.load(ETOK + rows)
    lo = tl.min(etok, axis=0)
    hi = tl.max(tl.where(etok < K, etok, -1), axis=0)
    acc = tl.zeros([C, BV], dtype=tl.float32)
    if READ:
        qh = tl.load(QH + rows[:, None] * DK + dk_[None, :], mask=dk_[None, :] < DK, other=0.0)
    run = tl.zeros([BK, BV], dtype=tl.float32)
    cur = lo * 0 - 1  # the new slot being gathered (−1: none yet)
    nxt = lo * 0  # the first new slot not written yet
    for r in range(0, K + 1):
        last = r == K  # the sentinel: closes the last group and fills the remaining slots
        e = tl.load(EOLD + r, mask=r < K, other=K)
        need = e < K
        if READ:
            w = tl.load(W + rows * K + r, mask=(rows >= 0) & (r < K), other=0.0)
            read = tl.max(tl.abs(w), axis=0) > 0
            s = tl.load(SRC + r * DK * DV + tile, mask=m2 & (need | read), other=0.0)
            if read:
                acc += w[:, None] * tl.dot(qh, s, input_precision=PREC)  # diag(w) (Q̂ S_r): no [C, Dk] temporary
        else:
            s = tl.load(SRC + r * DK * DV + tile, mask=m2 & need, other=0.0)
        if (need & (e != cur)) | last:
            first = tl.where(cur >= 0, cur, nxt)  # the open group's slot (= nxt − 1), else nxt
            for r2 in range(first, tl.where(last, K, e)):
                _new_slot(DST, r2, ET, rows, v, etok, lo, hi, r2 == cur, run, P, dv_, DK, DV, BK, BV, BH, PREC,
                          PREC_P)
            nxt = e + 1
            cur = e
            run = tl.zeros([BK, BV], dtype=tl.float32)
        if need:
            run += s
    tl.debug_barrier()  # the next chunk reads DST (other threads' stores)
    return acc


@triton.jit
def _fwd_scan_kernel(QH, W, P, ET, V, EOLD, ETOK, S0, TMP, SO, OI, NC,
                     K: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                     PREC_P: tl.constexpr):
    """OI [N, NC·C, Dv] = Σ_r W[t,r] S_rᵀ Q̂_t per chunk; SO = the final slot states. Chunk c's
    start states are S0 (c = 0) or the previous chunk's output; the outputs alternate between
    TMP and SO so that the last chunk writes SO."""
    pv = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    tok = n * NC * C
    QH += tok * DK
    ET += tok * DK
    W += tok * K
    V += tok * DV
    OI += tok * DV
    ETOK += tok
    PSZ: tl.constexpr = DK * DK  # P_C per chunk
    P += n * NC * PSZ
    EOLD += n * NC * K
    S0 += n * K * DK * DV
    TMP += n * K * DK * DV
    SO += n * K * DK * DV
    dk_ = tl.arange(0, BK)
    dv_ = pv * BV + tl.arange(0, BV)
    for c in range(0, NC):
        rows = c * C + tl.arange(0, C)
        if c == 0:
            src = S0
        elif (NC - c) % 2 == 0:
            src = SO
        else:
            src = TMP
        if (NC - 1 - c) % 2 == 0:
            dst = SO
        else:
            dst = TMP
        acc = _step(src, dst, P + c * PSZ, ET, V, EOLD + c * K, ETOK, QH, W, rows, dk_, dv_, K, DK, DV, C, BK, BV,
                    BH, True, PREC, PREC_P)
        tl.store(OI + rows[:, None] * DV + dv_[None, :], acc, mask=dv_[None, :] < DV)


@triton.jit
def _bwd_scan_kernel(QH, W, P, ET, V, EOLD, ETOK, DO, S0, DS, CK, SEG, DTMP, DS0,
                     DQH, DW, DET, DVS, DP, NC, R,
                     K: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, C: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr,
                     PREC_P: tl.constexpr):
    """The reverse pass over chunks (module doc). CK [NSEG, N, K, Dk, Dv]: chunk-start states of
    the chunks c ≡ 0 mod R; SEG [R, N, K, Dk, Dv]: those of the segment being reversed (SEG[0],
    SEG[1] also serve the first forward walk). dS' alternates between DTMP and DS0 so that the
    first chunk writes DS0. DQH, DW, DET, DP (zeroed) get this tile's share by atomic adds; DVS
    [N, NC·C, Dv] is written."""
    pv = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    N = tl.num_programs(1).to(tl.int64)
    tok = n * NC * C
    QH += tok * DK
    ET += tok * DK
    DQH += tok * DK
    DET += tok * DK
    W += tok * K
    DW += tok * K
    V += tok * DV
    DO += tok * DV
    DVS += tok * DV
    ETOK += tok
    PSZ: tl.constexpr = DK * DK
    P += n * NC * PSZ
    DP += n * NC * PSZ
    EOLD += n * NC * K
    SET = K * DK * DV  # one set of slot states
    S0 += n * SET
    DS += n * SET
    DTMP += n * SET
    DS0 += n * SET
    CK += n * SET
    SEG += n * SET
    STRIDE = N * SET  # between sets of CK and SEG
    dk_ = tl.arange(0, BK)
    dv_ = pv * BV + tl.arange(0, BV)
    tile = dk_[:, None] * DV + dv_[None, :]
    m2 = (dk_[:, None] < DK) & (dv_[None, :] < DV)
    mk = dk_[None, :] < DK
    mv = dv_[None, :] < DV
    # 1. forward walk, keeping the chunk-start states of chunks c ≡ 0 mod R
    for c in range(0, NC - 1):
        rows = c * C + tl.arange(0, C)
        if c == 0:
            src = S0
        elif c % 2 == 1:
            src = SEG + STRIDE
        else:
            src = SEG
        if c % R == 0:
            for r in range(0, K):
                x = tl.load(src + r * DK * DV + tile, mask=m2, other=0.0)
                tl.store(CK + (c // R) * STRIDE + r * DK * DV + tile, x, mask=m2)
        if c % 2 == 0:
            dst = SEG + STRIDE
        else:
            dst = SEG
        _step(src, dst, P + c * PSZ, ET, V, EOLD + c * K, ETOK, QH, W, rows, dk_, dv_, K, DK, DV, C, BK, BV, BH, False,
              PREC, PREC_P)
    c_last = NC - 1
    if c_last % R == 0:  # the last chunk starts a segment: its state is the walk's last output
        if c_last == 0:
            last = S0
        elif c_last % 2 == 1:
            last = SEG + STRIDE
        else:
            last = SEG
        for r in range(0, K):
            x = tl.load(last + r * DK * DV + tile, mask=m2, other=0.0)
            tl.store(CK + (c_last // R) * STRIDE + r * DK * DV + tile, x, mask=m2)
    tl.debug_barrier()
    # 2. segments in reverse: recompute their chunk-start states, then reverse their chunks
    nseg = tl.cdiv(NC, R)
    for i in range(0, nseg):
        seg = nseg - 1 - i
        c_first = seg * R
        n_in = tl.minimum(R, NC - c_first)
        for r in range(0, K):
            x = tl.load(CK + seg * STRIDE + r * DK * DV + tile, mask=m2, other=0.0)
            tl.store(SEG + r * DK * DV + tile, x, mask=m2)
        tl.debug_barrier()
        for j in range(1, n_in):
            c = c_first + j - 1
            rows = c * C + tl.arange(0, C)
            _step(SEG + (j - 1) * STRIDE, SEG + j * STRIDE, P + c * PSZ, ET, V, EOLD + c * K, ETOK, QH, W, rows,
                  dk_, dv_, K, DK, DV, C, BK, BV, BH, False, PREC, PREC_P)
        for jj in range(0, n_in):
            j = n_in - 1 - jj
            c = c_first + j
            src = SEG + j * STRIDE
            if c == NC - 1:
                dsn = DS
            elif (c + 1) % 2 == 0:
                dsn = DS0
            else:
                dsn = DTMP
            if c % 2 == 0:
                dst = DS0
            else:
                dst = DTMP
            rows = c * C + tl.arange(0, C)
            Pc = P + c * PSZ
            pm_mask = (dk_[:, None] < DK) & (dk_[None, :] < DK)
            pm_tile = dk_[:, None] * DK + dk_[None, :]
            do = tl.load(DO + rows[:, None] * DV + dv_[None, :], mask=mv, other=0.0)
            qh = tl.load(QH + rows[:, None] * DK + dk_[None, :], mask=mk, other=0.0)
            # token writes: dE_s = dS'_{ε_s} v_s, dv_s = E_sᵀ dS'_{ε_s}
            et = tl.load(ET + rows[:, None] * DK + dk_[None, :], mask=mk, other=0.0)
            v = tl.load(V + rows[:, None] * DV + dv_[None, :], mask=mv, other=0.0)
            etok = tl.load(ETOK + rows)
            lo = tl.min(etok, axis=0)
            hi = tl.max(tl.where(etok < K, etok, -1), axis=0)
            det = tl.zeros([C, BK], dtype=tl.float32)
            dvs = tl.zeros([C, BV], dtype=tl.float32)
            for r in range(0, K):
                if (r >= lo) & (r <= hi):
                    d = tl.load(dsn + r * DK * DV + tile, mask=m2, other=0.0)
                    sel = (etok == r)[:, None]
                    det += tl.where(sel, tl.dot(v, tl.trans(d), input_precision=PREC), 0.0)
                    dvs += tl.where(sel, tl.dot(et, d, input_precision=PREC), 0.0)
            tl.store(DVS + rows[:, None] * DV + dv_[None, :], dvs, mask=mv)
            tl.atomic_add(DET + rows[:, None] * DK + dk_[None, :], det, mask=mk, sem="relaxed")
            # old slots: read-out and transition
            dqh = tl.zeros([C, BK], dtype=tl.float32)
            dp = tl.zeros([BK, BK], dtype=tl.float32)  # dP_C
            cur = tl.load(EOLD + c * K)
            dsc = tl.load(dsn + cur * DK * DV + tile, mask=m2 & (cur < K), other=0.0)
            ptds = tl.dot(tl.trans(tl.load(Pc + pm_tile, mask=pm_mask, other=0.0)), dsc, input_precision=PREC_P)
            run = tl.zeros([BK, BV], dtype=tl.float32)
            for r in range(0, K):
                e = tl.load(EOLD + c * K + r)
                if e != cur:
                    dp += tl.dot(dsc, tl.trans(run), input_precision=PREC)
                    cur = e
                    run = tl.zeros([BK, BV], dtype=tl.float32)
                    dsc = tl.load(dsn + cur * DK * DV + tile, mask=m2 & (cur < K), other=0.0)
                    ptds = tl.dot(tl.trans(tl.load(Pc + pm_tile, mask=pm_mask, other=0.0)), dsc,
                                  input_precision=PREC_P)
                w = tl.load(W + rows * K + r)
                s = tl.load(src + r * DK * DV + tile, mask=m2, other=0.0)
                run += s
                ds = ptds
                if tl.max(tl.abs(w), axis=0) > 0:
                    dx = tl.dot(do, tl.trans(s), input_precision=PREC)  # [C, BK]
                    dqh += w[:, None] * dx
                    tl.atomic_add(DW + rows * K + r, tl.sum(dx * qh, axis=1), sem="relaxed")
                    ds += tl.dot(tl.trans(qh), w[:, None] * do, input_precision=PREC)
                tl.store(dst + r * DK * DV + tile, ds, mask=m2)
            tl.atomic_add(DQH + rows[:, None] * DK + dk_[None, :], dqh, mask=mk, sem="relaxed")
            dp += tl.dot(dsc, tl.trans(run), input_precision=PREC)
            tl.atomic_add(DP + c * PSZ + pm_tile, dp, mask=pm_mask, sem="relaxed")
            tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# The chunk-parallel part (batched torch over chunk-major views)
# --------------------------------------------------------------------------------------------


def _config(dk: int, dv: int, N: int, interpreted: bool) -> dict:
    """Chunk size C, Dv tile BV and warps of the scan. Smaller BV gives more programs (the scan
    has only N·Dv/BV of them) at the price of more atomic traffic in the backward. Dv only sets
    the number of tiles; Dk ≤ 128 (see `_check`)."""
    if interpreted:
        return dict(C=16, BV=16, num_warps=4)
    bv = 32 if N * triton.cdiv(dv, 32) >= 128 else 16
    return dict(C=64, BV=min(bv, pow2(dv)), num_warps=8 if dk >= 128 else 4)


def _heads_per_launch(N: int, nv: int, device) -> int:
    """Heads per launch of the backward scan, whose scratch (≈ 2·√(#chunks) sets of slot states)
    is sized for one launch: enough programs for about two per SM (the scan's programs are heavy,
    one or two fit an SM), so that splitting costs little parallelism and bounds the scratch
    when B·H is large (short sequences)."""
    if device.type != "cuda":
        return N
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(N, triton.cdiv(2 * sms, nv)))


class _Chunked:
    """Inputs as chunk-major views `[N·NC, C, ...]` (positions relative to each chunk start,
    the last chunk padded), with each chunk's old-slot positions, ready for `dla.ops.readout.chunked.chunk_terms`."""

    def __init__(self, q, k, v, lam, g, beta, level_start, S0, C: int):
        self.cdt = state_dtype(q.dtype)
        self.B, self.T, self.H, self.dk = q.shape
        self.dv, self.K = v.shape[-1], lam.shape[-1]
        self.N, self.C = self.B * self.H, C
        self.NC = triton.cdiv(self.T, C)
        self.Tp = self.NC * C
        dev, N, NC, K = q.device, self.N, self.NC, self.K
        pad = self.Tp - self.T
        self.q, self.k, self.v, self.lam = (self.padded_heads(x) for x in (q, k, v, lam))
        self.q_in, self.k_in, self.v_in, self.lam_in, self.g_in = q, k, v, lam, g  # for the gradients' dtypes
        self.g = None if g is None else self.padded_heads(g)
        self.beta = None if beta is None else self.padded_heads(beta)
        starts = heads(level_start, torch.int64)  # [N, T, K]
        if pad:  # padded rows repeat the last row: the chunk end is read there
            starts = torch.cat([starts, starts[:, -1:].expand(N, pad, K)], 1)
        c0 = (torch.arange(NC, device=dev) * C).view(1, NC, 1)
        prev = torch.cat([initial_starts(K, dev).to(torch.int64).expand(N, 1, K),
                          starts[:, C - 1 :: C][:, : NC - 1]], 1)  # [N, NC, K] absolute
        self.prev = torch.where(prev == EMPTY, prev, prev - c0).reshape(N * NC, K)
        st = starts.view(N, NC, C, K)
        self.starts = torch.where(st == EMPTY, st, st - c0[..., None]).reshape(N * NC, C, K)
        self.S0 = S0.to(torch.float32).reshape(N, K, self.dk, self.dv).contiguous()

    def padded_heads(self, x: Tensor, dtype=None) -> Tensor:
        """`[B, T, H, ...]` → head-major `[N, Tp, ...]` in `dtype` (the compute dtype), zero-padded."""
        h = heads(x, dtype or self.cdt)
        pad = self.Tp - self.T
        return torch.nn.functional.pad(h, (0, 0) * (h.dim() - 2) + (0, pad)) if pad else h

    def rows(self, x: Tensor | None) -> Tensor | None:
        return None if x is None else x.reshape(self.N * self.NC, self.C, *x.shape[2:])

    def block(self, i0: int, i1: int) -> tuple[Inputs, Tensor]:
        """Chunks i0..i1 (of the N·NC chunk rows) as `Inputs` of C tokens each."""
        def sl(x):
            return None if x is None else self.rows(x)[i0:i1]

        dummy = torch.zeros(1, 1, 1, 1, dtype=self.cdt, device=self.q.device).expand(i1 - i0, self.K, 1, 1)
        x = Inputs(q=sl(self.q), k=sl(self.k), v=sl(self.v), lam=sl(self.lam), g=sl(self.g), beta=sl(self.beta),
                    starts=self.starts[i0:i1], S0=dummy)
        return x, self.prev[i0:i1]

    def blocks(self):
        """Blocks of chunk rows bounding the chunk-local temporaries (~24 [C, C] tensors per chunk,
        float32: about 0.8 GB per block at 2²³ elements each, few blocks so few launches)."""
        step = max(1, (1 << 23) // (self.C * self.C))
        R = self.N * self.NC
        return [(i, min(i + step, R)) for i in range(0, R, step)]

    def scan_inputs(self, with_intra: bool):
        """With β: Q̂, W, Eᵀ, P_C, e, ε for every chunk (and the scale-free intra-chunk o)."""
        N, NC, C, K, dk, dv = self.N, self.NC, self.C, self.K, self.dk, self.dv
        dev, f32 = self.q.device, torch.float32
        R = N * NC
        qh, et = torch.empty(R, C, dk, dtype=f32, device=dev), torch.empty(R, C, dk, dtype=f32, device=dev)
        w = torch.empty(R, C, K, dtype=f32, device=dev)
        p = torch.empty(R, dk, dk, dtype=f32, device=dev)
        eold = torch.empty(R, K, dtype=torch.int32, device=dev)
        etok = torch.empty(R, C, dtype=torch.int32, device=dev)
        intra = torch.empty(R, C, dv, dtype=self.cdt, device=dev) if with_intra else None
        for i0, i1 in self.blocks():
            x, prev = self.block(i0, i1)
            c = chunk_terms(x, 0, C, prev)
            qh[i0:i1] = c.Qh
            et[i0:i1] = c.E.transpose(1, 2)
            w[i0:i1] = c.W
            p[i0:i1] = c.P
            eold[i0:i1] = c.end_old
            etok[i0:i1] = c.end_tok
            if with_intra:
                intra[i0:i1] = (c.At * c.Lam) @ c.v
        return qh, w, et, p, eold, etok, intra


def _check(name: str, q: Tensor, v: Tensor, lam: Tensor, beta: Tensor | None, input_precision: str | None) -> None:
    if beta is None:
        raise ValueError(f"{name}: beta is required (without β the readout takes dla.ops.readout.objects_triton)")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{name}: q must be float32, bfloat16 or float16, got {q.dtype} (float64 runs on the CPU path)")
    if input_precision not in (None, "ieee", "tf32", "tf32x3"):
        raise ValueError(f"{name}: input_precision must be None, 'ieee', 'tf32' or 'tf32x3', got {input_precision!r}")
    B, T, H, Dk = q.shape
    if Dk > 128:  # [C, Dk] and [Dk, Dk] tiles beyond 128 are neither tuned nor tested on the card
        raise ValueError(f"{name}: key head size Dk = {Dk} > 128 is not supported by the scan Triton kernels "
                         "(the CPU path takes any size)")
    if (T + 64) * max(Dk, v.shape[-1], lam.shape[-1]) >= 2**31:
        raise ValueError(f"{name}: T·max(Dk, Dv, K) must stay below 2**31 (int32 offsets within a head)")


def _precisions(dtype: torch.dtype, input_precision: str | None, has_g: bool) -> tuple[str, str]:
    """(precision of the scan's dots, precision of its recursions: P_C · S forward, P_Cᵀ · dS
    backward). The recursions compound their rounding over the chunks; without `g` nothing
    decays it, so with 16-bit inputs they take tf32x3 (about float32) unless told otherwise.
    With `g` they take tf32, which the decay keeps from compounding (the GPU grid holds it to the
    bf16 tolerance up to T = 16384), at a fraction of tf32x3's cost."""
    if dtype == torch.float32:
        prec = input_precision or "ieee"
        return prec, prec
    return input_precision or "tf32", input_precision or ("tf32" if has_g else "tf32x3")


def _meta(dk: int, dv: int, K: int, N: int, dtype: torch.dtype, input_precision: str | None,
          has_g: bool = False, interpreted: bool = False) -> tuple[dict, int]:
    """The scan kernels' meta-parameters (constexprs, num_warps, num_stages) and the number of
    Dv tiles, from the shapes alone (the sm_90 compile test uses the same)."""
    cfg = _config(dk, dv, N, interpreted)
    bv, bk = cfg["BV"], pow2(dk)
    prec, prec_p = _precisions(dtype, input_precision, has_g)
    meta = dict(K=K, DK=dk, DV=dv, C=cfg["C"], BK=bk, BV=bv, BH=min(bk, 64), PREC=prec, PREC_P=prec_p,
                num_warps=cfg["num_warps"], num_stages=1)
    return meta, triton.cdiv(dv, bv)


def _launch_meta(x: _Chunked, input_precision: str | None, dtype: torch.dtype) -> tuple[dict, int]:
    return _meta(x.dk, x.dv, x.K, x.N, dtype, input_precision, x.g is not None, interpreting(x.q))


def scan_forward(q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                           *, input_precision: str | None = None) -> tuple[Tensor, Tensor]:
    """`(o [B,T,H,Dv] in q's dtype, S [B,H,K,Dk,Dv] float32)`; see the module doc. The chunk size
    is the kernel's own (`chunk_size` is accepted for schema parity: the result does not depend
    on it beyond rounding)."""
    _check("scan_forward", q, v, lam, beta, input_precision)
    B, T, H, Dk = q.shape
    Dv, K = v.shape[-1], lam.shape[-1]
    if T == 0:
        return q.new_empty(B, 0, H, Dv), S0.to(torch.float32).clone()
    x = _Chunked(q, k, v, lam, g, beta, level_start, S0, _config(Dk, Dv, B * H, interpreting(q))["C"])
    scale = float(scale)
    qh, w, et, p, eold, etok, intra = x.scan_inputs(with_intra=True)
    intra = intra * scale
    meta, nv = _launch_meta(x, input_precision, q.dtype)
    f32 = dict(dtype=torch.float32, device=q.device)
    S = torch.empty(B, H, K, Dk, Dv, **f32)
    tmp = torch.empty(B, H, K, Dk, Dv, **f32) if x.NC > 1 else S
    oi = torch.empty(x.N, x.Tp, Dv, **f32)
    v32 = x.v.to(torch.float32).contiguous()
    _fwd_scan_kernel[(nv, x.N)](qh, w, p, et, v32, eold, etok, x.S0, tmp, S, oi, x.NC, **meta)
    o = oi.to(x.cdt) * scale + intra.view(x.N, x.Tp, Dv)
    return unheads(o[:, :T], B, H, q.dtype), S


def _local_backward(c, dOt, dQh, dW, dEt, dvs, dP, has_g: bool):
    """The chunk-local part of `dla.ops.readout._chunk_backward` (β branch), given the scan's
    sums over slots: dQ̂, dW, dE (token writes), dv (token writes) and dP_C. Returns
    (dq, dk, dv, dλ, dg, dβ) for the block's chunks."""
    N, C, Dk = c.k.shape
    K = c.W.shape[-1]
    dv = (c.At * c.Lam).transpose(1, 2) @ dOt + dvs
    dAL = dOt @ c.v.transpose(1, 2)
    dAt = dAL * c.Lam
    dLam = dAL * c.At
    dlam = torch.zeros(N, C, K, dtype=dOt.dtype, device=dOt.device)
    dlam.scatter_add_(-1, c.lev_tok.clamp(min=0), torch.where(c.lev_tok >= 0, dLam, 0.0))
    dlam.scatter_add_(-1, c.lev_old.clamp(min=0), torch.where(c.lev_old >= 0, dW, 0.0))
    gam, rho, Gam = c.gam, c.rho, c.Gam
    dgam = (dQh * c.q).sum(-1)
    dq = gam[..., None] * dQh
    dE = dEt.transpose(1, 2)
    dgam_C = dP.diagonal(dim1=1, dim2=2).sum(-1)
    Hk = gam[..., None] * c.k
    dE = dE - dP @ Hk.transpose(1, 2)
    dAt = dAt - dQh @ Hk.transpose(1, 2)
    dH = -(c.E.transpose(1, 2) @ dP) - c.At.transpose(1, 2) @ dQh
    dk = gam[..., None] * dH
    dgam = dgam + (dH * c.k).sum(-1)
    Kr = rho[..., None] * c.k
    dKr = c.M @ dE.transpose(1, 2)
    dM = Kr @ dE + c.Aqk.transpose(1, 2) @ dAt
    dAqk = dAt @ c.M.transpose(1, 2)
    dbeta = (dM * c.Tinv).sum(1)
    dTinv = dM * c.beta[:, None, :]
    dAkk = -(c.Tinv.transpose(1, 2) @ dTinv @ c.Tinv.transpose(1, 2)).tril(-1)
    dbeta = dbeta + (dAkk * c.KK * Gam).sum(2)
    dB = c.beta[:, :, None] * dAkk
    Zk = dB * Gam
    dk = dk + Zk @ c.k + Zk.transpose(1, 2) @ c.k
    dGam = dB * c.KK + dAqk * c.QK
    Zq = dAqk * Gam
    dq = dq + Zq @ c.k
    dk = dk + rho[..., None] * dKr + Zq.transpose(1, 2) @ c.q
    dg = _dg(c, dGam, dKr, dgam, dgam_C) if has_g else None
    return dq, dk, dv, dlam, dg, dbeta


def _dg(c, dGam, dKr, dgam, dgam_C):
    """dg from the gradients of Γ, ρ (through `Kᵀ diag(ρ)`), γ and γ_C: reverse cumsum of dG."""
    drho = (dKr * c.k).sum(-1)
    Zg = dGam * c.Gam
    dG = Zg.sum(2) - Zg.sum(1) + dgam * c.gam - drho * c.rho
    dG[:, -1] += (drho * c.rho).sum(1) + dgam_C * c.gam_C
    return dG.flip(1).cumsum(1).flip(1)


def scan_backward(do, dS, q, k, v, lam, g, beta, level_start, S0, scale: float, chunk_size: int,
                            *, input_precision: str | None = None):
    """`(dq, dk, dv, dlam, dg, dbeta, dS0)`, shaped and typed like the inputs; `dg` is float32
    zeros `[B,T,H]` when `g` is absent. `do` or `dS` may be None (zero)."""
    _check("scan_backward", q, v, lam, beta, input_precision)
    B, T, H, Dk = q.shape
    Dv, K = v.shape[-1], lam.shape[-1]
    dev, f32 = q.device, torch.float32
    if T == 0:
        dg = torch.zeros(B, 0, H, dtype=g.dtype if g is not None else f32, device=dev)
        dS0 = torch.zeros(S0.shape, dtype=f32, device=dev) if dS is None else dS.to(f32).clone()
        return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), lam.new_empty(lam.shape),
                dg, torch.zeros(B, 0, H, dtype=beta.dtype, device=dev), dS0.to(S0.dtype))
    x = _Chunked(q, k, v, lam, g, beta, level_start, S0, _config(Dk, Dv, B * H, interpreting(q))["C"])
    N, NC, C, Tp = x.N, x.NC, x.C, x.Tp
    qh, w, et, p, eold, etok, _ = x.scan_inputs(with_intra=False)
    meta, nv = _launch_meta(x, input_precision, q.dtype)
    if do is None:
        dOt = torch.zeros(N, Tp, Dv, dtype=f32, device=dev)
    else:
        dOt = (torch.nn.functional.pad(heads(do, f32), (0, 0, 0, Tp - T)) * float(scale)).contiguous()
    dS = torch.zeros(B, H, K, Dk, Dv, dtype=f32, device=dev) if dS is None else dS.to(f32).contiguous()
    R = max(1, math.isqrt(NC))
    nseg = triton.cdiv(NC, R)
    G = _heads_per_launch(N, nv, dev)
    sets = dict(dtype=f32, device=dev)
    ck = torch.empty(nseg, G, K, Dk, Dv, **sets)  # scratch for G heads, reused by each launch
    seg = torch.empty(max(R, 2), G, K, Dk, Dv, **sets)
    dtmp = torch.empty(G, K, Dk, Dv, **sets)
    dS0 = torch.empty(B, H, K, Dk, Dv, **sets)
    dqh = torch.zeros(N, Tp, Dk, **sets)
    dw = torch.zeros(N, Tp, K, **sets)
    det = torch.zeros(N, Tp, Dk, **sets)
    dvs = torch.empty(N, Tp, Dv, **sets)
    dp = torch.zeros(N * NC, Dk, Dk, **sets)  # dP_C
    v32 = x.v.to(f32).contiguous()
    per_head = (dOt, x.S0, dS.view(N, K, Dk, Dv), dS0.view(N, K, Dk, Dv), dqh, dw, det, dvs, v32)
    for n0 in range(0, N, G):
        n1 = min(N, n0 + G)
        h = [t[n0:n1] for t in per_head]
        c = [t[n0 * NC : n1 * NC] for t in (qh, w, p, et, eold, etok, dp)]
        _bwd_scan_kernel[(nv, n1 - n0)](c[0], c[1], c[2], c[3], h[8], c[4], c[5], h[0], h[1], h[2], ck, seg, dtmp,
                                        h[3], h[4], h[5], h[6], h[7], c[6], NC, R, **meta)
    del ck, seg, dtmp

    grads = [torch.empty(N * NC, C, d, dtype=x.cdt, device=dev) for d in (Dk, Dk, Dv, K)]
    dg = torch.zeros(N * NC, C, dtype=x.cdt, device=dev)
    dbeta = torch.empty(N * NC, C, dtype=x.cdt, device=dev)
    rows = x.rows
    dOt_r, dqh_r, dw_r, det_r, dvs_r = (rows(t).to(x.cdt) for t in (dOt, dqh, dw, det, dvs))
    for i0, i1 in x.blocks():
        xb, prev = x.block(i0, i1)
        c = chunk_terms(xb, 0, C, prev)
        out = _local_backward(c, dOt_r[i0:i1], dqh_r[i0:i1], dw_r[i0:i1], det_r[i0:i1], dvs_r[i0:i1],
                              dp[i0:i1].to(x.cdt), g is not None)
        for buf, val in zip(grads, out[:4]):
            buf[i0:i1] = val
        if g is not None:
            dg[i0:i1] = out[4]
        dbeta[i0:i1] = out[5]

    def back(t, dtype):
        return unheads(t.view(N, Tp, *t.shape[2:])[:, :T], B, H, dtype)

    dq, dk, dv, dlam = (back(t, ref.dtype) for t, ref in zip(grads, (q, k, v, lam)))
    dg_out = back(dg, g.dtype) if g is not None else torch.zeros(B, T, H, dtype=f32, device=dev)
    return dq, dk, dv, dlam, dg_out, back(dbeta, beta.dtype), dS0.to(S0.dtype)
