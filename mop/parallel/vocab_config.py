"""`[parallel.vocab]`: the options of the vocabulary-parallel embedding and output head
(`mop.parallel.vocab`, `mop.parallel.vocab_ring`).

Kept apart from the kernels so that validating a configuration imports no torch code.
"""

from __future__ import annotations

from dataclasses import dataclass

# How the ring moves a vocabulary block: "weights" passes the weight strips around the group,
# "activations" the hidden states; "auto" picks the smaller per step (mop.parallel.vocab_ring).
SCHEDULES = ("auto", "weights", "activations")


@dataclass
class VocabParallelConfig:
    """Vocabulary parallelism: embedding and output head in blocks over groups of P ranks."""

    degree: int = 1  # P: ranks per vocabulary group (divides the world size)
    schedule: str = "auto"  # what the loss ring moves: "auto" (the smaller) | "weights" | "activations"

    def __post_init__(self) -> None:
        if self.degree < 1:
            raise ValueError(f"parallel.vocab.degree: must be >= 1, got {self.degree}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"parallel.vocab.schedule: {self.schedule!r} is not one of "
                             + ", ".join(repr(s) for s in SCHEDULES))
