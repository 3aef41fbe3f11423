"""Operators: the public multi-state attention, its references, segmentation and readout."""

from dla.ops.api import level_map, multistate_attention
from dla.ops.state import MultiStateCache, empty_cache

__all__ = ["multistate_attention", "level_map", "MultiStateCache", "empty_cache"]

import dla.compile.ops  # noqa: E402,F401  registers dla::segment and dla::readout
