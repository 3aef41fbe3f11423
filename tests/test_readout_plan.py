"""The object plan (`dla.ops.readout.plan`) against a direct simulation on the dense level map,
and its counts against the segmentation (`segment_naive`): the plan that the kernels and the
cost model consume is held to what the level map says, element by element."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dla.ops.levels import dense_level_map, encode_level_map
from dla.ops.readout.plan import build_plan, chunk_count
from dla.ops.reference import segment_naive
from dla.ops.segment.closed_form import segment_fenwick
from perf.cost_model import counts
from tests.strategies import Case, build, claims_decisions, decisive, fenwick_levels, random_cache, tally_draw

BASE = dict(batch=2, heads=2, dk=3, dv=2, score="token", inputs="piecewise", seed=3)


@st.composite
def plan_cases(draw):
    """`(case, initial?, steps)`: `dla` maps that reach capacity merges (`decisive`)."""
    policy = draw(st.sampled_from(["dla", "dla", "fenwick", "single"]))
    initial = draw(st.booleans())
    score = draw(st.sampled_from(["token", "state"]))
    if policy == "dla":
        fields = draw(decisive(score, 40))
    else:
        length = draw(st.integers(1, 40))
        levels = draw(st.integers(2, 6))
        if policy == "fenwick":
            levels = max(levels, fenwick_levels(length, offset=5 if initial else 0))
        fields = dict(length=length, levels=levels, tau=0.6, inputs=draw(st.sampled_from(["gaussian", "piecewise"])),
                      mean_regime=4.0)
    case = Case(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 2)), dk=3, dv=2, policy=policy,
                transition="none", score=score, seed=draw(st.integers(0, 2**31 - 1)),
                chunk_size=draw(st.sampled_from([1, 2, 4, 8, 16])), **fields)
    return case, initial, draw(st.lists(st.integers(0, 40), min_size=case.batch, max_size=case.batch))


def level_map_of(case: Case, initial: bool, steps: list[int] | None = None):
    """`(level_start, segmentation, m0, step)`: with a cache, its step is the warm-up's (5)."""
    t = build(case)
    state = random_cache(case, seed=case.seed + 1) if initial else None
    seg = segment_naive(t["k"], t["v"], levels=case.levels, policy=case.policy, tau=case.tau, score=case.score,
                        initial_state=state)
    m0 = state.m if state is not None else torch.zeros(case.batch, case.heads, dtype=torch.int64)
    step = state.step if state is not None else torch.tensor(steps or [0] * case.batch)
    return encode_level_map(seg.level, seg.initial_level, m0), seg, m0, step


def simulate(level_start: torch.Tensor, step: torch.Tensor, C: int):
    """Per row, per chunk index c (NC + 1 of them), the partition P_c read off the dense level
    map: positions before cs_c (initial slots at −1 − r) grouped by their level at row cs_c
    (row T − 1 for cs_c = T), as a list of `(rank, frozenset)`; and the chunk starts."""
    B, T, H, L = level_start.shape
    level, initial = dense_level_map(level_start, torch.full((B, H), L))  # every pseudo-position a slot
    NC = chunk_count(T, C)
    out = []
    for b in range(B):
        phase = int(step[b]) % C
        cs = [min(max(c * C - phase, 0), T) for c in range(NC)] + [T]
        for h in range(H):
            parts = []
            for c0 in cs:
                row = min(c0, T - 1)
                groups: dict[int, set] = {}
                for s in range(c0):
                    groups.setdefault(int(level[b, h, row, s]), set()).add(s)
                for r in range(L):
                    lev = int(initial[b, h, row, L - 1 - r])  # slot L − 1 − r sits at −1 − r
                    if lev >= 0:
                        groups.setdefault(lev, set()).add(-1 - r)
                parts.append(sorted((lev, frozenset(m)) for lev, m in groups.items() if lev >= 0))
            out.append((cs, parts))
    return out


