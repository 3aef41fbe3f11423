"""Each bad input of SPEC §4 raises the named error with a message naming the argument,
at every public entry point, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from dla import MultiStateCache, empty_cache, multistate_attention
from dla.ops.reference import multistate_attention_materialized, multistate_attention_recurrent

ENTRY_POINTS = [multistate_attention, multistate_attention_recurrent, multistate_attention_materialized]


def inputs(B=1, T=4, H=2, Dk=3, Dv=2, L=3, dtype=torch.float32):
    return dict(q=torch.randn(B, T, H, Dk, dtype=dtype), k=torch.randn(B, T, H, Dk, dtype=dtype),
                v=torch.randn(B, T, H, Dv, dtype=dtype), lam=torch.rand(B, T, H, L, dtype=dtype))


def call(fn, t, **kw):
    return fn(t["q"], t["k"], t["v"], t["lam"], **kw)


def bad_cases():
    t = inputs()
    yield "rank", {**t, "q": t["q"][0]}, {}, ValueError, "q must be 4-D"
    yield "k shape", {**t, "k": torch.randn(1, 4, 2, 5)}, {}, ValueError, "k must have shape"
    yield "v shape", {**t, "v": torch.randn(1, 3, 2, 2)}, {}, ValueError, "v must have shape"
    yield "lam shape", {**t, "lam": torch.rand(1, 4, 1, 3)}, {}, ValueError, "lam must have shape"
    yield "not a tensor", {**t, "v": [[1.0]]}, {}, TypeError, "v must be a torch.Tensor"
    yield "dtype mismatch", {**t, "k": t["k"].double()}, {}, TypeError, "k is torch.float64"
    yield "unsupported dtype", {n: x.to(torch.bfloat16) for n, x in t.items()}, {}, TypeError, "q has dtype torch.bfloat16"
    yield "g shape", t, {"g": torch.zeros(1, 4, 3)}, ValueError, "g must have shape"
    yield "beta dtype", t, {"beta": torch.zeros(1, 4, 2, dtype=torch.int64)}, TypeError, "beta has dtype"
    yield "device", t, {"g": torch.zeros(1, 4, 2, device="meta")}, ValueError, "g is on meta"
    yield "capacity", {**t, "lam": torch.rand(1, 4, 2, 1)}, {}, ValueError, "K = lam.shape\\[-1\\] >= 2"
    yield "fenwick levels", {**t, "lam": torch.rand(1, 4, 2, 2)}, {"policy": "fenwick"}, ValueError, "bitlen\\(T - 1\\)"
    yield "tau", t, {"tau": -0.1}, ValueError, "tau must be"
    yield "tau nan", t, {"tau": float("nan")}, ValueError, "tau must be"
    yield "policy", t, {"policy": "lru"}, ValueError, "policy must be one of"
    yield "score", t, {"score": "cosine"}, ValueError, "score must be one of"
    yield "chunk", t, {"chunk_size": 0}, ValueError, "chunk_size must be"
    yield "scale", t, {"scale": -1.0}, ValueError, "scale must be"
    yield "state type", t, {"initial_state": (1, 2)}, TypeError, "initial_state must be"
    good = empty_cache(1, 2, 3, 3, 2, dtype=torch.float32, device="cpu")
    yield "state shape", t, {"initial_state": good._replace(S=torch.zeros(1, 2, 4, 3, 2))}, ValueError, "initial_state.S must have shape"
    yield "state dtype", t, {"initial_state": good._replace(n=torch.zeros(1, 2, 3))}, TypeError, "initial_state.n must have dtype"
    yield "state N shape", t, {"initial_state": good._replace(N=torch.zeros(1, 3))}, ValueError, "initial_state.N must have shape"
    yield "state N dtype", t, {"initial_state": good._replace(N=torch.zeros(1, 2, dtype=torch.float64))}, TypeError, \
        "initial_state.N must have dtype"


CASES = list(bad_cases())


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name,t,kw,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_naming_the_argument(fn, name, t, kw, error, message):
    with pytest.raises(error, match=message):
        call(fn, t, **kw)


def test_good_input_passes():
    t = inputs()
    for fn in ENTRY_POINTS:
        assert call(fn, t).shape == (1, 4, 2, 2)
    assert isinstance(call(multistate_attention, t, output_final_state=True)[1], MultiStateCache)
