"""Testing aids for code built on `dla`.

`triton_interpreter()` runs the operator's Triton kernels on CPU tensors, through Triton's
interpreter, for the length of a `with` block: a user can fuzz the GPU path (with hypothesis,
say) on a machine without a GPU. Inside the block the CPU kernels of the `dla::*` ops are the
CUDA side of each stage's rule — the same kernels, chosen the same way — and a launch of any
Triton kernel runs through the interpreter (`triton.jit` picks compiler or interpreter when a
kernel is defined, so the block hands each launch and each device-function call to an
interpreted twin of the kernel). Outside it nothing has changed: the registrations and Triton's
own launch methods come back when the block exits. Not thread-safe: use it around tests.

`bounds_checked()` holds every load and store of the interpreted kernels launched inside it to
the tensor argument it addresses: an access past a tensor's end, which on a GPU reads another
buffer or stops the process with an illegal address, raises at the launch that makes it.

`relative_error(out, ref)` is the comparison the library's tests and GPU checks share:
`‖out − ref‖ / ‖ref‖` in float64 (`‖out − ref‖` where `ref` is zero). `poisoned_empty()` fills
what `torch.empty` and `torch.empty_like` return inside a `with` block with NaN (extreme values
for integers), so an output element a kernel forgets to write shows in that comparison.

`compile_for_sm90(fn, types, constexprs, **options)` puts one Triton kernel through Triton's GPU
compiler and ptxas for an H100 on the same machine: what the interpreter accepts but the compiler
refuses, and a kernel's shared memory and spills, show without a GPU.

The interpreter runs every program of a launch in Python over numpy arrays, so keep shapes tiny
(a few heads, tens of tokens, head dims of 16 or 32). It computes float32 faithfully; 16-bit
`tl.dot` is not trustworthy there, so call the operator with float32 inputs.

    import torch, dla
    from dla.testing import triton_interpreter

    with triton_interpreter():
        o = dla.multistate_attention(q, k, v, lam, g=g)     # q, ... float32 CPU tensors
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from contextlib import contextmanager

import numpy as np
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import interpreter as _interp
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

import dla.compile.ops  # noqa: F401  the registrations this overrides
from dla.ops.backbone import backbone_backward_triton, backbone_forward_triton
from dla.ops.readout import readout_backward_triton, readout_forward_triton
from dla.ops.segment import segment_triton

__all__ = ["triton_interpreter", "no_dead_overflow_checks", "bounds_checked", "OutOfBounds", "compile_for_sm90",
           "PTXAS", "relative_error", "poisoned_empty"]

# the ptxas that `compile_for_sm90` runs, shipped in Triton's wheel (absent from some builds)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`‖out − ref‖ / ‖ref‖` in float64; `‖out − ref‖` where `ref` is zero."""
    ref = ref.double()
    denom = ref.norm()
    err = (out.double() - ref).norm()
    return float(err / denom) if denom > 0 else float(err)


