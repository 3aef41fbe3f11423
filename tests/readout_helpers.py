"""What the Triton readout tests share: drawn cases turned into kernel arguments and oracles
(`setup`, `reference`), the interpreter/GPU device parameters, and the long synthetic level maps
and inputs of the GPU grids with their float64 torch references (`poisoned_empty` is
`tests.strategies`')."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from dla.ops.levels import EMPTY, encode_level_map
from dla.ops.reference import multistate_attention_materialized, segment_naive
from tests.strategies import Case, build, fenwick_levels, poisoned_empty, random_cache, relative_error

TOL32 = 1e-5  # SPEC §6, float32 with ieee dots
GRADS = ("q", "k", "v", "lam", "g")

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = [  # CPU tensors run through the interpreter; on a GPU machine the same tests run on CUDA
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETING, reason="CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        INTERPRETING or not torch.cuda.is_available(), reason="needs CUDA (and the interpreter off)")]),
]


def to_rank_order(S_oldest: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Oldest-first slots [B,H,K,Dk,Dv] with m live → rank order (rank r = slot m−1−r, zero
    beyond m)."""
    K = S_oldest.shape[2]
    r = torch.arange(K, device=m.device)
    idx = (m[..., None] - 1 - r).clamp(min=0)
    S = torch.gather(S_oldest, 2, idx[..., None, None].expand_as(S_oldest))
    return torch.where((r < m[..., None])[..., None, None], S, torch.zeros((), dtype=S.dtype))


def setup(case: Case, initial: bool):
    """float64 inputs, the initial cache (Gaussian states in its live, non-empty slots) or None,
    the encoded level map, `S0` in rank order, the mask of live non-empty initial slots and the
    call's `step [B]` (the cache's, else 0)."""
    if case.policy == "fenwick":
        case = replace(case, levels=max(case.levels, fenwick_levels(case.length, 5 if initial else 0)))
    t = build(case)
    B, H, K = case.batch, case.heads, case.levels
    state = None
    m0 = torch.zeros(B, H, dtype=torch.int64)
    live = torch.zeros(B, H, K, dtype=torch.bool)
    if initial:
        state = random_cache(case, seed=case.seed + 1)
        gen = torch.Generator().manual_seed(case.seed + 2)
        slots = (torch.arange(K) < state.m[..., None]) & (state.n > 0)
        S = torch.randn(state.S.shape, generator=gen, dtype=torch.float64)
        state = state._replace(S=torch.where(slots[..., None, None], S, 0.0))
        m0 = state.m
        live = to_rank_order(slots[..., None, None].double(), m0)[..., 0, 0] > 0
    seg = segment_naive(t["k"], t["v"], levels=K, policy=case.policy, tau=case.tau, score=case.score,
                        initial_state=state)
    level_start = encode_level_map(seg.level, seg.initial_level, m0)
    if state is not None:
        S0 = to_rank_order(state.S, m0)
    else:
        S0 = torch.zeros(B, H, K, case.dk, case.dv, dtype=torch.float64)
    step = state.step if state is not None else torch.zeros(B, dtype=torch.int64)
    return case, t, state, level_start, S0, live, step


def reference(case: Case, t: dict, state, *, grads=None):
    """Materialized `(o, S in rank order)`, with β where the case has it; with `grads = (do,
    dS)` also the gradients of `⟨o, do⟩ + ⟨S, dS⟩` by autograd, keyed like `GRADS` (and
    `"beta"`) plus `"S0"` (rank order)."""
    leaves = {n: (x.clone().requires_grad_(grads is not None) if x is not None else None) for n, x in t.items()}
    if state is not None and grads is not None:
        state = state._replace(S=state.S.clone().requires_grad_(True))
    o, final = multistate_attention_materialized(
        leaves["q"], leaves["k"], leaves["v"], leaves["lam"], g=leaves["g"], beta=leaves.get("beta"),
        policy=case.policy, tau=case.tau, score=case.score, initial_state=state, output_final_state=True)
    S = to_rank_order(final.S, final.m)
    if grads is None:
        return o.detach(), S.detach()
    do, dS = grads
    names = [n for n in (*GRADS, "beta") if leaves.get(n) is not None]
    wrt = [leaves[n] for n in names] + ([state.S] if state is not None else [])
    out = torch.autograd.grad((o * do).sum() + (S * dS).sum(), wrt)
    result = dict(zip(names, out))
    if state is not None:
        result["S0"] = to_rank_order(out[-1], state.m)
    return result


