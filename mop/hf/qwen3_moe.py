"""Qwen3-MoE (`qwen3_moe`): GQA with QK-norm, softmax router, per-expert Hub Linears."""

from __future__ import annotations

from mop.hf.adapter import (COMMON_LAYER_NAMES, GQA_NAMES, FamilyAdapter, expert_count, gqa_fields, require,
                            rope_fields, rope_to_hf)
from mop.models.config import ModelConfig


class Qwen3MoeAdapter(FamilyAdapter):
    model_type = "qwen3_moe"
    layer_names = {**COMMON_LAYER_NAMES, **GQA_NAMES,
                   "attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight",
                   "moe.router.gate.weight": "mlp.gate.weight"}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
        if hf.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported for qwen3_moe")
        n_layers = require(hf, "num_hidden_layers")
        step = hf.get("decoder_sparse_step", 1)
        dense = sorted(set(hf.get("mlp_only_layers") or []) | {i for i in range(n_layers) if (i + 1) % step})
        if dense != list(range(len(dense))):
            raise ValueError(f"config.json: dense (MLP-only) layers {dense} must be the first layers")
        n_experts = expert_count(hf, "num_experts", "num_local_experts")
        return ModelConfig(
            shape=f"hf:{self.model_type}", **gqa_fields(hf), qk_norm=True,
            attn_bias=bool(hf.get("attention_bias", False)), **rope_fields(hf, refuse_scaling=True),
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), n_experts=n_experts,
            top_k=require(hf, "num_experts_per_tok"), expert_dim=require(hf, "moe_intermediate_size"),
            score_func="softmax", norm_topk=bool(hf.get("norm_topk_prob", False)),
            aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0), n_dense_layers=len(dense),
            dense_dim=require(hf, "intermediate_size") if dense else 0,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), max_seq_len=hf.get("max_position_embeddings") or 0)

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        if cfg.n_shared_experts or cfg.score_func != "softmax" or cfg.expert_bias or cfg.route_scale != 1.0 \
                or not cfg.qk_norm or cfg.attention != "gqa" or cfg.attn_sinks or cfg.sliding_window \
                or cfg.moe_bias or cfg.swiglu_limit or cfg.n_groups > 1 or cfg.rope_scaling != "none":
            raise ValueError("this model is not Qwen3-MoE-like (softmax router, no shared experts, no expert bias, "
                             "route_scale 1, QK-norm, plain RoPE): no Hugging Face family takes it")
        out = {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "attention_bias": cfg.attn_bias,
            "rope_parameters": rope_to_hf(cfg), "rms_norm_eps": cfg.norm_eps, "num_experts": cfg.n_experts,
            "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_dim,
            "norm_topk_prob": cfg.norm_topk, "router_aux_loss_coef": cfg.aux_loss_coef, "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(cfg.n_dense_layers)), "hidden_act": "silu",
            "tie_word_embeddings": cfg.tie_embeddings, "use_sliding_window": False,
        }
        if cfg.n_dense_layers:
            out["intermediate_size"] = cfg.dense_dim
        if cfg.max_seq_len:
            out["max_position_embeddings"] = cfg.max_seq_len
        return out
