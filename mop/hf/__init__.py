"""Hugging Face interop: Qwen3-MoE, DeepSeek-V3 / Kimi-K2 and gpt-oss checkpoints to and from mop models.

    cfg, tensors = load_hf_checkpoint("Qwen3-30B-A3B/")      # mop ModelConfig + mop-named tensors
    save_hf_checkpoint(state_dict, cfg, "out_dir/")           # the Hub layout, sharded safetensors

One adapter per family (`mop.hf.qwen3_moe`, `mop.hf.deepseek_v3`, `mop.hf.gpt_oss`; registry in
`mop.hf.io.ADAPTERS`) maps config keys and tensor names; names map one to one except the routed
experts, which mop stores stacked ([E, H, I] / [E, I, H]). Tensors are read lazily, one at a time
(`safe_open`), so importing never holds more than the converted model plus one expert stack.
Quantized checkpoints are dequantized on import (FP8 with 128x128 block scales: DeepSeek-V3,
Kimi-K2; MXFP4 experts: gpt-oss) to fp32; export writes bf16 (or fp32).

Training from a checkpoint: `--model.shape=hf:PATH --checkpoint.init_from=PATH` (any layout; each
rank keeps its shards). Exporting a run: `mop export RUN_DIR OUT_DIR` (config.json as imported, only
the keys the model changed rewritten; generation_config.json copied).
"""

from mop.hf.export import export_main, export_run
from mop.hf.io import (ADAPTERS, SUPPORTED, HFCheckpoint, adapter_for, config_from_hf, hf_to_mop, load_hf_checkpoint,
                       load_hf_config, merge_config, mop_names, mop_to_hf, save_hf_checkpoint)

__all__ = ["ADAPTERS", "SUPPORTED", "HFCheckpoint", "adapter_for", "config_from_hf", "export_main", "export_run",
           "hf_to_mop", "load_hf_checkpoint", "load_hf_config", "merge_config", "mop_names", "mop_to_hf",
           "save_hf_checkpoint"]
