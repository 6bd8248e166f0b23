"""`[parallel.seq]`: the options of Ulysses sequence parallelism (`mop.parallel.ulysses`).

Kept apart from the kernels so that validating a configuration imports no torch code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SeqParallelConfig:
    """Ulysses sequence parallelism: attention over groups of D ranks that split each sequence."""

    degree: int = 1  # D: ranks per sequence group (divides the world size)
    head_chunks: int = 1  # attention heads in this many chunks, each chunk's all-to-all hidden behind another's math

    def __post_init__(self) -> None:
        for name in ("degree", "head_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.seq.{name}: must be >= 1, got {getattr(self, name)}")
