"""The FSDP-best baseline: stock PyTorch (FSDP2/HSDP, TP, CP, all-to-all EP, AC, compile, offload)."""

from mop.baselines.config import BaselineConfig
from mop.baselines.fsdp_best import BaselineTrainer, parallelize_baseline

__all__ = ["BaselineConfig", "BaselineTrainer", "parallelize_baseline"]
