"""Overlap the host optimizer's update with the next step's forward (the MoP paper, §3.5).

`HostAdamW.step_async()` starts the update bucket by bucket in forward order and returns. The next
forward then waits, module by module, only for the parameters it is about to use:

* the root (embedding, final norm, and the output head when it is an FSDP parameter): all-gathered
  by FSDP's root pre-forward, so they are waited for before it;
* block i: FSDP all-gathers block i and prefetches block i+1 in block i's pre-forward, so block i's
  hook waits for both blocks' parameters (the block's expert shards included);
* an output head that declares `late_parameters()` (the vocabulary-parallel one): used last,
  waited for last.

On CUDA a wait is an event wait of the compute stream (no host sync). FSDP2 issues forward
all-gathers from its own copy-in stream, which it orders after the compute stream only once, at
the root's pre-forward; each hook therefore also orders FSDP's all-gather streams after the compute
stream, or a block's all-gather could read its shard before the update wrote it.
"""

from __future__ import annotations

import torch
from torch import nn


def forward_groups(model: nn.Module) -> tuple[list, list[list], list]:
    """(root parameters, each block's parameters, late parameters), in the order the forward uses them.

    Late parameters are those the output head declares with `late_parameters()` (e.g. a
    vocabulary-parallel head, not an FSDP parameter: gathered where it is used, last), less a
    weight tied to the embedding, which the forward needs first.
    """
    late = []
    late_parameters = getattr(getattr(model, "output", None), "late_parameters", None)
    if late_parameters is not None:
        emb = getattr(getattr(model, "tok_embeddings", None), "weight", None)
        late = [p for p in late_parameters() if p is not emb]
    blocks = [list(b.parameters()) for b in model.layers.values()]
    taken = {id(p) for ps in blocks for p in ps} | {id(p) for p in late}
    first = [p for p in model.parameters() if id(p) not in taken]
    return first, blocks, late


def forward_order(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters in the order the forward needs them (see the module docstring)."""
    first, blocks, late = forward_groups(model)
    return first + [p for ps in blocks for p in ps] + late


def _fsdp_all_gather_streams(module: nn.Module) -> list:
    """FSDP2's forward all-gather streams (private API; [] where FSDP or its lazy init is absent)."""
    get_state = getattr(module, "_get_fsdp_state", None)
    if get_state is None or not torch.cuda.is_available():
        return []
    ctx = getattr(get_state(), "_comm_ctx", None)
    return [s for s in (getattr(ctx, "all_gather_copy_in_stream", None), getattr(ctx, "all_gather_stream", None))
            if s is not None]


class UpdateOverlap:
    """Installs the forward pre-hooks that wait for an in-flight `step_async()`; `remove()` undoes them."""

    def __init__(self, model: nn.Module, optimizer):
        self.optimizer = optimizer
        self.handles = []
        first, blocks, late = forward_groups(model)
        self._hook(model, first, model)
        for i, (block, params) in enumerate(zip(model.layers.values(), blocks)):
            self._hook(block, params + (blocks[i + 1] if i + 1 < len(blocks) else []), model)
        if late:
            self._hook(model.output, late, model)

    def _hook(self, module: nn.Module, params: list, root: nn.Module) -> None:
        params = [p for p in params if p.requires_grad]

        def pre_forward(_module, _args):
            self.optimizer.wait_params(params)
            if torch.cuda.is_available() and params and params[0].device.type == "cuda":
                current = torch.cuda.current_stream()
                for stream in _fsdp_all_gather_streams(root):
                    stream.wait_stream(current)

        # prepend: run before FSDP's own pre-forward hook, which issues the all-gathers.
        self.handles.append(module.register_forward_pre_hook(pre_forward, prepend=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
