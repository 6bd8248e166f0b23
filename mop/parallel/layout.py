"""The MoP rank layout: W ranks and three independent, overlapping sub-group partitions.

MoP gives each component its own sharding axis over the SAME W ranks (the MoP paper, §2):

* sequence groups of D ranks (Ulysses attention): contiguous blocks ``[g*D, (g+1)*D)``; ranks of one
  group hold consecutive chunks of the same sequences, distinct groups hold distinct sequences;
* expert groups of Ep ranks (expert parallelism): contiguous blocks ``[g*Ep, (g+1)*Ep)``; each
  expert is further sharded over the complementary "expert-shard" group of W/Ep ranks, the ranks
  with the same position in their expert group (``{p, p+Ep, p+2Ep, ...}``);
* vocabulary groups of P ranks (data-tensor-parallel output projection): contiguous blocks
  ``[g*P, (g+1)*P)``, complementary "vocab-shard" groups of W/P ranks likewise.

These are partitions of one set of ranks, not axes of a Cartesian product: D, Ep and P are chosen
independently, each dividing W. Contiguous blocks keep the bandwidth-heavy groups (all-to-all of
Ulysses and expert dispatch) inside a node when the degree is at most the node's GPU count.

`LayoutSpec` is the pure, validated description (no process groups; usable in tests and by
`mop plan`); `Layout` holds the DeviceMeshes / process groups, built once and passed explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def divisors(n: int) -> list[int]:
    """The positive divisors of `n`, ascending: the valid degrees of an axis over n ranks."""
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class LayoutSpec:
    """World size W and the degrees D (sequence), Ep (expert), P (vocabulary). Validated on creation."""

    world: int
    seq: int = 1
    expert: int = 1
    vocab: int = 1

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ValueError(f"world size must be >= 1, got {self.world}")
        valid = divisors(self.world)
        for name, deg in (("parallel.seq.degree (D)", self.seq), ("parallel.experts.degree (Ep)", self.expert),
                          ("parallel.vocab.degree (P)", self.vocab)):
            if deg < 1 or self.world % deg:
                raise ValueError(f"{name}={deg} must divide the world size {self.world}; valid values: {valid}")

    # -- derived degrees -------------------------------------------------------------------------
    @property
    def expert_shard(self) -> int:
        """Ranks each expert's weights are sharded over (W / Ep)."""
        return self.world // self.expert

    @property
    def data_parallel(self) -> int:
        """Number of distinct sequence streams (W / D): each sequence group reads its own sequences."""
        return self.world // self.seq

    # -- membership (pure functions of the rank) ------------------------------------------------
    def rank_grid(self, degree: int) -> torch.Tensor:
        """[W/degree, degree] ranks of an axis of `degree`, as `Layout.build` lays out its mesh.

        Row g is the contiguous group ``[g*degree, (g+1)*degree)``; column p the complementary
        strided group ``{p, p+degree, p+2*degree, ...}``.
        """
        return torch.arange(self.world).view(self.world // degree, degree)

    def seq_rank(self, rank: int) -> int:
        """Position of `rank` in its sequence group: which chunk of the sequence it holds."""
        return rank % self.seq

    def dp_rank(self, rank: int) -> int:
        """Index of `rank`'s sequence group: which sequences it reads."""
        return rank // self.seq

    # -- model-dependent checks ------------------------------------------------------------------
    def validate_model(self, *, n_heads: int, n_kv_heads: int, n_experts: int, seq_len: int | None = None) -> None:
        """Raise a ValueError naming the option when the model cannot be split by this layout.

        D need not divide the heads: Ulysses then falls back to its all-gather-KV ring
        (`mop.parallel.ulysses.ulysses_factorization`).
        """
        if n_experts and n_experts % self.expert:
            ok = [d for d in divisors(self.world) if n_experts % d == 0]
            raise ValueError(f"parallel.experts.degree (Ep)={self.expert} must divide the number of experts "
                             f"{n_experts}; valid values for W={self.world}: {ok}")
        if seq_len is not None and seq_len % self.seq:
            raise ValueError(f"training.seq_len={seq_len} must be divisible by parallel.seq.degree (D)={self.seq}")


@dataclass
class Layout:
    """Process groups and DeviceMeshes of a `LayoutSpec` for this rank. Build with `Layout.build`.

    Meshes (all over the same W ranks, laid out by `LayoutSpec.rank_grid`):
      world_mesh   1-D [W]                              dense-path FSDP
      seq_mesh     2-D [W/D, D]   ("dp", "seq")           Ulysses all-to-all along "seq"
      expert_mesh  2-D [W/Ep, Ep] ("expert_shard", "expert") routed experts (mop.parallel.experts)
      vocab_mesh   2-D [P, W/P]   ("vocab", "vocab_shard")   the vocabulary modules' weights (mop.parallel.vocab):
                   the vocabulary is cut into P blocks first, so "vocab" is the outer dimension
    """

    spec: LayoutSpec
    device: torch.device
    world_mesh: object = field(repr=False)
    seq_mesh: object = field(repr=False)
    expert_mesh: object = field(repr=False)
    vocab_mesh: object = field(repr=False)

    @staticmethod
    def build(spec: LayoutSpec, device: torch.device) -> "Layout":
        """Create every mesh once. Requires an initialised default process group of size W."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import DeviceMesh

        if not dist.is_initialized():
            raise RuntimeError("Layout.build needs torch.distributed initialised (torchrun or mop train --nproc)")
        if dist.get_world_size() != spec.world:
            raise ValueError(f"layout world size {spec.world} != number of launched ranks {dist.get_world_size()}")
        dev_type = device.type
        return Layout(
            spec=spec,
            device=device,
            world_mesh=DeviceMesh(dev_type, torch.arange(spec.world), mesh_dim_names=("world",)),
            seq_mesh=DeviceMesh(dev_type, spec.rank_grid(spec.seq), mesh_dim_names=("dp", "seq")),
            expert_mesh=DeviceMesh(dev_type, spec.rank_grid(spec.expert), mesh_dim_names=("expert_shard", "expert")),
            vocab_mesh=DeviceMesh(dev_type, spec.rank_grid(spec.vocab).t(), mesh_dim_names=("vocab", "vocab_shard")),
        )

    # Process groups, by role.
    @property
    def world_group(self):
        return self.world_mesh.get_group("world")

    @property
    def seq_group(self):
        return self.seq_mesh.get_group("seq")

    @property
    def expert_group(self):
        return self.expert_mesh.get_group("expert")

    @property
    def expert_shard_group(self):
        return self.expert_mesh.get_group("expert_shard")
