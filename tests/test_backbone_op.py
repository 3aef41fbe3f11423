"""`dla::backbone` (the `single` policy) as the operator reaches it: against the references,
through opcheck and a fullgraph compile, and with its Triton kernels under the interpreter."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dla
from dla.ops.reference import multistate_attention_materialized, multistate_attention_recurrent
from dla.testing import triton_interpreter
from tests.strategies import relative_error


def _inputs(B, T, H, Dk, Dv, K, *, decay: bool, seed: int, dtype=torch.float64, delta: bool = False):
    """q, k, v, λ, g, β; with `delta` l2-normalised keys and β in (0, 1) (DeltaNet's)."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, Dk, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, T, H, Dv, generator=gen, dtype=dtype)
    lam = torch.rand(B, T, H, K, generator=gen, dtype=dtype) + 0.5
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype) * 0.3 if decay else None
    beta = None
    if delta:
        k = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    return q, k, v, lam, g, beta


@settings(max_examples=12)
@given(T=st.integers(1, 40), chunk=st.sampled_from([1, 4, 16, 64]), decay=st.booleans(), delta=st.booleans(),
       carried=st.booleans(), seed=st.integers(0, 2**16))
@example(T=1, chunk=64, decay=True, delta=False, carried=True, seed=0)
@example(T=33, chunk=16, decay=False, delta=False, carried=True, seed=1)
@example(T=19, chunk=4, decay=True, delta=True, carried=True, seed=2)
@example(T=1, chunk=64, decay=False, delta=True, carried=False, seed=3)
def test_single_matches_the_references(T, chunk, decay, delta, carried, seed):
    """Forward, final cache and gradients in float64 for every transition, from an empty cache or
    from a `dla` cache with several live slots (all of them read at rank 0, SPEC §2)."""
    B, H, Dk, Dv, K = 2, 2, 5, 6, 3
    q, k, v, lam, g, beta = _inputs(B, T, H, Dk, Dv, K, decay=decay, seed=seed, delta=delta)
    initial = None
    if carried:
        p = _inputs(B, 12, H, Dk, Dv, K, decay=decay, seed=seed + 1, delta=delta)
        _, initial = multistate_attention_recurrent(*p[:4], g=p[4], beta=p[5], policy="dla", tau=0.3, score="token",
                                                    output_final_state=True)
        assert bool((initial.m > 1).any())
    kw = dict(g=g, beta=beta, policy="single", initial_state=initial, output_final_state=True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, lam)]
    o, cache = dla.multistate_attention(*leaves, chunk_size=chunk, **kw)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, lam)]
    ref, ref_cache = multistate_attention_materialized(*ref_leaves, **kw)
    assert relative_error(o.detach(), ref.detach()) <= 1e-10
    for field in ("S", "n", "m", "I", "Z", "zz", "step"):
        assert relative_error(getattr(cache, field).double(), getattr(ref_cache, field).double()) <= 1e-10, field
    r, r_cache = multistate_attention_recurrent(q, k, v, lam, **kw)
    assert relative_error(o.detach(), r) <= 1e-10
    for field in ("S", "n", "m"):
        assert relative_error(getattr(cache, field).double(), getattr(r_cache, field).double()) <= 1e-10, field
    cot = torch.randn_like(ref)
    got = torch.autograd.grad((o * cot).sum(), leaves)
    want = torch.autograd.grad((ref * cot).sum(), ref_leaves)
    for name, a, b in zip("q k v lam".split(), got, want):
        assert relative_error(a, b) <= 1e-10, name


@pytest.mark.parametrize("delta", [False, True])
def test_opcheck_and_fullgraph_compile(delta):
    q, k, v, lam, g, beta = _inputs(1, 13, 2, 4, 5, 1, decay=True, seed=3, dtype=torch.float32, delta=delta)
    S0 = torch.randn(1, 2, 4, 5)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, lam[..., 0], g, beta, S0)]
    torch.library.opcheck(torch.ops.dla.backbone.default, (*leaves, 0.5, 4))
    do, dS = torch.randn(1, 13, 2, 5), torch.randn(1, 2, 4, 5)
    torch.library.opcheck(torch.ops.dla.backbone_backward.default, (do, dS, q, k, v, lam[..., 0], g, beta, S0, 0.5, 4))

    def loss(q, k, v, lam, g, beta):
        return dla.multistate_attention(q, k, v, lam, g=g, beta=beta, policy="single", chunk_size=4).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, lam, g, beta)]
    got = torch.autograd.grad(compiled(*leaves), [x for x in leaves if x is not None])
    want_leaves = [x.double().requires_grad_() if x is not None else None for x in (q, k, v, lam, g, beta)]
    want = torch.autograd.grad(loss(*want_leaves), [x for x in want_leaves if x is not None])
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 1e-5


@pytest.mark.parametrize("decay,delta", [(False, False), (True, False), (True, True), (False, True)])
def test_triton_kernels_through_the_interpreter(decay, delta):
    """The operator's CUDA path for `single` on CPU tensors: the Triton SSD at its own chunk of 64,
    with β and gates the Triton delta rule, with β alone the torch delta rule (`dla.ops.backbone`'s
    rule)."""
    q, k, v, lam, g, beta = _inputs(1, 70, 2, 16, 16, 1, decay=decay, seed=5, dtype=torch.float32, delta=delta)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (q, k, v, lam, g, beta)]
    with triton_interpreter():
        o = dla.multistate_attention(*leaves[:4], g=leaves[4], beta=leaves[5], policy="single")
        got = torch.autograd.grad(o.square().sum(), [x for x in leaves if x is not None])
    ref_leaves = [x.double().requires_grad_() if x is not None else None for x in (q, k, v, lam, g, beta)]
    ref = multistate_attention_materialized(*ref_leaves[:4], g=ref_leaves[4], beta=ref_leaves[5], policy="single")
    want = torch.autograd.grad(ref.square().sum(), [x for x in ref_leaves if x is not None])
    assert relative_error(o.detach(), ref.detach()) <= 1e-5
    for a, b in zip(got, want):
        assert relative_error(a, b) <= 1e-5


@pytest.mark.parametrize("gated", [True, False])
def test_the_rule_takes_the_triton_delta_rule_with_gates_only(gated, monkeypatch):
    """With β, the CUDA side of the rule launches the Triton delta rule for gated inputs (verified
    on an H100) and keeps ungated ones (DeltaNet) on the torch kernels (module doc)."""
    import dla.ops.backbone as backbone

    calls = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)
        monkeypatch.setattr(backbone, name, wrapped)

    for name in ("delta_forward_triton", "delta_backward_triton", "delta_forward", "delta_backward"):
        spy(name, getattr(backbone, name))
    q, k, v, lam, g, beta = _inputs(1, 70, 2, 16, 16, 1, decay=gated, seed=6, dtype=torch.float32, delta=True)
    S0 = torch.zeros(1, 2, 16, 16)
    with triton_interpreter():
        o, S = backbone.backbone_forward_triton(q, k, v, lam[..., 0], g, beta, S0, 0.25, 64)
        backbone.backbone_backward_triton(torch.ones_like(o), torch.zeros_like(S), q, k, v, lam[..., 0], g, beta, S0,
                                          0.25, 64)
    expected = ["delta_forward_triton", "delta_backward_triton"] if gated else ["delta_forward", "delta_backward"]
    assert calls == expected
