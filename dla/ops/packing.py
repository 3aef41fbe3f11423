"""Packed variable-length sequences as padded rows, in static shapes.

A packed batch is one row of `T` tokens holding `N` sequences back to back, and `cu_seqlens
[N + 1]` (int32) their cumulative offsets: `0` first, `T` last, non-decreasing — the convention of
flash-attention's and fla's `cu_seqlens`. `layout` lays sequence `n` out as row `n` of `[N, L]`,
left-aligned, with padding after its last token; `to_rows` and `from_rows` move tensors between
the two layouts. Both directions are gathers of static shape (`L` is a Python int), so they trace
under `torch.compile(fullgraph=True)`, carry gradients, and read no value on the host.

Padding comes after a sequence's tokens, so in a causal computation it never reaches them. What
follows a sequence's end in its row is the caller's to neutralise where it would change a final
state (the operator writes nothing there and tells the segmentation where each row ends).

The rows cost `N·L` tokens of work for `T` packed ones: `L` (`max_seqlen`) bounds the longest
sequence, so the layout pays for the spread of lengths, never for their order.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Rows", "check_cu_seqlens", "layout", "to_rows", "from_rows"]


class Rows(NamedTuple):
    """Where each packed position lives in the padded rows, and back."""
    index: Tensor  # [N, L] int64 packed position of row n, column j (clamped where j ≥ length)
    valid: Tensor  # [N, L] bool: column j holds a token of sequence n
    lengths: Tensor  # [N] int64
    row: Tensor  # [T] int64 the row of packed position p
    column: Tensor  # [T] int64 its column


def check_cu_seqlens(cu_seqlens, batch: int, length: int, max_seqlen, device, name: str = "cu_seqlens") -> int:
    """Check the metadata on the host and the values on the device (`torch._assert_async`: no
    synchronisation; a bad value fails the call, naming the argument). Returns the rows' length
    `L`: `max_seqlen` or, when None, `length`."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32 offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be a 1-D int32 tensor of N + 1 ≥ 2 cumulative offsets, got "
                         f"{cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != torch.device(device):
        raise ValueError(f"{name} must be on the inputs' device {device}, got {cu_seqlens.device}")
    if batch != 1:
        raise ValueError(f"with {name}, the inputs hold one packed row: batch must be 1, got {batch}")
    if max_seqlen is None:
        max_seqlen = length
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int (or None: the packed length), got {max_seqlen!r}")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    torch._assert_async(cu_seqlens[0] == 0, f"{name} must start at 0")
    torch._assert_async(cu_seqlens[-1] == length, f"{name} must end at the packed length T = {length}")
    torch._assert_async((lengths >= 0).all(), f"{name} must be non-decreasing")
    torch._assert_async((lengths <= max_seqlen).all(),
                        f"{name}: a sequence is longer than max_seqlen = {max_seqlen}")
    return max_seqlen


def layout(cu_seqlens: Tensor, length: int, rows: int) -> Rows:
    """The map between `length` packed positions and `N` rows of `rows` columns."""
    dev = cu_seqlens.device
    offsets = cu_seqlens.to(torch.int64)
    lengths = offsets[1:] - offsets[:-1]
    column = torch.arange(rows, device=dev)
    valid = column < lengths[:, None]
    index = (offsets[:-1, None] + column).clamp(max=max(length - 1, 0))
    position = torch.arange(length, device=dev)
    # the last sequence starting at or before p holds it (empty sequences share its offset)
    row = torch.searchsorted(offsets[1:], position, right=True)
    return Rows(index=index, valid=valid, lengths=lengths, row=row, column=position - offsets[row])


def to_rows(x: Tensor | None, rows: Rows) -> Tensor | None:
    """`x [1, T, ...]` → `[N, L, ...]`, zero after each sequence's end."""
    if x is None:
        return None
    out = x[0][rows.index]
    return torch.where(rows.valid.view(*rows.valid.shape, *([1] * (x.dim() - 2))), out, 0)


def from_rows(y: Tensor, rows: Rows) -> Tensor:
    """`y [N, L, ...]` → `[1, T, ...]`: each packed position from its row and column."""
    return y[rows.row, rows.column][None]
