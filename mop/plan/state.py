"""Memory that does not depend on the context: parameters, gradients and optimizer state per rank.

Every parameter is sharded exactly once over all W ranks (FSDP2 for the dense weights, EP x
sharding for the experts, vocabulary blocks), so these numbers follow from the parameter count
alone and are exact up to the allocator: weight shards and gradient shards on the device in the
parameter dtype (fp32, or bf16 with `training.param_dtype=bf16`: 2 + 2 B/param), AdamW's two fp32
moments on the device, or (host-resident optimizer) fp32 master weights and both moments (12 B/param)
in pinned host memory, of which the first `device_fraction` stays on the device. `mop train` checks them before it allocates anything, so a layout
that can never fit fails at once with the numbers, not after minutes of start-up with an OOM.

Activations are not included here: they depend on the context, the layout and recomputation, and
are modelled by `mop.plan.memory` (which builds on these exact numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from mop.models.config import ModelConfig

GIB = 2**30
FP32 = 4


@dataclass(frozen=True)
class StateMemory:
    """Bytes per rank of the training state."""

    weights: float
    grads: float
    optimizer_device: float
    optimizer_host: float

    @property
    def device(self) -> float:
        return self.weights + self.grads + self.optimizer_device


def state_memory(cfg: ModelConfig, world: int, offload: str = "none", device_fraction: float = 0.0,
                 param_bytes: int = FP32) -> StateMemory:
    """Per-rank bytes of weights, gradients and AdamW state for `cfg` sharded over `world` ranks.

    `param_bytes`: 4 (fp32 parameters) or 2 (`training.param_dtype=bf16`, host optimizer only: the
    fp32 master copy lives with the moments, so the host state is 12 B/param either way).
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if param_bytes not in (2, FP32):
        raise ValueError(f"param_bytes must be 2 (bf16) or 4 (fp32), got {param_bytes}")
    if param_bytes != FP32 and offload == "none":
        raise ValueError("bf16 parameters need a host optimizer (it keeps the fp32 master): set an optimizer offload")
    local = cfg.param_counts()["total"] / world
    w = param_bytes * local
    if offload == "none":
        return StateMemory(w, w, 2 * FP32 * local, 0.0)
    frac = min(max(device_fraction, 0.0), 1.0)
    return StateMemory(w, w, 3 * FP32 * local * frac, 3 * FP32 * local * (1 - frac))


def check_state_fits(cfg: ModelConfig, world: int, device_bytes: float, offload: str = "none",
                     device_fraction: float = 0.0, headroom: float = 0.9) -> StateMemory:
    """Raise ValueError, with the numbers and what would help, when the state alone exceeds the device."""
    mem = state_memory(cfg, world, offload, device_fraction)
    if mem.device > headroom * device_bytes:
        counts = cfg.param_counts()
        hints = []
        if offload == "none":
            with_offload = state_memory(cfg, world, "gpu_stream", 0.0).device
            hints.append(f"--optimizer.offload=gpu_stream (device state {with_offload / GIB:.1f} GiB per rank)")
        need = mem.weights + mem.grads + (0 if offload != "none" else mem.optimizer_device)
        min_world = int(-(-need * world // (headroom * device_bytes)))
        hints.append(f"at least {min_world} GPUs for this state alone")
        raise ValueError(
            f"{cfg.shape} ({counts['total'] / 1e9:.2f}B parameters) cannot fit on {world} GPU(s) of "
            f"{device_bytes / GIB:.0f} GiB: per rank, weights {mem.weights / GIB:.1f} + gradients "
            f"{mem.grads / GIB:.1f} + optimizer {mem.optimizer_device / GIB:.1f} = {mem.device / GIB:.1f} GiB before "
            f"any activation (limit {headroom:.0%} of the device). Try: " + "; ".join(hints))
    return mem
