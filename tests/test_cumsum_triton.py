"""The prefix-sum kernel (`dla/ops/cumsum_triton.py`) against `torch.cumsum`, through the
interpreter on the CPU and on the GPU at the sizes the readout scans."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dla.ops.cumsum_triton import cumsum, cumsum_triton
from tests.sm90 import compile_script

DTYPES = {"float64": torch.float64, "float32": torch.float32, "int64": torch.int64, "int32": torch.int32}


def _reference(x: torch.Tensor, dim: int, reverse: bool) -> torch.Tensor:
    return x.flip(dim).cumsum(dim).flip(dim) if reverse else x.cumsum(dim)


def _check(y: torch.Tensor, x: torch.Tensor, dim: int, reverse: bool) -> None:
    ref = _reference(x, dim, reverse)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dtype.is_floating_point:
        bound = 1e-12 if x.dtype == torch.float64 else 1e-5
        err = ((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        assert err <= bound, err
    else:
        assert torch.equal(y, ref)


@settings(max_examples=30, deadline=None)
@given(rank=st.integers(1, 3), data=st.data(), dtype=st.sampled_from(list(DTYPES)), reverse=st.booleans())
def test_matches_torch_cumsum(rank, data, dtype, reverse):
    """Any rank, any summed dimension (first, inner, last), lengths across block edges, both
    directions, floating and integer sums; the input given as a non-contiguous view. The summed
    length crosses the interpreter's 16-long blocks and pieces, the trailing dimensions its
    16-wide column blocks; the leading ones are rows of their own (one program each under the
    interpreter, so they stay few)."""
    dim = data.draw(st.integers(-rank, rank - 1))
    lead, trail = dim % rank, rank - 1 - dim % rank
    shape = (*data.draw(st.lists(st.integers(1, 3), min_size=lead, max_size=lead)), data.draw(st.integers(1, 70)),
             *data.draw(st.lists(st.integers(1, 24), min_size=trail, max_size=trail)))
    gen = torch.Generator().manual_seed(len(shape) * 100 + shape[0])
    base = torch.randn(*shape, 2, generator=gen, dtype=torch.float64) * 50
    x = base[..., 0].to(DTYPES[dtype])  # a strided view
    _check(cumsum_triton(x, dim, reverse), x, dim, reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_long_row_in_many_pieces(reverse):
    """A row long enough for dozens of pieces (the offset kernel sums their totals), T not a
    multiple of the piece."""
    x = torch.randn(1, 1100, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _check(cumsum_triton(x, 1, reverse), x, 1, reverse)


def test_empty_and_rejected_inputs():
    x = torch.zeros(3, 0, 2)
    assert cumsum_triton(x, 1).shape == (3, 0, 2)
    with pytest.raises(TypeError, match="x must be"):
        cumsum_triton(torch.zeros(4, dtype=torch.bfloat16), 0)


def test_cpu_tensors_take_torch():
    x = torch.arange(10, dtype=torch.int64).reshape(2, 5)
    assert torch.equal(cumsum(x, 1), x.cumsum(1))
    assert torch.equal(cumsum(x, 1, reverse=True), x.flip(1).cumsum(1).flip(1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape,dim", [((16, 32768, 16), 1), ((256, 33 * 32), 1), ((256, 129, 32), -1),
                                       ((2, 300, 2), 1)])
@pytest.mark.parametrize("dtype", ["float64", "int64"])
def test_gpu_matches_torch_cumsum(shape, dim, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 50).to(DTYPES[dtype]).cuda()
    for reverse in (False, True):
        _check(cumsum(x, dim, reverse), x, dim, reverse)


COMPILE = r"""
from dla.testing import compile_for_sm90
import dla.ops.cumsum_triton as S

for pointer in ("*fp64", "*fp32", "*i64"):
    for fn, extra in ((S._piece_kernel, {}), (S._offset_kernel, {"BP": 64})):
        for reverse in (False, True):
            meta = dict(CH=512, BT=64, BC=16, REVERSE=reverse, **extra)
            compile_for_sm90(fn, lambda a: "i32" if a in ("T", "C", "NP") else pointer, meta, num_warps=4,
                             num_stages=1)
            print(pointer, fn.__name__, reverse, "compiled", flush=True)
"""


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Both kernels through Triton's GPU compiler and ptxas for sm_90, every dtype the readout
    scans, both directions (the GPU test runs them on the card)."""
    assert compile_script(COMPILE).count("compiled") == 12
