"""gpt-oss (`gpt_oss`): GQA with biases, attention sinks, alternating sliding-window / full layers,
YaRN RoPE, a router with a bias (softmax over the top-k logits), experts with biases and the clamped
SwiGLU.

Hub expert layout (unquantized): `gate_up_proj` [E, H, 2I] with gate and up interleaved along the
last dim (gate at even, up at odd columns), `gate_up_proj_bias` [E, 2I], `down_proj` [E, I, H],
`down_proj_bias` [E, H]; mop: w1 / w3 [E, H, I], b1 / b3 [E, I], w2 [E, I, H], b2 [E, H]. The
published MXFP4 form (`*_blocks`, `*_scales`) is dequantized on read (`mop.hf.quant`).
"""

from __future__ import annotations

import torch

from mop.hf.adapter import (COMMON_LAYER_NAMES, GQA_NAMES, FamilyAdapter, Getter, expert_count, gqa_fields, require,
                            rope_fields, rope_to_hf)
from mop.models.config import ModelConfig


class GptOssAdapter(FamilyAdapter):
    model_type = "gpt_oss"
    layer_names = {**COMMON_LAYER_NAMES, **GQA_NAMES, "attention.sinks": "self_attn.sinks",
                   "moe.router.gate.weight": "mlp.router.weight", "moe.router.gate.bias": "mlp.router.bias"}

    def config_from_hf(self, hf: dict) -> ModelConfig:
        n_layers, window = require(hf, "num_hidden_layers"), hf.get("sliding_window") or 0
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        if window and types == ["sliding_attention"] * n_layers:
            layers = "all"
        elif not window or types == ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]:
            layers = "even"
        else:
            raise ValueError(f"config.json: layer_types {types} is not supported (sliding on even layers, or on all)")
        if all(t == "full_attention" for t in types):
            window = 0
        n_experts = expert_count(hf, "num_local_experts", "num_experts")
        return ModelConfig(
            shape=f"hf:{self.model_type}", **gqa_fields(hf), qk_norm=False,
            attn_bias=bool(hf.get("attention_bias", True)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            **rope_fields(hf), max_seq_len=hf.get("max_position_embeddings") or 0, attn_sinks=True,
            sliding_window=window, sliding_window_layers=layers, n_experts=n_experts,
            top_k=require(hf, "num_experts_per_tok"), expert_dim=require(hf, "intermediate_size"),
            score_func="softmax", norm_topk=True, moe_bias=True, swiglu_limit=float(require(hf, "swiglu_limit")),
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), aux_loss_coef=float(hf.get("router_aux_loss_coef") or 0.0),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)))

    def config_to_hf(self, cfg: ModelConfig) -> dict:
        if not (cfg.attn_sinks and cfg.moe_bias and cfg.swiglu_limit) or cfg.attention != "gqa" or cfg.n_dense_layers \
                or cfg.n_shared_experts or cfg.score_func != "softmax":
            raise ValueError("this model is not gpt-oss-like (sinks, expert biases, clamped SwiGLU, softmax router, "
                             "no dense layers or shared experts)")
        types = ["sliding_attention" if cfg.layer_window(i) else "full_attention" for i in range(cfg.n_layers)]
        out = {
            "architectures": ["GptOssForCausalLM"], "model_type": self.model_type, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "attention_bias": cfg.attn_bias,
            "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope_to_hf(cfg), "sliding_window": cfg.sliding_window or None,
            "layer_types": types, "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
            "intermediate_size": cfg.expert_dim, "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha,
            "router_aux_loss_coef": cfg.aux_loss_coef, "tie_word_embeddings": cfg.tie_embeddings,
        }
        if cfg.max_seq_len:
            out["max_position_embeddings"] = cfg.max_seq_len
        return out

    def expert_to_mop(self, layer: str, w: str, get: Getter, cfg: ModelConfig) -> torch.Tensor:
        base = f"model.layers.{layer}.mlp.experts."
        start = 0 if w in ("w1", "b1") else 1  # gate at even columns, up at odd ones
        if w in ("w1", "w3"):
            return get(base + "gate_up_proj")[..., start::2].contiguous()
        if w in ("b1", "b3"):
            return get(base + "gate_up_proj_bias")[..., start::2].contiguous()
        return get(base + {"w2": "down_proj", "b2": "down_proj_bias"}[w])

    def experts_to_hub(self, layer: str, stacks: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        base = f"model.layers.{layer}.mlp.experts."

        def interleave(a, b):
            return torch.stack([a, b], dim=-1).flatten(-2).contiguous()

        return {base + "gate_up_proj": interleave(stacks["w1"], stacks["w3"]),
                base + "gate_up_proj_bias": interleave(stacks["b1"], stacks["b3"]),
                base + "down_proj": stacks["w2"], base + "down_proj_bias": stacks["b2"]}
