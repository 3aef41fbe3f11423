"""Text generation: prefill the prompt, then one decode step per new token (the model comes from
`dla.run.checkpoint.load`).

The step `model.step(token, cache) → (logits, cache)` has static shapes (`dla.model.cache`), so
it compiles once with `torch.compile(fullgraph=True)`; on CUDA the default mode is
"reduce-overhead", which replays it as a CUDA graph (every backbone and policy; nothing in the
step reads from the host). Sampling happens outside the compiled
step: temperature 0 is greedy, otherwise softmax(logits / temperature) over the `top_k` most
likely bytes (all when `top_k` is None), drawn from a seeded generator.

Context: the prompt must fit the model's `seq_len`. The recurrent backbones (`mamba2`, `gdn`)
with the `dla` or `single` policy keep a fixed-size state and decode past it; the attention
baseline and `fenwick` (whose levels and rotary positions were sized for `seq_len`) stop there.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from dla.model import CausalLM, ModelConfig
from dla.run.device import autocast

COMPILE_MODES = ("auto", "default", "reduce-overhead", "none")


def max_context(cfg: ModelConfig) -> int | None:
    """Most tokens (prompt and generated) the model can take, or None for no bound."""
    if cfg.backbone == "attention" or cfg.policy == "fenwick":
        return cfg.seq_len
    return None


def check_request(cfg: ModelConfig, prompt_len: int, max_new_tokens: int, temperature: float,
                  top_k: int | None) -> None:
    """Raise `ValueError` naming the argument that the model cannot serve."""
    if prompt_len < 1:
        raise ValueError("--prompt must hold at least one byte")
    if prompt_len > cfg.seq_len:
        raise ValueError(f"--prompt is {prompt_len} bytes, longer than the model's context of {cfg.seq_len}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    limit = max_context(cfg)
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the {prompt_len}-byte prompt leaves room for "
                         f"{limit - prompt_len} new bytes in the {cfg.backbone}/{cfg.policy} model's context of {limit}")
    if not (isinstance(temperature, (int, float)) and temperature >= 0 and temperature != float("inf")):
        raise ValueError(f"--temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or not 1 <= top_k <= cfg.vocab_size):
        raise ValueError(f"--top-k must be an integer in [1, {cfg.vocab_size}], got {top_k!r}")


def sample(logits: Tensor, *, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    """logits [B, V] → tokens [B] int64."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[:, 0]


def decode_step(model: CausalLM, mode: str = "auto", backend="inductor"):
    """`model.step`, compiled (`fullgraph=True`) unless `mode` is "none". "auto" picks
    "reduce-overhead" (CUDA graphs) on CUDA and Inductor's default elsewhere; `mode` applies to
    the Inductor `backend` only (tests pass another backend to count frames).

    The compiled frame takes and returns tensors only — the cache's leaves, the structure kept
    outside — so Dynamo never rebuilds a cache object at the frame's end (torch 2.11's Dynamo
    asserts on rebuilding those named tuples there)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {list(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return model.step
    cuda = model.embed.weight.device.type == "cuda"
    if mode == "auto":
        mode = "reduce-overhead" if cuda else "default"
    graphs = mode == "reduce-overhead" and cuda and backend == "inductor"
    frames: list = []  # (cache structure, its compiled frame): one structure per model in practice

    def compiled_for(spec):
        for known, frame in frames:
            if known == spec:
                return frame

        def tensors_step(token: Tensor, *leaves: Tensor):
            logits, cache = model.step(token, tree_unflatten(list(leaves), spec))
            return (logits, *tree_flatten(cache)[0])

        kw = {"mode": mode} if backend == "inductor" else {}
        frame = torch.compile(tensors_step, fullgraph=True, backend=backend, **kw)
        frames.append((spec, frame))
        return frame

    def step(token: Tensor, cache):
        leaves, spec = tree_flatten(cache)
        frame = compiled_for(spec)
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        logits, *leaves = frame(token, *leaves)
        if graphs:  # a replay reuses its output memory: copy out what the next replay would overwrite
            logits, leaves = logits.clone(), [x.clone() for x in leaves]
        return logits, tree_unflatten(leaves, spec)

    return step


def activation_dtype(model: CausalLM) -> torch.dtype:
    """bfloat16 under CUDA autocast (as in training), else the parameters' dtype."""
    return torch.bfloat16 if model.embed.weight.device.type == "cuda" else model.embed.weight.dtype


@torch.no_grad()
def generate(model: CausalLM, prompt: Tensor, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, compile: str = "auto", step=None) -> Tensor:
    """prompt [B, T] int64 → the `max_new_tokens` tokens that follow, [B, max_new_tokens].
    `step` reuses a decode step made by `decode_step` (compiling once for many calls)."""
    B, T = prompt.shape
    check_request(model.cfg, T, max_new_tokens, temperature, top_k)
    device = model.embed.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    step = step or decode_step(model, compile)
    dtype = activation_dtype(model)
    cache = model.empty_cache(B, max_len=T + max_new_tokens, dtype=dtype)
    with autocast(device):
        logits, cache = model.prefill(prompt.to(device), cache)
        token = sample(logits[:, -1], temperature=temperature, top_k=top_k, generator=generator)
        out = [token]
        for _ in range(max_new_tokens - 1):
            logits, cache = step(token, cache)
            token = sample(logits, temperature=temperature, top_k=top_k, generator=generator)
            out.append(token)
    return torch.stack(out, dim=1)
