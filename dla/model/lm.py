"""Causal language model: token embedding, pre-norm blocks (mixer, SwiGLU MLP), final norm,
head tied to the embedding. Shapes: `idx, targets [B, T]` int64 with `T ≤ seq_len`.

Packed documents (`cu_seqlens`, the flash-attention convention of `dla.ops.packing`): `idx [1, T]`
holds `N` sequences back to back; each is laid out as its own row of `max_seqlen` columns and the
unchanged model runs on those rows, so no layer (mixer, short convolution, attention) lets a token
see another sequence's, and each sequence's logits are those of running it alone.

Generation runs the same blocks over a fixed-shape cache (`dla.model.cache`): `prefill` takes a
prompt, `step` one token per call."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dla.model.attention import SoftmaxAttention
from dla.model.cache import LMCache
from dla.model.config import ModelConfig
from dla.model.gated_deltanet import DLAGatedDeltaNet
from dla.model.layers import SwiGLU
from dla.model.mamba2 import DLAMamba2
from dla.ops.packing import check_cu_seqlens, from_rows, layout, to_rows

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

    def forward_cached(self, x: Tensor, cache, pos: Tensor):
        y, cache = self.mixer.forward_cached(self.mixer_norm(x), cache, pos)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


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

    def forward(self, idx: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None) -> Tensor:
        """idx [B, T] → logits [B, T, vocab]. With `cu_seqlens` (int32 [N + 1] offsets: 0 first,
        T last, non-decreasing; sequences may be empty), `idx [1, T]` is `N` packed sequences of
        at most `max_seqlen ≤ seq_len` tokens each (default T), and each position's logits are
        its sequence's alone. Static shapes: the work is `N · max_seqlen` tokens, and nothing is
        read back to the host, so the packed call compiles with `fullgraph=True` too."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be [B, T] token ids, got shape {list(idx.shape)}")
        if cu_seqlens is None:
            if max_seqlen is not None:
                raise ValueError("max_seqlen applies to packed sequences: pass cu_seqlens with it")
            if idx.shape[-1] > self.cfg.seq_len:
                raise ValueError(f"idx holds {idx.shape[-1]} tokens, more than the model's seq_len = "
                                 f"{self.cfg.seq_len}")
            return self._head(self._blocks(self.embed(idx)))
        length = idx.shape[1]
        rows = check_cu_seqlens(cu_seqlens, idx.shape[0], length, max_seqlen, idx.device)
        if rows > self.cfg.seq_len:
            raise ValueError(f"max_seqlen = {rows} (T = {length} when not given) is more than the model's "
                             f"seq_len = {self.cfg.seq_len}")
        where = layout(cu_seqlens, length, rows)
        # token 0 pads each row after its sequence's end, which a causal model never reads back
        x = self._blocks(self.embed(to_rows(idx, where)))
        # the rows' hidden states back to the packed positions before the head: T·vocab logits, not N·L·vocab
        return self._head(from_rows(x, where))

    def _blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def _head(self, x: Tensor) -> Tensor:
        return F.linear(self.norm(x), self.embed.weight)

    def empty_cache(self, batch: int, *, max_len: int | None = None, dtype: torch.dtype | None = None,
                    device=None) -> LMCache:
        """The decode cache before the first token. `max_len` bounds the attention baseline's
        key/value cache (default `seq_len`); the recurrent caches do not grow. `dtype` is the
        activations' dtype (default: the parameters'; bfloat16 under CUDA autocast): recurrent
        states follow the operator's rule (float32, or float64 for float64), convolution and
        key/value caches take `dtype`."""
        param = self.embed.weight
        dtype = dtype or param.dtype
        device = param.device if device is None else device
        max_len = self.cfg.seq_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
        layers = tuple(block.mixer.empty_cache(batch, max_len=max_len, dtype=dtype, device=device)
                       for block in self.blocks)
        return LMCache(layers=layers, pos=torch.zeros((), dtype=torch.int64, device=device))

    def prefill(self, idx: Tensor, cache: LMCache) -> tuple[Tensor, LMCache]:
        """The forward of `idx [B, T]` continued from `cache`: logits [B, T, vocab] and the
        cache after these tokens. From an empty cache the logits equal `forward(idx)` (up to
        rounding; well-conditioned `dla` decisions, SPEC §2)."""
        x = self.embed(idx)
        layers = []
        for block, layer in zip(self.blocks, cache.layers):
            x, layer = block.forward_cached(x, layer, cache.pos)
            layers.append(layer)
        logits = F.linear(self.norm(x), self.embed.weight)
        return logits, LMCache(layers=tuple(layers), pos=cache.pos + idx.shape[1])

    def step(self, token: Tensor, cache: LMCache) -> tuple[Tensor, LMCache]:
        """One decode step: token [B] int64 → next-token logits [B, vocab] and the new cache.
        Static shapes throughout, so it compiles once with `fullgraph=True`."""
        logits, cache = self.prefill(token[:, None], cache)
        return logits[:, 0], cache

    def loss(self, idx: Tensor, targets: Tensor, cu_seqlens: Tensor | None = None,
             max_seqlen: int | None = None) -> Tensor:
        """Mean next-token cross-entropy in nats, float32, over the targets that are not -100
        (`cross_entropy`'s `ignore_index`: e.g. a packed sequence's last target, which would
        predict the next sequence's first token). `cu_seqlens, max_seqlen` as in `forward`."""
        logits = self(idx, cu_seqlens, max_seqlen)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
