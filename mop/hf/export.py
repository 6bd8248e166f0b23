"""`mop export`: a training run's newest checkpoint (any layout) as a Hugging Face checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from mop.hf.io import _SHARD_BYTES, adapter_for, save_hf_checkpoint
from mop.models.config import ModelConfig


def export_run(src: str | os.PathLike, out: str | os.PathLike, dtype: torch.dtype = torch.bfloat16,
               shard_bytes: int = _SHARD_BYTES) -> Path:
    """Write the newest complete checkpoint of a run (or the checkpoint directory `src`) as a Hub checkpoint.

    One process, no GPU: torch.distributed.checkpoint reassembles the full tensors from the shards
    of any layout; the model config comes from the checkpoint's `model.json` (which carries the
    imported config.json / generation_config.json when the run started from a Hub checkpoint). Host
    memory needed: about 4 bytes per parameter (the fp32 model) plus the output dtype's copy.
    """
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
    adapter_for(cfg).config_to_hf(cfg)  # refuse early, before reading any tensor, if no Hub family takes it
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    state = {"model": {n: t.detach() for n, t in model.state_dict().items()}}  # parameters and persistent buffers
    dcp.load(state, checkpoint_id=str(ckpt))
    return save_hf_checkpoint(state["model"], cfg, out, dtype=dtype, shard_bytes=shard_bytes)


def export_main(argv: list[str]) -> int:
    """`mop export RUN_DIR|CHECKPOINT_DIR OUT_DIR [--dtype bf16|fp32] [--shard-gib N]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="mop export", description="write a training checkpoint as a Hugging Face "
                                 "checkpoint (qwen3_moe, deepseek_v3, gpt_oss): config.json as imported (only the "
                                 "keys the model changed rewritten), generation_config.json, safetensors")
    ap.add_argument("src", help="run directory (its newest complete checkpoint) or one checkpoint directory")
    ap.add_argument("out", help="output directory")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    ap.add_argument("--shard-gib", type=float, default=5.0, help="safetensors shard size")
    args = ap.parse_args(argv)
    out = export_run(args.src, args.out, torch.bfloat16 if args.dtype == "bf16" else torch.float32,
                     int(args.shard_gib * 2**30))
    print(f"mop export: wrote {out}")
    return 0
