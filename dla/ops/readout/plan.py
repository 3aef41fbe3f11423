r"""The object plan of the persistent-object readout (SPEC §3.1): which slot objects exist, how
each is built, and which ones every chunk reads — from the level map alone, in torch, with
static shapes and no host synchronisation, on the tensors' device. The CPU kernel
(`objects.py`), the Triton kernels (`objects_triton.py`) and the cost model
(`cost.py`, `perf/cost_model.py`) all consume this one plan.

Chunks
======
Per row `n = b·H + h`, chunks are aligned to absolute positions `step_b + t`: with
`φ = step_b mod C`, chunk `c` holds the tokens `[cs_c, cs_{c+1})`, `cs_c = clamp(c·C − φ, 0, T)`,
so a call whose `step` is not a multiple of `C` starts with a partial chunk. There are
`NC = ⌈(T + C − 1) / C⌉` chunk slots (the most any phase needs; trailing ones may be empty) and one
more index, `c = NC` (`cs_NC = T`), for the final state.

The partition each chunk reads
==============================
`P_c` is the partition of the positions before `cs_c` that the level map's row `cs_c` induces
(row `T − 1` with every position for `cs_c = T`): with `m_r` the running minimum of that row's
starts (`m_{−1} = +∞`), its element of rank `r` is the range

    E_{c,r} = [a, e] = [m_r, min(m_{r−1}, cs_c) − 1]           (empty when a > e)

Segments only merge, so every query `t ≥ cs_c` of the chunk sees each element inside one of its
own segments: all members share the level `ℓ_t(a)`, and the chunk reads each element as one
object with the weight `λ_t[ℓ_t(a)]`. `P_{−1}` is the initial slots, one each: rank `r` is the
pseudo-position `−1 − r`. For `fenwick` with aligned chunks, `P_j` is the dyadic blocks of
`bitlen(cs_j ⊕ s)`: `popcount(j)` elements.

Objects
=======
An object is a set `[a, e]`, stored in its own frame (anchored at its last member `e`):
`S̄ = Σ_{s∈[a,e]} exp(G_e − G_s) k_s v_sᵀ` (+ the initial slots it holds, decayed from `−1`;
`G_p = 0` for `p < 0`). Sets only coarsen, so `(a, e)` identifies an object for the whole call.
Object ids: the `L` initial slots are `0..L−1` (their states are `S0`); every element of some
`P_c` that is not an element of `P_{c−1}` is *new* at `c` and gets the next id, in order of
`(c, r)`. A new element is built from the chunk before it:

    S̄_E = Σ_{parents j} exp(G_e − G_{e_j}) S̄_j + Σ_{s ∈ [lo, hi)} exp(G_e − G_s) k_s v_sᵀ

its parents being the elements of `P_{c−1}` inside it (a contiguous range of ranks
`[par_lo, par_hi]`; empty ranks inside the range are skipped), its tokens
`[lo, hi) = [max(a, cs_{c−1}), e + 1)` (none for `c = 0`). Every element of `P_{c−1}` is the parent
of exactly one element of `P_c` (itself, when it persists).

`Λ_c` is the element that holds `cs_c − 1` (the newest one; new at every chunk that follows one
with tokens, since it holds a token of that chunk). It is the open block's carried state when the
block continues, and it is the parent the next chunk most often builds from: the Triton build
kernel keeps it in registers, so an object needs a master in memory only when it is not a `Λ_c`
retired at `c + 1` (`needs_master`; the final slots, written as they are built, need none).
Masters are numbered `0..L−1` for the initial slots (`S0` itself) and `L, L+1, …` for the
others, in id order. `merged` marks the objects a build before the final state reads from their
master (retired into a new element, not as `Λ`): the backward, which stops before the final
state, writes only those masters.

Shapes (`N = B·H`, `L = K` levels, `R = NC + 1` chunk indices, `P` the id capacity): the
`[N, R, L]` element tables and the `[N, P]` per-object tables of `Plan`. Ids at or beyond the
capacity are dropped and the row is marked `overflow` (its plan is not usable; the rule gives it
the dense path).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.cumsum_triton import cumsum
from dla.ops.levels import EMPTY, running_min

__all__ = ["Plan", "build_plan", "chunk_count", "chunk_starts"]

NONE = -1


def chunk_count(T: int, C: int) -> int:
    """`NC`: chunk slots for any phase `φ < C` (`⌈(T + C − 1)/C⌉`; 0 when T = 0)."""
    return 0 if T == 0 else (T + 2 * C - 2) // C


def chunk_starts(step: Tensor | None, T: int, C: int, H: int, B: int | None = None, device=None) -> Tensor:
    """`cs [N, NC + 1]` int64: `clamp(c·C − φ_b, 0, T)` per row `n = b·H + h`, `cs_NC = T`.
    `step` None (a call from the empty cache, every `φ_b = 0`; then `B` and `device` are given):
    the same starts as a constant of the shapes, so that a compiler folds no clamped index
    arithmetic out of them (Inductor's loop simplification in torch 2.11 failed on
    `clamp(c·C, 0, T)` shifted by a chunk)."""
    NC = chunk_count(T, C)
    if step is None:
        starts = torch.tensor([min(c * C, T) for c in range(NC)] + [T], dtype=torch.int64, device=device)
        return starts.expand(B * H, NC + 1)
    phase = torch.remainder(step.to(torch.int64), C).repeat_interleave(H)  # [N]
    c = torch.arange(NC + 1, device=step.device)
    cs = (c[None, :] * C - phase[:, None]).clamp(0, T)
    cs[:, -1] = T
    return cs


class Plan(NamedTuple):
    """One row per `(b, h)`; `R = NC + 1` chunk indices (`NC` = the final state), `P` ids."""

    chunk: int  # C
    master_capacity: int  # M: masters, initial slots included
    starts: Tensor  # cs [N, R] int64
    read: Tensor  # [N, R, L] int32: id of E_{c,r}, −1 where empty
    first: Tensor  # [N, R, L] int64: a of E_{c,r} (EMPTY where empty)
    last: Tensor  # [N, R, L] int64: e of E_{c,r}
    new: Tensor  # [N, R, L] bool: E_{c,r} is created at c
    lam_rank: Tensor  # [N, R] int64: the rank of Λ_c (−1: none)
    lam_id: Tensor  # [N, R] int32: the id of Λ_c (−1: none)
    obj_chunk: Tensor  # [N, P] int32: creation chunk (−1 for initial slots and unused ids)
    obj_first: Tensor  # [N, P] int32: a
    obj_last: Tensor  # [N, P] int32: e (the anchor)
    par_lo: Tensor  # [N, P] int32: parent ranks [par_lo, par_hi] of P_{c−1} (par_lo > par_hi: none)
    par_hi: Tensor  # [N, P] int32
    tok_lo: Tensor  # [N, P] int32: token range [tok_lo, tok_hi) in chunk c − 1 (empty: tok_lo ≥ tok_hi)
    tok_hi: Tensor  # [N, P] int32
    master: Tensor  # [N, P] int32: master index (−1: none); initial slots keep their own id
    merged: Tensor  # [N, P] bool: a later chunk's build reads it from its master (not as Λ_{c−1})
    read_lo: Tensor  # [N, P] int32: first chunk < NC that reads the object (NC: none)
    read_hi: Tensor  # [N, P] int32: last chunk < NC that reads it (−1: none)
    final_rank: Tensor  # [N, P] int32: its rank in the final state (−1: none)
    new_ids: Tensor  # [N, R, L] int32: the ids created at c, compacted (−1 padding)
    new_count: Tensor  # [N, R] int32
    created: Tensor  # [N] int64: objects created
    masters: Tensor  # [N] int64: masters beyond the initial slots
    overflow: Tensor  # [N] bool: created or masters beyond the capacity


def _elements(starts_rows: Tensor, limit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`(a, e, valid)` of `E_{c,r}` from the rows `[N, R, L]` and their limits `cs [N, R]`."""
    m = running_min(starts_rows)
    prev = torch.cat([torch.full_like(m[..., :1], EMPTY), m[..., :-1]], -1)
    a = m
    e = torch.minimum(prev, limit[..., None]) - 1
    valid = a <= e
    return torch.where(valid, a, EMPTY), torch.where(valid, e, NONE), valid


