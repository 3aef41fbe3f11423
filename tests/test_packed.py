"""Packed variable-length sequences (`cu_seqlens`, issue #24): one packed call equals the separate
calls on each sequence — outputs, final caches and gradients — for every policy, score and
transition, with empty and length-1 sequences, sequences that end mid-chunk and an initial cache
per sequence; on the CPU kernels (float64) and through the Triton interpreter; compiled with
`fullgraph=True`; bad offsets rejected naming `cu_seqlens`."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dla import multistate_attention
from dla.ops.state import MultiStateCache
from dla.testing import triton_interpreter
from tests.strategies import (
    Case, build, cases, claims_decisions, comparable, fenwick_levels, information_close, naive_segmentation,
    random_cache, relative_error, tally_draw,
)

NAMES = ("q", "k", "v", "lam", "g", "beta")


def offsets(lengths: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def part_of(case, length: int, seed: int, dtype=torch.float64) -> dict:
    """One sequence's tensors `[1, length, ...]` (an empty one sliced from a one-token draw)."""
    t = build(replace(case, batch=1, length=max(length, 1), seed=seed), dtype)
    return {n: (x[:, :length] if x is not None else None) for n, x in t.items()}


def pack(parts: list[dict]) -> dict:
    """The sequences' tensors (each `[1, T_n, ...]`) back to back in one row."""
    return {n: (torch.cat([p[n] for p in parts], 1) if parts[0][n] is not None else None) for n in NAMES}


def stack_caches(caches: list[MultiStateCache]) -> MultiStateCache:
    return MultiStateCache(*(torch.cat(fields, 0) for fields in zip(*caches)))


def call(t: dict, case, **kw):
    return multistate_attention(t["q"], t["k"], t["v"], t["lam"], g=t["g"], beta=t["beta"], policy=case.policy,
                                tau=case.tau, score=case.score, chunk_size=case.chunk_size, **kw)


def leaves(t: dict) -> dict:
    return {n: (x.detach().clone().requires_grad_() if x is not None else None) for n, x in t.items()}


def assert_caches_equal(got: MultiStateCache, want: MultiStateCache, dtype, tol: float) -> None:
    assert torch.equal(got.m, want.m) and torch.equal(got.n, want.n) and torch.equal(got.step, want.step)
    assert relative_error(got.S, want.S) <= tol
    assert information_close(got.I, want.I, want.n, dtype)
    for name in ("Z", "zz", "N"):
        assert relative_error(getattr(got, name), getattr(want, name)) <= tol, name


@st.composite
def packed_cases(draw):
    """A template `Case` (policy, transition, score, widths, threshold, chunk) and the lengths of
    2–4 sequences: the template's own length (long enough for capacity merges under `dla`), and
    others from 0 up to it, so empty, length-1 and mid-chunk ends occur."""
    case = replace(draw(cases(max_length=20)), batch=1)
    others = draw(st.lists(st.sampled_from([0, 1, 2, case.chunk_size + 1, max(case.length - 1, 0), case.length]),
                           min_size=1, max_size=3))
    lengths = draw(st.permutations([case.length, *others]))
    with_cache = draw(st.booleans())
    if case.policy == "fenwick":  # `random_cache` is a 5-token call's
        case = replace(case, levels=max(case.levels, fenwick_levels(max(lengths), offset=5 if with_cache else 0)))
    return case, list(lengths), with_cache


