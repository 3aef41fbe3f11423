"""What computes, by stage (SPEC §8): `segment/` (the level map from the writes), `backbone/`
(one state read out per query: the `single` policy and DLA's open block), `readout/` (every
query reads every live slot); beside them the three float64 references (`reference.py`), the
cache (`state.py`), input validation and the policy and score names (`validation.py`), the level
map's encoding (`levels.py`) and what the Triton files share (`triton_utils.py`).

Nothing here imports `dla.compile` or anything above it: the public operator is
`dla.multistate_attention` (`dla/operator.py`), above the op registrations.
"""

from dla.ops.state import MultiStateCache, empty_cache
from dla.ops.validation import POLICIES, SCORES

__all__ = ["MultiStateCache", "empty_cache", "POLICIES", "SCORES"]
