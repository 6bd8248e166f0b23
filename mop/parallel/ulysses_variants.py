"""Ulysses for attention with sinks and sliding windows (gpt-oss): the same exchange, its own Function.

`UlyssesAttention.forward(q, k, v, positions, sinks=..., window=...)` comes here. The exchange and
the token slots are Ulysses' (`mop.parallel.ulysses`); per head chunk, the attention of the slot's
queries runs `mop.ops.attention_variants.attention_piece` on every (query range, document) piece:
a window is a mask taken in global token indices, so it composes with the document mask, the
causal mask and the zig-zag token slots, and a piece sees exactly the keys it would see on one
device. The sinks are per query head: each rank uses the slice of its head chunk, and returns
their gradient in those places of a full-size [Hq] tensor (zeros elsewhere); the D ranks of a
group own disjoint heads (the R ranks of one head slot hold partial sums over their queries), so
the SUM reduction FSDP applies to every dense gradient completes it, exactly.

Unlike `UlyssesKernel`, the forward keeps each chunk's attention graph on the ctx (no hand-over
between checkpoint passes): under a checkpointed block these layers recompute their forward in the
recompute pass like any op, and backward uses the original forward's graphs.
"""

from __future__ import annotations

from functools import partial

import torch

from mop.ops.attention_variants import attention_piece


def _identity(t):
    return t


class UlyssesVariantFunction(torch.autograd.Function):
    """out = Ulysses attention with `sinks` [Hq] (or None) and `window`; gradients for q, k, v, sinks."""

    @staticmethod
    def forward(ctx, q_BHND, k_BHND, v_BHND, sinks_H, plan, spans, me: int, group, window: int):
        from mop.parallel.ulysses import gather_heads, scatter_heads, slot_attention

        out_BHND = torch.empty_like(q_BHND)
        graphs = []
        for c in range(len(plan.q_routes)):
            qr, kvr = plan.q_routes[c], plan.kv_routes[c]
            q, k, v = gather_heads([(q_BHND, qr), (k_BHND, kvr), (v_BHND, kvr)], me, group).finish()
            h0, nh = qr.heads[me]
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            sinks = None if sinks_H is None else sinks_H[h0:h0 + nh].detach().requires_grad_()
            # Identity hooks over a checkpoint's: this graph's saved tensors are kept as they are.
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
                piece = partial(attention_piece, sinks_H=sinks, window=window)
                o = slot_attention(*leaves, plan.slot, spans, piece=piece)
            graphs.append((leaves + ([sinks] if sinks is not None else []), o))
            scatter_heads([(o.detach(), qr, out_BHND, False)], me, group).finish()
        ctx.graphs, ctx.plan, ctx.me, ctx.group = graphs, plan, me, group
        ctx.shapes = (k_BHND.shape, k_BHND.dtype, None if sinks_H is None else (sinks_H.shape, sinks_H.dtype))
        return out_BHND

    @staticmethod
    def backward(ctx, dout_BHND):
        from mop.parallel.ulysses import gather_heads, scatter_heads

        plan, me, group = ctx.plan, ctx.me, ctx.group
        kv_shape, kv_dtype, sinks_meta = ctx.shapes
        dout_BHND = dout_BHND.contiguous()
        dq_BHND = torch.empty_like(dout_BHND)
        # K/V gradients sum over token slots and replicated heads: accumulate in fp32.
        dk_BHND = torch.zeros(kv_shape, dtype=torch.float32, device=dout_BHND.device)
        dv_BHND = torch.zeros(kv_shape, dtype=torch.float32, device=dout_BHND.device)
        dsinks_H = None if sinks_meta is None else torch.zeros(sinks_meta[0], dtype=torch.float32, device=dout_BHND.device)
        for c in range(len(plan.q_routes)):
            qr, kvr = plan.q_routes[c], plan.kv_routes[c]
            (do,) = gather_heads([(dout_BHND, qr)], me, group).finish()
            leaves, o = ctx.graphs[c]
            grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
            ctx.graphs[c] = None  # free this chunk's graph now
            if dsinks_H is not None:
                h0, nh = qr.heads[me]
                dsinks_H[h0:h0 + nh] += grads[3].float()
            scatter_heads([(grads[0], qr, dq_BHND, False), (grads[1], kvr, dk_BHND, True),
                           (grads[2], kvr, dv_BHND, True)], me, group).finish()
        dsinks = None if dsinks_H is None else dsinks_H.to(sinks_meta[1])
        return dq_BHND, dk_BHND.to(kv_dtype), dv_BHND.to(kv_dtype), dsinks, None, None, None, None, None
