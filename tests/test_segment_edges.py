"""Decisions exactly on the rule's edges (SPEC §2): a score equal to `τ` opens a slot
(`I_t ≥ τ`), and of merge densities that tie the oldest pair merges. The property tests keep
margins around every decision, so they cannot see either edge; here every kernel that segments
— the CPU kernel, and the Triton kernels through `dla.testing.triton_interpreter()` — meets
them under every score, through the `dla::segment` op, against the oracle `segment_naive`.

The inputs are designed (`tests.strategies.designed_stream`) so that every path computes the
edge exactly: small integer multiples of one key and value, no decay, `β = 1`. `"repeated"`
makes every score exactly 0 (at `τ = 0`: every token opens by equality, and every capacity
merge is a tie of zero densities), `"alternating"` makes it exactly 2 (at `τ = 2`). The tie of
the issue that found the gap — `K = 3` slots of `n = 2`, `I = 0.5` each — is its own case."""

from __future__ import annotations

import pytest
import torch

from dla.ops.levels import encode_level_map
from dla.ops.reference import multistate_attention_recurrent, segment_naive
from dla.ops.state import empty_cache, state_dtype
from dla.ops.validation import SCORES
from dla.testing import triton_interpreter
from tests.strategies import TRANSITIONS, designed_stream, information_close, relative_error

K, T, WARM, D = 3, 20, 3, 16  # T beyond the Triton walk's chunk of 16: a block carried across chunks
KERNELS = ("cpu", "triton")
# the Triton kernels read g and β through the same code whether one or both are given
KERNEL_TRANSITIONS = [("cpu", tr) for tr in TRANSITIONS] + [("triton", tr) for tr in ("none", "both")]


def segment_op(kernel: str, k, v, g, beta, state, tau: float, score: str, levels: int = K):
    """`dla::segment` on CPU tensors: the CPU kernel, or the Triton kernels interpreted."""
    args = (k, v, g, beta, state.S, state.n, state.I, state.m, state.Z, state.zz, state.N, state.step, levels,
            "dla", score, tau, 16)
    if kernel == "triton":
        with triton_interpreter():
            return torch.ops.dla.segment(*args)
    return torch.ops.dla.segment(*args)


def designed(kind: str, transition: str, warm: int, dtype):
    """The call's `k, v, g, beta` in `dtype` and the cache that `warm` earlier tokens of the same
    designed stream left (the recurrent reference's, in the state dtype)."""
    has_g, has_beta = transition in ("g", "both"), transition in ("beta", "both")
    k, v = designed_stream(kind, 1, warm + T, 2, D, D, has_beta)
    g = torch.zeros(1, warm + T, 2, dtype=torch.float64) if has_g else None
    beta = torch.ones(1, warm + T, 2, dtype=torch.float64) if has_beta else None
    state = empty_cache(1, 2, K, D, D, dtype=torch.float64, device="cpu")
    if warm:
        q, lam = torch.zeros_like(k[:, :warm]), torch.ones(1, warm, 2, K, dtype=torch.float64)
        _, state = multistate_attention_recurrent(
            q, k[:, :warm], v[:, :warm], lam, g=None if g is None else g[:, :warm],
            beta=None if beta is None else beta[:, :warm], tau=0.0 if kind == "repeated" else 2.0,
            score="token", output_final_state=True)
    sdt = state_dtype(dtype)
    state = state._replace(**{f: getattr(state, f).to(sdt) for f in ("S", "I", "Z", "zz", "N")})
    call = [None if x is None else x[:, warm:].to(dtype) for x in (k, v, g, beta)]
    return (*call, state)


def oracle(k, v, g, beta, state, tau: float, score: str):
    """`segment_naive` in float64 on the same values."""
    f64 = [None if x is None else x.double() for x in (k, v, g, beta)]
    state = state._replace(**{f: getattr(state, f).double() for f in ("S", "I", "Z", "zz", "N")})
    return segment_naive(f64[0], f64[1], levels=state.n.shape[-1], g=f64[2], beta=f64[3], tau=tau, score=score,
                         initial_state=state)


