"""Selective checkpoint offload (MOP.md §3.6): a checkpointed block's input lives in host memory.

With per-block activation checkpointing each block keeps one long-lived tensor, its input (N x H
per rank; 1 GiB per block at 256K tokens and H = 2048). For the blocks chosen, that tensor is
copied to pinned host memory during forward and brought back during backward, one block ahead
of its recomputation, so at most two such inputs are on the device at once.

How it threads through autograd (two small Functions around `checkpoint_block`):
* `_Stash(h)` starts the device-to-host copy and returns an empty *token* in place of `h`; the
  checkpoint keeps only the token, so nothing holds `h` on the device after the forward.
* Inside the checkpointed function `_Unstash(token)` gives the block its input: in forward the
  device tensor itself (no copy), in the recompute pass the host copy brought back to the device.
* Backward: `_Unstash` passes the input's gradient to `_Stash` through the shared stash, since an
  empty token cannot carry an N x H gradient.
"""

from __future__ import annotations

import torch

from mop.models.activation_policy import checkpoint_block, checkpoint_phase


class HostStash:
    """One block input: a reusable pinned host buffer, its copy events, and the next one to prefetch."""

    def __init__(self):
        self.host: torch.Tensor | None = None
        self.device_ref: torch.Tensor | None = None  # the input itself, during its block's forward only
        self.saved = None  # CUDA event: the device-to-host copy is done
        self.fetched: torch.Tensor | None = None  # prefetched device copy, waiting for its block
        self.fetched_event = None
        self.grad: torch.Tensor | None = None
        self.prefetch_next: HostStash | None = None  # the block recomputed after this one

    def save(self, h: torch.Tensor) -> None:
        if self.host is None or self.host.shape != h.shape or self.host.dtype != h.dtype:
            self.host = torch.empty(h.shape, dtype=h.dtype, pin_memory=h.is_cuda)
        if not h.is_cuda:
            self.host.copy_(h)
            return
        stream = _side_stream(h.device, "d2h")
        stream.wait_stream(torch.cuda.current_stream(h.device))
        with torch.cuda.stream(stream):
            self.host.copy_(h, non_blocking=True)
            h.record_stream(stream)  # the allocator must not reuse h before the copy has read it
            self.saved = stream.record_event()

    def prefetch(self, device: torch.device) -> None:
        """Start bringing the input back (on CUDA, on a side stream); `load` then only waits."""
        if self.fetched is not None or self.host is None:
            return
        if device.type != "cuda":
            self.fetched = self.host.to(device)
            return
        stream = _side_stream(device, "h2d")
        with torch.cuda.stream(stream):
            if self.saved is not None:
                stream.wait_event(self.saved)
            self.fetched = self.host.to(device, non_blocking=True)
            self.fetched_event = stream.record_event()

    def load(self, device: torch.device) -> torch.Tensor:
        self.prefetch(device)
        x, self.fetched = self.fetched, None
        if self.fetched_event is not None:
            torch.cuda.current_stream(device).wait_event(self.fetched_event)
            x.record_stream(torch.cuda.current_stream(device))
            self.fetched_event = None
        if self.prefetch_next is not None:
            self.prefetch_next.prefetch(device)  # one block ahead: overlaps this block's recomputation
        return x


_STREAMS: dict[tuple, torch.cuda.Stream] = {}


def _side_stream(device: torch.device, name: str):
    key = (device.index, name)
    if key not in _STREAMS:
        _STREAMS[key] = torch.cuda.Stream(device)
    return _STREAMS[key]


class _Stash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, stash: HostStash):
        stash.save(h)
        stash.device_ref = h
        ctx.stash = stash
        return h.new_empty(0)

    @staticmethod
    def backward(ctx, _grad_token):
        grad, ctx.stash.grad = ctx.stash.grad, None
        return grad, None


class _Unstash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, stash: HostStash):
        ctx.stash = stash
        if checkpoint_phase() == "recompute" or stash.device_ref is None:
            return stash.load(token.device)
        return stash.device_ref.detach()  # forward: the input itself (an alias, no copy)

    @staticmethod
    def backward(ctx, grad_x):
        ctx.stash.grad = grad_x
        return grad_x.new_empty(0), None


def checkpoint_block_offloaded(block, h, positions, stash: HostStash):
    """`checkpoint_block(block, h, positions)` with the block's input kept in host memory until backward."""
    token = _Stash.apply(h, stash)

    def run(token_, positions_):
        return block(_Unstash.apply(token_, stash), positions_)

    try:
        return checkpoint_block(run, token, positions)
    finally:
        stash.device_ref = None  # from here on only the host copy holds the input
