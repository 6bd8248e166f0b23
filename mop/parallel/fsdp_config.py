"""`[parallel.fsdp]`: the options of FSDP2 over the parameters no other step shards
(`mop.parallel.parallelize.apply_fsdp`; the baseline's `mop.baselines.fsdp_best.apply_fsdp` reads them too).

Kept apart from the FSDP code so that validating a configuration imports no torch code.
"""

from __future__ import annotations

from dataclasses import dataclass

REDUCE_DTYPES = ("fp32", "bf16")


@dataclass
class FSDPConfig:
    """FSDP2: when the gathered weights are freed and in which dtype their gradients are reduced."""

    reduce_dtype: str = "fp32"  # dtype of the gradient reduce-scatter on GPU: "fp32" | "bf16"
    reshard_after_forward: bool = True  # free the gathered dense weights after each block's forward

    def __post_init__(self) -> None:
        if self.reduce_dtype not in REDUCE_DTYPES:
            raise ValueError(f"parallel.fsdp.reduce_dtype: {self.reduce_dtype!r} is not one of "
                             + ", ".join(repr(d) for d in REDUCE_DTYPES))
