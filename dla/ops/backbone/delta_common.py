r"""What the Triton stage files of the chunked delta rule share (`delta.py`'s notation).

The chunk-local gates and segment masks, as Triton helpers that every stage kernel recomputes
from `g` and `reset` (one load of `C` scalars each, cheaper than storing and re-reading them):

    G_t = Σ_{u≤t} g_u,   σ_t = Σ_{u≤t} reset_u          (chunk-local; beyond T: g = 0, no reset)
    γ_t = [σ_t = 0] exp(G_t),   ρ_s = [σ_s = σ_C] exp(G_C − G_s),   γ_C = [σ_C = 0] exp(G_C)
    Γ[t,s] = exp(G_t − G_s) · [s ≤ t] · [σ_t = σ_s]      (strict: s < t)

Pointers to `[B,T,H]` tensors are passed with `tok`, the offset of the head's token 0, and the
token stride `H`; `t` holds the chunk's global token indices `[C]`.

The dot precisions (`precisions`). For 16-bit inputs, products of inputs with the stored
16-bit intermediates (`w, u, U`, the chunk states `h`) take bf16/fp16 operands with float32
accumulation. A product with a float32 operand computed by the chunk algebra — the decayed
scores `(QKᵀ ⊙ Γ)` and `dO Uᵀ ⊙ Γ`, `Qᵀ diag(γ λ0 · scale)`, the float32 gradients of the
states and of `U`, the UT gradients, `T` in the backward — takes `"tf32"` with its other
operand exact in float32; the triangular inverse's own products (the solve, `Tᵀ dT Tᵀ`) and
`w, u` take `"tf32x3"`. The diagonal scalings (`β`, `γ`, `λ0`) are applied to the float32 side
or after the product, never to a 16-bit operand, and the gradients of `U` and of the states are
stored in float32. In a float32 emulation of these roundings (perf inputs, resets at 2%, S0;
T = 2048 and 16384 with g, 4096 without, Dk = 64 and 128) the bf16 outputs come out at
1.05–1.74× the error of the torch path on the same inputs, against 2.2–3.3× with fla's choices
(bf16 `T`, operands scaled before rounding, 16-bit gradients), over SPEC §6's 2×. float32
inputs take `"ieee"` everywhere (the tests' configuration).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def chunk_gates(g, reset, tok, t, T, H, C: tl.constexpr, HAS_G: tl.constexpr, HAS_RESET: tl.constexpr):
    """(G [C] float32, σ [C] int32)."""
    inside = t < T
    if HAS_G:
        G = tl.cumsum(tl.load(g + tok + t * H, mask=inside, other=0.0).to(tl.float32), axis=0)
    else:
        G = tl.zeros([C], dtype=tl.float32)
    if HAS_RESET:
        seg = tl.cumsum(tl.load(reset + tok + t * H, mask=inside, other=0).to(tl.int32), axis=0)
    else:
        seg = tl.zeros([C], dtype=tl.int32)
    return G, seg


@triton.jit
def chunk_ends(G, seg, C: tl.constexpr):
    """(γ [C], ρ [C], γ_C): what reaches each token from the chunk start, what each token leaves
    at the chunk end, and what the carried state keeps (0 once a reset cut it)."""
    o = tl.arange(0, C)
    G_C = tl.sum(tl.where(o == C - 1, G, 0.0), axis=0)
    seg_C = tl.max(seg, axis=0)
    gam = tl.where(seg == 0, tl.exp(G), 0.0)
    rho = tl.where(seg == seg_C, tl.exp(G_C - G), 0.0)
    gam_C = tl.where(seg_C == 0, tl.exp(G_C), 0.0)
    return gam, rho, gam_C


@triton.jit
def decay(G, seg, C: tl.constexpr, STRICT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Γ [C, C] (rows t, columns s), or Γᵀ (rows s, columns t) when TRANSPOSED, built as such
    rather than transposed. The exponent is masked after exp: where the mask is off it may
    overflow, and `where` drops it."""
    o = tl.arange(0, C)
    if TRANSPOSED:
        rows, cols = o[None, :], o[:, None]
        diff = G[None, :] - G[:, None]
        same = seg[None, :] == seg[:, None]
    else:
        rows, cols = o[:, None], o[None, :]
        diff = G[:, None] - G[None, :]
        same = seg[:, None] == seg[None, :]
    if STRICT:
        causal = rows > cols
    else:
        causal = rows >= cols
    return tl.where(causal & same, tl.exp(diff), 0.0)


def precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(products with a float32 chunk-algebra operand, the triangular inverse's products)."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32x3")