def build_plan(level_start: Tensor, step: Tensor | None, chunk: int, capacity: int | None = None,
               master_capacity: int | None = None) -> Plan:
    """The plan of the module doc. `level_start [B,T,H,L]` (T ≥ 1), `step [B]` (None: zeros, a
    call from the empty cache); `capacity` bounds
    the ids (initial slots included; None: the most any map can need, `L + (NC + 1)·L`),
    `master_capacity` the masters (initial slots included; None: `capacity`)."""
    B, T, H, L = level_start.shape
    C, dev = int(chunk), level_start.device
    N, NC = B * H, chunk_count(T, C)
    R = NC + 1
    P = L + R * L if capacity is None else int(capacity)
    PM = P if master_capacity is None else int(master_capacity)
    i64 = torch.int64
    rows_map = level_start.permute(0, 2, 1, 3).reshape(N, T, L).to(i64)
    cs = chunk_starts(step, T, C, H, B, dev)  # [N, R]
    row = cs.clamp(max=T - 1)
    rows = torch.gather(rows_map, 1, row[..., None].expand(N, R, L))  # [N, R, L]
    a, e, valid = _elements(rows, cs)

    # P_{−1}: the initial slots, rank r at −1 − r
    init = -1 - torch.arange(L, device=dev, dtype=i64)
    a_prev = torch.cat([init.expand(N, 1, L), a[:, :-1]], 1)
    e_prev = torch.cat([init.expand(N, 1, L), e[:, :-1]], 1)
    v_prev = torch.cat([torch.ones(N, 1, L, dtype=torch.bool, device=dev), valid[:, :-1]], 1)
    same = (a[..., :, None] == a_prev[..., None, :]) & (e[..., :, None] == e_prev[..., None, :]) & v_prev[..., None, :]
    new = valid & ~same.any(-1)
    inside = (a[..., :, None] <= a_prev[..., None, :]) & (e_prev[..., None, :] <= e[..., :, None])
    inside &= v_prev[..., None, :]
    ranks = torch.arange(L, device=dev)
    par_lo = torch.where(inside, ranks, L).amin(-1)
    par_hi = torch.where(inside, ranks, -1).amax(-1)
    cs_prev = torch.cat([torch.zeros(N, 1, dtype=i64, device=dev), cs[:, :-1]], 1)
    tok_lo = torch.maximum(a, cs_prev[..., None])
    tok_hi = torch.where(torch.arange(R, device=dev)[None, :, None] > 0, e + 1, tok_lo)
    tok_hi = torch.maximum(tok_hi, tok_lo)

    # ids in creation order, then every element's id by its key (a, e)
    flat_new = new.reshape(N, R * L)
    ids_new = L + cumsum(flat_new.to(i64), 1) - 1  # valid where new
    width = T + L + 2
    key = ((a + L) * width + (e + L)).reshape(N, R * L)
    key_init = (init + L) * width + (init + L)
    BIG = torch.iinfo(i64).max
    table_keys = torch.cat([key_init.expand(N, L), torch.where(flat_new, key, BIG)], 1)
    table_ids = torch.cat([torch.arange(L, device=dev, dtype=i64).expand(N, L), ids_new], 1)
    sorted_keys, order = torch.sort(table_keys, dim=1)
    sorted_ids = torch.gather(table_ids, 1, order)
    pos = torch.searchsorted(sorted_keys, key.contiguous()).clamp(max=sorted_keys.shape[1] - 1)
    ids = torch.gather(sorted_ids, 1, pos).reshape(N, R, L)
    read = torch.where(valid, ids, NONE)

    # Λ_c: the element holding cs_c − 1, and whether it is retired at c + 1
    holds_last = valid & (e == cs[..., None] - 1)
    lam_rank = torch.where(holds_last, ranks, L).amin(-1)
    lam_rank = torch.where(lam_rank < L, lam_rank, NONE)
    a_next = torch.cat([a[:, 1:], torch.full_like(a[:, :1], EMPTY)], 1)
    e_next = torch.cat([e[:, 1:], torch.full_like(e[:, :1], NONE)], 1)
    persists = ((a[..., :, None] == a_next[..., None, :]) & (e[..., :, None] == e_next[..., None, :])).any(-1)
    not_final = torch.arange(R, device=dev)[None, :, None] < NC  # the final state is written as it is built
    needs_master = new & ~(holds_last & ~persists) & not_final
    # retired at c + 1 < NC, not as Λ_c: a parent the backward's build (which stops before the
    # final state) reads from memory
    before_last = torch.arange(R, device=dev)[None, :, None] < NC - 1
    merged_here = valid & ~persists & ~holds_last & before_last
    flat_master = needs_master.reshape(N, R * L)
    master_of_new = L + cumsum(flat_master.to(i64), 1) - 1

    created = flat_new.sum(1)
    masters = flat_master.sum(1)
    overflow = (L + created > P) | (L + masters > PM)

    # per-object tables, scattered from the new elements (ids beyond the capacity dropped)
    def per_object(values: Tensor, fill: int, initial: Tensor | None = None) -> Tensor:
        out = torch.full((N, P + 1), fill, dtype=torch.int32, device=dev)
        if initial is not None:
            out[:, :L] = initial.to(torch.int32)
        index = torch.where(flat_new, ids_new, P).clamp(max=P)
        out.scatter_(1, index, values.reshape(N, R * L).to(torch.int32))
        return out[:, :P]

    cidx = torch.arange(R, device=dev, dtype=i64)[None, :, None].expand(N, R, L)
    obj_chunk = per_object(cidx, NONE)
    obj_first = per_object(a, EMPTY, init.expand(N, L))
    obj_last = per_object(e, NONE, init.expand(N, L))
    plo = per_object(par_lo, L)
    phi = per_object(par_hi, NONE)
    tlo = per_object(tok_lo, 0)
    thi = per_object(tok_hi, 0)
    master = per_object(torch.where(needs_master, master_of_new.reshape(N, R, L), NONE), NONE,
                        torch.arange(L, device=dev).expand(N, L))
    master = torch.where(master < PM, master, NONE)
    merged = torch.zeros(N, P + 1, dtype=torch.bool, device=dev)
    merged.scatter_(1, torch.where(merged_here.reshape(N, R * L) & (read.reshape(N, R * L) < P),
                                   read.reshape(N, R * L), P), True)
    merged[:, :L] = False  # initial slots are S0
    lam_id = torch.gather(read, 2, lam_rank.clamp(min=0)[..., None])[..., 0]
    lam_id = torch.where((lam_rank >= 0) & (lam_id < P), lam_id, NONE)

    # which chunks read each object, and its final rank
    reads = read[:, :NC].reshape(N, NC * L).to(i64)
    chunk_of = torch.arange(NC, device=dev, dtype=i64).repeat_interleave(L).expand(N, NC * L)
    index = torch.where((reads >= 0) & (reads < P), reads, P)
    read_lo = torch.full((N, P + 1), NC, dtype=i64, device=dev).scatter_reduce(1, index, chunk_of, "amin")[:, :P]
    read_hi = torch.full((N, P + 1), NONE, dtype=i64, device=dev).scatter_reduce(1, index, chunk_of, "amax")[:, :P]
    fin = read[:, NC].to(i64)
    final_rank = torch.full((N, P + 1), NONE, dtype=i64, device=dev)
    final_rank.scatter_(1, torch.where((fin >= 0) & (fin < P), fin, P), ranks.expand(N, L).clone())

    # the ids each chunk creates, compacted (creation order = rank order)
    slot = cumsum(new.to(i64), -1) - 1
    new_ids = torch.full((N, R, L + 1), NONE, dtype=i64, device=dev)
    new_ids.scatter_(-1, torch.where(new, slot, L), torch.where(new, read.to(i64), NONE))
    new_ids = torch.where(new_ids < P, new_ids, NONE)

    return Plan(
        chunk=C, master_capacity=PM, starts=cs, read=torch.where(read < P, read, NONE).to(torch.int32), first=a,
        last=e, new=new, lam_rank=lam_rank, lam_id=lam_id.to(torch.int32), obj_chunk=obj_chunk, obj_first=obj_first,
        obj_last=obj_last, par_lo=plo, par_hi=phi, tok_lo=tlo, tok_hi=thi, master=master, merged=merged[:, :P],
        read_lo=read_lo.to(torch.int32), read_hi=read_hi.to(torch.int32),
        final_rank=final_rank[:, :P].to(torch.int32), new_ids=new_ids[..., :L].to(torch.int32),
        new_count=new.sum(-1).to(torch.int32), created=created, masters=masters, overflow=overflow,
    )