@contextmanager
def poisoned_empty():
    """`torch.empty` and `torch.empty_like` return NaN-filled floats (and extreme ints) inside the
    block, so an element a kernel forgets to write shows."""
    real_empty, real_like = torch.empty, torch.empty_like

    def poison(x):
        if x.is_floating_point():
            return x.fill_(float("nan"))
        return x.fill_(True) if x.dtype == torch.bool else x.fill_(max(-(2**30), torch.iinfo(x.dtype).min))

    torch.empty = lambda *size, **kw: poison(real_empty(*size, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_like


def compile_for_sm90(fn, types, constexprs: dict, **options):
    """The Triton kernel `fn` through Triton's GPU compiler and ptxas for sm_90a, on this machine
    (no GPU needed: a kernel that compiles here but exceeds Hopper's shared memory or spills shows
    it in the result's metadata and `asm`). Every runtime parameter gets the Triton signature type
    `types(name)` (`"*fp32"`, `"i32"`, ...), the constexprs are `constexprs`, and `options` are the
    launch options (`num_warps`, `num_stages`)."""
    signature = {p.name: "constexpr" if p.is_constexpr else types(p.name) for p in fn.params}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)


@contextmanager
def no_dead_overflow_checks():
    """Inside the block, Triton's interpreter skips integer-overflow checks that it would throw
    away. For every integer add, subtract and multiply it recomputes the result in int64,
    compares it with the type's range and hands the comparison to `device_assert`, which
    discards it unless the builder's options have `debug` on — never in the interpreter. That
    dead work is a large share of an interpreted launch; skipping it changes nothing a kernel
    computes. `triton_interpreter()` enters it for its block; a test suite that interprets
    every launch (`TRITON_INTERPRET=1`) can hold it for the whole session."""
    builder = getattr(_interp, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    # a Triton other than the pinned one may lay its interpreter out otherwise: then skip nothing
    skip = (dataclasses.is_dataclass(options) and getattr(options, "sanitize_overflow", False) is True
            and getattr(options, "debug", True) is False)
    if skip:
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    try:
        yield
    finally:
        if skip:
            builder.options = options


@contextmanager
def triton_interpreter():
    """Route the `dla::*` ops' CPU kernels to their Triton kernels, interpreted, inside the block."""
    with _jit_functions_interpreted(), no_dead_overflow_checks(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="(?s).*Overriding a previously registered kernel")
        lib = torch.library.Library("dla", "IMPL")
        try:
            lib.impl("segment", segment_triton, "CPU")
            lib.impl("readout", readout_forward_triton, "CPU")
            lib.impl("readout_backward", readout_backward_triton, "CPU")
            lib.impl("backbone", backbone_forward_triton, "CPU")
            lib.impl("backbone_backward", backbone_backward_triton, "CPU")
            yield
        finally:
            lib._destroy()


class OutOfBounds(AssertionError):
    """An interpreted kernel's load or store outside the tensor argument it addresses."""


@contextmanager
def bounds_checked():
    """Inside the block, each load and store of an interpreted Triton launch must fall, on every
    lane its mask keeps, inside the one tensor argument that its lowest address lies in (from
    that tensor's first element to its last, by its strides); otherwise `OutOfBounds` names the
    kernel, the argument and the overrun (the interpreter re-raises it as its `InterpreterError`,
    with the message). Accesses that address no argument at all raise too.
    Patches the interpreter (`GridExecutor`, `InterpreterBuilder`) for the block; not
    thread-safe."""
    ranges: list[tuple[int, int, str]] = []
    kernel = [""]
    init, load, store = (_interp.GridExecutor._init_args_hst, _interp.InterpreterBuilder.create_masked_load,
                         _interp.InterpreterBuilder.create_masked_store)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        kernel[0] = self.fn.__name__
        ranges.clear()
        named = list(zip(self.arg_names, args_hst)) + list(kwargs_hst.items())
        for name, a in named:
            if isinstance(a, torch.Tensor) and a.numel() > 0:
                last = sum((n - 1) * st for n, st in zip(a.shape, a.stride()))
                ranges.append((a.data_ptr(), a.data_ptr() + (last + 1) * a.element_size(), name))
        return args_hst, kwargs_hst

    def check(what: str, ptrs, mask) -> None:
        addr = np.asarray(ptrs.data, dtype=np.uint64)
        on = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
        if not on.any():
            return
        size = np.dtype(_interp._get_np_dtype(ptrs.get_element_ty())).itemsize
        lo, hi = int(addr[on].min()), int(addr[on].max()) + size
        for start, end, name in ranges:
            if start <= lo < end:
                if hi > end:
                    raise OutOfBounds(f"{kernel[0]}: a {what} of {name!r} reaches byte {hi - start} of its "
                                      f"{end - start}")
                return
        raise OutOfBounds(f"{kernel[0]}: a {what} at an address in no tensor argument")

    def checked_load(self, ptrs, mask, *rest):
        check("load", ptrs, mask)
        return load(self, ptrs, mask, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        check("store", ptrs, mask)
        return store(self, ptrs, value, mask, *rest)

    _interp.GridExecutor._init_args_hst = init_args
    _interp.InterpreterBuilder.create_masked_load = checked_load
    _interp.InterpreterBuilder.create_masked_store = checked_store
    try:
        yield
    finally:
        _interp.GridExecutor._init_args_hst = init
        _interp.InterpreterBuilder.create_masked_load = load
        _interp.InterpreterBuilder.create_masked_store = store


@contextmanager
def _jit_functions_interpreted():
    """`JITFunction.run` (a launch) and `JITFunction.__call__` (a device-function call inside a
    kernel, `tl.sum` included) handed to an interpreted twin of the same Python function."""
    twins: dict = {}

    def twin(jit_fn: JITFunction) -> InterpretedFunction:
        if jit_fn.fn not in twins:
            twins[jit_fn.fn] = InterpretedFunction(jit_fn.fn)
        return twins[jit_fn.fn]

    run, call = JITFunction.run, JITFunction.__call__
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: twin(self).run(*args, grid=grid, warmup=warmup, **kwargs)
    JITFunction.__call__ = lambda self, *args, **kwargs: twin(self)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.run, JITFunction.__call__ = run, call
