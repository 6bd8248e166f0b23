"""`[parallel]`: the MoP layout's section of the job configuration.

Each component owns its options, validation and defaults beside its code; this section only
gathers them (`[parallel.seq]`, `[parallel.experts]`, `[parallel.vocab]`, `[parallel.fsdp]`) with the
options that belong to no one component: the local worker count and the planner switch. It imports no
torch code, so validating a configuration loads no kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mop.parallel.experts.config import ExpertParallelConfig
from mop.parallel.fsdp_config import FSDPConfig
from mop.parallel.ulysses_config import SeqParallelConfig
from mop.parallel.vocab_config import VocabParallelConfig


@dataclass
class ParallelConfig:
    """How the W ranks split the work: one section per component, each degree dividing W."""

    nproc: int = 1  # `mop train --nproc N` launches N local workers (ignored under torchrun)
    # "auto": `mop plan` chooses the degrees, the dispatcher, the activation policies and the
    # optimizer's placement for this model, context, tokens per step and machine (replacing those options).
    plan: str = "none"
    seq: SeqParallelConfig = field(default_factory=SeqParallelConfig)
    experts: ExpertParallelConfig = field(default_factory=ExpertParallelConfig)
    vocab: VocabParallelConfig = field(default_factory=VocabParallelConfig)
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError(f"parallel.nproc: must be >= 1, got {self.nproc}")
        if self.plan not in ("none", "auto"):
            raise ValueError(f"parallel.plan: {self.plan!r} is not one of 'none', 'auto'")

    def layout_spec(self, world: int):
        """The validated `LayoutSpec` of these degrees over `world` ranks."""
        from mop.parallel.layout import LayoutSpec

        return LayoutSpec(world, self.seq.degree, self.experts.degree, self.vocab.degree)
