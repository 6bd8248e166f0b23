"""Model configuration: one dataclass that expresses the Qwen3-MoE, DeepSeek-V3 / Kimi-K2 and gpt-oss families.

Family features are plain options, each off by default: multi-head latent attention
(`attention="mla"`, DeepSeek-V2/V3, Kimi-K2), group-limited routing (`n_groups`, `topk_groups`),
YaRN RoPE scaling (`rope_scaling="yarn"`), attention sinks and sliding windows (gpt-oss), the
clamped SwiGLU with expert and router biases (gpt-oss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Shape and behaviour of a decoder-only MoE transformer. Validated on creation."""

    shape: str = "tiny"  # registry name this config started from (informational)
    vocab_size: int = 258  # tokens in the vocabulary (rows of the embedding and the output head)
    dim: int = 64  # model width (H)
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # query heads per attention layer
    n_kv_heads: int = 2  # key/value heads (GQA: divides n_heads)
    head_dim: int = 16  # width of one attention head
    qk_norm: bool = True  # RMSNorm on queries and keys (Qwen3)
    attn_bias: bool = False  # gpt-oss uses biases on q/k/v/o
    rope_theta: float = 10000.0  # RoPE base frequency
    norm_eps: float = 1e-6  # epsilon of the RMSNorms
    # MoE
    n_experts: int = 8  # routed experts per MoE layer (E)
    top_k: int = 2  # experts each token is routed to
    expert_dim: int = 32  # width of each routed expert (I)
    n_shared_experts: int = 0  # experts every token passes through, besides the routed ones
    shared_expert_dim: int = 0  # width of one shared expert (defaults to expert_dim)
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = True  # renormalise the top-k weights to sum to 1
    route_scale: float = 1.0  # factor on the routing weights
    aux_loss_coef: float = 0.0  # switch-style load-balancing loss; 0 disables
    expert_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3), used for selection only
    expert_bias_rate: float = 1e-3  # step size of the aux-loss-free balancing bias
    n_dense_layers: int = 0  # first layers with a dense FFN instead of MoE
    dense_dim: int = 0  # width of those dense FFNs
    tie_embeddings: bool = False  # the output head shares the embedding's weight
    init_std: float = 0.02  # standard deviation of the initial weights
    # -- attention variants --------------------------------------------------------------------
    attention: str = "gqa"  # "gqa" | "mla" (multi-head latent attention; then n_kv_heads == n_heads)
    # MLA: head_dim is the q/k head dim (nope + rope parts); v_head_dim the value head dim.
    q_lora_rank: int = 0  # MLA: rank of the compressed query projection (0: one full-rank projection)
    kv_lora_rank: int = 0  # MLA: rank of the compressed key/value projection
    qk_rope_head_dim: int = 0  # MLA: the decoupled RoPE part of head_dim, shared by all heads on the key side
    v_head_dim: int = 0  # MLA: width of a value head (0: head_dim)
    rope_interleave: bool = False  # rotate pairs (x0, x1), (x2, x3), ... (DeepSeek) instead of halves
    # YaRN context extension (the Hugging Face `rope_parameters` of type "yarn").
    rope_scaling: str = "none"  # "none" | "yarn"
    rope_factor: float = 1.0  # YaRN: context extension factor
    rope_original_max_len: int = 0  # YaRN: the context the model was pre-trained with
    rope_beta_fast: float = 32.0  # YaRN: high-frequency boundary (rotations)
    rope_beta_slow: float = 1.0  # YaRN: low-frequency boundary (rotations)
    rope_mscale: float = 0.0  # YaRN: attention-scale factor (0: not set)
    rope_mscale_all_dim: float = 0.0  # YaRN: attention-scale factor over all dimensions (0: not set)
    rope_truncate: bool = True  # YaRN: round the correction range to whole dimensions
    max_seq_len: int = 0  # positions the model was trained for (max_position_embeddings); 0: unchecked
    attn_sinks: bool = False  # gpt-oss: a learned per-head logit in the softmax denominator
    sliding_window: int = 0  # gpt-oss: width of the attention window in tokens (0: full attention everywhere)
    sliding_window_layers: str = "even"  # layers with the window: "even" (0, 2, ...: gpt-oss) | "all"
    # -- MoE variants ----------------------------------------------------------------------------
    n_groups: int = 1  # group-limited routing (DeepSeek-V3): experts in n_groups groups
    topk_groups: int = 1  # group-limited routing: a token's top-k is chosen inside its best topk_groups groups
    moe_bias: bool = False  # gpt-oss: biases on the router and on every expert projection
    swiglu_limit: float = 0.0  # > 0: gpt-oss clamped SwiGLU (gate <= limit, |up| <= limit, (up + 1) * ...)
    swiglu_alpha: float = 1.702  # gpt-oss: sigmoid gain of the clamped SwiGLU (used when swiglu_limit > 0)
    # `mop export` writes these back with only what the model changed; name -> parsed JSON
    # (config.json, generation_config.json).
    hf_files: dict = field(default_factory=dict)  # files of the Hugging Face checkpoint it came from (set by hf:PATH)

    def __post_init__(self) -> None:
        def bad(option: str, msg: str) -> ValueError:
            return ValueError(f"model.{option}: {msg}")

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "n_experts", "top_k",
                     "expert_dim"):
            if getattr(self, name) < 1:
                raise bad(name, f"must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise bad("n_kv_heads", f"{self.n_kv_heads} must divide n_heads={self.n_heads} (grouped-query attention)")
        if self.top_k > self.n_experts:
            raise bad("top_k", f"{self.top_k} exceeds n_experts={self.n_experts}")
        if self.score_func not in ("softmax", "sigmoid"):
            raise bad("score_func", f"{self.score_func!r} is not one of 'softmax', 'sigmoid'")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise bad("n_dense_layers", f"must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        if self.n_dense_layers and self.dense_dim < 1:
            raise bad("dense_dim", "must be >= 1 when n_dense_layers > 0")
        if self.n_shared_experts < 0:
            raise bad("n_shared_experts", "must be >= 0")
        if self.head_dim % 2:
            raise bad("head_dim", f"must be even for rotary embeddings, got {self.head_dim}")
        if self.attention not in ("gqa", "mla"):
            raise bad("attention", f"{self.attention!r} is not one of 'gqa', 'mla'")
        if self.attention == "mla":
            if self.n_kv_heads != self.n_heads:
                raise bad("n_kv_heads", f"MLA computes one key/value head per query head: set n_kv_heads="
                          f"{self.n_heads} (= n_heads), got {self.n_kv_heads}")
            if self.kv_lora_rank < 1:
                raise bad("kv_lora_rank", "must be >= 1 with attention='mla'")
            if not 0 < self.qk_rope_head_dim < self.head_dim or self.qk_rope_head_dim % 2:
                raise bad("qk_rope_head_dim", f"must be even and in (0, head_dim={self.head_dim}) with attention='mla' "
                          f"(head_dim = qk_nope_head_dim + qk_rope_head_dim), got {self.qk_rope_head_dim}")
        if self.rope_scaling not in ("none", "yarn"):
            raise bad("rope_scaling", f"{self.rope_scaling!r} is not one of 'none', 'yarn'")
        if self.rope_scaling == "yarn" and (self.rope_factor <= 0 or self.rope_original_max_len < 1):
            raise bad("rope_factor", "YaRN needs rope_factor > 0 and rope_original_max_len >= 1")
        if self.sliding_window < 0 or self.max_seq_len < 0:
            raise bad("sliding_window" if self.sliding_window < 0 else "max_seq_len", "must be >= 0")
        if self.sliding_window_layers not in ("even", "all"):
            raise bad("sliding_window_layers", f"{self.sliding_window_layers!r} is not one of 'even', 'all'")
        if self.n_groups < 1 or self.n_experts % self.n_groups:
            raise bad("n_groups", f"must divide n_experts={self.n_experts}, got {self.n_groups}")
        if not 1 <= self.topk_groups <= self.n_groups:
            raise bad("topk_groups", f"must be in [1, n_groups={self.n_groups}], got {self.topk_groups}")
        if self.n_groups > 1 and self.top_k > self.topk_groups * (self.n_experts // self.n_groups):
            raise bad("top_k", f"{self.top_k} exceeds the experts of topk_groups={self.topk_groups} groups")
        if self.swiglu_limit < 0:
            raise bad("swiglu_limit", "must be >= 0 (0: plain SwiGLU)")
        if not isinstance(self.hf_files, dict):
            raise bad("hf_files", "is set by the Hugging Face import (model.shape=hf:PATH), not on the command line")

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def qk_nope_head_dim(self) -> int:
        """MLA: the per-head part of q/k without rotary embedding."""
        return self.head_dim - self.qk_rope_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def layer_window(self, layer_id: int) -> int:
        """Sliding-window width of layer `layer_id` (0: full attention)."""
        if self.sliding_window and (self.sliding_window_layers == "all" or layer_id % 2 == 0):
            return self.sliding_window
        return 0

    def softmax_scale(self) -> float:
        """Attention softmax scale: 1/sqrt(qk head dim), times YaRN's mscale^2 for MLA (DeepSeek's rule)."""
        scale = self.head_dim**-0.5
        if self.attention == "mla" and self.rope_scaling == "yarn" and self.rope_mscale_all_dim:
            m = yarn_mscale(self.rope_factor, self.rope_mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def shared_dim(self) -> int:
        """Total width of the shared-expert FFN (all shared experts fused into one)."""
        return self.n_shared_experts * (self.shared_expert_dim or self.expert_dim)

    # -- sizes (pure arithmetic, no allocation) --------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts by component, and the total / active totals."""
        H, V = self.dim, self.vocab_size
        attn = self._attention_params()
        norms = 2 * H
        expert = 3 * H * self.expert_dim + (2 * self.expert_dim + H if self.moe_bias else 0)
        router = H * self.n_experts + (self.n_experts if self.moe_bias else 0)
        shared = 3 * H * self.shared_dim
        dense_ffn = 3 * H * self.dense_dim
        embed = V * H
        output = 0 if self.tie_embeddings else V * H
        per_moe = attn + norms + router + shared + self.n_experts * expert
        per_dense = attn + norms + dense_ffn
        total = self.n_moe_layers * per_moe + self.n_dense_layers * per_dense + embed + output + H
        active = total - self.n_moe_layers * (self.n_experts - self.top_k) * expert
        return {
            "total": total,
            "active": active,
            "embedding": embed,
            "output": output,
            "experts": self.n_moe_layers * self.n_experts * expert,
            "dense": total - self.n_moe_layers * self.n_experts * expert - embed - output,
        }

    def _attention_params(self) -> int:
        H, nh, dqk = self.dim, self.n_heads, self.head_dim
        sinks = nh if self.attn_sinks else 0
        if self.attention == "mla":
            dv, r, rq = self.value_head_dim, self.qk_rope_head_dim, self.q_lora_rank
            bias = self.attn_bias
            q = (H * rq + (rq if bias else 0) + rq + rq * nh * dqk) if rq else H * nh * dqk
            kv = H * (self.kv_lora_rank + r) + (self.kv_lora_rank + r if bias else 0) + self.kv_lora_rank
            kv += self.kv_lora_rank * nh * (self.qk_nope_head_dim + dv)
            return q + kv + nh * dv * H + (H if bias else 0) + sinks
        q, kv = nh * dqk, self.n_kv_heads * dqk
        attn = H * q + 2 * H * kv + q * H + (q + 2 * kv + H if self.attn_bias else 0)
        return attn + (2 * dqk if self.qk_norm else 0) + sinks

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active matmul params + causal attention.

        Formula (stated in the README): 6 * (active params - embedding table) + 6 * L * S/2 * 2 * Hq * Dh,
        i.e. QK^T and AV each 2*S*Hq*Dh per token forward, halved for causality, x3 for backward; with
        Dh = (Dqk + Dv) / 2 under MLA, and S/2 capped at the window on windowed layers.
        Recomputation (activation checkpointing) is not counted, as is customary for MFU.
        """
        counts = self.param_counts()
        matmul_params = counts["active"] - counts["embedding"]
        if self.tie_embeddings:
            matmul_params += counts["embedding"]  # the tied table is still the output projection
        # QK^T uses the q/k head dim, AV the value head dim (they differ under MLA): 6 * ctx * Hq * (Dqk + Dv)
        # per layer, ctx = S/2 keys per query on average (causal), at most the window on windowed layers.
        ctx = sum(min(self.layer_window(i) or seq_len / 2, seq_len / 2) for i in range(self.n_layers))
        attn = 6 * ctx * self.n_heads * (self.head_dim + self.value_head_dim)
        return 6.0 * matmul_params + attn


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
