"""The attention core as one autograd Function that never runs attention more often than it must.

Why: at 64K tokens and beyond attention is most of a step's FLOPs. Plain autograd under per-block
activation checkpointing runs the attention kernel forward twice (forward, then the block's
recompute pass); a hand-written backward that recomputes (as Ulysses' used to) adds a third.
`AttentionFunction` runs it forward once per backward it needs, whatever the block's policy:

| block policy (mop.models.activation_policy) | forward pass              | recompute pass                  | backward            |
|------------------------------------------|---------------------------|---------------------------------|---------------------|
| none (no checkpoint)                     | kernel, state kept        | -                               | from the kept state |
| selective (checkpoint, keep attention)   | kernel, state kept        | returns the forward's output    | from the kept state |
| full / offload (checkpoint)              | kernel without state      | kernel, state handed to backward| from that state     |

"State" is what the kernel's backward needs (q, k, v, output, log-sum-exp: the saved tensors of
the fused SDPA op, built as a small autograd graph on detached inputs). It is held on the autograd
ctx or in a per-module slot, outside the checkpoint's saved-tensor hooks (identity hooks are pushed
on top of them while it is built), so a checkpoint neither discards nor recomputes it.

How this threads through non-reentrant checkpointing: backward always runs through the ORIGINAL
forward's nodes; the recompute pass only refills the tensors those nodes saved, in order. This
Function saves nothing through `save_for_backward`, so in every pass the saved-tensor order of the
block is unchanged. In the recompute pass it still has to return the right values, because the
output projection saves its input: a selective block returns the output its forward stashed, a
full block recomputes it (and hands the state it built to the original node's backward through
the module's slot).

A kernel (`LocalAttentionKernel` here; Ulysses in mop.parallel.ulysses) provides three methods:
`forward(q, k, v, positions) -> out` (no state), `forward_with_state(...) -> (out, state)` and
`backward(state, dout) -> (dq, dk, dv)`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mop.models.activation_policy import checkpoint_keeps_attention, checkpoint_phase
from mop.ops.attention import causal_attention


class _ExpandedKV:
    """Saved-tensor hooks that keep GQA-expanded K/V as their sources and expand again when used.

    The fused CUDA kernels take K/V with as many heads as Q, so they are expanded (a cheap copy);
    the SDPA node would then keep the expanded copies, Hq/Hkv times the K/V memory, until backward.
    A saved tensor is recognised as (a view of) an expansion by its storage: no device work, no sync.
    """

    def __init__(self):
        self.expansions: list[tuple[torch.Tensor, torch.Tensor, int]] = []  # (expanded, source, repeats)

    def expand(self, t: torch.Tensor, n_heads: int) -> torch.Tensor:
        if t.shape[1] == n_heads:
            return t
        rep = n_heads // t.shape[1]
        out = t.repeat_interleave(rep, dim=1)
        self.expansions.append((out, t, rep))
        return out

    def pack(self, t: torch.Tensor):
        if not self.expansions:
            return t
        try:
            ptr = t.untyped_storage().data_ptr()
        except RuntimeError:  # a tensor without real storage (e.g. inside a tensor-subclass kernel)
            return t
        for out, src, rep in self.expansions:
            if ptr == out.untyped_storage().data_ptr():
                return (src, rep, t.size(), t.stride(), t.storage_offset())
        return t

    @staticmethod
    def unpack(packed):
        if isinstance(packed, tuple):
            src, rep, size, stride, offset = packed
            return src.repeat_interleave(rep, dim=1).as_strided(size, stride, offset)
        return packed


def attention_graph(run, q, k, v, *args):
    """Run `run(q', k', v', *args)` on detached leaves with grad, its saved tensors outside any checkpoint.

    On CUDA, GQA K/V are expanded to the query heads first (what the fused kernels need) and the
    expansion is kept as its source (`_ExpandedKV`). Returns (out, state), state = (q', k', v', out
    with its graph); `state_backward` consumes it.
    """
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    hooks = _ExpandedKV()
    # Identity hooks on top of a checkpoint's hooks: the kernel's saved tensors stay as they are.
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        qq, kk, vv = leaves
        if q.is_cuda:
            kk, vv = hooks.expand(kk, q.shape[1]), hooks.expand(vv, q.shape[1])
        out = run(qq, kk, vv, *args)
    return out.detach(), (*leaves, out)


def state_backward(state, dout):
    """(dq, dk, dv) from a state of `attention_graph`."""
    q, k, v, out = state
    return torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))


class LocalAttentionKernel:
    """Causal, document-masked attention of local tensors (`mop.ops.attention.causal_attention`)."""

    def forward(self, q, k, v, positions):
        return causal_attention(q, k, v, positions)

    def forward_with_state(self, q, k, v, positions):
        return attention_graph(causal_attention, q, k, v, positions)

    def backward(self, state, dout):
        return state_backward(state, dout)


class AttentionSlots:
    """Per-core hand-over between passes: the forward's output (selective) and the recompute's state (full)."""

    def __init__(self):
        self.output = None
        self.state = None


class AttentionFunction(torch.autograd.Function):
    """out = kernel(q, k, v, positions); see the module docstring for what each pass runs."""

    @staticmethod
    def forward(ctx, q, k, v, positions, kernel, slots: AttentionSlots):
        phase, keep = checkpoint_phase(), checkpoint_keeps_attention()
        ctx.kernel, ctx.slots, ctx.state = kernel, slots, None
        if phase == "forward" and not keep:  # full checkpoint: recomputed before backward
            return kernel.forward(q, k, v, positions)
        if phase == "recompute" and keep:  # selective: the forward's output, no kernel, no communication
            if slots.output is None:
                raise RuntimeError("selective checkpoint: the attention output of this block's forward is missing "
                                   "(a forward without backward in between?)")
            out, slots.output = slots.output, None
            return out
        out, state = kernel.forward_with_state(q, k, v, positions)
        if phase == "recompute":  # full checkpoint: the original node's backward takes this state
            slots.state = state
        else:
            ctx.state = state
            if phase == "forward":  # selective: the recompute pass returns this instead of recomputing
                slots.output = out.detach()
        return out

    @staticmethod
    def backward(ctx, dout):
        state = ctx.state
        if state is None:
            state, ctx.slots.state = ctx.slots.state, None
        ctx.state = None
        if state is None:
            raise RuntimeError("attention backward: no saved state (the checkpoint's recompute pass did not run "
                               "this core)")
        dq, dk, dv = ctx.kernel.backward(state, dout)
        return dq, dk, dv, None, None, None


class AttentionCore(nn.Module):
    """Causal, document-masked attention of local tensors; `parallelize()` swaps in Ulysses."""

    def __init__(self):
        super().__init__()
        self.kernel = LocalAttentionKernel()
        self._slots = AttentionSlots()

    def forward(self, q_BHSD, k_BHSD, v_BHSD, positions_BS):
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q_BHSD, k_BHSD, v_BHSD))):
            return self.kernel.forward(q_BHSD, k_BHSD, v_BHSD, positions_BS)
        return AttentionFunction.apply(q_BHSD, k_BHSD, v_BHSD, positions_BS, self.kernel, self._slots)
