"""`BaselineConfig`: the degrees and switches of one FSDP-best configuration."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass


@dataclass(frozen=True)
class BaselineConfig:
    """One stock-PyTorch configuration: FSDP2 (HSDP) x TP x CP, EP inside the FSDP ranks, switches.

    Mesh (outer to inner): dp_replicate x dp_shard x cp x tp = world. FSDP shards over dp_shard x cp
    (and replicates over dp_replicate: HSDP); TP is the innermost dim (fastest links); expert
    parallelism borrows `ep` ranks from dp_shard x cp, like torchtitan. `dp_shard=-1` means "the rest".
    """

    dp_shard: int = -1
    dp_replicate: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1
    cpu_offload: bool = False  # FSDP2 CPUOffloadPolicy: sharded params, grads and AdamW state on the host
    # Only the optimizer on the host (ZeRO-Offload style, mop.baselines.optimizer_offload): FSDP2 keeps
    # fp32 params and grads on the device (8 B/param), torch AdamW updates fp32 master shards and
    # moments on the host CPU (16 B/param of host memory with the gradient staging).
    optimizer_offload: bool = False
    compile_loss: bool = True  # torch.compile of cross_entropy(hidden @ W.T): the fp32 logits copy fuses away
    # Never build the N x V logits: the model's own strip-wise cross-entropy (mop.ops.cross_entropy,
    # one device, no vocabulary parallelism), as public stacks do with a fused linear-cross-entropy
    # kernel (Liger's FLCE, torchtune's chunked loss). At 128K under CP2 the plain head's bf16 logits
    # and their gradient are ~40 GB per rank: the difference between fitting on the device and not.
    chunked_loss: bool = False
    compile_blocks: bool = False  # torch.compile of each transformer block (nn.Module.compile, FQNs kept)
    activation_checkpoint: bool = True
    # With activation_checkpoint: recompute every block except attention, which keeps its kernel's
    # state (the model's "selective" policy; torchtitan's op-level selective AC saves SDPA's outputs
    # for the same reason). Same model code as mop, so the comparison is of layouts, not kernels.
    selective: bool = False

    @property
    def block_policy(self) -> str:
        """The per-block activation policy of the shared model code (mop.models.activation_policy)."""
        if not self.activation_checkpoint:
            return "none"
        return "selective" if self.selective else "full"

    @property
    def recompute_level(self) -> int:
        """2 = full recomputation, 1 = selective, 0 = none: more recomputation, less memory."""
        return {"full": 2, "selective": 1, "none": 0}[self.block_policy]

    @property
    def offload_level(self) -> int:
        """Device bytes per parameter moved to the host / 8: 2 = CPUOffloadPolicy (params, grads and
        optimizer state, 16 B), 1 = optimizer only (exp_avg, exp_avg_sq, 8 B), 0 = none."""
        return 2 if self.cpu_offload else int(self.optimizer_offload)

    def __post_init__(self) -> None:
        if self.optimizer_offload and self.cpu_offload:
            raise ValueError("baseline.optimizer_offload and baseline.cpu_offload exclude each other (CPUOffloadPolicy "
                             "already keeps the optimizer on the host): set one of them")
        if self.selective and not self.activation_checkpoint:
            raise ValueError("baseline.selective needs baseline.activation_checkpoint=true")
        for name in ("dp_replicate", "tp", "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"baseline.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard != -1 and self.dp_shard < 1:
            raise ValueError(f"baseline.dp_shard must be >= 1 or -1 (the rest of the world), got {self.dp_shard}")

    @property
    def replicas(self) -> int:
        """Ranks that hold the same sequence (TP replicates it, CP splits it): tp x cp."""
        return self.tp * self.cp

    def resolved(self, world: int) -> "BaselineConfig":
        """This config with dp_shard filled in for `world` ranks; ValueError if the degrees do not fit."""
        inner = self.dp_replicate * self.tp * self.cp
        if world % inner:
            raise ValueError(f"baseline: dp_replicate*tp*cp = {self.dp_replicate}*{self.tp}*{self.cp} = {inner} "
                             f"must divide the world size {world}")
        dp_shard = world // inner if self.dp_shard == -1 else self.dp_shard
        if dp_shard * inner != world:
            raise ValueError(f"baseline: dp_replicate*dp_shard*cp*tp = {dp_shard * inner} != world size {world}; "
                             f"set baseline.dp_shard={world // inner} (or -1)")
        if (dp_shard * self.cp) % self.ep:
            raise ValueError(f"baseline.ep={self.ep} must divide dp_shard*cp = {dp_shard * self.cp} "
                             f"(expert parallelism borrows ranks from the FSDP dimension)")
        return dataclasses.replace(self, dp_shard=dp_shard)

    def validate_model(self, cfg, seq_len: int) -> None:
        """ValueError naming the degree when the model or context cannot be split this way."""
        if cfg.n_experts % self.ep:
            raise ValueError(f"baseline.ep={self.ep} must divide model.n_experts={cfg.n_experts}")
        if self.tp > 1:
            if cfg.attention == "mla" and cfg.n_heads % self.tp:
                raise ValueError(f"baseline.tp={self.tp} must divide model.n_heads={cfg.n_heads} (MLA splits "
                                 f"whole heads of its up-projections wq_b / wkv_b over the TP ranks)")
            for name, size in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads),
                               ("dense_dim", cfg.dense_dim if cfg.n_dense_layers else 0), ("shared_dim", cfg.shared_dim)):
                if size % self.tp:
                    raise ValueError(f"baseline.tp={self.tp} must divide model.{name}={size}")
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ValueError(f"baseline.cp={self.cp}: training.seq_len={seq_len} must be divisible by 2*cp "
                             f"(context_parallel's load balancer cuts each sequence into 2*cp chunks)")

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. 'fsdp4 ep4 cp1 tp1 ac offload'."""
        parts = [f"hsdp{self.dp_replicate}x{self.dp_shard}" if self.dp_replicate > 1 else f"fsdp{self.dp_shard}",
                 f"ep{self.ep}", f"cp{self.cp}", f"tp{self.tp}"]
        if self.activation_checkpoint:
            parts.append("sac" if self.selective else "ac")
        if self.chunked_loss:
            parts.append("cce")
        if self.cpu_offload:
            parts.append("offload")
        if self.optimizer_offload:
            parts.append("opt-offload")
        if self.compile_blocks:
            parts.append("compile")
        return " ".join(parts)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "BaselineConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"baseline config: unknown keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)
