"""Multi-head latent attention (MLA), as DeepSeek-V2/V3 and Kimi-K2 define it.

Projections (names follow the Hub's, shortened; H = dim, h = heads):

    q      = wq_b(q_norm(wq_a(x)))            (or wq(x) when q_lora_rank = 0)    [h, nope + rope]
    latent, k_rope = split(wkv_a(x))          latent [kv_lora_rank], k_rope [rope] (one, shared by all heads)
    k_nope, v = split(wkv_b(kv_norm(latent)))                                    [h, nope], [h, v_head_dim]
    k      = [k_nope, rope(k_rope)] per head;  q = [q_nope, rope(q_rope)]
    out    = wo(attention(q, k, v))

Training computes per-head k and v from the latent (the "absorbed" form, which attends over the
latent directly, saves memory only for decoding with a KV cache). The softmax scale is
1/sqrt(nope + rope), times YaRN's mscale^2 when RoPE scaling is on (`ModelConfig.softmax_scale`).

Why heads are split after the up-projection, also under Ulysses: the attention core (and Ulysses'
all-to-all, which swaps a sequence split for a head split) moves per-head q, k, v, exactly as for
grouped-query attention with n_kv_heads = n_heads. Splitting the latent instead would need the
up-projection `wkv_b` split by heads on each rank (tensor parallelism of a dense weight); here it
is an ordinary dense weight, FSDP-sharded over all W ranks and all-gathered whole before use like
every other, so every rank up-projects its own tokens for all heads and Ulysses sends each head
to its owner. The cost is that the exchange moves h x (2 x qk_head_dim) values per token, not the
latent's kv_lora_rank + rope.

v_head_dim differs from the q/k head dim (DeepSeek-V3: 128 vs 192). Which SDPA backend runs it,
measured on an H200 (torch 2.11, cuDNN 9.19; scripts/sdpa_backends_mla.py; bf16, causal, 16 heads,
forward + backward): cuDNN takes dv != dqk and is the fastest, 5.8 ms at 8K tokens and 36.6 ms at
32K; flash refuses unequal dims; memory-efficient takes them at 25.8 / 368 ms. With v padded to 192,
cuDNN needs 3.8 / 59.4 ms and flash 5.7 / 81 ms. So the local core (whose preference order puts
cuDNN first, `mop.ops.attention`) gets v unpadded. Under Ulysses (any other core) v is padded with
zeros to the q/k head dim and the output cut back: the exchange moves one head dim per call, and
zero columns of v only produce zero columns of the output (exact, forward and backward), at the
cost of (dqk - dv) / dv more V traffic and AV FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mop.models.config import ModelConfig
from mop.models.layers import AttentionCore, RMSNorm
from mop.models.rope import Rotary

# The Hub's latent norms (q_a_layernorm, kv_a_layernorm) use their module default, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MultiHeadLatentAttention(nn.Module):
    """MLA with low-rank q (optional), a compressed KV latent, decoupled RoPE and v_head_dim != qk dim."""

    elementwise_kernels = "eager"  # RoPE op by op or fused (mop.ops.fused); the trainer sets it

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.qk_dim, self.v_dim = cfg.n_heads, cfg.head_dim, cfg.value_head_dim
        self.nope_dim, self.rope_dim, self.kv_rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        h, bias = cfg.n_heads, cfg.attn_bias
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * self.qk_dim, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, h * self.qk_dim, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_rank + self.rope_dim, bias=bias)
        self.kv_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_rank, h * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(h * self.v_dim, cfg.dim, bias=bias)
        self.rope = Rotary(cfg, self.rope_dim)
        # The core applies the default 1/sqrt(q's head dim); the configured scale (YaRN's extra
        # mscale^2) is folded into q in forward, after any padding of q.
        self.softmax_scale = cfg.softmax_scale()
        self.core = AttentionCore()

    def forward(self, x_BSH: torch.Tensor, positions_BS: torch.Tensor) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q = self.wq_b(self.q_norm(self.wq_a(x_BSH))) if "wq_a" in self._modules else self.wq(x_BSH)
        # Head counts from the widths (-1), as in `Attention`: a split projection gives local heads.
        q_nope, q_rope = q.view(B, S, -1, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x_BSH).split([self.kv_rank, self.rope_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, -1, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        cos, sin = self.rope.tables(positions_BS)
        q_rope = self.rope.rotate(q_rope, cos, sin, self.elementwise_kernels)
        k_rope = self.rope.rotate(k_rope.view(B, S, 1, self.rope_dim), cos, sin, self.elementwise_kernels)
        heads = k_nope.shape[2]
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(B, S, heads, self.rope_dim)], dim=-1)
        if type(self.core) is not AttentionCore:  # Ulysses: equal head dims (see the module docstring)
            if self.v_dim < self.qk_dim:
                v = F.pad(v, (0, self.qk_dim - self.v_dim))
            elif self.v_dim > self.qk_dim:  # zero q/k columns change no score
                q, k = F.pad(q, (0, self.v_dim - self.qk_dim)), F.pad(k, (0, self.v_dim - self.qk_dim))
        q_scale = self.softmax_scale * q.shape[-1] ** 0.5
        if q_scale != 1.0:
            q = q * q_scale
        out = self.core(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), positions_BS)
        out = out[..., : self.v_dim].transpose(1, 2).reshape(B, S, -1)
        return self.wo(out)
