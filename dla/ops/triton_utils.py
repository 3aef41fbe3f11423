"""What the Triton kernel files of `dla.ops` share.

* A launch runs through the Triton interpreter exactly when its tensors are on the CPU (that
  happens under `dla.testing.triton_interpreter()` and in the test suite, whose kernels are
  interpreted). Launchers pick interpreter-sized blocks by asking `interpreting(tensor)`: the
  tensors decide, not an environment variable read at an arbitrary time.
* Block sizes are powers of two no smaller than `tl.dot`'s minimum of 16.
* The backbone's sequential state passes index one batch element in int32 (`check_state_offsets`).
* Products with a float32 operand, for bfloat16 inputs, as split bfloat16 products (`mm`, `mmr`,
  `mm32`: the float32 tile as hi + lo, two bfloat16 tiles holding 16 bits of its mantissa, with
  float32 accumulation): two bfloat16 tensor-core products cost a third of tf32x3's three tf32
  ones, and the inputs' tile enters as it was loaded. `split_products(x)` gives the kernels'
  `SPLIT` (bfloat16 inputs) and `INTERP` (the interpreter's bfloat16 dot is wrong: there the
  same products run in float32).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter


def interpreting(x: torch.Tensor) -> bool:
    """Whether a launch over `x` runs through the interpreter (CPU tensors) rather than the GPU
    compiler; applies the interpreter fixes below the first time it says yes."""
    if x.device.type == "cuda":
        return False
    fix_interpreter_range()
    fix_interpreter_bfloat16()
    return True


def pow2(x: int, lo: int = 16) -> int:
    """The smallest power of two ≥ max(x, lo)."""
    return max(lo, triton.next_power_of_2(int(x)))


def check_state_offsets(name: str, T: int, H: int, Dk: int, Dv: int, chunk_size: int) -> None:
    """Refuse shapes past the state passes' int32 offsets within one batch element — token rows
    `t·H·D` and chunk states `c·Dk·Dv` — where their addresses would wrap silently."""
    if T * H * max(Dk, Dv) >= 2**31 or -(-T // chunk_size) * Dk * Dv >= 2**31:
        raise ValueError(f"{name}: the kernels index one batch element in int32: T·H·max(Dk, Dv) and "
                         f"⌈T/chunk_size⌉·Dk·Dv must be < 2**31, got T={T}, H={H}, Dk={Dk}, Dv={Dv}")


def fix_interpreter_range() -> None:
    """Triton 3.6's interpreter turns a runtime scalar into a 1-element array and `range()`
    calls `int()` on it, which numpy ≥ 2.4 refuses (triton#9171, fixed upstream by #9172). The
    kernels keep `for` loops over runtime bounds, which the GPU compiler pipelines."""
    original = interpreter._patch_lang_tensor
    if getattr(original, "dla_range_fix", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.dla_range_fix = True
    interpreter._patch_lang_tensor = patched


def fix_interpreter_bfloat16() -> None:
    """Triton 3.6's interpreter casts float32 to bfloat16 by dropping the low bits (rounding
    toward zero), where the GPU rounds to nearest even: twice the error, and biased, in every
    16-bit result a CPU test checks. The interpreter's cast rounds as the GPU does (torch's
    conversion, which rounds to nearest even)."""
    original = interpreter.InterpreterBuilder.cast_impl
    if getattr(original, "dla_rounding_fix", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    cast_impl.dla_rounding_fix = True
    interpreter.InterpreterBuilder.cast_impl = cast_impl


def split_products(x: torch.Tensor) -> dict:
    """The split-product flags of a launch over inputs like `x` (module doc)."""
    return dict(SPLIT=x.dtype == torch.bfloat16, INTERP=interpreting(x))


@triton.jit
def hilo(x):
    """x (float32) as hi + lo, two bfloat16 tiles (16 bits of x's mantissa; bfloat16 has x's range)."""
    hi = x.to(tl.bfloat16)
    return hi, (x - hi.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def mm(a, b, PREC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """a · b in float32, a a tile of the inputs in their dtype (exact), b float32. SPLIT (bfloat16
    inputs): a·hi(b) + a·lo(b), bfloat16 products with float32 accumulation — a is a plain load,
    which Triton hands to the tensor cores from shared memory, where a converted float32 operand
    would sit in registers; else a in float32 at PREC."""
    if SPLIT:
        hi, lo = hilo(b)
        if INTERP:  # the interpreter's bfloat16 dot is wrong: the same two products in float32
            a = a.to(tl.float32)
            return tl.dot(a, lo.to(tl.float32), tl.dot(a, hi.to(tl.float32), input_precision="ieee"),
                          input_precision="ieee")
        return tl.dot(a, lo, tl.dot(a, hi))
    return tl.dot(a.to(tl.float32), b, input_precision=PREC)


@triton.jit
def mm16(a, b, PREC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """a · b in float32 for two tiles of the inputs in their dtype (exact products either way)."""
    if SPLIT and not INTERP:
        return tl.dot(a, b)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)


@triton.jit
def mmr(a, b, PREC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """`mm` mirrored: a · b for a float32 a and a tile b of the inputs in their dtype."""
    if SPLIT:
        hi, lo = hilo(a)
        if INTERP:
            b = b.to(tl.float32)
            return tl.dot(lo.to(tl.float32), b, tl.dot(hi.to(tl.float32), b, input_precision="ieee"),
                          input_precision="ieee")
        return tl.dot(lo, b, tl.dot(hi, b))
    return tl.dot(a, b.to(tl.float32), input_precision=PREC)


@triton.jit
def mm32(a, b, PREC: tl.constexpr, SPLIT: tl.constexpr, INTERP: tl.constexpr):
    """a · b for two float32 tiles. SPLIT: the three bfloat16 products of (a_hi + a_lo)(b_hi + b_lo)
    without lo·lo (relative error about 2⁻¹⁶ per product); else PREC."""
    if SPLIT:
        ah, al = hilo(a)
        bh, bl = hilo(b)
        if INTERP:
            ah, al, bh, bl = ah.to(tl.float32), al.to(tl.float32), bh.to(tl.float32), bl.to(tl.float32)
            return tl.dot(al, bh, tl.dot(ah, bl, tl.dot(ah, bh, input_precision="ieee"), input_precision="ieee"),
                          input_precision="ieee")
        return tl.dot(al, bh, tl.dot(ah, bl, tl.dot(ah, bh)))
    return tl.dot(a, b, input_precision=PREC)
