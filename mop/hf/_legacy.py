"""Hugging Face interop: Qwen3-MoE checkpoints (config.json + safetensors) to and from mop models.

    cfg, tensors = load_hf_checkpoint("Qwen3-30B-A3B/")      # mop ModelConfig + mop-named tensors
    save_hf_checkpoint(state_dict, cfg, "out_dir/")           # the Hub layout, sharded safetensors

Names map one to one except the routed experts: the Hub stores one [I, H] / [H, I] Linear weight per
expert and projection (`mlp.experts.{e}.gate_proj.weight`, ...); mop stacks them, transposed, as
`moe.experts.w1` / `w3` [E, H, I] and `w2` [E, I, H]. Tensors are read lazily, one at a time
(`safe_open`), so importing never holds more than the converted model plus one expert stack.

Training from a checkpoint: `--model.shape=hf:PATH --checkpoint.init_from=PATH` (any layout; each
rank keeps its shards).
Exporting a run: `mop export RUN_DIR OUT_DIR`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from mop.models.config import ModelConfig

SUPPORTED = ("qwen3_moe",)
_SHARD_BYTES = 5 * 2**30


# -- configs ----------------------------------------------------------------------------------------

def config_from_hf(hf: dict) -> ModelConfig:
    """mop ModelConfig of a Hugging Face `config.json` (dict); unsupported features raise ValueError."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise ValueError(f"config.json: model_type {kind!r} is not supported (supported: {SUPPORTED})")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU with silu only)")
    if hf.get("use_sliding_window"):
        raise ValueError("config.json: use_sliding_window=true is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"config.json: rope scaling {rope!r} is not supported (plain RoPE only)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    n_layers = hf["num_hidden_layers"]
    step = hf.get("decoder_sparse_step", 1)
    dense = sorted(set(hf.get("mlp_only_layers") or []) | {i for i in range(n_layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        raise ValueError(f"config.json: dense (MLP-only) layers {dense} must be the first layers")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        shape=f"hf:{kind}", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=n_layers, n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads", heads), head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        qk_norm=True, attn_bias=bool(hf.get("attention_bias", False)), rope_theta=float(theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        n_experts=hf.get("num_experts", hf.get("num_local_experts")), top_k=hf["num_experts_per_tok"],
        expert_dim=hf["moe_intermediate_size"], score_func="softmax", norm_topk=bool(hf.get("norm_topk_prob", False)),
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0)), n_dense_layers=len(dense),
        dense_dim=hf.get("intermediate_size", 0) if dense else 0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))


def config_to_hf(cfg: ModelConfig) -> dict:
    """Hugging Face `config.json` (Qwen3-MoE) of a mop ModelConfig; raises if the model is not one."""
    if cfg.n_shared_experts or cfg.score_func != "softmax" or cfg.expert_bias or cfg.route_scale != 1.0 \
            or not cfg.qk_norm:
        raise ValueError("only Qwen3-MoE-like models export to Hugging Face (softmax router, no shared experts, "
                         "no expert bias, route_scale 1, QK-norm)")
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "attention_bias": cfg.attn_bias,
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps, "num_experts": cfg.n_experts, "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k, "moe_intermediate_size": cfg.expert_dim,
        "norm_topk_prob": cfg.norm_topk, "router_aux_loss_coef": cfg.aux_loss_coef, "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.n_dense_layers)),
        "intermediate_size": cfg.dense_dim or 4 * cfg.dim, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "use_sliding_window": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 262144,
    }


# -- names ------------------------------------------------------------------------------------------

