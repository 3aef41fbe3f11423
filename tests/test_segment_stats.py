"""`dla.ops.segment.stats.segmentation_stats` against counts taken from `segment_naive` on the same
inputs: its boundary and capacity-merge counters and per-token scores, and segment lengths and
changed slots counted from its dense level map with Python sets."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from dla.ops.levels import encode_level_map
from dla.ops.segment.stats import segmentation_stats
from dla.ops.state import empty_cache
from tests.strategies import Case, build, claims_decisions, decisive, naive_segmentation, random_cache, tally_draw


@st.composite
def stats_cases(draw):
    """`(case, from a cache?, chunk, skip)`: draws that reach capacity merges (`decisive`)."""
    score = draw(st.sampled_from(["drift", "token"]))
    case = Case(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), dk=draw(st.integers(2, 4)),
        dv=draw(st.integers(2, 4)), policy="dla", transition=draw(st.sampled_from(["g", "both"])), score=score,
        seed=draw(st.integers(0, 2**31 - 1)), **draw(decisive(score, 40)),
    )
    return case, draw(st.booleans()), draw(st.sampled_from([1, 4, 16, 64])), draw(st.sampled_from([0, 5, 16]))


def slot_sets(level: torch.Tensor, initial_level: torch.Tensor, t: int) -> dict[int, frozenset]:
    """Members of each rank after step t: token positions and ("init", i) for initial slots."""
    members: dict[int, set] = {}
    for s in range(t + 1):
        members.setdefault(int(level[t, s]), set()).add(s)
    for i, r in enumerate(initial_level[t].tolist()):
        if r >= 0:
            members.setdefault(r, set()).add(("init", i))
    return {r: frozenset(x) for r, x in members.items()}


@claims_decisions()
@given(stats_cases())
def test_statistics_equal_counts_from_segment_naive(draw):
    case, with_state, chunk, skip = draw
    B, T, H, K = case.batch, case.length, case.heads, case.levels
    t = build(case)
    state = random_cache(case, seed=case.seed % 1000) if with_state else empty_cache(
        B, H, K, case.dk, case.dv, dtype=torch.float64, device="cpu")
    seg = naive_segmentation(case, t, state)
    tally_draw(case.policy, seg)
    got = segmentation_stats(encode_level_map(seg.level, seg.initial_level, state.m), m0=state.m, chunk_size=chunk,
                             skip_first=skip)

    per_1k = lambda n, tokens: 1000.0 * n / tokens  # noqa: E731
    for h in range(H):
        assert math.isclose(got.boundaries_per_1k[h], per_1k(int(seg.boundaries[:, h].sum()), B * T))
        assert math.isclose(got.merges_per_1k[h], per_1k(int(seg.capacity_merges[:, h].sum()), B * T))
        scored = torch.ones(B, T, dtype=torch.bool)
        scored[:, 0] = state.m[:, h] > 0  # the first token of an empty cache opens its slot unscored
        late = int(((seg.info[:, h] >= case.tau) & scored)[:, skip:].sum())
        if T > skip:
            assert math.isclose(got.late_boundaries_per_1k[h], per_1k(late, B * (T - skip)))
        else:
            assert math.isnan(got.late_boundaries_per_1k[h])

        lengths, changed = [], []
        for b in range(B):
            level, initial = seg.level[b, h], seg.initial_level[b, h]
            opened = [s for s in range(T) if int(level[s, s]) == 0 and (
                bool((initial[0] != 0).all()) if s == 0 else int(level[s, s - 1]) != 0)]
            cuts = sorted(set([0] + opened + [T]))
            lengths += [hi - lo for lo, hi in zip(cuts, cuts[1:])]
            m0 = int(state.m[b, h])
            before = {m0 - 1 - i: frozenset({("init", i)}) for i in range(m0)}
            for c0 in range(0, T, chunk):
                after = slot_sets(level, initial, min(c0 + chunk, T) - 1)
                closed = {x for r, x in before.items() if r >= 1}
                changed.append(sum(x not in closed for x in after.values()))
                before = after
        lengths.sort()
        assert math.isclose(got.mean_segment[h], sum(lengths) / len(lengths))
        assert got.median_segment[h] == lengths[(len(lengths) - 1) // 2]
        assert math.isclose(got.slots_changed_per_chunk[h], sum(changed) / len(changed))


def test_statistics_on_a_segmentation_by_hand():
    """One stream, K = 2, empty cache: tokens 0, 3, 5 open slots (5 with a capacity merge); the
    pieces are 3, 2, 1 tokens long."""
    EMPTY = 2**31 - 1
    rows = [[0, EMPTY], [0, EMPTY], [0, EMPTY], [3, 0], [3, 0], [5, 0]]
    level_start = torch.tensor(rows, dtype=torch.int32)[None, :, None, :]
    got = segmentation_stats(level_start, chunk_size=2, skip_first=4)
    assert got.boundaries_per_1k.tolist() == [1000.0 * 2 / 6]  # token 0 opens the first slot unscored
    assert got.late_boundaries_per_1k.tolist() == [1000.0 * 1 / 2]
    assert got.merges_per_1k.tolist() == [1000.0 / 6]
    assert got.mean_segment.tolist() == [2.0] and got.median_segment.tolist() == [2.0]
    # chunk {0,1}: the open block; {2,3}: {0,1,2} closed, {3} opened; {4,5}: merged {0..4}, opened {5}
    assert got.slots_changed_per_chunk.tolist() == [(1 + 2 + 2) / 3]