def f32(x, device="cpu"):
    return None if x is None else x.to(device=device, dtype=torch.float32)


def triton_args(case: Case, t: dict, level_start, S0, device="cpu"):
    """The launchers' arguments `(q, k, v, lam, g, beta, level_start, S0, scale, chunk_size)` in
    float32, β None where the case has none."""
    return (*(f32(t.get(n), device) for n in ("q", "k", "v", "lam", "g", "beta")), level_start.to(device),
            f32(S0, device), case.dk**-0.5, 16)


def cotangents(case: Case, S0):
    """`(do, dS)` drawn from the case's seed, float64."""
    gen = torch.Generator().manual_seed(case.seed + 3)
    do = torch.randn(case.batch, case.length, case.heads, case.dv, generator=gen, dtype=torch.float64)
    return do, torch.randn(S0.shape, generator=gen, dtype=torch.float64)


def cpu(xs):
    return [x.cpu() if x is not None else None for x in xs]


# --------------------------------------------------------------------------------------------
# Synthetic level maps and inputs of the GPU grids
# --------------------------------------------------------------------------------------------


def fenwick_map(B: int, T: int, H: int, K: int, device="cpu") -> torch.Tensor:
    """Closed-form fenwick map from position 0: level r ≥ 1 holds the s with bitlen(t ⊕ s) = r,
    i.e. [(t ≫ r) ≪ r, …) when bit r − 1 of t is set."""
    t = torch.arange(T, device=device)[:, None]
    r = torch.arange(K, device=device)[None, :]
    rm1 = (r - 1).clamp(min=0)
    start = torch.where(r == 0, t, torch.where(((t >> rm1) & 1) == 1, (t >> r) << r, EMPTY))
    return start.to(torch.int32)[None, :, None, :].expand(B, T, H, K).contiguous()


def single_map(B: int, T: int, H: int, K: int, initial: bool, device="cpu") -> torch.Tensor:
    start = torch.full((B, T, H, K), EMPTY, dtype=torch.int32, device=device)
    start[..., 0] = -1 if initial else 0
    return start


def dla_map(B: int, T: int, H: int, K: int, m0: int, p_boundary: float, seed: int) -> torch.Tensor:
    """A random `dla`-like map: a boundary opens a slot with probability `p_boundary` (always on
    an empty cache), a full cache first merges a random adjacent pair; `m0` initial slots."""
    gen = torch.Generator().manual_seed(seed)
    N = B * H
    idx = torch.arange(K)
    starts = torch.where(idx < m0, -1 - idx, EMPTY).expand(N, K).clone()  # rank order
    m = torch.full((N,), m0)
    rows = torch.empty(T, N, K, dtype=torch.int64)
    for t in range(T):
        boundary = (torch.rand(N, generator=gen) < p_boundary) | (m == 0)
        full = boundary & (m == K)
        j = (torch.rand(N, generator=gen) * (K - 1)).long()  # merge ranks j (newer) and j + 1
        merged = torch.where(idx < j[:, None], starts, torch.cat([starts[:, 1:], starts[:, -1:]], 1))
        starts = torch.where(full[:, None], merged, starts)
        shifted = torch.cat([torch.full((N, 1), t), starts[:, :-1]], 1)
        starts = torch.where(boundary[:, None], shifted, starts)
        m = m + boundary.long() - full.long()
        rows[t] = starts
    return rows.view(T, B, H, K).permute(1, 0, 2, 3).to(torch.int32).contiguous()


