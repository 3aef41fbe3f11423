r"""Reference workloads for the CPU regression ratios (perf/test_cpu_regression.py): plain torch,
frozen, and independent of `dla`, so a slowdown of `dla` moves a ratio while the machine's own
speed (its load, its clock, its cache pressure) moves numerator and denominator alike. Each one
imitates the operation mix of the `dla` code it is set against, at the same shapes.

`chunked_multistate(q, k, v, lam, g, C)` — imitates the chunked readout (`dla/ops/readout/chunked.py`):
`q, k [N,T,Dk]`, `v [N,T,Dv]`, `lam [N,T,K]`, `g [N,T]`, `K` states `S [N,K,Dk,Dv]` from zero,
chunks of `C` tokens, chunk-local `G = cumsum(g)`, `Γ[t,s] = exp(G_t − G_s)` (`s ≤ t`):

    o_c  = ((Q Kᵀ ⊙ Γ) ⊙ λ[:, :, 0]) V  +  X [S_0; …; S_{K−1}],   X[t, r] = λ_t[r] · exp(G_t) q_t
    S_r ← exp(G_C) S_r  +  [r = c mod K] · Kᵀ diag(exp(G_C − G)) V

(a static level map: chunk `c` is written to state `c mod K`). `chunked_multistate_fwd_bwd` runs
it forward and backward through autograd — the same GEMM sizes as the readout's forward and its
written-out backward, `C×Dk×C`, `C×K·Dk×Dv` and `Dk×C×Dv` per chunk.

`token_scan(k, v, C, tau)` — imitates the sequential part of the `dla` segmentation
(`dla/ops/segment/cpu.py`): per chunk a Gram `(K Kᵀ) ⊙ (V Vᵀ)` (strictly lower) with suffix sums
and the open block's content `Z` brought in by `rowsum((K Z) ⊙ V)`, then per token a handful of `[N]`-vector ops (look up `c_t`, the cosine score
`I_t = √max(0, 2 − 2 c_t / √(ss_t · zz))`, a threshold `I_t ≥ τ` tested on the host, and the
running `zz` and `I` updated or restarted where a block opens), and `Z` carried to the chunk
end by one masked GEMM. Its cost is dominated by
per-op dispatch, like the scan's.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12


def chunked_multistate(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, g: Tensor, C: int) -> Tensor:
    N, T, Dk = q.shape
    Dv, K = v.shape[-1], lam.shape[-1]
    S = q.new_zeros(N, K, Dk, Dv)
    slots = torch.arange(K)
    outs = []
    for ci, c0 in enumerate(range(0, T, C)):
        qc, kc, vc, lc, gc = (x[:, c0:c0 + C] for x in (q, k, v, lam, g))
        Cc = qc.shape[1]
        G = gc.cumsum(1)
        upper = torch.ones(Cc, Cc, dtype=torch.bool).triu(1)
        gamma = torch.exp((G[:, :, None] - G[:, None, :]).masked_fill(upper, float("-inf")))
        A = (qc @ kc.mT) * gamma * lc[..., :1]
        X = (lc[..., None] * (qc * G.exp()[..., None])[:, :, None, :]).reshape(N, Cc, K * Dk)
        outs.append(A @ vc + X @ S.reshape(N, K * Dk, Dv))
        GC = G[:, -1]
        update = (kc * torch.exp(GC[:, None] - G)[..., None]).mT @ vc  # [N, Dk, Dv]
        mine = (slots == ci % K).to(q.dtype)[None, :, None, None]
        S = S * GC.exp()[:, None, None, None] + mine * update[:, None]
    return torch.cat(outs, 1)


def chunked_multistate_fwd_bwd(t: dict, C: int) -> None:
    """Forward and backward of `chunked_multistate` on head-major inputs `t` (see
    `head_major`); gradients for `q, k, v, lam, g`."""
    xs = {n: x.detach().requires_grad_() for n, x in t.items()}
    o = chunked_multistate(xs["q"], xs["k"], xs["v"], xs["lam"], xs["g"], C)
    o.backward(t["do"])


def head_major(t: dict, do: Tensor) -> dict:
    """`[B,T,H,…]` layer inputs (perf/inputs.py) and an output gradient → `[B·H,T,…]`."""
    def hm(x):
        B, T, H = x.shape[:3]
        return x.transpose(1, 2).reshape(B * H, T, *x.shape[3:]).contiguous()

    return {"q": hm(t["q"]), "k": hm(t["k"]), "v": hm(t["v"]), "lam": hm(t["lam"]), "g": hm(t["g"]), "do": hm(do)}


@torch.no_grad()
def token_scan(k: Tensor, v: Tensor, C: int, tau: float) -> Tensor:
    """`k [N,T,Dk]`, `v [N,T,Dv]` → the number of blocks opened per row `[N]`."""
    N, T, _ = k.shape
    rows = torch.arange(N)
    zz = torch.ones(N, dtype=k.dtype)
    info_sum = torch.zeros(N, dtype=k.dtype)
    opened = torch.zeros(N, dtype=torch.int64)
    start = torch.zeros(N, dtype=torch.int64)
    two = torch.full((N,), 2.0, dtype=k.dtype)
    Z = k.new_zeros(N, k.shape[-1], v.shape[-1])
    for c0 in range(0, T, C):
        kc, vc = k[:, c0:c0 + C], v[:, c0:c0 + C]
        Cc = kc.shape[1]
        gram = ((kc @ kc.mT) * (vc @ vc.mT)).tril(-1)
        suf = gram.flip(-1).cumsum(-1).flip(-1)
        suf[:, :, 0] += ((kc @ Z) * vc).sum(-1) * (start < c0)[:, None]  # the block open at c0
        suf = suf.reshape(-1)
        ss = ((kc * kc).sum(-1) * (vc * vc).sum(-1)).T.contiguous()  # [Cc, N]
        base = rows * (Cc * Cc)
        for j in range(Cc):
            c = suf.take(base + j * Cc + (start - c0).clamp(min=0, max=Cc - 1))
            s = ss[j]
            denom = (s * zz).clamp_(min=0).sqrt_().clamp_(min=EPS)
            info = torch.addcdiv(two, c, denom, value=-2).clamp_(min=0).sqrt_()
            opens = info >= tau
            if not bool(opens.any()):
                info_sum.add_(info)
                zz.add_(c, alpha=2).add_(s)
                continue
            info_sum = torch.where(opens, info, info_sum + info)
            zz = torch.where(opens, s, torch.add(zz, c, alpha=2).add_(s))
            start = start.masked_fill(opens, c0 + j)
            opened = opened + opens
        in_block = (torch.arange(c0, c0 + Cc)[None, :] >= start[:, None]).to(k.dtype)
        Z = torch.baddbmm(Z.masked_fill((start >= c0)[:, None, None], 0.0), (kc * in_block[..., None]).mT, vc)
    return opened