def check_plan(level_start, step, C):
    plan = build_plan(level_start, step, C)
    B, T, H, L = level_start.shape
    rows = simulate(level_start, step, C)
    for n, (cs, parts) in enumerate(rows):
        assert plan.starts[n].tolist() == cs
        ids: dict[frozenset, int] = {frozenset([-1 - r]): r for r in range(L)}
        previous = [frozenset([-1 - r]) for r in range(L)]
        created = 0
        for c, part in enumerate(parts):
            got = {r: int(plan.read[n, c, r]) for r in range(L) if plan.read[n, c, r] >= 0}
            assert sorted(got) == [rank for rank, _ in part], (n, c)
            new_here = []
            for rank, members in part:
                assert (int(plan.first[n, c, rank]), int(plan.last[n, c, rank])) == (min(members), max(members))
                assert members == frozenset(range(min(members), max(members) + 1))  # contiguous
                is_new = members not in previous
                assert bool(plan.new[n, c, rank]) == is_new, (n, c, rank)
                if is_new:
                    assert members not in ids
                    ids[members] = L + created
                    created += 1
                    new_here.append(ids[members])
                    i = ids[members]
                    parents = [j for j, m in enumerate(previous) if m and m <= members]
                    lo, hi = int(plan.par_lo[n, i]), int(plan.par_hi[n, i])
                    ranks_prev = [r for r in range(L)
                                  if (c == 0 or int(plan.read[n, c - 1, r]) >= 0) and lo <= r <= hi]
                    assert ranks_prev == parents
                    tokens = sorted(s for s in members if c > 0 and cs[c - 1] <= s < cs[c])
                    assert list(range(int(plan.tok_lo[n, i]), int(plan.tok_hi[n, i]))) == tokens
                    assert int(plan.obj_chunk[n, i]) == c
                    assert members == frozenset().union(*(previous[j] for j in parents), tokens)
                assert got[rank] == ids[members]
            assert plan.new_ids[n, c, : len(new_here)].tolist() == new_here
            assert int(plan.new_count[n, c]) == len(new_here)
            holding = [rank for rank, m in part if cs[c] - 1 in m]
            assert int(plan.lam_rank[n, c]) == (holding[0] if holding else -1)
            previous = [None] * L
            for rank, members in part:
                previous[rank] = members
        assert int(plan.created[n]) == created
        assert not bool(plan.overflow[n])
    return plan


@claims_decisions()
@given(plan_cases())
@example((Case(length=23, levels=3, policy="dla", transition="none", tau=0.0, mean_regime=4.0, chunk_size=4, **BASE),
          True, [0, 0]))  # every token a boundary, capacity merges from the first
@example((Case(length=33, levels=7, policy="fenwick", transition="none", tau=0.6, mean_regime=4.0, chunk_size=4,
               **BASE), False, [3, 6]))  # partial first chunks
@example((Case(length=9, levels=2, policy="single", transition="none", tau=0.6, mean_regime=4.0, chunk_size=4, **BASE),
          True, [0, 0]))
def test_plan_matches_the_level_map(drawn):
    case, initial, steps = drawn
    level_start, seg, _, step = level_map_of(case, initial, steps)
    tally_draw(case.policy, seg)
    check_plan(level_start, step, case.chunk_size)


def test_cost_model_counts_are_the_plans_and_the_segmentations():
    """perf.cost_model's counts: boundaries and capacity merges are the segmentation's own
    (`segment_naive`), objects, reads and changed slots those of the level map's partitions
    (`simulate`), on piecewise inputs where all of them happen."""
    case = Case(batch=2, length=300, heads=2, dk=4, dv=4, levels=6, policy="dla", transition="none", score="token",
                tau=0.6, inputs="piecewise", mean_regime=6.0, seed=5, chunk_size=16)
    level_start, seg, _, step = level_map_of(case, False)
    C, T = case.chunk_size, case.length
    got = counts(level_start, build_plan(level_start, step, C), T, C)
    assert got["merges_per_1000"] > 0 and got["boundaries_per_1000"] > got["merges_per_1000"]
    per_head = lambda x: float(x.double().sum(0).mean()) / (case.batch * T) * 1000  # noqa: E731
    assert got["boundaries_per_1000"] == pytest.approx(per_head(seg.boundaries))
    assert got["merges_per_1000"] == pytest.approx(per_head(seg.capacity_merges))
    created, reads, changed, chunks = [], [], [], []
    for cs, parts in simulate(level_start, step, C):
        seen, new = {frozenset([-1 - r]) for r in range(case.levels)}, []
        for part in parts:  # sets only coarsen: an element not seen before is created here
            new.append(len({m for _, m in part} - seen))
            seen |= {m for _, m in part}
        created.append(sum(new))
        reads.append(sum(len(part) * (cs[c + 1] - cs[c]) for c, part in enumerate(parts[:-1])) / T)
        live = [c for c in range(len(parts) - 1) if cs[c + 1] > cs[c]]
        changed.append(sum(new[c + 1] for c in live) / len(live))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert got["objects_per_1000"] == pytest.approx(mean(created) / T * 1000)
    assert got["objects_read_per_chunk"] == pytest.approx(mean(reads))
    assert got["slots_changed_per_chunk"] == pytest.approx(mean(changed))


