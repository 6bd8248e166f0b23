"""DeepSeek-V3 (`deepseek_v3`; Kimi-K2's `kimi_k2` is the same layout): MLA, sigmoid group-limited router
with a selection bias (`e_score_correction_bias`), shared experts, first-k dense layers.

Multi-token prediction (MTP) is not modelled: a checkpoint's MTP layers (`model.layers.{L}.*`,
L = num_hidden_layers; `num_nextn_predict_layers` > 0) are not loaded, with a warning that names
them, and an export contains none (its config.json keeps the imported `num_nextn_predict_layers`).
"""

from __future__ import annotations

import re

from mop.hf.adapter import COMMON_LAYER_NAMES, FamilyAdapter, require, rope_fields, rope_to_hf
from mop.models.config import ModelConfig


class DeepseekV3Adapter(FamilyAdapter):
    model_type = "deepseek_v3"
    layer_names = {
        **COMMON_LAYER_NAMES,
        "attention.wq.weight": "self_attn.q_proj.weight",
        "attention.wq_a.weight": "self_attn.q_a_proj.weight", "attention.wq_a.bias": "self_attn.q_a_proj.bias",
        "attention.q_norm.weight": "self_attn.q_a_layernorm.weight",
        "attention.wq_b.weight": "self_attn.q_b_proj.weight",
        "attention.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
        "attention.wkv_a.bias": "self_attn.kv_a_proj_with_mqa.bias",
        "attention.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
        "attention.wkv_b.weight": "self_attn.kv_b_proj.weight",
        "attention.wo.weight": "self_attn.o_proj.weight", "attention.wo.bias": "self_attn.o_proj.bias",
        "moe.router.gate.weight": "mlp.gate.weight",
        "moe.router.expert_bias": "mlp.gate.e_score_correction_bias",
        "moe.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
        "moe.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
        "moe.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
    }

    def config_from_hf(self, hf: dict) -> ModelConfig:
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
        if hf.get("topk_method", "noaux_tc") != "noaux_tc" or hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError("config.json: only DeepSeek-V3's router (scoring_func 'sigmoid', topk_method 'noaux_tc') "
                             "is supported")
        if hf.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"config.json: moe_layer_freq={hf['moe_layer_freq']} is not supported (every layer after "
                             "the first_k_dense_replace dense ones is MoE)")
        heads = require(hf, "num_attention_heads")
        n_experts = require(hf, "n_routed_experts", "the routed expert count")
        nope, rope_dim = require(hf, "qk_nope_head_dim"), require(hf, "qk_rope_head_dim")
        n_shared = hf.get("n_shared_experts") or 0
        return ModelConfig(
            shape=f"hf:{self.model_type}", vocab_size=require(hf, "vocab_size"), dim=require(hf, "hidden_size"),
            n_layers=require(hf, "num_hidden_layers"), n_heads=heads, n_kv_heads=heads, head_dim=nope + rope_dim,
            qk_norm=False, attn_bias=bool(hf.get("attention_bias", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            attention="mla", q_lora_rank=hf.get("q_lora_rank") or 0, kv_lora_rank=require(hf, "kv_lora_rank"),
            qk_rope_head_dim=rope_dim, v_head_dim=require(hf, "v_head_dim"),
            rope_interleave=bool(hf.get("rope_interleave", True)), **rope_fields(hf),
            max_seq_len=hf.get("max_position_embeddings") or 0,
            n_experts=n_experts, top_k=require(hf, "num_experts_per_tok"), expert_dim=require(hf, "moe_intermediate_size"),
            n_shared_experts=n_shared, score_func="sigmoid", norm_topk=bool(hf.get("norm_topk_prob", True)),
            route_scale=float(hf.get("routed_scaling_factor") or 1.0), expert_bias=True,
            n_groups=hf.get("n_group") or 1, topk_groups=hf.get("topk_group") or 1,
            n_dense_layers=hf.get("first_k_dense_replace") or 0,
            dense_dim=require(hf, "intermediate_size") if hf.get("first_k_dense_replace") else 0,
            aux_loss_coef=0.0, tie_embeddings=bool(hf.get("tie_word_embeddings", False)))

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        if cfg.attention != "mla" or cfg.score_func != "sigmoid" or cfg.attn_sinks or cfg.moe_bias or cfg.swiglu_limit:
            raise ValueError("this model is not DeepSeek-V3-like (MLA, sigmoid router, no sinks or expert biases)")
        out = {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "attention_bias": cfg.attn_bias, "rms_norm_eps": cfg.norm_eps,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.value_head_dim, "rope_interleave": cfg.rope_interleave, "rope_parameters": rope_to_hf(cfg),
            "n_routed_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_dim,
            "n_shared_experts": cfg.n_shared_experts, "norm_topk_prob": cfg.norm_topk,
            "routed_scaling_factor": cfg.route_scale, "n_group": cfg.n_groups, "topk_group": cfg.topk_groups,
            "first_k_dense_replace": cfg.n_dense_layers, "hidden_act": "silu", "tie_word_embeddings": cfg.tie_embeddings,
        }
        if cfg.n_dense_layers:
            out["intermediate_size"] = cfg.dense_dim
        if cfg.max_seq_len:
            out["max_position_embeddings"] = cfg.max_seq_len
        return out

    def unused_hub_tensors(self, hub_names, cfg: ModelConfig) -> list[str]:
        """The MTP layers: every `model.layers.{i}.*` with i >= num_hidden_layers."""
        layer = re.compile(r"model\.layers\.(\d+)\.")
        return sorted(n for n in hub_names if (m := layer.match(n)) and int(m.group(1)) >= cfg.n_layers)
