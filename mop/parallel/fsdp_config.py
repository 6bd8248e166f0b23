"""`[parallel.fsdp]`: the options of FSDP2 over the parameters no other step shards
(`mop.parallel.parallelize.apply_fsdp`; the baseline's `mop.baselines.fsdp_best.apply_fsdp` reads them too).

Kept apart from the FSDP code so that validating a configuration imports no torch code.
"""

from __future__ import annotations

from dataclasses import dataclass

REDUCE_DTYPES = ("auto", "fp32", "bf16")
ACCUMULATION_MODES = ("reshard", "keep_gathered", "keep_all")  # ordered by what each keeps, least first


def resolve_reduce_dtype(reduce_dtype: str, param_dtype: str) -> str:
    """`parallel.fsdp.reduce_dtype` as it acts: "auto" is the gradients' storage dtype
    (`training.param_dtype`), bf16 or fp32. The trainer and `mop plan` both read it here."""
    if reduce_dtype == "auto":
        return "bf16" if param_dtype == "bf16" else "fp32"
    return reduce_dtype


@dataclass
class FSDPConfig:
    """FSDP2: when the gathered weights are freed and in which dtype their gradients are reduced."""

    # dtype of the gradient reduce-scatter on GPU: "fp32" | "bf16" | "auto": the gradients' storage
    # dtype, i.e. bf16 with training.param_dtype=bf16 (the fp32 sum would be rounded to bf16 on
    # storage anyway: at W = 2 the same bits for half the bytes; above, each ring hop rounds to bf16),
    # else fp32. Measured: 8K, 24 layers on 2 x H200, experts sharded as dense: +10% tokens/s.
    reduce_dtype: str = "auto"
    reshard_after_forward: bool = True  # free the gathered dense weights after each block's forward
    # With gradient accumulation (training.grad_accum > 1), what FSDP keeps between micro-batches:
    # "reshard": every micro-batch gathers each block's weights (twice with resharding after
    #   forward) and reduce-scatters its gradients;
    # "keep_gathered": weights stay gathered from the step's first forward to its last backward
    #   (one all-gather per block per step; costs the unsharded weights of all blocks in the
    #   compute dtype on every rank); gradients are still reduce-scattered per micro-batch;
    # "keep_all": also accumulates the gradients unsharded (in the reduce dtype) and reduce-scatters
    #   them once, in the last backward.
    # Worth it when the host optimizer has freed the device (2^20-token steps of many micro-batches).
    accumulation: str = "reshard"

    def __post_init__(self) -> None:
        if self.accumulation not in ACCUMULATION_MODES:
            raise ValueError(f"parallel.fsdp.accumulation: {self.accumulation!r} is not one of "
                             + ", ".join(repr(d) for d in ACCUMULATION_MODES))
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"parallel.fsdp.reduce_dtype: {self.reduce_dtype!r} is not one of "
                             + ", ".join(repr(d) for d in REDUCE_DTYPES))
