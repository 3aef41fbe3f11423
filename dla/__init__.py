"""Dynamic Linear Attention for PyTorch: `dla.multistate_attention` (the operator, SPEC §4), its
kernels by stage in `dla.ops`, their registration as custom ops in `dla.compile`, the model in
`dla.model`."""

from dla.operator import level_map, multistate_attention
from dla.ops import MultiStateCache, empty_cache

__all__ = ["multistate_attention", "level_map", "MultiStateCache", "empty_cache"]
