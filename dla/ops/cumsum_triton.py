r"""Prefix sums along one dimension, by a Triton kernel on CUDA tensors:

    y[r, t, c] = Σ_{s ≤ t} x[r, s, c]          (reverse: Σ_{s ≥ t} x[r, s, c])

with `x` viewed as `[R, T, C]` around the summed dimension. One program per row `r` and block of
`C`, walking `T` in blocks with a carried total, so any `T` runs at one launch.

Why not `torch.cumsum`: code inside `dla::readout_without_beta` (a `triton_op`) is traced by
`torch.compile`, which turns its cumsums into Inductor scans, and on few rows Inductor picks its
split-scan kernel, whose code generation failed under torch 2.11 (`TritonSplitScanKernel`:
"list indices must be integers or slices, not NoneType" on a model of two heads,
`tests/test_eval.py::test_compiled_grid_runs_on_the_gpu`). A kernel of ours is opaque to that
choice and needs no transposes to scan an outer dimension. CPU tensors take `torch.cumsum`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from dla.ops.triton_utils import interpreting, pow2

__all__ = ["cumsum", "cumsum_triton"]


@triton.jit
def _cumsum_kernel(X, Y, T, C, BT: tl.constexpr, BC: tl.constexpr, REVERSE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    X += r * T * C
    Y += r * T * C
    carry = tl.zeros([BC], dtype=Y.dtype.element_ty)
    for i in range(0, tl.cdiv(T, BT)):
        if REVERSE:
            t = T - (i + 1) * BT + tl.arange(0, BT)
        else:
            t = i * BT + tl.arange(0, BT)
        m = ((t >= 0) & (t < T))[:, None] & (c < C)[None, :]
        x = tl.load(X + t[:, None].to(tl.int64) * C + c[None, :], mask=m, other=0).to(Y.dtype.element_ty)
        y = carry[None, :] + tl.cumsum(x, axis=0, reverse=REVERSE)
        tl.store(Y + t[:, None].to(tl.int64) * C + c[None, :], y, mask=m)
        carry += tl.sum(x, axis=0)


def cumsum_triton(x: Tensor, dim: int, reverse: bool = False) -> Tensor:
    """`torch.cumsum(x, dim)` (reversed: `x.flip(dim).cumsum(dim).flip(dim)`) by the kernel, in
    `x`'s dtype (float32, float64, int32 or int64; CPU tensors through the interpreter)."""
    if x.dtype not in (torch.float32, torch.float64, torch.int32, torch.int64):
        raise TypeError(f"x must be float32, float64, int32 or int64, got {x.dtype}")
    dim = dim % x.dim()
    x = x.contiguous()
    R, T, C = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    BC = min(pow2(C, 1), 64 if not interpreting(x) else 16)
    BT = max(16, min(1024 // BC, pow2(T, 16), 256 if not interpreting(x) else 32))
    wrap_triton(_cumsum_kernel)[(R, triton.cdiv(C, BC))](x, y, T, C, BT=BT, BC=BC, REVERSE=reverse)
    return y


def cumsum(x: Tensor, dim: int, reverse: bool = False) -> Tensor:
    """The prefix sum along `dim` (module doc): the kernel for CUDA tensors, torch otherwise."""
    if x.is_cuda:
        return cumsum_triton(x, dim, reverse)
    return x.flip(dim).cumsum(dim).flip(dim) if reverse else x.cumsum(dim)
