"""`dla.testing.triton_interpreter()`: the public operator's Triton path on CPU tensors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
from triton.runtime.errors import InterpreterError

import dla
import dla.ops.readout as readout
import dla.testing as testing
from dla.ops.reference import multistate_attention_materialized
from dla.testing import triton_interpreter
from tests.strategies import relative_error


def _inputs(beta: bool):
    gen = torch.Generator().manual_seed(0)
    B, T, H, D, K = 1, 20, 2, 16, 4
    q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    lam = torch.rand(B, T, H, K, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 0.1
    b = torch.rand(B, T, H, generator=gen) if beta else None
    return dict(q=q, k=k, v=v, lam=lam, g=g, beta=b)


@pytest.mark.parametrize("beta", [False, True])
def test_the_operator_runs_its_triton_kernels_inside_the_block_only(beta, monkeypatch):
    calls = []

    def spy(module, name):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: (calls.append(name), original(*a, **kw))[1])

    spy(testing, "segment_triton")
    for name in ("mixed_forward", "mixed_backward", "objects_delta_forward_triton", "objects_delta_backward_triton"):
        spy(readout, name)
    x = _inputs(beta)
    leaves = {n: t.clone().requires_grad_() for n, t in x.items() if t is not None}
    kw = dict(score="token", tau=0.6)
    with triton_interpreter():
        o = dla.multistate_attention(leaves["q"], leaves["k"], leaves["v"], leaves["lam"], g=leaves["g"],
                                     beta=leaves.get("beta"), **kw)
        grads = torch.autograd.grad(o.square().sum(), list(leaves.values()))
    # the readout stage's rule: by windows with β, objects or dense heads without
    kernel = "objects_delta_{}_triton" if beta else "mixed_{}"
    assert calls == ["segment_triton", kernel.format("forward"), kernel.format("backward")]

    x64 = {n: (t.double().requires_grad_() if t is not None else None) for n, t in x.items()}
    ref = multistate_attention_materialized(x64["q"], x64["k"], x64["v"], x64["lam"], g=x64["g"], beta=x64["beta"], **kw)
    ref_grads = torch.autograd.grad(ref.square().sum(), [t for t in x64.values() if t is not None])
    assert relative_error(o.detach(), ref.detach()) <= 1e-5
    for name, got, want in zip(leaves, grads, ref_grads):
        assert relative_error(got, want) <= 1e-5, name

    calls.clear()  # outside the block the CPU kernels are the torch ones again
    dla.multistate_attention(x["q"], x["k"], x["v"], x["lam"], g=x["g"], beta=x["beta"], **kw)
    assert calls == []


SCRIPT = r"""
import torch, dla
from dla.testing import triton_interpreter
from dla.ops.reference import multistate_attention_recurrent
from triton.runtime.jit import JITFunction
import dla.ops.segment.triton_walk as walk
assert isinstance(walk._walk_kernel, JITFunction)  # a process where triton compiles
gen = torch.Generator().manual_seed(1)
q, k, v = (torch.randn(1, 24, 2, 16, generator=gen) for _ in range(3))
lam, g = torch.rand(1, 24, 2, 3, generator=gen), -torch.rand(1, 24, 2, generator=gen) * 0.2
with triton_interpreter():
    o = dla.multistate_attention(q, k, v, lam, g=g, score="token")
