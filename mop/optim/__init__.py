"""Optimizers: HostAdamW, AdamW with host-resident fp32 state updated in pipelined buckets (the MoP paper, §3.5)."""

from mop.optim.host_adamw import HostAdamW
from mop.optim.registry import ENGINES

__all__ = ["ENGINES", "HostAdamW"]
