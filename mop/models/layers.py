"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU FFN."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mop.models.attention_core import AttentionCore
from mop.ops.fused import kernel


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale.

    `F.rms_norm`: statistics in fp32, normalised value cast to the input dtype, then scaled (the
    Hugging Face Llama/Qwen convention); on CUDA a fused kernel instead of seven elementwise passes.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


def rope_cos_sin(positions_BS: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [B, S, Dh/2] for the given (per-document) positions, in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions_BS.device, dtype=torch.float32) / head_dim))
    angles = positions_BS.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x_BSHD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor,
               kernels: str = "eager") -> torch.Tensor:
    """Rotate pairs (x[..., :D/2], x[..., D/2:]) (the Llama/Qwen "rotate half" convention); `kernels`:
    op by op or one fused kernel (mop.ops.fused)."""
    return kernel("rope", x_BSHD, kernels)(x_BSHD, cos_BSD, sin_BSD)


class Attention(nn.Module):
    """Grouped-query attention with optional QK-norm and rotary embeddings."""

    elementwise_kernels = "eager"  # RoPE op by op or fused (mop.ops.fused); the trainer sets it

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, qk_norm: bool, bias: bool,
                 norm_eps: float, rope_theta: float, *, rope=None, sinks: bool = False, window: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.rope_theta = n_heads, n_kv_heads, head_dim, rope_theta
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.core = AttentionCore()
        self.rope = rope  # a mop.models.rope.Rotary (YaRN scaling); None: plain RoPE of rope_theta
        # gpt-oss: learned per-head sink logits and a sliding window, handed to the core as keyword
        # extras so that the Ulysses core swapped in by parallelize() gets them too.
        self.sinks = nn.Parameter(torch.empty(n_heads)) if sinks else None
        self.window = window
        if sinks or window:
            from mop.models.variant_core import VariantAttentionCore

            self.core = VariantAttentionCore()

    def forward(self, x_BSH: torch.Tensor, positions_BS: torch.Tensor):
        B, S, _ = x_BSH.shape
        # cos/sin are recomputed per layer from the integer positions (S x Dh/2, negligible): passing
        # float tables between blocks would let mixed precision cast them to bf16 on the way in.
        rope = self.rope.tables(positions_BS) if self.rope is not None else rope_cos_sin(positions_BS, self.head_dim,
                                                                                         self.rope_theta)
        # Head counts come from the projections' widths (-1), so a tensor-parallel split of the
        # projections (the FSDP-best baseline) gives local heads without a model change.
        q = self.wq(x_BSH).view(B, S, -1, self.head_dim)
        k = self.wk(x_BSH).view(B, S, -1, self.head_dim)
        v = self.wv(x_BSH).view(B, S, -1, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope, self.elementwise_kernels), apply_rope(k, *rope, self.elementwise_kernels)
        extras = {}
        if self.sinks is not None:
            extras["sinks"] = self.sinks
        if self.window:
            extras["window"] = self.window
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions_BS, **extras)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x). Used for dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    elementwise_kernels = "eager"  # SwiGLU op by op or fused (mop.ops.fused); the trainer sets it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w1(x), self.w3(x)
        return self.w2(kernel("swiglu", gate, self.elementwise_kernels)(gate, up))
