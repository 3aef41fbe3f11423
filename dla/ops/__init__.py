"""Operators: the public multi-state attention, its references, segmentation and readout."""

from dla.ops.api import multistate_attention
from dla.ops.state import MultiStateCache, empty_cache

__all__ = ["multistate_attention", "MultiStateCache", "empty_cache"]