@pytest.mark.parametrize("C,T", [(4, 64), (8, 200), (16, 257)])
def test_fenwick_reads_popcount_objects_and_creates_one_block(C, T):
    """Aligned chunks: chunk j reads at most popcount(j) dyadic blocks (exactly that many from
    position 0) and creates exactly one, the block of C·2^tz(j) tokens ending at jC − 1; a call
    from a `step` that is not a multiple of C starts with a partial chunk."""
    B, L = 3, fenwick_levels(T, 3 * C + 5)
    k = torch.zeros(B, T, 1, 2)
    zeros = dict(n0=torch.zeros(B, 1, L, dtype=torch.int64), m0=torch.zeros(B, 1, dtype=torch.int64),
                 Z0=torch.zeros(B, 1, 2, 2), zz0=torch.zeros(B, 1))
    steps = [0, 3 * C, 5]
    step = torch.tensor(steps)
    level_start = segment_fenwick(k, k, zeros["n0"], zeros["m0"], zeros["Z0"], zeros["zz0"], step, L)[0]
    plan = check_plan(level_start, step, C)
    for b, s0 in enumerate(steps):
        for c in range(plan.read.shape[1] - 1):
            c0 = int(plan.starts[b, c])
            if c0 >= T or (s0 + c0) % C:
                continue  # the empty tail, or the partial first chunk
            j = (s0 + c0) // C  # absolute chunk index
            reads = int((plan.read[b, c] >= 0).sum())
            assert reads <= bin(j).count("1")
            if s0 == 0 and j > 0:
                assert reads == bin(j).count("1")
                assert int(plan.new_count[b, c]) == 1
                i = int(plan.new_ids[b, c, 0])
                size = C << ((j & -j).bit_length() - 1)
                assert (int(plan.obj_first[b, i]), int(plan.obj_last[b, i])) == (j * C - size, j * C - 1)


def test_capacity_overflows_are_flagged():
    case = Case(length=30, levels=3, policy="dla", transition="none", tau=0.0, mean_regime=4.0, chunk_size=4, **BASE)
    level_start, _, _, step = level_map_of(case, False)
    full = build_plan(level_start, step, 4)
    need = 3 + int(full.created.max())
    assert not build_plan(level_start, step, 4, capacity=need).overflow.any()
    small = build_plan(level_start, step, 4, capacity=need - 1)
    assert torch.equal(small.overflow, 3 + full.created > need - 1)
    masters = 3 + int(full.masters.max())
    assert build_plan(level_start, step, 4, capacity=need, master_capacity=masters - 1).overflow.any()


@pytest.mark.parametrize("length", [1, 30, 33])
def test_a_missing_step_is_the_plan_of_step_zero(length):
    """`step` None (the operator's fresh calls: chunk starts as a constant of the shapes) builds
    exactly the plan of a zero `step` tensor, partial last chunks included."""
    case = Case(length=length, levels=3, policy="dla", transition="none", tau=0.6, mean_regime=4.0, chunk_size=4,
                **BASE)
    level_start, _, _, _ = level_map_of(case, False)
    zero = build_plan(level_start, torch.zeros(case.batch, dtype=torch.int64), 4)
    none = build_plan(level_start, None, 4)
    for name, a, b in zip(zero._fields, zero, none):
        assert (a == b) if isinstance(a, int) else torch.equal(a, b), name


def test_cost_model_with_beta_costs_the_window_plan(monkeypatch):
    """`perf.cost_model --backbone gdn`: the windowed readout's kernels from the window plan's own
    counts, summed over heads — at most the worst case at the same `R` (every window holding `K`
    objects), whose totals it reports beside — with the segmentation's counts."""
    import perf.cost_model as cm
    from dla.ops.readout import cost_delta

    monkeypatch.setattr(cm, "TOKENS", 1024)
    monkeypatch.setattr(cm, "HEADS", 2)
    got = cm.model_delta(512, 8, "sparse")
    R, N = got["window_R"], 2 * 2
    worst = cost_delta.delta_kernels(cost_delta.worst_counts(512, 8, 64, R), 128, 128, 8, 2, 64)
    assert got["flops_fwd_bwd"] <= N * sum(f for f, _ in worst.values()) + got["kernels"]["segmentation"]["gflop"] * 1e9
    assert 0 < got["roofline_ms"] <= got["worst_case_roofline_ms"] + got["kernels"]["segmentation"]["ms"]
    assert got["counts"]["boundaries_per_1000"] > 0 and got["counts"]["per_token"]["chunks"] == 1 / 64
    assert set(worst) <= set(got["kernels"])
