"""What the Triton kernel files of `dla.ops` share.

* A launch runs through the Triton interpreter exactly when its tensors are on the CPU (that
  happens under `dla.testing.triton_interpreter()` and in the test suite, whose kernels are
  interpreted). Launchers pick interpreter-sized blocks by asking `interpreting(tensor)`: the
  tensors decide, not an environment variable read at an arbitrary time.
* Block sizes are powers of two no smaller than `tl.dot`'s minimum of 16.
* The backbone's sequential state passes index one batch element in int32 (`check_state_offsets`).
"""

from __future__ import annotations

import torch
import triton
from triton.runtime import interpreter


def interpreting(x: torch.Tensor) -> bool:
    """Whether a launch over `x` runs through the interpreter (CPU tensors) rather than the GPU
    compiler; applies the interpreter fix below the first time it says yes."""
    if x.device.type == "cuda":
        return False
    fix_interpreter_range()
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
