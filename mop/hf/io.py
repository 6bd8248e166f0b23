"""Reading and writing Hub checkpoint directories (config.json, generation_config.json, safetensors).

Import: `HFCheckpoint(path)` reads config.json into a ModelConfig (keeping the files' JSON in
`cfg.hf_files`) and serves one mop tensor at a time, memory-mapped and dequantized on the way (FP8
block scales, MXFP4: `mop.hf.quant`), so initialising a sharded model never holds the checkpoint.
Export: `save_hf_checkpoint` writes bf16 (or fp32) safetensors, config.json as imported with only the
keys the model changed (`merge_config`), and generation_config.json as imported.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path

import torch

from mop.hf.adapter import FamilyAdapter
from mop.hf.deepseek_v3 import DeepseekV3Adapter
from mop.hf.gpt_oss import GptOssAdapter
from mop.hf.qwen3_moe import Qwen3MoeAdapter
from mop.hf.quant import dequantize_fp8_blocks, dequantize_mxfp4
from mop.models.config import ModelConfig

ADAPTERS: dict[str, FamilyAdapter] = {a.model_type: a for a in (Qwen3MoeAdapter(), DeepseekV3Adapter(), GptOssAdapter())}
ADAPTERS["kimi_k2"] = ADAPTERS["deepseek_v3"]  # Kimi-K2 ships the DeepSeek-V3 architecture under its own name
SUPPORTED = tuple(ADAPTERS)
CONFIG, GENERATION_CONFIG = "config.json", "generation_config.json"
_SHARD_BYTES = 5 * 2**30
# Keys the export sets itself: the dtype of the tensors it writes (the imported name of the key is
# kept), and no quantization_config (it writes dequantized weights).
_EXPORT_OWNED = ("dtype", "torch_dtype", "quantization_config")


def adapter_for(cfg_or_type) -> FamilyAdapter:
    """The adapter of a model_type string, or of a ModelConfig (its imported family, else by features)."""
    if isinstance(cfg_or_type, ModelConfig):
        kind = cfg_or_type.hf_files.get(CONFIG, {}).get("model_type")
        if kind is None:
            kind = "deepseek_v3" if cfg_or_type.attention == "mla" else "gpt_oss" if cfg_or_type.attn_sinks else "qwen3_moe"
    else:
        kind = cfg_or_type
    if kind not in ADAPTERS:
        raise ValueError(f"config.json: model_type {kind!r} is not supported (supported: {SUPPORTED})")
    return ADAPTERS[kind]


def config_from_hf(hf: dict, generation_config: dict | None = None) -> ModelConfig:
    """mop ModelConfig of a Hugging Face `config.json` (dict); unsupported features raise ValueError."""
    cfg = adapter_for(hf.get("model_type")).config_from_hf(hf)
    files = {CONFIG: hf} if generation_config is None else {CONFIG: hf, GENERATION_CONFIG: generation_config}
    return dataclasses.replace(cfg, hf_files=files)


def merge_config(cfg: ModelConfig, dtype: torch.dtype | None = None) -> dict:
    """config.json for `cfg`: the imported file, with the keys whose mop-determined value changed rewritten.

    A key is rewritten only when `config_to_hf` of the model differs from `config_to_hf` of the
    imported config read back, so representation details (rope_theta's place, nulls, keys mop does
    not know) survive. Always set: the dtype key (to the written tensors' dtype) and no
    quantization_config (the weights are written dequantized).
    """
    adapter = adapter_for(cfg)
    mine = adapter.config_to_hf(cfg)
    source = cfg.hf_files.get(CONFIG)
    if source is None:
        out = dict(mine)
    else:
        before = adapter.config_to_hf(adapter.config_from_hf(source))
        out = dict(source)
        for key, value in mine.items():
            if key not in before or before[key] != value:
                out[key] = value
    out.pop("quantization_config", None)
    if dtype is not None:
        key = "torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"
        out[key] = str(dtype).removeprefix("torch.")
    return out


def mop_names(cfg: ModelConfig, buffers: bool = False) -> list[str]:
    """Parameter names of the mop model of `cfg` (and its persistent buffers); built on meta, nothing allocated."""
    from mop.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    return list(model.state_dict()) if buffers else [n for n, _ in model.named_parameters()]


def hf_to_mop(get, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """mop state dict (parameters) from a Hub tensor getter `get(name) -> Tensor`."""
    adapter = adapter_for(cfg)
    return {name: adapter.to_mop(name, get, cfg) for name in mop_names(cfg)}


def mop_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hub-named tensors of a full mop state dict (parameters, and buffers the family stores)."""
    adapter = adapter_for(cfg)
    # The routers' selection bias is a buffer; of the families only DeepSeek-V3 stores it.
    stores_bias = "moe.router.expert_bias" in adapter.layer_names
    return adapter.to_hub({n: t for n, t in state.items() if stores_bias or not n.endswith(".expert_bias")}, cfg)


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


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def load_hf_config(path: str | os.PathLike) -> ModelConfig:
    """ModelConfig of a Hub checkpoint directory (config.json; generation_config.json kept for export)."""
    path = Path(path)
    hf = _read_json(path / CONFIG)
    if hf is None:
        raise FileNotFoundError(f"{path}/{CONFIG}: not a Hugging Face checkpoint directory")
    return config_from_hf(hf, _read_json(path / GENERATION_CONFIG))


class HFCheckpoint:
    """A Hub checkpoint directory read lazily: `config` (ModelConfig) and `tensor(mop_name)`.

    Each call reads (memory-maps) only the tensors of that one parameter, dequantizing FP8 (with its
    `weight_scale_inv`) and MXFP4 (`_blocks` + `_scales`) to fp32, so a sharded model can be
    initialised parameter by parameter without any rank holding the whole checkpoint.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.config = load_hf_config(self.path)
        self.adapter = adapter_for(self.config)
        self.files = _weight_files(self.path)
        self._handles = {}
        unused = self.adapter.unused_hub_tensors(self.files, self.config)
        if unused:
            warnings.warn(f"{self.path}: {len(unused)} tensors are not loaded (mop does not model them: "
                          f"multi-token prediction layers), e.g. {unused[:3]}; an export will not contain them",
                          stacklevel=2)

    def _raw(self, name: str) -> torch.Tensor:
        f = self.files.get(name)
        if f is None:
            raise KeyError(f"{self.path}: the checkpoint has no tensor {name!r}")
        if f not in self._handles:
            from safetensors import safe_open

            self._handles[f] = safe_open(str(f), "pt")
        return self._handles[f].get_tensor(name)

    def _get(self, name: str) -> torch.Tensor:
        if name == "lm_head.weight" and name not in self.files and self.config.tie_embeddings:
            name = "model.embed_tokens.weight"  # tied checkpoints store the embedding only
        if name not in self.files and name + "_blocks" in self.files:  # gpt-oss MXFP4 experts
            return dequantize_mxfp4(self._raw(name + "_blocks"), self._raw(name + "_scales"))
        t = self._raw(name)
        if name + "_scale_inv" in self.files:  # DeepSeek-V3 / Kimi-K2 FP8 with 128x128 block scales
            return dequantize_fp8_blocks(t, self._raw(name + "_scale_inv"))
        return t

    def tensor(self, mop_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.adapter.to_mop(mop_name, self._get, self.config).to(dtype)

    def buffer(self, mop_name: str) -> torch.Tensor | None:
        """The stored value of a persistent mop buffer (DeepSeek-V3's `e_score_correction_bias` as
        `moe.router.expert_bias`), or None when the family does not store it (keep the model's own)."""
        return self.tensor(mop_name) if self._has(mop_name) else None

    def state_dict(self, dtype: torch.dtype = torch.float32, buffers: bool = False) -> dict[str, torch.Tensor]:
        """Every parameter (and with `buffers`, each persistent buffer the checkpoint stores)."""
        names = mop_names(self.config, buffers=buffers)
        return {n: self.tensor(n, dtype) for n in names if not buffers or self._has(n)}

    def _has(self, mop_name: str) -> bool:
        try:
            self.adapter.hub_name(mop_name)
        except KeyError:
            return "experts" in mop_name  # expert stacks have no one-to-one name
        return True


def load_hf_checkpoint(path: str | os.PathLike, dtype: torch.dtype = torch.float32, buffers: bool = True):
    """(ModelConfig, full mop state dict in `dtype`) of a Hub checkpoint directory (with stored buffers,
    e.g. DeepSeek's `e_score_correction_bias` as `moe.router.expert_bias`)."""
    ckpt = HFCheckpoint(path)
    return ckpt.config, ckpt.state_dict(dtype, buffers=buffers)


def save_hf_checkpoint(state: dict[str, torch.Tensor], cfg: ModelConfig, path: str | os.PathLike,
                       dtype: torch.dtype = torch.bfloat16, shard_bytes: int = _SHARD_BYTES) -> Path:
    """Write config.json, generation_config.json (as imported) and safetensors shards (with an index
    when more than one) in the Hub layout."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in mop_to_hf(state, cfg).items()}
    hf = merge_config(cfg, dtype)
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
    (path / CONFIG).write_text(json.dumps(hf, indent=2))
    if GENERATION_CONFIG in cfg.hf_files:
        (path / GENERATION_CONFIG).write_text(json.dumps(cfg.hf_files[GENERATION_CONFIG], indent=2))
    return path
