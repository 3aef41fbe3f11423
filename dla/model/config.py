"""The model's configuration: one dataclass, and named presets that are data, not code paths.

Every backbone reads the same head geometry: `n_heads` heads with `head_dim = Dk` (Mamba-2's
state size `N`, Gated DeltaNet's key width, attention's head width) and `head_dim_v = Dv`
(Mamba-2's head dimension `P`, so its inner width is `n_heads · Dv`; Gated DeltaNet's value
width). The presets keep `n_heads · Dv = 2 · d_model`, Mamba-2's expansion and Gated
DeltaNet's `expand_v`.

The level count `L = λ.shape[-1]` follows from the policy: `dla` keeps `capacity` states,
`fenwick` needs `L > bitlen(seq_len − 1)` (SPEC §2) and so derives it from `seq_len`, and
`single` is the plain backbone, read with `λ ≡ 1`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dla.ops import POLICIES, SCORES

BACKBONES = ("mamba2", "gdn", "attention")


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "mamba2"  # mamba2 | gdn | attention
    policy: str = "dla"  # dla | fenwick | single (ignored by attention)
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    head_dim: int = 32  # Dk
    head_dim_v: int = 64  # Dv
    mlp_ratio: float = 4.0  # SwiGLU hidden width = mlp_ratio · d_model (rounded up to 32)
    conv_size: int = 4  # short causal convolution of Mamba-2 and Gated DeltaNet
    capacity: int = 8  # K, the number of states of `dla`
    tau: float = 0.6
    score: str = "drift"
    chunk_size: int = 64
    seq_len: int = 128  # context the model is built for (fenwick levels, RoPE table)
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        choices = {"backbone": BACKBONES, "policy": POLICIES, "score": SCORES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "head_dim_v", "conv_size",
                     "chunk_size", "seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.policy == "dla" and (isinstance(self.capacity, bool) or not isinstance(self.capacity, int)
                                     or self.capacity < 2):
            raise ValueError(f"capacity must be an integer >= 2 for policy 'dla', got {self.capacity!r}")
        if not self.tau >= 0:
            raise ValueError(f"tau must be >= 0, got {self.tau!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @property
    def levels(self) -> int:
        """L = λ.shape[-1] for this policy at `seq_len`."""
        if self.policy == "dla":
            return self.capacity
        if self.policy == "fenwick":
            return (self.seq_len - 1).bit_length() + 1
        return 1

    @property
    def mlp_hidden(self) -> int:
        return -(-int(self.mlp_ratio * self.d_model) // 32) * 32

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown model config field {unknown[0]!r}")
        # a config that does not record `score` was written when `token` was the default
        return cls(**{"score": "token", **fields})


# Model shapes by name. `tiny` trains on two CPU cores in minutes; `base` is ~125M parameters;
# `paper` is the paper's large shape (~1B with Mamba-2: 24 layers of width 1536), K = 30, τ = 0.6.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=2, n_heads=4, head_dim=32, head_dim_v=64, capacity=8, seq_len=128),
    "small": dict(d_model=384, n_layers=6, n_heads=6, head_dim=64, head_dim_v=128, capacity=16, seq_len=512),
    "base": dict(d_model=768, n_layers=12, n_heads=12, head_dim=64, head_dim_v=128, capacity=16, seq_len=1024),
    "paper": dict(d_model=1536, n_layers=24, n_heads=12, head_dim=128, head_dim_v=256, capacity=30, tau=0.6,
                  seq_len=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The named preset with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {list(PRESETS)}, got {name!r}")
    return ModelConfig(**{**PRESETS[name], **overrides})
