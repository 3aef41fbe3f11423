"""Non-finite inputs stay causal (the operator's module doc): a NaN or inf in `k_t`, `v_t`, `g_t`
or `β_t` leaves every output before `t` exactly as without it, on the CPU kernels and on the
Triton kernels (through the interpreter); outputs from `t` on, and a final cache that took it,
are non-finite, as the reference's are."""

from __future__ import annotations

import math

import pytest
import torch

import dla
from dla.ops.reference import multistate_attention_recurrent
from dla.testing import triton_interpreter
from tests.strategies import relative_error

CASES = [  # (policy, transition, poisoned input, value)
    ("dla", "g", "k", math.nan), ("dla", "both", "v", math.inf), ("dla", "g", "g", -math.inf),
    ("fenwick", "g", "v", math.nan), ("single", "g", "k", math.inf), ("single", "both", "beta", math.nan),
    ("dla", "none", "v", -math.inf),
]


def _inputs(transition: str, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    B, T, H, D, K = 2, 40, 2, 16, 7
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=dtype) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    lam = torch.rand(B, T, H, K, generator=gen, dtype=dtype)
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype) * 0.2 if transition in ("g", "both") else None
    beta = torch.rand(B, T, H, generator=gen, dtype=dtype) if transition in ("beta", "both") else None
    return dict(q=q, k=k, v=v, lam=lam, g=g, beta=beta)


def _call(x, policy, **kw):
    return dla.multistate_attention(x["q"], x["k"], x["v"], x["lam"], g=x["g"], beta=x["beta"], policy=policy,
                                    tau=0.3, chunk_size=16, output_final_state=True, **kw)


def _poison(x, name, value, b=1, t=27, h=0):
    y = {n: (z.clone() if z is not None else None) for n, z in x.items()}
    if y[name].dim() == 4:
        y[name][b, t, h, 3] = value
    else:
        y[name][b, t, h] = value
    return y, (b, t, h)


def _check(clean, dirty, where):
    b, t, h = where
    (o, cache), (o_bad, cache_bad) = clean, dirty
    assert torch.equal(o_bad[b, :t, h], o[b, :t, h])  # exactly the clean prefix
    assert not torch.isfinite(o_bad[b, t:, h]).any()
    assert torch.isfinite(o_bad[1 - b]).all() and torch.isfinite(o_bad[b, :, 1 - h]).all()
    assert torch.equal(o_bad[1 - b], o[1 - b])  # other rows untouched
    assert torch.isnan(cache_bad.S[b, h]).all() and torch.isnan(cache_bad.N[b, h])
    assert torch.isfinite(cache_bad.S[1 - b]).all()


@pytest.mark.parametrize("policy,transition,name,value", CASES)
def test_cpu_kernels(policy, transition, name, value):
    x = _inputs(transition)
    if name not in x or x[name] is None:
        pytest.skip("input absent for this transition")
    dirty, where = _poison(x, name, value)
    _check(_call(x, policy), _call(dirty, policy), where)
    # the reference keeps the prefix finite too, and equal to ours
    b, t, h = where
    ref = multistate_attention_recurrent(*(dirty[n].double() for n in ("q", "k", "v", "lam")),
                                         g=None if dirty["g"] is None else dirty["g"].double(),
                                         beta=None if dirty["beta"] is None else dirty["beta"].double(),
                                         policy=policy, tau=0.3)
    assert relative_error(_call(dirty, policy)[0][b, :t, h], ref[b, :t, h]) <= 1e-5


@pytest.mark.parametrize("policy,transition,name,value", CASES[:4])
def test_triton_kernels(policy, transition, name, value):
    x = _inputs(transition)
    dirty, where = _poison(x, name, value)
    with triton_interpreter():
        _check(_call(x, policy), _call(dirty, policy), where)


def test_gradients_of_the_prefix_are_those_of_the_clean_prefix():
    """A loss over the outputs before the bad token has the clean inputs' gradients."""
    x = _inputs("g")
    dirty, (b, t, h) = _poison(x, "v", math.nan)
    grads = []
    for inputs in (x, dirty):
        leaves = {n: z.clone().requires_grad_() for n, z in inputs.items() if z is not None}
        o = dla.multistate_attention(leaves["q"], leaves["k"], leaves["v"], leaves["lam"], g=leaves["g"], tau=0.3,
                                     chunk_size=16)
        grads.append(torch.autograd.grad(o[:, :t].sum(), list(leaves.values())))
    for clean, bad in zip(*grads):
        assert torch.isfinite(bad).all()
        assert relative_error(bad, clean) <= 1e-6
