"""Models over the multi-state operator: Mamba-2 and Gated DeltaNet mixers (policy chosen by
config, so base, Log-Linear and DLA variants are one class each), a softmax-attention
baseline, and the causal language model."""

from dla.model.attention import SoftmaxAttention
from dla.model.config import BACKBONES, POLICIES, PRESETS, ModelConfig, preset
from dla.model.gated_deltanet import DLAGatedDeltaNet
from dla.model.lm import CausalLM
from dla.model.mamba2 import DLAMamba2

__all__ = ["BACKBONES", "POLICIES", "PRESETS", "ModelConfig", "preset", "CausalLM", "DLAMamba2",
           "DLAGatedDeltaNet", "SoftmaxAttention"]
