"""Model configuration: one dataclass that expresses the Qwen3-MoE, DeepSeek-V3 (GQA) and gpt-oss families."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelConfig:
    """Shape and behaviour of a decoder-only MoE transformer. Validated on creation."""

    shape: str = "tiny"  # registry name this config started from (informational)
    vocab_size: int = 258
    dim: int = 64  # H
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 16
    qk_norm: bool = True
    attn_bias: bool = False  # gpt-oss uses biases on q/k/v/o
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # MoE
    n_experts: int = 8
    top_k: int = 2
    expert_dim: int = 32  # I, width of each routed expert
    n_shared_experts: int = 0
    shared_expert_dim: int = 0  # width of one shared expert (defaults to expert_dim)
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    norm_topk: bool = True  # renormalise the top-k weights to sum to 1
    route_scale: float = 1.0
    aux_loss_coef: float = 0.0  # switch-style load-balancing loss; 0 disables
    expert_bias: bool = False  # aux-loss-free balancing bias (DeepSeek-V3), used for selection only
    expert_bias_rate: float = 1e-3
    n_dense_layers: int = 0  # first layers with a dense FFN instead of MoE
    dense_dim: int = 0  # width of those dense FFNs
    tie_embeddings: bool = False
    init_std: float = 0.02

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

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def shared_dim(self) -> int:
        """Total width of the shared-expert FFN (all shared experts fused into one)."""
        return self.n_shared_experts * (self.shared_expert_dim or self.expert_dim)

    # -- sizes (pure arithmetic, no allocation) --------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Parameter counts by component, and the total / active totals."""
        H, V = self.dim, self.vocab_size
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = H * q + 2 * H * kv + q * H + (q + 2 * kv + H if self.attn_bias else 0)
        attn += 2 * self.head_dim if self.qk_norm else 0
        norms = 2 * H
        expert = 3 * H * self.expert_dim
        router = H * self.n_experts
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

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active matmul params + causal attention.

        Formula (stated in the README): 6 * (active params - embedding table) + 6 * L * S/2 * 2 * Hq * Dh,
        i.e. QK^T and AV each 2*S*Hq*Dh per token forward, halved for causality, x3 for backward.
        Recomputation (activation checkpointing) is not counted, as is customary for MFU.
        """
        counts = self.param_counts()
        matmul_params = counts["active"] - counts["embedding"]
        if self.tie_embeddings:
            matmul_params += counts["embedding"]  # the tied table is still the output projection
        attn = 6 * self.n_layers * seq_len * self.n_heads * self.head_dim  # = 6 * L * (S/2) * 2*Hq*Dh
        return 6.0 * matmul_params + attn
