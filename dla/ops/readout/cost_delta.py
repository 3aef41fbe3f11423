r"""What the readout with `β` by windows costs (`objects_delta.py`), kernel by kernel, from the plan
it consumes (`objects_delta.window_plan`), and the window `R` that the cost model picks.

Counts per row
==============
`window_counts(plan)` gives, per `(b, h)` row (float64 `[N]`, on the plan's device, no host
read), with `n_w = |P_w|` the objects of window `w` (the elements of the partition at its start)
and `j_c` the position of chunk `c` inside its window (0 for the window's first chunk):

    tokens, chunks, windows
    reads     = Σ_w tokens(w) · n_w                  (object reads: Dk·Dv each)
    steps     = Σ_c tokens(c) · j_c                  (transport steps back to the window's frame)
    objects   = Σ_w n_w                              (objects held, once per window)
    reframes  = Σ_w #{E' ∈ P_{w+1} holding an element of P_w}   (the last one: the final state)

Kernels (forward + backward), multiply-adds ×2 = FLOPs
=======================================================
`D = Dk·Dv`, `s` the inputs' itemsize; per-token terms at `Dk = Dv = 128`, `C = 64` in brackets.

    window products    per chunk: the UT solve and Ē (2C²Dk + C³/3), the suffix products
                       K̃ = Suf Ē and Suf ← γ_C Suf − K̃ H (2·Dk²·C) [2Dk² = 33K];
                       reads k, β, g; writes Ē and K̃ (float32) and Suf_F per window (float32)
    object pass        reframes·Dk²·Dv + tokens·D (the token parts Σ K̃_s v_sᵀ), sequential over
                       windows; float32 masters read and written, a copy in the inputs' dtype
    readout            per chunk the UT algebra of its own chunk (4C²Dk + C²Dv + C³);
                       per transport step and query C·(2Dk + Dv) [24.6K] (scores q̃Ē, the WY step
                       (q̃Ē)H, the band's (scores ⊙ Λ)V); reads·D; every object read once per
                       window (the window's chunks share it in L2)
    (backward) window products and object pass recomputed as above (nothing of size T·K·D saved)
    readout backward   per window (one program walks its chunks): the chain again (2C·Dk per step),
                       its adjoint C·(4Dk + 2Dv) per step, U = dÕ S̄ᵀ and D = Σ ω q̃ dÕᵀ (2·reads·D),
                       the own chunk's UT backward (≈ 8C²Dk + 3C³); D written per window (float32)
    object pass backward   reverse over windows: Sufᵀ D' and dSuf = D'(ΣS̄)ᵀ (2·reframes·Dk²·Dv),
                       dK̃ = D' v and dv += D'ᵀ K̃ (2·tokens·D)
    window products backward   the suffix chain again and its adjoint (6·Dk²·C per chunk) and the
                       UT backward of Ē (≈ 4C²Dk + C³)

Bytes count each tensor a kernel touches once (DRAM): inputs in their dtype, λ and the level
rows (`L·(s + 4)` per token), float32 intermediates at 4 bytes.

The window
==========
`R` trades re-framing (`n·Dk²·Dv` per window, falling as `1/R`) against transport (`(R − 1)/2`
steps per query, rising with `R`). `window_for(…)` takes the `R` (a power of two, at most the
chunks of the call) with the least roofline time on the given card, from shapes alone: `n_w = K`
objects and `K` re-framings per window (the most a plan can hold), so the choice needs no count
and no host read (decode and CUDA graphs); `cost_delta.window_counts` at that `R` then gives the
call's figures.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dla.ops.readout.objects_delta import WindowPlan

__all__ = ["window_counts", "delta_kernels", "worst_counts", "roofline_s", "window_for", "WINDOWS"]

WINDOWS = (1, 2, 4, 8, 16, 32)


def window_counts(plan: WindowPlan) -> dict[str, Tensor]:
    """The per-row counts of the module doc, float64 `[N]`."""
    f = torch.float64
    N, W1, L = plan.first.shape
    B = plan.chunk_starts.shape[0]
    H = N // B
    cs, ws = plan.chunk_starts, plan.window_starts  # [B, NC + 1], [B, NW + 1]
    ntok = (cs[:, 1:] - cs[:, :-1]).to(f)  # [B, NC]
    window = torch.searchsorted(ws.contiguous(), cs[:, :-1].contiguous(), right=True) - 1  # [B, NC]
    first_chunk = torch.searchsorted(cs.contiguous(), torch.gather(ws, 1, window.clamp(max=ws.shape[1] - 1)),
                                     right=False)
    position = (torch.arange(cs.shape[1] - 1, device=cs.device) - first_chunk).to(f)
    wtok = (ws[:, 1:] - ws[:, :-1]).to(f)  # [B, NW]
    valid = plan.first <= plan.last  # [N, NW + 1, L]
    n_w = valid.sum(-1).to(f)  # [N, NW + 1]
    a, e = plan.first, plan.last
    holds = ((a[:, 1:, :, None] <= a[:, :-1, None, :]) & (e[:, :-1, None, :] <= e[:, 1:, :, None])
             & valid[:, :-1, None, :] & valid[:, 1:, :, None]).any(-1)  # [N, NW, L]
    live = wtok > 0  # window slots holding tokens

    def per_row(x: Tensor) -> Tensor:  # [B, …] → [N, …]
        return x.repeat_interleave(H, 0)

    return {
        "tokens": per_row(ntok.sum(1)),
        "chunks": per_row((ntok > 0).sum(1).to(f)),
        "windows": per_row(live.sum(1).to(f)),
        "reads": (per_row(wtok) * n_w[:, :-1]).sum(1),
        "steps": per_row((ntok * position).sum(1)),
        "objects": (n_w[:, :-1] * per_row(live).to(f)).sum(1),
        "reframes": (holds.sum(-1).to(f) * per_row(live).to(f)).sum(1),
    }


def worst_counts(T: int, K: int, C: int, R: int) -> dict[str, float]:
    """The counts of a call of `T` tokens from step 0 with every window holding `K` objects."""
    chunks = -(-T // C)
    windows = -(-chunks // R)
    steps = 0.0
    for c in range(chunks):
        steps += min(C, T - c * C) * (c % R)
    return {"tokens": float(T), "chunks": float(chunks), "windows": float(windows), "reads": float(T * K),
            "steps": steps, "objects": float(windows * K), "reframes": float(windows * K)}


def delta_kernels(n: dict, Dk: int, Dv: int, L: int, itemsize: int, C: int) -> dict[str, tuple]:
    """Per row, `{kernel: (flops, bytes)}` of the module doc from the counts `n` (floats or `[N]`
    tensors)."""
    D, s = Dk * Dv, itemsize
    T, NC, NW = n["tokens"], n["chunks"], n["windows"]
    ut = 2 * C * C * Dk + C**3 / 3  # KKᵀ, the solve, Ē = Kρᵀ M: per chunk
    rows = T * (L * (s + 4) + 8)  # λ, the level rows, G
    qkv = T * (2 * Dk + Dv) * s
    products = (2.0 * (NC * ut + 2 * Dk * Dk * T),
                T * (Dk * s + 8) + T * Dk * 4 * 2 + NW * Dk * Dk * 4)
    object_pass = (2.0 * (n["reframes"] * Dk * D + T * D),
                   (n["objects"] + n["reframes"]) * D * 4 + n["reframes"] * D * s + NW * Dk * Dk * 4
                   + T * (Dk * 4 + Dv * s) + L * D * 4)
    step = C * (2 * Dk + Dv)
    readout = (2.0 * (NC * (4 * C * C * Dk + C * C * Dv + C**3) + n["steps"] * step + n["reads"] * D),
               qkv + rows + T * (Dv * s + Dk * 4 + 8) + n["objects"] * D * s)
    readout_bwd = (2.0 * (NC * (8 * C * C * Dk + 3 * C**3) + n["steps"] * C * (6 * Dk + 2 * Dv) + 2 * n["reads"] * D),
                   qkv + rows + T * Dv * s * 2 + T * (2 * Dk + Dv + L) * s + T * (Dk * 4 * 3 + 16)
                   + n["objects"] * D * (s + 4))
    object_bwd = (2.0 * (2 * n["reframes"] * Dk * D + 2 * T * D),
                  (n["objects"] + n["reframes"]) * D * 4 * 2 + NW * Dk * Dk * 4 * 2 + T * (Dk * 4 * 2 + Dv * s * 2))
    products_bwd = (2.0 * (NC * (4 * C * C * Dk + C**3) + 6 * Dk * Dk * T),
                    T * (Dk * s * 2 + 16) + T * Dk * 4 * 4 + NW * Dk * Dk * 4 * 2)
    return {
        "window products": products,
        "object pass": object_pass,
        "readout (objects + band)": readout,
        "window products (recomputed)": products,
        "object pass (recomputed)": object_pass,
        "readout backward": readout_bwd,
        "object pass backward": object_bwd,
        "window products backward": products_bwd,
    }


def roofline_s(kernels: dict[str, tuple], flops_per_s: float, bytes_per_s: float):
    """Σ over kernels of max(flops / F, bytes / W), in seconds (floats or tensors)."""
    total = 0.0
    for flops, bytes_ in kernels.values():
        t_f, t_b = flops / flops_per_s, bytes_ / bytes_per_s
        if isinstance(t_f, Tensor) or isinstance(t_b, Tensor):
            total = total + torch.maximum(torch.as_tensor(t_f, dtype=torch.float64),
                                          torch.as_tensor(t_b, dtype=torch.float64))
        else:
            total = total + max(t_f, t_b)
    return total


def window_for(T: int, K: int, Dk: int, Dv: int, itemsize: int, C: int, flops_per_s: float,
               bytes_per_s: float) -> int:
    """The `R` of `WINDOWS` (at most the call's chunks) with the least roofline time at the
    worst-case counts (module doc): a pure function of the shapes and the card's two peaks."""
    chunks = max(1, -(-T // C))
    best, best_t = 1, float("inf")
    for R in WINDOWS:
        if R > 1 and R // 2 >= chunks:
            break
        t = roofline_s(delta_kernels(worst_counts(T, K, C, R), Dk, Dv, K, itemsize, C), flops_per_s, bytes_per_s)
        if t < best_t:
            best, best_t = R, t
    return best
