"""Optimizer-only CPU offload for the FSDP-best baseline: torch AdamW on the host, weights on the device.

What a careful stock-PyTorch user does when the fp32 weights and gradients fit the device but the
AdamW state does not (ZeRO-Offload; torchao's CPUOffloadOptimizer): FSDP2 keeps its sharded fp32
parameters and gradients on the device as usual, and the optimizer keeps, for every parameter's
local shard, an fp32 master copy plus exp_avg / exp_avg_sq on the host and updates them there with
torch's own `torch.optim.AdamW(fused=True)` (the fused CPU kernel: one pass over the state and no
foreach temporaries, which would add 4 B/param of host memory during the step).

One step (`HostOffloadAdamW.step`):
1. every gradient's local shard device->host into a pinned staging buffer (non_blocking), then one
   stream synchronisation: the host update reads them;
2. the host AdamW step on the master shards with this optimizer's param-group hyperparameters (lr as
   the trainer's scheduler set it, weight decay, betas, eps), copied into the host optimizer's groups;
3. every updated master shard host->device into the parameter's local tensor (non_blocking; the next
   step's synchronisation orders the host's next write of the master after the copy).

Nothing overlaps: not the three phases with each other, nor the update with the next forward. This
is the baseline, not mop (mop's `HostAdamW` pipelines buckets and overlaps the update). Gradient
clipping happens before the step (`FSDPBestStrategy.grad_norm_and_clip` scales the device gradients
in place), so the staged gradients are the clipped ones, exactly what the device AdamW would read.

Memory per parameter of the rank's shard:
- device: the fp32 parameter and gradient FSDP2 holds anyway, 8 B; nothing for the optimizer (the
  device AdamW adds exp_avg + exp_avg_sq, 8 B more);
- host: master 4 B + gradient staging 4 B, pinned (they cross PCIe every step), and exp_avg +
  exp_avg_sq 8 B, pageable (torch AdamW allocates them at the first step; they never leave the
  host) = `HOST_BYTES_PER_PARAM` = 16 B.
The pinned buffers are two flat tensors registered with `cudaHostRegister` at their exact size:
torch's pinned allocator rounds every allocation up to a power of two (a 31 GB buffer would lock 34).

Checkpoints: `state_dict` / `load_state_dict` raise NotImplementedError (the strategy refuses
`checkpoint.enabled` / `checkpoint.resume` with this option up front; `mop bench` never checkpoints).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from mop.distributed import local_shard

HOST_BYTES_PER_PARAM = 16  # master + exp_avg + exp_avg_sq (12 B) + gradient staging (4 B), fp32
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")  # what the scheduler / config set per group
_CUDA_HOST_REGISTER_PORTABLE = 1


def host_buffer(numel: int, device: torch.device) -> torch.Tensor:
    """A flat fp32 host tensor, page-locked when `device` is a GPU (so copies to and from it are async)."""
    buf = torch.empty(numel, dtype=torch.float32)
    if device.type != "cuda" or numel == 0:
        return buf
    err = torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.nbytes, _CUDA_HOST_REGISTER_PORTABLE)
    if int(err) == 0:
        weakref.finalize(buf, _unregister, buf.data_ptr())
        return buf
    warnings.warn(f"cudaHostRegister of {buf.nbytes / 2**30:.1f} GiB failed ({err}); using torch's pinned "
                  "allocator, which rounds the buffer up to a power of two", stacklevel=2)
    return torch.empty(numel, dtype=torch.float32, pin_memory=True)


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class HostOffloadAdamW(torch.optim.Optimizer):
    """Decoupled AdamW (torch.optim.AdamW) whose fp32 master shards and moments live on the host; the
    parameters (FSDP2 DTensors or plain tensors) keep their device storage and get the updated values.

    `param_groups` / `lr` / `betas` / `eps` / `weight_decay` as for `torch.optim.AdamW`; the groups'
    "lr" is what an lr scheduler drives. `zero_grad` clears the parameters' own gradients.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self._params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        shards = [local_shard(p.detach()) for p in self._params]
        bad = sorted({str(s.dtype) for s in shards} - {"torch.float32"})
        if bad:
            raise ValueError(f"HostOffloadAdamW updates fp32 parameters in place; got {bad} (keep training.param_dtype=fp32)")
        self.device = shards[0].device if shards else torch.device("cpu")
        numel = sum(s.numel() for s in shards)
        self._master_flat = host_buffer(numel, self.device)
        self._staging_flat = host_buffer(numel, self.device)
        self._master: dict[torch.Tensor, torch.Tensor] = {}
        self._staging: dict[torch.Tensor, torch.Tensor] = {}
        offset = 0
        for p, shard in zip(self._params, shards):
            master = self._master_flat.narrow(0, offset, shard.numel()).view(shard.shape)
            master.copy_(shard)  # once, at build: the device values are where training starts
            self._master[p] = master
            self._staging[p] = self._staging_flat.narrow(0, offset, shard.numel()).view(shard.shape)
            offset += shard.numel()
        host_groups = [{**{k: g[k] for k in HYPERPARAMETERS},
                        "params": [self._master[p] for p in g["params"] if p.requires_grad]}
                       for g in self.param_groups]
        self.host = torch.optim.AdamW(host_groups, fused=True)

    @property
    def host_bytes(self) -> int:
        """Host memory this optimizer holds now (master, staging and, after the first step, moments)."""
        moments = sum(t.nbytes for s in self.host.state.values() for k, t in s.items() if k != "step")
        return self._master_flat.nbytes + self._staging_flat.nbytes + moments

    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The host fp32 master copy of parameter `p`'s local shard."""
        return self._master[p]

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW update on the host (module docstring): gradients in, update, weights out."""
        if closure is not None:
            raise ValueError("HostOffloadAdamW.step takes no closure")
        updated = []
        for p in self._params:
            master = self._master[p]
            if p.grad is None:
                master.grad = None  # like torch AdamW: no gradient, no update (nor weight decay)
                continue
            self._staging[p].copy_(local_shard(p.grad), non_blocking=True)
            master.grad = self._staging[p]
            updated.append(p)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # host sync: the update reads the gradients
        for group, host_group in zip(self.param_groups, self.host.param_groups):
            for key in HYPERPARAMETERS:
                host_group[key] = group[key]
        self.host.step()
        for p in updated:
            local_shard(p).copy_(self._master[p], non_blocking=True)
        return None

    def state_dict(self):
        """Not supported: the baseline with this option never checkpoints (see the module docstring)."""
        raise NotImplementedError("the optimizer-offloaded baseline (baseline.optimizer_offload) does not checkpoint "
                                  "its host optimizer state; mop bench never checkpoints the baseline")

    def load_state_dict(self, state_dict) -> None:
        """Not supported: the baseline with this option never resumes."""
        raise NotImplementedError("the optimizer-offloaded baseline (baseline.optimizer_offload) cannot resume from a "
                                  "checkpoint")


def check_host_memory(local_numel: int, local_ranks: int, device: torch.device, all_reduce) -> None:
    """Raise ValueError on every rank unless `local_ranks` ranks' host optimizers (16 B per parameter of
    each shard) fit the host's available memory. Every rank reads the available memory before any of
    them allocates, and they agree (one all-reduce), so none goes on to wait for a peer that gave up."""
    from mop.optim.buckets import host_available_bytes

    needed = local_ranks * local_numel * HOST_BYTES_PER_PARAM
    available = host_available_bytes()
    short = torch.tensor(float(available is not None and needed > available), device=device)
    if all_reduce(short).item() > 0:  # host sync: once, at build
        have = "unknown" if available is None else f"{available / 2**30:.1f} GiB"
        raise ValueError(f"baseline.optimizer_offload: {local_ranks} rank(s) per host x {local_numel:,} parameters x "
                         f"{HOST_BYTES_PER_PARAM} B = {needed / 2**30:.1f} GiB of host memory needed on some rank, "
                         f"{have} available here; use more GPUs or fewer layers")
