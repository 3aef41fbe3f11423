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

A property test that claims decisions is decorated with `claims_decisions` and reports each
example with `tally_draw` (which names it in hypothesis' statistics with `event`): among its
generated `dla` draws (explicit `@example`s do not count) at least `WELL_SHARE` must clear the
margins and at least `MERGE_SHARE` of those compared must reach a capacity merge, asserted from
the same draws after hypothesis has run them (SPEC §6); and one compared `dla` example at least
must absorb a token into its open block. `dla` draws come from `decisive`, which makes capacity
merges the rule.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from hypothesis import event, example
from hypothesis import strategies as st
from hypothesis.control import current_build_context

from dla.ops.levels import EMPTY
from dla.ops.reference import multistate_attention_recurrent, segment_naive
from dla.ops.state import MultiStateCache
from dla.ops.validation import POLICIES, SCORES
from dla.run.synthetic import piecewise_stationary
from dla.testing import poisoned_empty, relative_error  # noqa: F401  the tests' aids, from here as before

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
def decisive(draw, score: str, max_length: int, min_length: int = 1, decay: bool = True) -> dict:
    """The fields of a `dla` draw that decide where the tests look (SPEC §6): capacity, length,
    inputs, mean regime, threshold and log-decay range such that the sequence opens more slots
    than the capacity in most draws. Per score, the inputs open a slot every few tokens — under
    `token` at each regime change, or almost everywhere on Gaussian inputs; under `state` and
    under `drift` without decay (`decay`: whether `g` is given) while the block or the state is
    still small, so at a low threshold into a small capacity (and on Gaussian inputs for
    `drift`, whose state a regime of similar tokens grows fastest); under `drift` with decay
    where the memory forgets (`FORGETFUL`). The length leaves room for more openings than
    slots: three tokens per slot on Gaussian inputs, two regimes' worth on piecewise ones
    (where `max_length` allows)."""
    few = score == "state" or (score == "drift" and not decay)  # slots open early in the call only
    inputs = draw(st.sampled_from(["gaussian"] if score == "drift" and not decay else ["gaussian", "piecewise"]))
    levels = draw(st.integers(2, max(2, min(3 if few else 5, max_length // 3))))
    long_regimes = inputs == "piecewise" and not few and max_length >= 8 * levels
    mean_regime = draw(st.sampled_from([2.0, 4.0])) if long_regimes else 2.0
    per_slot = 3 if inputs == "gaussian" else int(2 * mean_regime)
    length = draw(st.integers(min(max(min_length, per_slot * levels), max_length), max_length))
    if score == "token":
        taus = [0.0, 0.3, 0.6, 0.6, 1.0]
    elif few:
        taus = [0.0, 0.3, 0.3] if score == "state" else [0.3]
    else:
        taus = [0.3, 0.6]
    return dict(levels=levels, length=length, inputs=inputs, tau=draw(st.sampled_from(taus)), mean_regime=mean_regime,
                log_decay=FORGETFUL if score == "drift" else draw(st.sampled_from([GENTLE, FORGETFUL])))


@st.composite
def token_map_fields(draw, policy: str, max_length: int, initial: bool) -> dict:
    """The map fields of a readout test's draw under `token`: `decisive` for `dla`; for the closed
    forms any length and 2–6 levels, `fenwick` given enough for a `random_cache` before the call
    (`initial`), which leaves `step = 5`."""
    if policy == "dla":
        return draw(decisive("token", max_length))
    length = draw(st.integers(1, max_length))
    levels = draw(st.integers(2, 6))
    if policy == "fenwick":
        levels = max(levels, fenwick_levels(length, offset=5 if initial else 0))
    return dict(length=length, levels=levels, tau=0.6, inputs=draw(st.sampled_from(["gaussian", "piecewise"])),
                mean_regime=4.0)


def with_examples(draws):
    """Decorator: `@example` each of `draws` (explicit edge cases beside a strategy's own)."""
    def wrap(fn):
        for drawn in draws:
            fn = example(drawn)(fn)
        return fn
    return wrap


@st.composite
def cases(draw, policies=("dla", "dla", "fenwick", "single"), transitions=TRANSITIONS, scores=SCORES, max_length=24):
    """A `Case`; `dla` draws are `decisive`, the closed forms range over every length."""
    policy = draw(st.sampled_from(policies))
    score = draw(st.sampled_from(scores))
    transition = draw(st.sampled_from(transitions))
    if policy == "dla":
        fields = draw(decisive(score, max_length, decay=transition in ("g", "both")))
    else:
        length = draw(st.integers(1, max_length))
        levels = draw(st.integers(2, 6))
        fields = dict(length=length, levels=max(levels, fenwick_levels(length)) if policy == "fenwick" else levels,
                      tau=0.6, inputs=draw(st.sampled_from(["gaussian", "piecewise"])), mean_regime=4.0,
                      log_decay=draw(st.sampled_from([GENTLE, FORGETFUL])))
    # a scalar S^g (dk = dv = 1) makes every drift cosine ±1, where I's rounding is √ε; a rank-1 Z
    # under `state` can be cancelled by one token (tests/test_segment.py::seg_cases)
    low = 2 if score in ("drift", "state") else 1
    return Case(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=draw(st.integers(low, 5)),
        dv=draw(st.integers(low, 4)), policy=policy, transition=transition, score=score,
        seed=draw(st.integers(0, 2**31 - 1)), chunk_size=draw(st.sampled_from([1, 3, 4, 8, 64])), **fields,
    )


@st.composite
def kernel_cases(draw, max_length: int, transitions=("none", "g")):
    """A `Case` for the readout kernels' interpreter tests under the `token` score: `dla` draws
    are `decisive` (capacity merges in most draws), the closed forms any length; `dk, dv` the
    dot-sized 16 or 32."""
    policy = draw(st.sampled_from(["dla", "dla", "fenwick", "single"]))
    if policy == "dla":
        fields = draw(decisive("token", max_length))
    else:
        fields = dict(length=draw(st.integers(1, max_length)), levels=draw(st.integers(2, 6)), tau=0.6,
                      inputs=draw(st.sampled_from(["gaussian", "piecewise"])), mean_regime=4.0)
    return Case(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=draw(st.sampled_from([16, 32])),
        dv=draw(st.sampled_from([16, 32])), policy=policy, transition=draw(st.sampled_from(transitions)),
        score="token", seed=draw(st.integers(0, 2**31 - 1)), **fields,
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


class Decisions(NamedTuple):
    """`[B, H]` counts of the decisions a property test tallies (`segment_naive`'s result has both)."""

    capacity_merges: torch.Tensor  # steps that open a slot in a full cache (a pair merged first)
    absorbed: torch.Tensor  # tokens that join the open block (in-block merges)


def map_decisions(level_start: torch.Tensor, m0: torch.Tensor | None = None) -> Decisions:
    """The decisions that a `dla` level map `[B,T,H,K]` records after an initial cache of `m0 [B, H]`
    live slots (None: empty): a step opens a slot iff its level-0 segment starts at itself; it
    merged a pair first iff the live count stays; otherwise the token joined the open block."""
    B, T, H, _ = level_start.shape
    live = (level_start != EMPTY).sum(-1)  # [B, T, H]
    m0 = torch.zeros(B, H, dtype=live.dtype) if m0 is None else m0.to(live.dtype)
    before = torch.cat([m0[:, None, :], live[:, :-1]], 1)
    opens = level_start[..., 0] == torch.arange(T, device=level_start.device)[None, :, None]
    return Decisions((opens & (live == before)).sum(1), (~opens).sum(1))


MERGE_SHARE = 0.5  # of the compared `dla` draws of a property test reach a capacity merge
WELL_SHARE = 2 / 3  # of its `dla` draws clear the margins (the filter must not hollow the test out)


@dataclass
class DrawTally:
    """The generated `dla` draws of one property test: how many, how many were compared (passed
    the margin filter), and how many of those reached a capacity merge; and how many compared
    `dla` examples, explicit ones included, absorbed a token."""

    drawn: int = 0
    compared: int = 0
    merged: int = 0
    absorbing: int = 0


_TALLIES: list[DrawTally] = []  # the running `claims_decisions` tests, innermost last


def claims_decisions(merge_share: float = MERGE_SHARE, well_share: float = WELL_SHARE):
    """Decorator for a hypothesis test (outermost, above `@given` and `@settings`) whose examples
    call `tally_draw`: once hypothesis has run them all, at least `well_share` of the generated
    `dla` draws were compared and at least `merge_share` of those reached a capacity merge; and
    one compared `dla` example at least (an explicit one counts: a test of a handful of draws
    may draw only boundaries) absorbed a token into its open block."""

    def wrap(test):
        @functools.wraps(test)
        def run(*args, **kwargs):
            tally = DrawTally()
            _TALLIES.append(tally)
            try:
                test(*args, **kwargs)
            finally:
                _TALLIES.pop()
            assert tally.drawn > 0, "no dla draws: the test cannot show the decisions it claims"
            assert tally.compared >= well_share * tally.drawn, \
                f"{tally.compared} of {tally.drawn} dla draws well-conditioned, fewer than {well_share:.0%}"
            assert tally.merged >= merge_share * tally.compared, \
                f"{tally.merged} of {tally.compared} compared dla draws reach a capacity merge, " \
                f"fewer than {merge_share:.0%}"
            assert tally.absorbing > 0, "no compared dla example absorbs a token"

        return run

    return wrap


def tally_draw(policy: str, decisions, compared: bool = True) -> bool:
    """Count one example of the running `claims_decisions` test — its policy, its `decisions` (a
    `segment_naive` result or `Decisions`), whether it is compared — and name it in hypothesis'
    statistics (`event`). Explicit `@example`s count towards absorption only: the shares are
    the strategy's. Returns `compared`."""
    if not _TALLIES:
        raise RuntimeError("tally_draw outside a @claims_decisions test")
    merged = int(decisions.capacity_merges.sum()) > 0
    if policy != "dla":
        event(f"policy {policy}")
        return compared
    event("dla: ill-conditioned, not compared" if not compared else
          "dla: capacity merge" if merged else "dla: no capacity merge")
    tally = _TALLIES[-1]
    tally.absorbing += compared and int(decisions.absorbed.sum()) > 0
    if not current_build_context().is_final:  # explicit examples (and a failure's replay) run as the final one
        tally.drawn += 1
        tally.compared += compared
        tally.merged += compared and merged
    return compared
