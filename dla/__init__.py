"""Dynamic Linear Attention for PyTorch: multi-state linear attention whose memory is segmented
by content. `dla.multistate_attention` is the operator (SPEC §4), its kernels are in `dla.ops` by
stage and registered as custom ops by `dla.compile`; `dla.model` composes the layers and the
language model; `dla.run` and the `dla` command train, evaluate and serve it.
`dla.load(checkpoint)` returns a trained model ready to use."""

from dla.operator import level_map, multistate_attention
from dla.ops import MultiStateCache, empty_cache
from dla.run.checkpoint import load

__version__ = "0.1.0"

__all__ = ["__version__", "multistate_attention", "level_map", "MultiStateCache", "empty_cache", "load"]