def gpu_inputs(policy, T, Dk, Dv, K, has_g, initial, B=1, H=2, seed=0, with_beta=False, dev="cuda",
               p_boundary=1 / 16):
    """float64 inputs of the GPU grids, the synthetic level map and S0, on `dev`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    lam = torch.rand(B, T, H, K, generator=gen, dtype=torch.float64) + 0.1
    g = -0.5 * torch.rand(B, T, H, generator=gen, dtype=torch.float64) if has_g else None
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05 if with_beta else None
    m0 = min(3, K) if initial and policy == "dla" else int(initial)
    if policy == "dla":
        ls = dla_map(B, T, H, K, m0, p_boundary, seed)
    elif policy == "fenwick":
        ls = fenwick_map(B, T, H, K)
    else:
        ls = single_map(B, T, H, K, initial)
    S0 = torch.randn(B, H, K, Dk, Dv, generator=gen, dtype=torch.float64) * (torch.arange(K) < m0)[:, None, None]
    t = dict(q=q, k=k, v=v, lam=lam, g=g, **({"beta": beta} if with_beta else {}))
    return {n: (x.to(dev) if x is not None else None) for n, x in t.items()}, ls.to(dev), S0.to(dev)


def cast(t: dict, dtype):
    """q, k, v, λ in `dtype`, g and β in float32 (as gates usually are)."""
    return {n: None if x is None else x.float() if n in ("g", "beta") else x.to(dtype) for n, x in t.items()}


def assert_matches_float64(forward_triton, backward_triton, x: dict, do_x, dS, ls, S0, scale, step=None):
    """A Triton readout's forward and backward against the CPU stage's torch kernels (objects
    without β, the chunked form with β) run in float64 on the same device and the same (rounded)
    inputs `x` (q, k, v, λ, g, β; g/β may be None): float32 within TOL32; 16-bit inputs within
    2e-2 and at most twice the error of the same torch kernel run on the 16-bit inputs (SPEC §6),
    whose outputs are rounded to the inputs' dtype like ours."""
    from dla.ops.readout.chunked import chunked_backward, chunked_forward
    from dla.ops.readout.objects import objects_backward, objects_forward

    x = {"beta": None, **x}
    step = torch.zeros(x["q"].shape[0], dtype=torch.int64, device=x["q"].device) if step is None else step

    def torch_forward(q, k, v, lam, g, beta, ls, S0):
        if beta is not None:
            return chunked_forward(q, k, v, lam, g, beta, ls, S0, scale, 64)
        return objects_forward(q, k, v, lam, g, ls, S0, scale, 64, step)

    def torch_backward(do, dS, q, k, v, lam, g, beta, ls, S0):
        if beta is not None:
            return chunked_backward(do, dS, q, k, v, lam, g, beta, ls, S0, scale, 64)
        dq, dk, dv, dlam, dg, dS0 = objects_backward(do, dS, q, k, v, lam, g, ls, S0, scale, 64, step)
        return dq, dk, dv, dlam, dg, None, dS0

    x64 = {n: (v.double() if v is not None else None) for n, v in x.items()}
    ref_args = (x64["q"], x64["k"], x64["v"], x64["lam"], x64["g"], x64["beta"], ls, S0)
    o_ref, S_ref = torch_forward(*ref_args)
    grads_ref = torch_backward(do_x.double(), dS, *ref_args)
    args = (x["q"], x["k"], x["v"], x["lam"], x["g"], x["beta"], ls, S0.float())
    with poisoned_empty():
        o, S = forward_triton(*args)
        grads = backward_triton(do_x, dS.float(), *args)
    names = ("dq", "dk", "dv", "dlam", "dg", "dbeta", "dS0")
    absent = {n for n, gate in (("dg", "g"), ("dbeta", "beta")) if x[gate] is None}
    outs = dict(o=(o, o_ref), S=(S, S_ref))
    outs.update({n: (a, b) for n, a, b in zip(names, grads, grads_ref) if n not in absent})
    if x["q"].dtype == torch.float32:
        for name, (a, b) in outs.items():
            assert torch.isfinite(a).all(), name
            assert relative_error(a, b) <= TOL32, (name, relative_error(a, b))
        return
    o_t, S_t = torch_forward(*args)
    grads_t = torch_backward(do_x, dS.float(), *args)
    torch_outs = dict(o=o_t, S=S_t, **dict(zip(names, grads_t)))
    for name, (a, b) in outs.items():
        assert torch.isfinite(a).all(), name
        err, err_torch = relative_error(a, b), relative_error(torch_outs[name], b)
        assert err <= 2e-2, (name, err, "torch path at this dtype:", err_torch)
        if a.dtype == torch.bfloat16:  # float32 outputs (S, dg, dβ, dS0) are held to 2e-2 only
            assert err <= 2 * err_torch, (name, err, err_torch)
