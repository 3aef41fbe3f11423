"""Public operator (SPEC §4). TRANSITIONAL: delegates to the recurrent reference until the
custom ops land in this session."""

from dla.ops.reference import multistate_attention_recurrent as multistate_attention  # noqa: F401