_LAYER_NAMES = {  # mop suffix -> Hub suffix, inside layers.{i}
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.weight": "self_attn.k_proj.weight", "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight", "attention.wo.bias": "self_attn.o_proj.bias",
    "attention.q_norm.weight": "self_attn.q_norm.weight", "attention.k_norm.weight": "self_attn.k_norm.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_EXPERTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def hf_name(mop_name: str) -> str:
    """Hub name of a (non-expert) mop parameter name."""
    if mop_name in _TOP_NAMES:
        return _TOP_NAMES[mop_name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", mop_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise KeyError(f"no Hugging Face name for parameter {mop_name!r}")


# -- state dicts ------------------------------------------------------------------------------------

def mop_names(cfg: ModelConfig) -> list[str]:
    """Every parameter name of the mop model of `cfg` (built on meta: nothing is allocated)."""
    from mop.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return [n for n, _ in model.named_parameters()]


def _hub_expert_names(name: str, n_experts: int) -> list[str] | None:
    """Hub names of the per-expert weights stacked in the mop parameter `name` (None if not an expert stack).

    Hub: one Linear weight per expert ([I, H] gate/up, [H, I] down); mop: stacked and transposed.
    """
    m = re.fullmatch(r"layers\.(\d+)\.moe\.experts\.(w[123])", name)
    if m is None:
        return None
    layer, w = m.groups()
    return [f"model.layers.{layer}.mlp.experts.{e}.{_EXPERTS[w]}.weight" for e in range(n_experts)]


def mop_tensor(name: str, get, cfg: ModelConfig) -> torch.Tensor:
    """The mop parameter `name` from a Hub tensor getter `get(hub_name) -> Tensor`."""
    experts = _hub_expert_names(name, cfg.n_experts)
    if experts is not None:
        return torch.stack([get(n).t() for n in experts]).contiguous()
    return get(hf_name(name))


def hf_to_mop(get, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """mop state dict from a Hub tensor getter `get(name) -> Tensor` (experts stacked and transposed)."""
    return {name: mop_tensor(name, get, cfg) for name in mop_names(cfg)}


def mop_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hub-named tensors of a full mop state dict (experts unstacked and transposed)."""
    out = {}
    for name in mop_names(cfg):
        t = state[name]
        experts = _hub_expert_names(name, cfg.n_experts)
        if experts is not None:
            out.update({n: t[e].t().contiguous() for e, n in enumerate(experts)})
        elif name == "output.weight" and cfg.tie_embeddings:
            continue  # tied: the Hub stores the embedding only
        else:
            out[hf_name(name)] = t
    return out


# -- files ------------------------------------------------------------------------------------------

def _weight_files(path: Path) -> dict[str, Path]:
    """Hub tensor name -> safetensors file, from the index (sharded) or the single file."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single for k in f.keys()}


def load_hf_config(path: str | os.PathLike) -> ModelConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}/config.json: not a Hugging Face checkpoint directory")
    return config_from_hf(json.loads((path / "config.json").read_text()))


class HFCheckpoint:
    """A Hub checkpoint directory read lazily: `config` (ModelConfig) and `tensor(mop_name)`.

    Each call reads (memory-maps) only the tensors of that one parameter, so a sharded model can be
    initialised parameter by parameter without any rank holding the whole checkpoint.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = load_hf_config(self.path)
        self.files = _weight_files(self.path)
        self._handles = {}

    def _get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.files and self.config.tie_embeddings:
            name = "model.embed_tokens.weight"  # tied checkpoints store the embedding only
        f = self.files.get(name)
        if f is None:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        if f not in self._handles:
            from safetensors import safe_open

            self._handles[f] = safe_open(str(f), "pt")
        return self._handles[f].get_tensor(name)

    def tensor(self, mop_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return mop_tensor(mop_name, self._get, self.config).to(dtype)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name, dtype) for name in mop_names(self.config)}


def load_hf_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(ModelConfig, full mop state dict in `dtype`) of a Hub checkpoint directory."""
    ckpt = HFCheckpoint(path)
    return ckpt.config, ckpt.state_dict(dtype)


def save_hf_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike,
                       dtype: torch.dtype = torch.bfloat16, shard_bytes: int = _SHARD_BYTES) -> Path:
    """Write `config.json` and safetensors shards (with an index when more than one) in the Hub layout."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in mop_to_hf(state, cfg).items()}
    hf = config_to_hf(cfg)
    hf["torch_dtype"] = str(dtype).removeprefix("torch.")
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(path / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (path / "config.json").write_text(json.dumps(hf, indent=1))
    return path


# -- exporting a training run ----------------------------------------------------------------------

def export_run(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               shard_bytes: int = _SHARD_BYTES) -> Path:
    """Write the newest complete checkpoint of a run (or the checkpoint directory `src`) as a Hub checkpoint.

    One process, no GPU: torch.distributed.checkpoint reassembles the full tensors from the shards
    of any layout; the model config comes from the checkpoint's `model.json`. Host memory needed:
    about 4 bytes per parameter (the fp32 model) plus the output dtype's copy.
    """
    import dataclasses

    import torch.distributed.checkpoint as dcp

    from mop.checkpoint import CheckpointManager
    from mop.models.transformer import Transformer

    src = Path(src)
    ckpt = src if (src / "COMPLETE").is_file() else CheckpointManager(src).latest()
    if ckpt is None:
        raise FileNotFoundError(f"{src}: no complete checkpoint (neither a checkpoint directory nor a run directory "
                                "with checkpoints/step_*/COMPLETE)")
    meta = ckpt / "model.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta}: missing (checkpoints written before model.json was saved cannot be exported)")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in json.loads(meta.read_text()).items() if k in fields})
    config_to_hf(cfg)  # refuse early, before reading any tensor, if the model has no Hub counterpart
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state = {"model": {n: p.detach() for n, p in model.named_parameters()}}
    dcp.load(state, checkpoint_id=str(ckpt))
    return save_hf_checkpoint(state["model"], cfg, out, dtype=dtype, shard_bytes=shard_bytes)


def export_main(argv: list[str]) -> int:
    """`mop export RUN_DIR|CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--shard-gib N]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="mop export", description="write a training checkpoint as a Hugging Face "
                                 "(Qwen3-MoE) checkpoint: config.json + safetensors")
    ap.add_argument("src", help="run directory (its newest complete checkpoint) or one checkpoint directory")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--shard-gib", type=float, default=5.0, help="safetensors shard size")
    args = ap.parse_args(argv)
    out = export_run(args.src, args.out, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                     int(args.shard_gib * 2**30))
    print(f"mop export: wrote {out}")
    return 0
