"""Shared hypothesis strategies and input builders for the operator tests.

A drawn `Case` fixes shapes, policy, transition, score and a seed; `build` turns it into
tensors. Inputs are either Gaussian (almost every token a boundary) or piecewise-stationary
(few regimes plus small noise), so boundaries, in-block merges and capacity merges all occur.
The `drift` score compares the decayed backbone state step to step: it keeps opening slots at
regime changes only where the decay `g` makes the memory forget (`FORGETFUL`), and stops once
`S^g` has grown large without it.

Two designed inputs (`EXACT`, `designed_stream`) put decisions exactly on the rule's edges —
`I_t = τ` and merge densities that tie — with values every path computes exactly, so every
path must take the rule's side of the edge (`I_t ≥ τ` opens; ties merge the oldest pair) and
no margin filter applies to them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dla.ops.reference import multistate_attention_recurrent, segment_naive
from dla.ops.state import MultiStateCache
from dla.ops.validation import POLICIES, SCORES
from dla.run.synthetic import piecewise_stationary

TRANSITIONS = ("none", "g", "beta", "both")
EXACT = ("repeated", "alternating")  # designed inputs (`designed_stream`): decisions exactly on the rule's edges
EXACT_BETA = 1.0  # β of the designed inputs: `S^g` stays a small integer multiple of `k vᵀ`, exactly
DELTA = {torch.float64: 1e-9, torch.float32: 1e-4}  # SPEC §2 decision margins
GENTLE = (-0.5, 0.0)  # log-decay range: a long memory
FORGETFUL = (-1.2, -0.4)  # a memory of a few tokens, which a regime change moves under `drift`


@dataclass(frozen=True)
class Case:
    batch: int
    length: int
    heads: int
    dk: int
    dv: int
    levels: int
    policy: str
    transition: str
    score: str
    tau: float
    inputs: str  # "gaussian" | "piecewise" | one of EXACT
    mean_regime: float
    seed: int
    chunk_size: int = 4
    log_decay: tuple = GENTLE  # (lo, hi): g ~ U(lo, hi) where the transition has g

    @property
    def g(self) -> bool:
        return self.transition in ("g", "both")

    @property
    def beta(self) -> bool:
        return self.transition in ("beta", "both")


def fenwick_levels(length: int, offset: int = 0) -> int:
    return (offset + length - 1).bit_length() + 1


@st.composite
def cases(draw, policies=POLICIES, transitions=TRANSITIONS, scores=SCORES, max_length=24):
    policy = draw(st.sampled_from(policies))
    length = draw(st.integers(1, max_length))
    levels = draw(st.integers(2, 6))
    if policy == "fenwick":
        levels = max(levels, fenwick_levels(length))
    return Case(
        batch=draw(st.integers(1, 2)), length=length, heads=draw(st.integers(1, 2)),
        dk=draw(st.integers(1, 5)), dv=draw(st.integers(1, 4)), levels=levels, policy=policy,
        transition=draw(st.sampled_from(transitions)), score=draw(st.sampled_from(scores)),
        tau=draw(st.sampled_from([0.0, 0.3, 0.6, 0.6, 1.0])),
        inputs=draw(st.sampled_from(["gaussian", "piecewise", "piecewise"])),
        mean_regime=draw(st.sampled_from([2.0, 4.0, 8.0])), seed=draw(st.integers(0, 2**31 - 1)),
        chunk_size=draw(st.sampled_from([1, 3, 4, 8, 64])), log_decay=draw(st.sampled_from([GENTLE, FORGETFUL])),
    )


def build(case: Case, dtype=torch.float64) -> dict:
    """Tensors for `case`: q, k, v, lam and, by transition, g (≤ 0) and beta (in (0, 1)); with
    β the keys are l2-normalised, as Gated DeltaNet feeds them."""
    gen = torch.Generator().manual_seed(case.seed)
    B, T, H = case.batch, case.length, case.heads
    if case.inputs in EXACT:
        k, v = designed_stream(case.inputs, B, T, H, case.dk, case.dv, case.beta)
    elif case.inputs == "gaussian":
        k = torch.randn(B, T, H, case.dk, generator=gen, dtype=torch.float64)
        v = torch.randn(B, T, H, case.dv, generator=gen, dtype=torch.float64)
    else:
        k, v, _ = piecewise_stationary(B, T, H, case.dk, case.dv, mean_regime=case.mean_regime,
                                       noise=0.1, generator=gen, dtype=torch.float64)
    if case.beta:
        k = torch.nn.functional.normalize(k, dim=-1)
    tensors = {
        "q": torch.randn(B, T, H, case.dk, generator=gen, dtype=torch.float64),
        "k": k, "v": v,
        "lam": torch.rand(B, T, H, case.levels, generator=gen, dtype=torch.float64) + 0.1,
        "g": _uniform(case.log_decay, (B, T, H), gen) if case.g else None,
        "beta": torch.rand(B, T, H, generator=gen, dtype=torch.float64) * 0.9 + 0.05 if case.beta else None,
    }
    if case.inputs in EXACT:  # no decay and β = 1: the designed scores stay exact
        tensors["g"] = torch.zeros(B, T, H, dtype=torch.float64) if case.g else None
        tensors["beta"] = torch.full((B, T, H), EXACT_BETA, dtype=torch.float64) if case.beta else None
    return {name: (x.to(dtype) if x is not None else None) for name, x in tensors.items()}


def designed_stream(kind: str, B: int, T: int, H: int, dk: int, dv: int, beta: bool):
    """`k [B,T,H,dk]`, `v [B,T,H,dv]` (float64) of a designed input, for transitions with `g = 0`
    and, where `beta`, `β = EXACT_BETA`. Every key is `e₀`; the values are multiples of `e₀` by
    small dyadic numbers, so every product behind a score is exact on every path.

    * `"repeated"`: `v_t = e₀` at every step. The new content is parallel to the old under every
      score (`k vᵀ = Z` for a block of one token, `Z + k vᵀ = 2Z`, `S^g_t` a positive multiple of
      `S^g_{t−1}`), so `I_t = 0` exactly: at `τ = 0` every token opens a slot by equality, and all
      slots keep `I = 0`, so every capacity merge is an exact tie of zero densities.
    * `"alternating"`: `v_0 = e₀`, `v_t = (−1)^t c e₀` after it, `c = 2` without `β` and `2 − β = 1`
      with it: the backbone state alternates exactly, `S^g_t = −S^g_{t−1}`, and a token after a block
      of one token reverses it (`k vᵀ = −cZ`; under `state`, `Z + k vᵀ = −Z` at `t = 1` without
      `β`), so `I_t = 2` exactly there: at `τ = 2` those tokens open slots by equality."""
    k = torch.zeros(B, T, H, dk, dtype=torch.float64)
    k[..., 0] = 1.0
    v = torch.zeros(B, T, H, dv, dtype=torch.float64)
    if kind == "repeated":
        v[..., 0] = 1.0
    elif kind == "alternating":
        t = torch.arange(T)
        c = 2 - EXACT_BETA if beta else 2.0  # with β, S^g = ±β k e₀ᵀ: (1 − β)s − βc·sign(s) = −s
        v[..., 0] = torch.where(t == 0, 1.0, c * (-1.0) ** t)[None, :, None]
    else:
        raise ValueError(f"kind must be one of {EXACT}, got {kind!r}")
    return k, v


def _uniform(bounds: tuple, shape: tuple, gen: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return hi - (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)


def options(case: Case) -> dict:
    return dict(policy=case.policy, tau=case.tau, score=case.score, chunk_size=case.chunk_size)


def naive_segmentation(case: Case, t: dict, initial_state: MultiStateCache | None = None):
    """`segment_naive` of `case` on the tensors `t` that `build(case)` made."""
    return segment_naive(t["k"], t["v"], levels=case.levels, g=t["g"], beta=t["beta"], policy=case.policy,
                         tau=case.tau, score=case.score, initial_state=initial_state)


def well_conditioned(seg, dtype=torch.float64) -> bool:
    """SPEC §2: every decision clears its margin, so every path must take the same one."""
    delta = DELTA[dtype]
    return bool((seg.boundary_margin >= delta).all() and (seg.merge_margin >= delta).all())


def comparable(case: Case, seg, dtype=torch.float64) -> bool:
    """Whether every path must take `seg`'s decisions: a designed input (computed exactly on every
    path, so the rule's side of each edge) or a well-conditioned one."""
    return case.inputs in EXACT or well_conditioned(seg, dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm()
    err = (out.double() - ref).norm()
    return float(err / denom) if denom > 0 else float(err)


def random_cache(case: Case, seed: int, dtype=torch.float64) -> MultiStateCache:
    """A plausible non-empty cache for `case`'s policy, as a previous call would leave it."""
    warm = replace(case, length=5, seed=seed)
    t = build(warm, dtype)
    _, state = multistate_attention_recurrent(t["q"], t["k"], t["v"], t["lam"], g=t["g"], beta=t["beta"],
                                              output_final_state=True, **options(warm))
    return state


# I per slot: |I − I_ref| ≤ rtol·|I_ref| + atol·n. I_t = √(2 − 2cos) near cos = 1 turns cos's
# rounding ε into √ε per token (float32 ≈ 1e-3, float64 ≈ 5e-8); decisions built on I keep
# their margins (SPEC §2), only the summed value carries this noise.
I_TOL = {torch.float64: (1e-10, 1e-7), torch.float32: (1e-4, 1e-3)}


def information_close(I: torch.Tensor, ref_I: torch.Tensor, ref_n: torch.Tensor, dtype) -> bool:
    rtol, atol = I_TOL[dtype]
    err = (I.double() - ref_I.double()).abs()
    return bool((err <= rtol * ref_I.double().abs() + atol * ref_n.double()).all())


def decision_counts(seg) -> torch.Tensor:
    """[boundaries, in-block merges, capacity merges] of a `segment_naive` result: the drawn
    inputs must make all three happen (SPEC §6)."""
    return torch.stack([seg.boundaries.sum(), seg.absorbed.sum(), seg.capacity_merges.sum()])


def assert_draws_exercise_every_decision(strategy, **hypothesis_settings) -> None:
    """Boundaries, in-block merges and capacity merges all occur among the `dla` cases on
    piecewise-stationary inputs that `strategy` draws (with these hypothesis settings)."""
    events = torch.zeros(3, dtype=torch.long)

    @settings(database=None, **hypothesis_settings)
    @given(strategy)
    def draw(case):
        if case.policy != "dla" or case.inputs != "piecewise":
            return
        t = build(case)
        events.add_(decision_counts(naive_segmentation(case, t)))

    draw()
    assert (events > 0).all(), events


@contextlib.contextmanager
def poisoned_empty():
    """`torch.empty` returns NaN-filled floats (and extreme ints) inside the block, so a kernel's
    unwritten output shows."""
    real = torch.empty

    def empty(*size, **kw):
        x = real(*size, **kw)
        return x.fill_(float("nan")) if x.is_floating_point() else x.fill_(-(2**30))

    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = real