@claims_decisions()
@settings(max_examples=40, deadline=None)
@given(packed_cases())
def test_a_packed_call_equals_the_separate_calls(drawn):
    case, lengths, with_cache = drawn
    parts = [part_of(case, n, case.seed + i) for i, n in enumerate(lengths)]
    caches = [random_cache(case, seed=case.seed + 100 + i) for i in range(len(lengths))] if with_cache else None
    segs = [naive_segmentation(replace(case, length=n), p, c) for n, p, c in
            zip(lengths, parts, caches or [None] * len(lengths)) if n > 0]
    longest = max(range(len(segs)), key=lambda i: segs[i].boundary_margin.numel())
    compared = all(comparable(case, s) for s in segs)
    if not tally_draw(case.policy, segs[longest], compared):
        return

    packed = leaves(pack(parts))
    o, final = call(packed, case, cu_seqlens=offsets(lengths), max_seqlen=max(max(lengths), 1),
                    initial_state=stack_caches(caches) if caches else None, output_final_state=True)
    assert o.shape[:2] == (1, sum(lengths))
    # a loss linear in every output and final slot state: sliced per sequence, its weights make
    # each sequence's own loss, whose gradients the packed ones must equal slice by slice
    wo, wS = weights(o, final.S, case.seed)
    names = [n for n in NAMES if packed[n] is not None]
    grads = dict(zip(names, torch.autograd.grad((o * wo).sum() + (final.S * wS).sum(),
                                                [packed[n] for n in names])))
    for i, (start, n) in enumerate(zip(itertools.accumulate([0, *lengths]), lengths)):
        cache = caches[i] if caches else None
        got = MultiStateCache(*(x[i:i + 1] for x in final))
        if n == 0:  # nothing to compute: the sequence keeps its initial cache
            want = cache if cache is not None else MultiStateCache(*(torch.zeros_like(x) for x in got))
            assert all(torch.equal(a, b) for a, b in zip(got, want))
            continue
        alone = leaves(part := parts[i])
        assert part["q"].shape[1] == n
        o1, c1 = call(alone, case, initial_state=cache, output_final_state=True)
        assert relative_error(o[:, start:start + n].detach(), o1.detach()) <= 1e-10
        assert_caches_equal(MultiStateCache(*(x.detach() for x in got)), MultiStateCache(*(x.detach() for x in c1)),
                            torch.float64, 1e-10)
        loss = (o1 * wo[:, start:start + n]).sum() + (c1.S * wS[i:i + 1]).sum()
        for name, want in zip(names, torch.autograd.grad(loss, [alone[m] for m in names])):
            # (a gradient that is zero up to rounding — `dg` of a lone token — has no relative error)
            err = (grads[name][:, start:start + n] - want).norm()
            assert err <= 1e-10 * want.norm() + 1e-14, name


def weights(o: torch.Tensor, S: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o),
            torch.randn(S.shape, generator=gen, dtype=torch.float64).to(S))


INTERPRETER_CASES = [  # (policy, score, transition)
    ("dla", "drift", "g"), ("dla", "token", "none"), ("dla", "state", "both"), ("fenwick", "drift", "g"),
    ("single", "drift", "beta"),
]


@pytest.mark.parametrize("policy,score,transition", INTERPRETER_CASES)
def test_triton_kernels_pack_like_the_separate_calls(policy, score, transition):
    """The Triton kernels through the interpreter (segmentation, readout or backbone, backward):
    the packed call's outputs, final caches and gradients against the separate calls, float32."""
    lengths = [9, 0, 1, 20]  # an empty sequence, a lone token, ends inside a chunk
    case = Case(batch=1, length=20, heads=1, dk=16, dv=16, levels=6, policy=policy, transition=transition,
                score=score, tau=0.3, inputs="piecewise", mean_regime=3.0, seed=7, chunk_size=16)
    parts = [part_of(case, n, 7 + i, torch.float32) for i, n in enumerate(lengths)]
    names = [n for n in NAMES if parts[0][n] is not None]
    with triton_interpreter():
        packed = leaves(pack(parts))
        o, final = call(packed, case, cu_seqlens=offsets(lengths), max_seqlen=20, output_final_state=True)
        wo, wS = weights(o, final.S, 0)
        grads = torch.autograd.grad((o * wo).sum() + (final.S * wS).sum(), [packed[n] for n in names])
        for i, (start, n) in enumerate(zip(itertools.accumulate([0, *lengths]), lengths)):
            if n == 0:
                assert int(final.m[i].max()) == 0 and int(final.step[i]) == 0
                continue
            alone = leaves(parts[i])
            o1, c1 = call(alone, case, output_final_state=True)
            assert relative_error(o[:, start:start + n].detach(), o1.detach()) <= 1e-5
            got = MultiStateCache(*(x[i:i + 1].detach() for x in final))
            assert torch.equal(got.m, c1.m) and torch.equal(got.n, c1.n) and torch.equal(got.step, c1.step)
            assert relative_error(got.S, c1.S.detach()) <= 1e-5
            loss = (o1 * wo[:, start:start + n]).sum() + (c1.S * wS[i:i + 1]).sum()
            for name, g_packed, want in zip(names, grads, torch.autograd.grad(loss, [alone[m] for m in names])):
                err = (g_packed[:, start:start + n] - want).norm()
                # the floor: float32's epsilon at the scale of the whole gradient (a lone token's dg is
                # 0 in exact arithmetic, rounding in both calls, 1e-7 against a packed norm of 8 seen)
                assert err <= 1e-5 * want.norm() + 1e-7 * g_packed.norm(), name


