"""Layout-independent initialisation of (possibly sharded) parameters."""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def init_weights_sharded(model, seed: int, device: torch.device, values=None, buffers=None) -> None:
    """Give every parameter the value it would have on one device.

    That value is `values(fqn)` (e.g. a Hugging Face checkpoint's tensor) when given, else
    `model.full_param_value`, generated from (seed, name) on `device`. One parameter at a time, and
    only this rank's shard is kept: the whole model never exists in one place, and any layout starts
    from the same weights, which is what makes the lossless comparisons possible.
    """
    for fqn, p in model.named_parameters():
        if values is not None:
            full = values(fqn)
            if tuple(full.shape) != tuple(p.shape):
                raise ValueError(f"{fqn}: the checkpoint's tensor has shape {tuple(full.shape)}, the model's "
                                 f"parameter {tuple(p.shape)}; do the model options match the checkpoint?")
            full = full.to(device)
        else:
            full = model.full_param_value(fqn, p.shape, seed, device)
        if isinstance(p, DTensor):
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local.to(p.dtype))
        else:
            p.copy_(full.to(p.dtype))
        del full
    model.reset_buffers()
    if buffers is not None:
        # A checkpoint's stored buffers (DeepSeek-V3's routing correction bias) replace the fresh
        # ones: zeroing it would change which experts the pretrained model routes to.
        for fqn, b in model.named_buffers():
            value = buffers(fqn)
            if value is not None:
                b.copy_(value.to(device=b.device, dtype=b.dtype))
