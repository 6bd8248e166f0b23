"""`[parallel.experts]`: the options of expert parallelism and its token dispatchers.

One dataclass, read by the configuration (`--parallel.experts.dispatcher=llep`), by
`ExpertParallelExperts` and by each dispatcher's `from_config`. It imports no torch code, so
validating a configuration loads no kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from mop.parallel.experts.registry import check_dispatcher


@dataclass
class ExpertParallelConfig:
    """Expert parallelism: experts over groups of Ep ranks, and how tokens are dispatched to them.

    Each expert's weights are further sharded over the W/Ep ranks of its position.
    """

    degree: int = 1  # Ep: ranks per expert group (divides the world size and the number of experts)
    dispatcher: str = "alltoall"  # a name in mop.parallel.experts.registry.DISPATCHERS
    llep_alpha: float = 1.1  # LLEP: per-rank capacity = alpha * total / Ep
    llep_min_chunk: int = 1024  # LLEP: smallest spilled slice of an expert (tokens)
    llep_imbalance_threshold: float = 1.3  # LLEP: below this max/mean expert load, plain EP (lambda)
    # 16K, measured on an H200 (Ep=1, qwen3 widths, in a checkpointed block): at 64K tokens -50% peak
    # for +13% time, where 4K chunks gave -72% for +37% (each chunk re-reads and accumulates every
    # local expert's weight gradient).
    chunk_tokens: int = 16384  # llep_pipelined: tokens per chunk (c)
    max_chunks: int = 10  # llep_pipelined: at most this many chunks (K_max)

    def __post_init__(self) -> None:
        check_dispatcher(self.dispatcher)
        for name in ("degree", "llep_min_chunk", "chunk_tokens", "max_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.experts.{name}: must be >= 1, got {getattr(self, name)}")
        if not self.llep_alpha >= 1.0:
            raise ValueError(f"parallel.experts.llep_alpha: must be >= 1.0, got {self.llep_alpha}")
        if not self.llep_imbalance_threshold > 0:
            raise ValueError(f"parallel.experts.llep_imbalance_threshold: must be > 0, "
                             f"got {self.llep_imbalance_threshold}")

    @classmethod
    def from_any(cls, cfg) -> "ExpertParallelConfig":
        """Accept None (defaults), an instance, a dict, or any object carrying some of these field names."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d: getattr(cfg, k, d))
        return cls(**{f.name: get(f.name, f.default) for f in fields(cls)})