def test_compiled_packed_call_is_one_graph():
    """Forward and loss of a packed call in one `fullgraph=True` frame, equal to eager; new
    offsets of the same count reuse it."""
    case = replace(build_case(), policy="dla")
    parts = [part_of(case, n, i) for i, n in enumerate([5, 3, 8])]
    t = pack(parts)

    def loss(q, k, v, lam, g, cu):
        o = multistate_attention(q, k, v, lam, g=g, cu_seqlens=cu, max_seqlen=8, tau=0.3, chunk_size=4)
        return o.square().sum()

    compiled = torch.compile(loss, fullgraph=True, dynamic=False)
    args = [t[n] for n in ("q", "k", "v", "lam", "g")]
    for lengths in ([5, 3, 8], [8, 0, 8]):
        cu = offsets(lengths)
        assert torch.allclose(compiled(*args, cu), loss(*args, cu), rtol=1e-12, atol=0)


def build_case():
    return Case(batch=1, length=16, heads=2, dk=4, dv=3, levels=3, policy="dla", transition="g", score="drift",
                tau=0.3, inputs="gaussian", mean_regime=2.0, seed=3)


@pytest.mark.parametrize("cu,max_seqlen,error,match", [
    (torch.tensor([0, 4, 10], dtype=torch.int64), None, ValueError, "cu_seqlens must be a 1-D int32"),
    (torch.tensor([[0, 10]], dtype=torch.int32), None, ValueError, "cu_seqlens must be a 1-D int32"),
    ([0, 10], None, TypeError, "cu_seqlens must be a torch.Tensor"),
    (torch.tensor([1, 10], dtype=torch.int32), None, RuntimeError, "cu_seqlens must start at 0"),
    (torch.tensor([0, 9], dtype=torch.int32), None, RuntimeError, "cu_seqlens must end at the packed length"),
    (torch.tensor([0, 6, 4, 10], dtype=torch.int32), None, RuntimeError, "cu_seqlens must be non-decreasing"),
    (torch.tensor([0, 4, 10], dtype=torch.int32), 5, RuntimeError, "longer than max_seqlen = 5"),
    (torch.tensor([0, 4, 10], dtype=torch.int32), 0, ValueError, "max_seqlen must be a positive int"),
])
def test_bad_offsets_are_named(cu, max_seqlen, error, match):
    t = build(replace(build_case(), length=10))
    with pytest.raises(error, match=match):
        call(t, build_case(), cu_seqlens=cu, max_seqlen=max_seqlen)


def test_a_packed_call_needs_one_row_and_a_cache_per_sequence():
    case = build_case()
    t = build(replace(case, batch=2, length=10))
    with pytest.raises(ValueError, match="batch must be 1"):
        call(t, case, cu_seqlens=offsets([4, 6]))
    t = build(replace(case, length=10))
    cache = random_cache(case, seed=1)  # one row for two sequences
    with pytest.raises(ValueError, match="initial_state"):
        call(t, case, cu_seqlens=offsets([4, 6]), initial_state=cache)