def assert_matches_the_oracle(out, seg, state, dtype):
    level_start, n, I, m, Z, zz, N = out
    assert torch.equal(level_start, encode_level_map(seg.level, seg.initial_level, state.m))
    assert torch.equal(n, seg.n) and torch.equal(m, seg.m)
    assert information_close(I, seg.I, seg.n, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert relative_error(Z, seg.Z) <= tol and relative_error(zz, seg.zz) <= tol


@pytest.mark.parametrize("kernel,transition", KERNEL_TRANSITIONS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("warm", [0, WARM])
def test_a_score_equal_to_tau_opens_and_zero_densities_tie_to_the_oldest_pair(kernel, transition, score, warm):
    """`"repeated"` at `τ = 0`: every scored `I_t` is exactly 0 = τ, so every token opens a slot;
    every slot's `I` is 0, so each capacity merge ties all pairs and merges the oldest."""
    dtype = torch.float32 if kernel == "triton" else torch.float64
    k, v, g, beta, state = designed("repeated", transition, warm, dtype)
    seg = oracle(k, v, g, beta, state, 0.0, score)
    scored = T - (warm == 0)
    assert int(seg.boundaries.sum()) == 2 * scored and int(seg.capacity_merges.sum()) > 0
    assert_matches_the_oracle(segment_op(kernel, k, v, g, beta, state, 0.0, score), seg, state, dtype)


@pytest.mark.parametrize("kernel,transition", KERNEL_TRANSITIONS)
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("warm", [0, WARM])
def test_a_score_equal_to_tau_two_opens(kernel, transition, score, warm):
    """`"alternating"` at `τ = 2`: each token reverses the content it is scored against, so
    `I_t = 2 = τ` exactly (under `state` at the second token of the stream, without β) and it
    opens a slot."""
    dtype = torch.float32 if kernel == "triton" else torch.float64
    k, v, g, beta, state = designed("alternating", transition, warm, dtype)
    seg = oracle(k, v, g, beta, state, 2.0, score)
    at_tau = int((seg.info == 2.0).sum())
    if score == "state":
        assert at_tau == (2 if warm == 0 and transition in ("none", "g") else 0)
    else:
        assert at_tau == 2 * (T - (warm == 0)) and int(seg.boundaries.sum()) == at_tau
    assert_matches_the_oracle(segment_op(kernel, k, v, g, beta, state, 2.0, score), seg, state, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("score", SCORES)
def test_a_tie_between_two_pairs_merges_the_oldest(kernel, score):
    """`K = 3` slots of `n = 2`, `I = 0.5` each: a token that opens a slot (`τ = 0`) ties the
    pairs (0, 1) and (1, 2) at density 1/4; the oldest merges, `n = [4, 2, 1]` (the newest
    would give `[2, 4, 1]`)."""
    dtype = torch.float32 if kernel == "triton" else torch.float64
    gen = torch.Generator().manual_seed(0)
    k, v = (torch.randn(1, 1, 1, D, generator=gen, dtype=dtype) for _ in range(2))
    S = torch.randn(1, 1, K, D, D, generator=gen, dtype=state_dtype(dtype))
    Z = S[:, :, -1] / 2
    state = empty_cache(1, 1, K, D, D, dtype=dtype, device="cpu")._replace(
        S=S, n=torch.full((1, 1, K), 2), I=torch.full((1, 1, K), 0.5, dtype=state_dtype(dtype)),
        m=torch.full((1, 1), K), Z=Z, zz=Z.pow(2).sum((-2, -1)), N=S.sum(2).pow(2).sum((-2, -1)),
        step=torch.full((1,), 6))
    seg = oracle(k, v, None, None, state, 0.0, score)
    assert seg.n.tolist() == [[[4, 2, 1]]] and int(seg.capacity_merges.sum()) == 1
    assert_matches_the_oracle(segment_op(kernel, k, v, None, None, state, 0.0, score), seg, state, dtype)
