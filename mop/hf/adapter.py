"""One adapter per Hugging Face model family: config keys and tensor names to and from mop.

An adapter says, for its `model_type`:
* `config_from_hf(hf)`: the mop ModelConfig of a config.json (refusing what mop cannot run);
* `config_to_hf(cfg)`: the config.json keys mop's fields determine (`merge_config` decides which of
  them overwrite the imported file: only those the model changed);
* `layer_names`: mop parameter suffix -> Hub suffix inside a layer, for the one-to-one tensors;
* `expert_to_mop` / `experts_to_hub`: the routed experts, the only tensors whose layouts differ.

The registry `ADAPTERS` is how the rest of `mop.hf` finds them; adding a family is one file and
one registry line.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import Callable

import torch

from mop.models.config import ModelConfig

Getter = Callable[[str], torch.Tensor]

TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
COMMON_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
GQA_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight", "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight", "attention.wo.bias": "self_attn.o_proj.bias",
}
_EXPERT_RE = re.compile(r"layers\.(\d+)\.moe\.experts\.(\w+)")


def require(hf: dict, key: str, what: str = "") -> object:
    """hf[key], or a ValueError naming the key when it is missing or null."""
    value = hf.get(key)
    if value is None:
        raise ValueError(f"config.json: {key!r} is {'missing' if key not in hf else 'null'}"
                         f"{f' ({what})' if what else ''}")
    return value


def gqa_fields(hf: dict) -> dict:
    """mop's size fields of a grouped-query-attention config.json: vocabulary, width, depth, heads."""
    heads = require(hf, "num_attention_heads")
    return {"vocab_size": require(hf, "vocab_size"), "dim": require(hf, "hidden_size"),
            "n_layers": require(hf, "num_hidden_layers"), "n_heads": heads,
            "n_kv_heads": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads}


def expert_count(hf: dict, key: str, other: str) -> int:
    """The routed expert count, `hf[key]` or else `hf[other]` (the families name it either way)."""
    n_experts = hf.get(key, hf.get(other))
    if n_experts is None:
        raise ValueError(f"config.json: the expert count {key!r} is missing or null")
    return n_experts


def rope_fields(hf: dict, refuse_scaling: bool = False) -> dict:
    """mop rope_* fields of `rope_parameters` (or the older `rope_scaling` + `rope_theta`)."""
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default")) or "default"
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if kind == "default":
        return {"rope_theta": theta}
    if kind != "yarn" or refuse_scaling:
        raise ValueError(f"config.json: rope scaling {rope!r} is not supported (plain RoPE"
                         f"{'' if refuse_scaling else ' or yarn'} only)")
    if rope.get("attention_factor") is not None:
        raise ValueError("config.json: rope_parameters.attention_factor is not supported (mop derives it from "
                         "factor / mscale / mscale_all_dim)")
    original = int(require(rope, "original_max_position_embeddings", "in rope_parameters"))
    factor = rope.get("factor") or require(hf, "max_position_embeddings") / original
    return {"rope_theta": theta, "rope_scaling": "yarn", "rope_factor": float(factor), "rope_original_max_len": original,
            "rope_beta_fast": float(rope.get("beta_fast") or 32.0), "rope_beta_slow": float(rope.get("beta_slow") or 1.0),
            "rope_mscale": float(rope.get("mscale") or 0.0), "rope_mscale_all_dim": float(rope.get("mscale_all_dim") or 0.0),
            "rope_truncate": bool(rope.get("truncate", True))}


def rope_to_hf(cfg: ModelConfig) -> dict:
    """`rope_parameters` of the mop rope_* fields (the inverse of `rope_fields`)."""
    if cfg.rope_scaling == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
           "original_max_position_embeddings": cfg.rope_original_max_len, "beta_fast": cfg.rope_beta_fast,
           "beta_slow": cfg.rope_beta_slow, "truncate": cfg.rope_truncate}
    if cfg.rope_mscale:
        out["mscale"] = cfg.rope_mscale
    if cfg.rope_mscale_all_dim:
        out["mscale_all_dim"] = cfg.rope_mscale_all_dim
    return out


class FamilyAdapter(ABC):
    """Base: names map one to one except the routed experts (per-expert Hub Linears by default)."""

    model_type = ""
    layer_names: dict[str, str] = {}
    # Hub per-expert projection of each mop expert stack (Qwen3-MoE, DeepSeek-V3 layout).
    expert_projections = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    @abstractmethod
    def config_from_hf(self, hf: dict) -> ModelConfig:
        """The model config of a Hub config.json (as a dict)."""

    @abstractmethod
    def config_to_hf(self, cfg: ModelConfig) -> dict:
        """The Hub config.json keys of a model config."""

    # -- names -------------------------------------------------------------------------------------
    def hub_name(self, mop_name: str) -> str:
        """Hub name of a one-to-one (non-expert) mop tensor."""
        if mop_name in TOP_NAMES:
            return TOP_NAMES[mop_name]
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", mop_name)
        if m and m.group(2) in self.layer_names:
            return f"model.layers.{m.group(1)}.{self.layer_names[m.group(2)]}"
        raise KeyError(f"no Hugging Face ({self.model_type}) name for parameter {mop_name!r}")

    def _per_expert_names(self, layer: str, w: str, n_experts: int) -> list[str]:
        return [f"model.layers.{layer}.mlp.experts.{e}.{self.expert_projections[w]}.weight" for e in range(n_experts)]

    # -- tensors -----------------------------------------------------------------------------------
    def to_mop(self, name: str, get: Getter, cfg: ModelConfig) -> torch.Tensor:
        """The mop tensor `name` from a Hub tensor getter."""
        m = _EXPERT_RE.fullmatch(name)
        if m is not None:
            return self.expert_to_mop(m.group(1), m.group(2), get, cfg)
        return get(self.hub_name(name))

    def expert_to_mop(self, layer: str, w: str, get: Getter, cfg: ModelConfig) -> torch.Tensor:
        """Hub: one Linear weight per expert ([I, H] gate/up, [H, I] down); mop: stacked, transposed."""
        return torch.stack([get(n).t() for n in self._per_expert_names(layer, w, cfg.n_experts)]).contiguous()

    def to_hub(self, state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        """Hub-named tensors of a full mop state dict."""
        out, experts = {}, {}
        for name, t in state.items():
            m = _EXPERT_RE.fullmatch(name)
            if m is not None:
                experts.setdefault(m.group(1), {})[m.group(2)] = t
            elif name == "output.weight" and cfg.tie_embeddings:
                continue  # tied: the Hub stores the embedding only
            else:
                out[self.hub_name(name)] = t
        for layer, stacks in experts.items():
            out.update(self.experts_to_hub(layer, stacks, cfg))
        return out

    def experts_to_hub(self, layer: str, stacks: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
        out = {}
        for w, t in stacks.items():
            out.update({n: t[e].t().contiguous() for e, n in enumerate(self._per_expert_names(layer, w, cfg.n_experts))})
        return out

    def unused_hub_tensors(self, hub_names, cfg: ModelConfig) -> list[str]:
        """Checkpoint tensors this family knowingly does not load (e.g. DeepSeek's MTP layers)."""
        return []
