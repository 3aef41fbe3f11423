"""Causal language model: token embedding, pre-norm blocks (mixer, SwiGLU MLP), final norm,
head tied to the embedding. Shapes: `idx, targets [B, T]` int64 with `T ≤ seq_len`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.attention import SoftmaxAttention
from dla.model.config import ModelConfig
from dla.model.gated_deltanet import DLAGatedDeltaNet
from dla.model.layers import SwiGLU
from dla.model.mamba2 import DLAMamba2

MIXERS = {"mamba2": DLAMamba2, "gdn": DLAGatedDeltaNet, "attention": SoftmaxAttention}
RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down")  # scaled by 1/√(2·n_layers) at init, as in GPT-2


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = MIXERS[cfg.backbone](cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.normal_(self.embed.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(RESIDUAL_OUTPUTS) else 0.02
                nn.init.normal_(module.weight, std=std)

    def forward(self, idx: Tensor) -> Tensor:
        """idx [B, T] → logits [B, T, vocab]."""
        if idx.shape[-1] > self.cfg.seq_len:
            raise ValueError(f"idx holds {idx.shape[-1]} tokens, more than the model's seq_len = {self.cfg.seq_len}")
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)

    def loss(self, idx: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy in nats, float32."""
        logits = self(idx)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
