"""Input validation shared by every public entry point (SPEC §4).

Checks ranks, shapes, dtypes, devices and options from metadata only, so it never
synchronises a GPU and is free under `torch.compile`. Values inside tensors (`g ≤ 0`,
`β ∈ [0, 1]`) are the caller's contract. The one data-dependent check, `fenwick`'s level
budget with a carried `step`, runs inside the segmentation op (see `check_fenwick_levels`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from dla.ops.state import MultiStateCache, state_dtype

POLICIES = ("dla", "fenwick", "single")
SCORES = ("drift", "token", "state")  # the first is the default
CPU_DTYPES = (torch.float32, torch.float64)
CUDA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Problem(NamedTuple):
    batch: int
    length: int
    heads: int
    dk: int
    dv: int
    levels: int
    scale: float


def bit_length(x: int) -> int:
    return int(x).bit_length()


def _shape(name: str, x: Tensor, expected: tuple, what: str) -> None:
    if tuple(x.shape) != tuple(expected):
        layout = f"{what} = " if what else ""
        raise ValueError(f"{name} must have shape {layout}{list(expected)}, got {list(x.shape)}")


def _tensor(name: str, x) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def validate(
    q, k, v, lam, *, g=None, beta=None, policy="dla", tau=0.6, score="drift", scale=None,
    chunk_size=64, initial_state=None, packed=False,
) -> Problem:
    """Raise `TypeError`/`ValueError` naming the offending argument; return the dimensions.
    `packed`: the tensors are one row of packed sequences (`cu_seqlens`), whose lengths bound
    `fenwick`'s levels instead of `T` (checked again on the rows)."""
    for name, x in (("q", q), ("k", k), ("v", v), ("lam", lam)):
        _tensor(name, x)
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, T, H, D], got {x.dim()}-D shape {list(x.shape)}")
    B, T, H, Dk = q.shape
    Dv, L = v.shape[-1], lam.shape[-1]
    if T < 1:
        raise ValueError(f"q must hold at least one token (T >= 1), got T = {T}")
    _shape("k", k, (B, T, H, Dk), "[B, T, H, Dk] like q")
    _shape("v", v, (B, T, H, Dv), "[B, T, H, Dv]")
    _shape("lam", lam, (B, T, H, L), "[B, T, H, L]")
    for name, x in (("k", k), ("v", v), ("lam", lam)):
        if x.dtype != q.dtype:
            raise TypeError(f"q, k, v and lam must share one dtype: q is {q.dtype}, {name} is {x.dtype}")
    allowed = CUDA_DTYPES if q.device.type == "cuda" else CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q has dtype {q.dtype}; on {q.device.type} the supported dtypes are {list(allowed)}")
    for name, x in (("g", g), ("beta", beta)):
        if x is None:
            continue
        _tensor(name, x)
        _shape(name, x, (B, T, H), "[B, T, H]")
        if x.dtype not in allowed:
            raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes are {list(allowed)}")
        if x.dtype != q.dtype and x.dtype != torch.float32:
            raise TypeError(f"{name} must have q's dtype ({q.dtype}) or float32, got {x.dtype}")
    for name, x in (("k", k), ("v", v), ("lam", lam), ("g", g), ("beta", beta)):
        if x is not None and x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all tensors must share one device")

    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if not isinstance(score, str) or score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau >= 0 or tau == float("inf"):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if scale is None:
        scale = Dk**-0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
        raise ValueError(f"scale must be a finite number > 0 or None, got {scale!r}")
    if policy == "dla" and L < 2:
        raise ValueError(f"policy 'dla' needs capacity K = lam.shape[-1] >= 2, got {L}")
    if policy == "fenwick" and initial_state is None and not packed and not L > bit_length(T - 1):
        raise ValueError(
            f"policy 'fenwick' needs lam.shape[-1] > bitlen(T - 1) = {bit_length(T - 1)} levels for T = {T}, got {L}"
        )
    if initial_state is not None:
        _validate_state(initial_state, B, H, L, Dk, Dv, q)
    return Problem(B, T, H, Dk, Dv, L, float(scale))


def _validate_state(state, B, H, K, Dk, Dv, q: Tensor) -> None:
    if not isinstance(state, MultiStateCache):
        raise TypeError(f"initial_state must be a dla.ops.MultiStateCache, got {type(state).__name__}")
    fdt = state_dtype(q.dtype)
    expected = {
        "S": ((B, H, K, Dk, Dv), fdt), "n": ((B, H, K), torch.int64), "I": ((B, H, K), fdt),
        "m": ((B, H), torch.int64), "Z": ((B, H, Dk, Dv), fdt), "zz": ((B, H), fdt),
        "step": ((B,), torch.int64), "N": ((B, H), fdt),
    }
    for field, (shape, dtype) in expected.items():
        x = _tensor(f"initial_state.{field}", getattr(state, field))
        _shape(f"initial_state.{field}", x, shape, "")
        if x.dtype != dtype:
            raise TypeError(f"initial_state.{field} must have dtype {dtype}, got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"initial_state.{field} is on {x.device} but q is on {q.device}")


def check_segment_options(levels: int, policy: str, score: str, chunk_size: int) -> None:
    """The options a segmentation kernel receives, checked again at the op boundary (an op can be
    called directly, without `validate`)."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    if score not in SCORES:
        raise ValueError(f"score must be one of {list(SCORES)}, got {score!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if policy == "dla" and levels < 2:
        raise ValueError(f"policy 'dla' needs levels (capacity K) >= 2, got {levels}")


def check_fenwick_levels(levels: int, step: Tensor, length: int) -> None:
    """`fenwick` with a carried `step` needs `L > bitlen(step + T − 1)`; reads `step`, so it
    runs inside the segmentation op, never in traced code."""
    last = int(step.max()) + length - 1 if step.numel() else length - 1
    if not levels > bit_length(last):
        raise ValueError(
            f"policy 'fenwick' needs lam.shape[-1] > bitlen(step + T - 1) = {bit_length(last)} "
            f"levels at absolute position {last}, got {levels}"
        )
