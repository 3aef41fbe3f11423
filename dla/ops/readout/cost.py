r"""What the readout's CUDA kernels cost, the pool bound, and the rule that picks objects or the
dense path per head (SPEC §3.1). Pure functions of the shapes and of the plan's own counts
(`plan_counts`), evaluated on the device for the rule (no host read) and on the host for the
cost model (`perf/cost_model.py`).

Kernel by kernel
================
Each kernel's floating-point operations (a multiply-add is 2) and DRAM bytes, per `(b, h)` row,
for the kernels of `objects_triton.py` (object heads) and `masked_triton.py` (dense heads). `D =
Dk·Dv`, `s` the input itemsize, `C` the chunk, `NC` the chunk slots, `T` tokens, `L = K` levels,
state tiles those of the build, the object-major dS and the pushdown. Bytes count each
tensor a kernel touches once: what several programs read again comes from L2 — a chunk's keys
re-read within the chunk, an object re-read by every chunk it is alive in (neighbouring chunks of
a head run together in the grid's chunk-major order), and a chunk's `k, v` (or `q, dO`) read by
the sibling state tiles of one row, which the build and the pushdown walk chunk by chunk
together. Counts from the plan:
`created` objects (`copies`: those a chunk reads), `masters`, `reads` (`Σ_c tokens(c)·|P_c|`),
`with_tokens` (objects built from tokens), `links_memory` (parents read from a master, not
from the build's registers), `lam_tokens` (tokens of the chunks whose `Λ_c` has no master:
the pushdown forms its gradient), `final_masters` (final slots that are older objects).

    build (forward)                          2C·D per object with tokens
        k, v; copies·D·s and the masters' residuals written, links_memory
        masters read, the final state (final_masters masters read, L·D·4 written)
    chunk forward (band + objects)           2TC(Dk + Dv) + 2D·reads
        q, k, v, λ, the level rows, G, o; every copy once
    build (backward)                         as the forward's, writing the masters that later
        merges read (links_memory) and no final state
    backward dS̄ (object-major)              2D·(reads − lam_tokens)
        (masters + L)·D·4 written; q, dO once
    pushdown (reverse, merge tree)           2D·lam_tokens
        masters·D·4 read, links_memory·2·D·4 (the parents' read-modify-write),
        with_tokens·D·s written (D of the objects built from tokens), q, dO for lam_tokens
    chunk backward (both halves)             2TC(4Dk + 3Dv) + 2D·reads + 4CD·with_tokens
        q, k, v, dO, λ, level rows, G; dq, dk, dv, dλ, dG; every copy and D once

Dense heads take the masked quadratic kernels: `T(T + BT)` pairs per pass instead of `T(C + BT)`,
the final and initial states by their own kernels (`masked_triton.py`).

Segmentation (the `dla` walk of `segment/triton_walk.py`, scores `token`/`state`): per token the
chunk Gram `2C(Dk + Dv)` and the open block's `2·2D` (base term and update); k, v read, the
level map written and filled.

Roofline: a kernel takes `max(flops / F, bytes / W)` on a card of peak `F` FLOP/s and `W` B/s;
a call takes the sum over its kernels. `ARCHITECTURES` lists each card's datasheet peaks (dense
16-bit tensor FLOP/s, DRAM bandwidth); the rule only compares two sums on one card, so it
depends on their ratio, never on a constant measured on a card.

The pool bound (memory target: training peak ≤ 2× `single`)
===========================================================
The pool lives for one op call (freed when the op returns; the backward rebuilds it): it may
take what the layer's attention holds under `single` in a training step — q, k, v, o and their
gradients, `2T(2Dk + 2Dv)·s`, and the backbone's chunk states and their gradients,
`2(NC + 1)·D·4` — so one layer's transient pool never lifts the peak beyond twice `single`'s.
What it holds, per object: a copy in the input dtype (`s` bytes; every object a chunk reads) and,
for the objects later read as merge parents or as final slots, a master — the copy plus a bf16
residual (2 bytes: the pair keeps 16 mantissa bits; float32 copies are their own masters). The
backward holds the copies, each master's gradient (4 bytes) and each object's gradient as a
copy (`s`), its peak. At most one copy per chunk has no master (a `Λ_c`), so
`copies ≤ masters + NC + 1`, and

    masters ≤ M = ⌊(budget/D − 2s·(NC + 1)) / (2s + 4)⌋,   objects ≤ M + NC + 1

(plus the `L` initial slots, which are `S0` itself). A head whose plan exceeds either takes the
dense path.

The rule
========
Per head: objects iff the plan fits the pool. Calls of at most one chunk (decode) take the dense
path by shapes alone: no plan. The rule once also asked that the object kernels' roofline be at
most the dense kernels'; on an H100 that ranking was wrong wherever the two disagreed — the masked
kernels run an order of magnitude below their tensor-core roofline (per-pair level masking on the
CUDA cores, two launches per pass), the object kernels much closer to theirs, so every head that
fits ran faster on objects (`perf/results/paths-h100.md`) — and counting the plan on the device
cost a sizeable share of the readout itself. The kernel counts stay for `perf.cost_model`'s
predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dla.ops.readout.plan import NONE, Plan, chunk_count

__all__ = ["Arch", "ARCHITECTURES", "H100_ROOFLINE", "arch_of", "Shapes", "plan_counts", "object_kernels",
           "dense_kernels", "shared_kernels", "segmentation_kernel", "roofline_s", "pool_capacity",
           "takes_objects", "decode_sized"]


@dataclass(frozen=True)
class Arch:
    name: str
    flops: float  # dense 16-bit tensor-core FLOP/s
    bandwidth: float  # DRAM bytes/s


# Datasheet peaks (dense, no sparsity). Matched by name; an unknown card falls back on its
# compute capability's first entry.
ARCHITECTURES = {
    "H200": (90, Arch("H200", 989e12, 4.8e12)),
    "H100 PCIe": (90, Arch("H100 PCIe", 756e12, 2.0e12)),
    "H100": (90, Arch("H100 SXM", 989e12, 3.35e12)),
    "A100": (80, Arch("A100 SXM", 312e12, 2.04e12)),
    "L40S": (89, Arch("L40S", 362e12, 0.864e12)),
}
# The reference card for the cost model: an H100 at the 800 TFLOP/s it reaches.
H100_ROOFLINE = Arch("H100 (800 TFLOP/s, 3.35 TB/s)", 800e12, 3.35e12)


def arch_of(device: torch.device) -> Arch:
    """The table's entry for a CUDA device (by name, then by compute capability); the H100 for
    the CPU (the interpreter's launches)."""
    if device.type != "cuda":
        return ARCHITECTURES["H100"][1]
    name = torch.cuda.get_device_name(device)
    for key, (_, arch) in ARCHITECTURES.items():
        if key in name:
            return arch
    major, minor = torch.cuda.get_device_capability(device)
    for cc, arch in ARCHITECTURES.values():
        if cc == 10 * major + minor:
            return arch
    return ARCHITECTURES["H100"][1]


@dataclass(frozen=True)
class Shapes:
    T: int
    K: int
    Dk: int
    Dv: int
    itemsize: int  # of q, k, v, λ
    C: int = 64  # the object path's chunk
    BT: int = 64  # the dense path's query tile
    BS: int = 32  # the dense path's key tile

    @property
    def D(self) -> int:
        return self.Dk * self.Dv

    @property
    def NC(self) -> int:
        return chunk_count(self.T, self.C)


def plan_counts(plan: Plan) -> dict[str, Tensor]:
    """The per-row counts the cost formulas take, float64 `[N]`, from the plan alone."""
    f = torch.float64
    read, new = plan.read, plan.new
    N, R, L = read.shape
    NC = R - 1
    ntok = (plan.starts[:, 1:] - plan.starts[:, :-1]).to(f)  # [N, NC]
    live = (read[:, :NC] >= 0).to(f)
    reads = (ntok[..., None] * live).sum((1, 2))
    ranks = torch.arange(L, device=read.device)
    lam = plan.lam_rank  # [N, R]
    lam_id = torch.gather(read.long(), 2, lam.clamp(min=0)[..., None])[..., 0]
    lam_id = torch.where(lam >= 0, lam_id, NONE)
    P = plan.master.shape[1]
    has_master = torch.gather(plan.master, 1, lam_id.clamp(min=0, max=P - 1)) >= 0
    lam_new = torch.gather(new, 2, lam.clamp(min=0)[..., None])[..., 0] & (lam >= 0)
    lam_nomaster = lam_new[:, :NC] & ~has_master[:, :NC]
    lam_tokens = (ntok * lam_nomaster.to(f)).sum(1)
    ids = read.long().clamp(min=0, max=P - 1)
    tok = (torch.gather(plan.tok_hi, 1, ids.reshape(N, -1)) > torch.gather(plan.tok_lo, 1, ids.reshape(N, -1)))
    with_tokens = (new.reshape(N, -1) & tok).sum(1).to(f)
    # parents of each new element, and which of them is Λ_{c−1} (held in the build's registers)
    lo = torch.gather(plan.par_lo, 1, ids.reshape(N, -1)).reshape(N, R, L).long()
    hi = torch.gather(plan.par_hi, 1, ids.reshape(N, -1)).reshape(N, R, L).long()
    prev_valid = torch.cat([torch.ones(N, 1, L, dtype=torch.bool, device=read.device), read[:, :-1] >= 0], 1)
    in_range = (ranks[None, None, None, :] >= lo[..., None]) & (ranks[None, None, None, :] <= hi[..., None])
    parents = in_range & prev_valid[:, :, None, :] & new[..., None]
    lam_prev = torch.cat([torch.full((N, 1), NONE, device=read.device, dtype=lam.dtype), lam[:, :-1]], 1)
    from_registers = parents & (ranks[None, None, None, :] == lam_prev[:, :, None, None])
    from_registers[:, 0] = False  # the first chunk builds from S0
    links = parents.sum((1, 2, 3)).to(f)
    links_memory = links - from_registers.sum((1, 2, 3)).to(f)
    final_new = new[:, NC].sum(1).to(f)
    final_live = (read[:, NC] >= 0).sum(1).to(f)
    readable = new[:, :NC].sum((1, 2)).to(f)
    initial_reads = (ntok[..., None] * ((read[:, :NC] >= 0) & (plan.first[:, :NC] < 0)).to(f)).sum((1, 2))
    initial_slots = (plan.read_lo[:, :L] < NC).sum(1).to(f)
    return {
        "created": plan.created.to(f), "copies": readable, "masters": plan.masters.to(f), "reads": reads,
        "with_tokens": with_tokens, "links": links, "links_memory": links_memory, "lam_tokens": lam_tokens,
        "final_masters": final_live - final_new, "chunks": (ntok > 0).sum(1).to(f), "initial_reads": initial_reads,
        "initial_slots": initial_slots,
    }


def _k(flops, bytes_) -> tuple:
    return (flops, bytes_)


def shared_kernels(s: Shapes) -> dict[str, tuple]:
    """Per row, what both paths run before the readout: G (float64 cumsum, hi/lo split) and the
    level map's running minimum; and in the backward the reverse cumsum of dG."""
    T, L = s.T, s.K
    return {"G": _k(0.0, T * (4 + 8 + 8)), "level running min": _k(0.0, T * L * 4 * 2),
            "dg cumsum": _k(0.0, T * (4 + 8 + 8 + 4))}


def segmentation_kernel(s: Shapes) -> dict[str, tuple]:
    """Per row: the `dla` boundary walk, merge scan and level-map fill (scores token/state)."""
    T, L, D = s.T, s.K, s.D
    flops = 2.0 * T * (s.C * (s.Dk + s.Dv) + 2 * D)
    bytes_ = T * (s.Dk + s.Dv) * s.itemsize + T * 8 + 2 * T * L * 4
    return {"segmentation": _k(flops, bytes_)}


def object_kernels(s: Shapes, n: dict) -> dict[str, tuple]:
    """Per row, the object path's kernels (forward + backward) from the plan's counts `n`
    (floats or `[N]` tensors)."""
    T, L, D, C, it = s.T, s.K, s.D, s.C, s.itemsize
    R = s.NC + 1
    lo = 2 if it < 4 else 0  # a master is its copy plus a bf16 residual (float32 copies are masters)
    kv_build = T * (s.Dk + s.Dv) * it  # the sibling tiles of a row read each chunk's k, v together
    rows = T * (L * it + L * 4 + 8)  # λ, the level rows' running minimum, G hi/lo
    qkvo = T * (2 * s.Dk + 2 * s.Dv) * it
    plan_bytes = R * L * 4 * 12 + (L + R * L) * 4 * 16
    build_flops = 2.0 * C * D * n["with_tokens"]
    build = kv_build + n["copies"] * D * it + n["links_memory"] * D * (it + lo)
    return {
        "plan": _k(0.0 * n["reads"], plan_bytes + 0.0 * n["reads"]),
        "build": _k(build_flops, build + n["masters"] * D * lo + n["final_masters"] * D * (it + lo) + L * D * 4),
        "chunk forward (band + objects)": _k(2.0 * T * C * (s.Dk + s.Dv) + 2.0 * D * n["reads"],
                                             qkvo + rows + n["copies"] * D * it),
        "build (backward)": _k(build_flops, build + n["links_memory"] * D * lo),
        "backward dS (objects)": _k(2.0 * D * (n["reads"] - n["lam_tokens"]),
                                    (n["masters"] + L) * D * 4 + T * (s.Dk + s.Dv) * it + rows),
        "pushdown": _k(2.0 * D * n["lam_tokens"],
                       n["masters"] * D * 4 + n["links_memory"] * 2 * D * 4 + n["with_tokens"] * D * it
                       + n["lam_tokens"] * (s.Dk + s.Dv + L * (it + 4) + 8)),
        "chunk backward (band + objects + tokens)": _k(
            2.0 * T * C * (4 * s.Dk + 3 * s.Dv) + 2.0 * D * n["reads"] + 4.0 * D * C * n["with_tokens"],
            qkvo + rows + T * (2 * s.Dk + s.Dv + L) * it + 8 * T + (n["copies"] + n["with_tokens"]) * D * it),
    }


def dense_kernels(s: Shapes, n: dict) -> dict[str, tuple]:
    """Per row, the masked quadratic kernels (forward + backward) for a head of `T` tokens; the
    initial slots' terms by `n["initial_reads"]` (token reads) and `n["initial_slots"]` (slots
    read at all: the dS0 kernel walks all tokens for each)."""
    T, L, D, it = s.T, s.K, s.D, s.itemsize
    pairs = 1.0 * T * (T + s.BT)
    rows = T * (L * it + L * 4 + 8)
    io = T * (s.Dk + s.Dk + s.Dv) * it
    init = n["initial_reads"]
    return {
        "masked forward": _k(pairs * (s.Dk + s.Dv) + 2.0 * D * init + 2.0 * T * D,
                             io + rows + T * s.Dv * (it + 8) + L * D * 4 * 2),
        "masked backward dq": _k(pairs * (2 * s.Dk + s.Dv) + 4.0 * D * init,
                                 io + T * s.Dv * it + rows + T * (s.Dk * (4 + it) + L * (4 + it) + 8)),
        "masked backward dkv": _k(1.0 * T * (T + s.BS) * (2 * s.Dk + 2 * s.Dv) + 4.0 * T * D,
                                  io + T * s.Dv * it + rows + T * (s.Dk + s.Dv) * (4 + it) + T * 16 + L * D * 4),
        "masked backward dS0": _k(2.0 * D * init, L * L * 4 + L * D * 4 * 3
                                  + n["initial_slots"] * T * (L * (4 + it) + (s.Dk + s.Dv) * it + 8)),
    }


def roofline_s(kernels: dict[str, tuple], arch: Arch):
    """Σ over kernels of max(flops / F, bytes / W), in seconds (floats or tensors)."""
    total = 0.0
    for flops, bytes_ in kernels.values():
        t_f, t_b = flops / arch.flops, bytes_ / arch.bandwidth
        if isinstance(t_f, Tensor) or isinstance(t_b, Tensor):
            f64 = torch.float64
            total = total + torch.maximum(torch.as_tensor(t_f, dtype=f64), torch.as_tensor(t_b, dtype=f64))
        else:
            total = total + max(t_f, t_b)
    return total


def pool_capacity(T: int, K: int, Dk: int, Dv: int, itemsize: int, C: int = 64) -> tuple[int, int]:
    """`(ids, masters)`: the pool bound of the module doc, initial slots included."""
    D, NC = Dk * Dv, chunk_count(T, C)
    budget = 2 * T * (2 * Dk + 2 * Dv) * itemsize + 2 * (NC + 1) * D * 4
    masters = max(0, (budget // D - 2 * itemsize * (NC + 1)) // (2 * itemsize + 4))
    return K + masters + NC + 1, K + masters


def decode_sized(T: int, C: int = 64) -> bool:
    """Calls of at most one chunk take the dense path from shapes alone (no plan)."""
    return T <= C


def takes_objects(plan: Plan) -> Tensor:
    """`[N]` bool on the plan's device: the plan fits the pool (module doc, "The rule")."""
    return ~plan.overflow
