"""The FSDP-best baseline: stock PyTorch (FSDP2/HSDP, TP, CP, all-to-all EP, AC, compile, offload)."""

from mop.baselines.config import BaselineConfig
from mop.baselines.fsdp_best import FSDPBestStrategy, baseline_trainer, parallelize_baseline

__all__ = ["BaselineConfig", "FSDPBestStrategy", "baseline_trainer", "parallelize_baseline"]