ref = multistate_attention_recurrent(q.double(), k.double(), v.double(), lam.double(), g=g.double(), score="token")
print(float((o.double() - ref).norm() / ref.norm()))
"""


def test_works_where_triton_compiles():
    """In a process started without TRITON_INTERPRET (a user's), the block interprets the kernels."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.strip().splitlines()[-1]) <= 1e-5


def test_bounds_checked_names_an_overrun():
    """A kernel that reads one element past its input raises inside `bounds_checked()` and runs
    outside it; the in-bounds twin runs inside."""
    import triton.language as tl

    @triton.jit
    def copy(X, Y, N, EXTRA: tl.constexpr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(Y + o, tl.load(X + o, mask=o < N + EXTRA, other=0.0), mask=o < N)

    x, y = torch.randn(10), torch.empty(10)
    with triton_interpreter():
        with testing.bounds_checked():
            copy[(1,)](x, y, 10, EXTRA=0, BLOCK=16)
            with pytest.raises(InterpreterError, match="OutOfBounds.*'X' reaches byte 44 of its 40"):
                copy[(1,)](x, y, 10, EXTRA=1, BLOCK=16)
        copy[(1,)](x, y, 10, EXTRA=1, BLOCK=16)
    assert torch.equal(y, x)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the suite interprets every launch only without a GPU")
def test_the_overflow_checks_it_skips_are_dead(monkeypatch):
    """`no_dead_overflow_checks()` skips only work whose result is discarded: with the checks
    built (Triton's default, forced here over the suite's session-wide block), an int32 product
    that overflows still wraps without an error, as on a GPU without `debug` — so a Triton whose
    interpreter started to enforce them fails here instead of losing a check. Inside the block
    (which `triton_interpreter()` enters too) the kernel computes the same, and the options come
    back after it."""
    import dataclasses

    import triton.language as tl
    from triton.runtime import interpreter

    @triton.jit
    def square(X, Y, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        x = tl.load(X + o)
        tl.store(Y + o, x * x + x)

    builder = interpreter.interpreter_builder
    monkeypatch.setattr(builder, "options", dataclasses.replace(builder.options, sanitize_overflow=True))
    x = torch.tensor([2**20, 3, -(2**31), 46341], dtype=torch.int32)
    checked, skipped = torch.empty_like(x), torch.empty_like(x)
    square[(1,)](x, checked, BLOCK=4)
    with testing.no_dead_overflow_checks():
        assert not builder.options.sanitize_overflow
        square[(1,)](x, skipped, BLOCK=4)
    assert builder.options.sanitize_overflow
    with triton_interpreter():
        assert not builder.options.sanitize_overflow
    assert builder.options.sanitize_overflow
    assert torch.equal(checked, x * x + x) and torch.equal(skipped, checked)


@pytest.mark.parametrize("policy, transition", [("single", "g"), ("single", "both"), ("dla", "g"), ("dla", "beta"),
                                                ("dla", "both"), ("fenwick", "g"), ("fenwick", "both")])
def test_the_operators_kernels_stay_in_bounds(policy, transition):
    """Every Triton kernel the operator launches — segmentation, readout, backbone, forward and
    backward — on a length of no whole chunk and head dims of no power of two, with every access
    held to its tensor (`bounds_checked`). (`single` without gates runs the torch delta rule.)"""
    gen = torch.Generator().manual_seed(1)
    B, T, H, Dk, Dv, K = 2, 37, 2, 20, 24, 8
    q, k = (torch.randn(B, T, H, Dk, generator=gen) for _ in range(2))
    k = torch.nn.functional.normalize(k, dim=-1)
    v = torch.randn(B, T, H, Dv, generator=gen)
    lam = torch.rand(B, T, H, K, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * 0.1 if transition != "beta" else None
    beta = torch.rand(B, T, H, generator=gen) if transition != "g" else None
    leaves = [x.requires_grad_() for x in (q, k, v, lam)]
    with triton_interpreter(), testing.bounds_checked():
        o = dla.multistate_attention(*leaves, g=g, beta=beta, policy=policy, chunk_size=16)
        o.backward(torch.randn(o.shape, generator=gen))
    assert torch.isfinite(o).all() and all(torch.isfinite(x.grad).all() for x in leaves)


def test_relative_error_is_the_norm_ratio_in_float64():
    """`‖out − ref‖ / ‖ref‖` computed in float64 (a float32 difference of 1e-8 survives), and the
    absolute norm where the reference is zero (no division by it)."""
    ref = torch.tensor([3.0, 4.0])
    assert testing.relative_error(ref + torch.tensor([0.3, 0.4]), ref) == pytest.approx(0.1)
    assert testing.relative_error(ref.float(), ref.double() + 1e-8) == pytest.approx(2 ** 0.5 * 1e-8 / 5, rel=1e-3)
    assert testing.relative_error(torch.tensor([0.0, 2.0]), torch.zeros(2)) == 2.0
    assert testing.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
