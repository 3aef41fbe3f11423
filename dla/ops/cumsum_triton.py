r"""Prefix sums along one dimension, by Triton kernels on CUDA tensors:

    y[r, t, c] = Σ_{s ≤ t} x[r, s, c]          (reverse: Σ_{s ≥ t} x[r, s, c])

with `x` viewed as `[R, T, C]` around the summed dimension. Two launches, parallel over rows,
blocks of `C` and pieces of `T` (the readout scans a few rows of up to hundreds of thousands of
tokens, so one program per row would walk them one block at a time):

1. `_piece_kernel`: each piece of `CH` tokens scanned on its own, its total kept;
2. `_offset_kernel`: each piece adds the totals of the pieces before it (after it, reversed).

Why not `torch.cumsum`: code inside `dla::readout_without_beta` (a `triton_op`) is traced by
`torch.compile`, which turns its cumsums into Inductor scans, and on few rows Inductor picks its
split-scan kernel, whose code generation failed under torch 2.11 (`TritonSplitScanKernel`:
"list indices must be integers or slices, not NoneType" on a model of two heads,
`tests/test_eval.py::test_compiled_grid_runs_on_the_gpu`). Kernels of ours are opaque to that
choice and need no transposes to scan an outer dimension. CPU tensors take `torch.cumsum`.
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

MAX_PIECES = 64  # pieces per row: the offset kernel sums at most this many totals


@triton.jit
def _piece_kernel(X, Y, TOT, T, C, NP, CH: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                  REVERSE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    j = tl.program_id(2)
    X += r * T * C
    Y += r * T * C
    carry = tl.zeros([BC], dtype=Y.dtype.element_ty)
    for i in range(0, CH // BT):
        if REVERSE:
            t = j * CH + CH - (i + 1) * BT + tl.arange(0, BT)
        else:
            t = j * CH + i * BT + tl.arange(0, BT)
        m = (t < T)[:, None] & (c < C)[None, :]
        x = tl.load(X + t[:, None].to(tl.int64) * C + c[None, :], mask=m, other=0).to(Y.dtype.element_ty)
        tl.store(Y + t[:, None].to(tl.int64) * C + c[None, :], carry[None, :] + tl.cumsum(x, axis=0, reverse=REVERSE),
                 mask=m)
        carry += tl.sum(x, axis=0)
    tl.store(TOT + (r * NP + j) * C + c, carry, mask=c < C)


@triton.jit
def _offset_kernel(Y, TOT, T, C, NP, CH: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BP: tl.constexpr,
                   REVERSE: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    j = tl.program_id(2)
    p = tl.arange(0, BP)
    earlier = (p > j) if REVERSE else (p < j)
    totals = tl.load(TOT + (r * NP + p)[:, None] * C + c[None, :], mask=(earlier & (p < NP))[:, None]
                     & (c < C)[None, :], other=0)
    offset = tl.sum(totals, axis=0)
    Y += r * T * C
    for i in range(0, CH // BT):
        t = j * CH + i * BT + tl.arange(0, BT)
        m = (t < T)[:, None] & (c < C)[None, :]
        at = Y + t[:, None].to(tl.int64) * C + c[None, :]
        tl.store(at, tl.load(at, mask=m, other=0) + offset[None, :], mask=m)


def cumsum_triton(x: Tensor, dim: int, reverse: bool = False) -> Tensor:
    """`torch.cumsum(x, dim)` (reversed: `x.flip(dim).cumsum(dim).flip(dim)`) by the kernels, in
    `x`'s dtype (float32, float64, int32 or int64; CPU tensors through the interpreter)."""
    if x.dtype not in (torch.float32, torch.float64, torch.int32, torch.int64):
        raise TypeError(f"x must be float32, float64, int32 or int64, got {x.dtype}")
    dim = dim % x.dim()
    x = x.contiguous()
    R, T, C = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    small = interpreting(x)
    BC = min(pow2(C, 1), 16 if small else 64)
    BT = 16 if small else max(16, 1024 // BC)
    CH = max(BT, pow2(triton.cdiv(T, MAX_PIECES), 1))  # a multiple of BT: both are powers of two
    NP = triton.cdiv(T, CH)
    totals = torch.empty(R, NP, C, dtype=x.dtype, device=x.device)
    grid = (R, triton.cdiv(C, BC), NP)
    wrap_triton(_piece_kernel)[grid](x, y, totals, T, C, NP, CH=CH, BT=BT, BC=BC, REVERSE=reverse)
    if NP > 1:
        wrap_triton(_offset_kernel)[grid](y, totals, T, C, NP, CH=CH, BT=BT, BC=BC, BP=pow2(NP, 1), REVERSE=reverse)
    return y


def cumsum(x: Tensor, dim: int, reverse: bool = False) -> Tensor:
    """The prefix sum along `dim` (module doc): the kernels for CUDA tensors, torch otherwise."""
    if x.is_cuda:
        return cumsum_triton(x, dim, reverse)
    return x.flip(dim).cumsum(dim).flip(dim) if reverse else x.cumsum(dim)
