"""The expert layer as one autograd Function: gather -> move weights -> per chunk dispatch/GEMMs/combine.

Why one Function: every collective of the layer (shard all-gather, weight point-to-point, the
per-chunk all-to-alls, their backward counterparts, the gradient reduce-scatter) is issued here in
a fixed order, identical on every rank whatever its token counts. Left to the autograd engine, a
rank whose part of the graph is empty (say, an owner that only sends weights) would skip a
backward collective and hang its peers.

Two memory regimes, chosen by the caller's `recompute` flag:
* keep (alltoall, llep without activation checkpointing): the expert GEMM graph of each chunk is
  kept from forward to backward, like plain autograd (gathered weights included).
* recompute (llep_pipelined always; every dispatcher inside a checkpointed block): forward runs
  under no_grad and keeps only the layer inputs and the weight shards; backward re-gathers the
  weights and, chunk by chunk, redoes the dispatch and the GEMMs under enable_grad, so about one
  chunk of routed inputs, dispatch buffers and expert intermediates is live at a time.
Inside a checkpointed block the layer is thus its own checkpoint, and the block's recompute pass
skips it (`plan=None`): the experts' forward runs twice per step (forward, backward), as with plain
per-block checkpointing, instead of three times.
Overlap: the next chunk's dispatch all-to-all is issued asynchronously before the current chunk's
GEMMs, and a chunk's return all-to-all is finished only after the next chunk's GEMMs were issued.
On CUDA/NCCL an async collective runs on NCCL's own stream and `work.wait()` only makes the compute
stream wait for it (buffers stay reserved by NCCL's record_stream), so that is comm/compute overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mop.ops.fused import kernel
from mop.parallel.experts.comm import all_to_all, gather_shards, reduce_scatter_shards, return_expert_grads, \
    send_expert_weights
from mop.parallel.experts.dispatch import ExpertActivation, LayerPlan, TokenDispatcher


@dataclass(frozen=True)
class ShardSpec:
    """How this rank's expert weights are sharded over the expert-shard group (dim and full size per weight)."""

    group: object
    dims: tuple[int, ...]    # sharded dim of w1, w3, w2 (then b1, b3, b2 when the experts have biases)
    sizes: tuple[int, ...]   # full size of that dim


def _gather_all(shards, spec: ShardSpec, dtype: torch.dtype | None) -> list[torch.Tensor]:
    # Mixed precision: cast before the gather, as FSDP does, so the all-gather and the GEMMs run in
    # the compute dtype. The cast is done here, not by the caller, so autograd records no cast of
    # the grads and a checkpoint's recompute pass has no cast to redo.
    if dtype is not None:
        shards = [w.to(dtype) for w in shards]
    return [gather_shards(w, d, n, spec.group) for w, d, n in zip(shards, spec.dims, spec.sizes)]


def _move_weights(home, dispatcher: TokenDispatcher, plan: LayerPlan) -> list[torch.Tensor]:
    return send_expert_weights(home, plan.transfers, plan.foreign, dispatcher.me, dispatcher.experts_per_rank,
                               dispatcher.group)


def _leaves(ws):
    return [w.detach().requires_grad_() for w in ws]


class MoELayerFunction(torch.autograd.Function):
    """y_TH = experts(x_TH, routing) for the whole expert group; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TH, topk_weight_TK, dispatcher: TokenDispatcher, plan: LayerPlan | None, spec: ShardSpec,
                recompute: bool, dtype: torch.dtype | None, act: ExpertActivation, *shards):
        """`shards`: this rank's w1, w3, w2 (and b1, b3, b2 with biases), as `spec` describes."""
        if plan is None:
            # Activation-checkpoint recomputation of the enclosing block: backward runs through the
            # original forward's ctx, which kept everything it needs. Save the same tensors, in the
            # same order, so the checkpoint can match them (the raw shards: the cast is done inside);
            # the output is never read (the block only adds it to the residual stream, and additions
            # save nothing).
            ctx.save_for_backward(x_TH, topk_weight_TK, *shards)
            return x_TH.new_empty(x_TH.shape)
        home = _gather_all(shards, spec, dtype)
        foreign = _move_weights(home, dispatcher, plan)
        if not recompute:
            home, foreign = _leaves(home), _leaves(foreign)
            ctx.weights, ctx.chunks = (home, foreign), []
        out_TH = x_TH.new_empty(x_TH.shape)
        n_chunks = len(plan.routes)

        def start_dispatch(c):
            t0, t1 = plan.bounds[c]
            return dispatcher.dispatch(x_TH[t0:t1], plan.routes[c], async_op=True)

        def finish_combine(c, y_send, work):
            if work is not None:
                work.wait()
            t0, t1 = plan.bounds[c]
            out_TH[t0:t1] = dispatcher.combine(y_send, plan.routes[c], topk_weight_TK[t0:t1], act.kernels)

        pending, returning = start_dispatch(0), None
        for c in range(n_chunks):
            recv, work = pending
            if work is not None:
                work.wait()
            if c + 1 < n_chunks:
                pending = start_dispatch(c + 1)
            if recompute:
                y_recv = dispatcher.compute(recv, plan.routes[c], home, foreign, act)
            else:
                recv.requires_grad_()
                with torch.enable_grad():
                    y_recv = dispatcher.compute(recv, plan.routes[c], home, foreign, act)
            y_send, back_work = dispatcher.send_back(y_recv.detach(), plan.routes[c], async_op=True)
            if returning is not None:
                finish_combine(*returning)
            returning = (c, y_send, back_work)
            if not recompute:
                ctx.chunks.append((recv, y_recv, y_send))
        finish_combine(*returning)

        ctx.dispatcher, ctx.plan, ctx.spec, ctx.recompute, ctx.dtype = dispatcher, plan, spec, recompute, dtype
        ctx.act = act
        ctx.save_for_backward(x_TH, topk_weight_TK, *shards)
        return out_TH

    @staticmethod
    def backward(ctx, g_TH):
        x_TH, topk_weight_TK, *shards = ctx.saved_tensors
        dispatcher, plan, spec, act = ctx.dispatcher, ctx.plan, ctx.spec, ctx.act
        recompute, group = ctx.recompute, dispatcher.group
        if recompute:
            home = _gather_all(shards, spec, ctx.dtype)
            home, foreign = _leaves(home), _leaves(_move_weights(home, dispatcher, plan))
        else:
            home, foreign = ctx.weights
        dx_TH = torch.empty_like(x_TH)  # the chunks cover [0, T): every row is written below
        dw_TK = torch.empty_like(topk_weight_TK)
        n_chunks = len(plan.routes)

        def start_dispatch(c):
            t0, t1 = plan.bounds[c]
            return dispatcher.dispatch(x_TH[t0:t1], plan.routes[c], async_op=True)

        pending = start_dispatch(0) if recompute else None
        for c in range(n_chunks):
            route, (t0, t1) = plan.routes[c], plan.bounds[c]
            if recompute:
                recv, work = pending
                if work is not None:
                    work.wait()
                if c + 1 < n_chunks:
                    pending = start_dispatch(c + 1)
                recv.requires_grad_()
                with torch.enable_grad():
                    y_recv = dispatcher.compute(recv, route, home, foreign, act)
                y_send, _ = dispatcher.send_back(y_recv.detach(), route)
            else:
                recv, y_recv, y_send = ctx.chunks[c]
            # Combine backward (y = sum_k w * y_k, product in the input dtype): both gradients are
            # gathers (mop.ops.fused.combine_grads_math; one pass each with fused kernels).
            K = topk_weight_TK.shape[1]
            g_chunk = g_TH[t0:t1].to(y_send.dtype).contiguous()
            dy_send, dw_TK[t0:t1] = kernel("combine_grads", y_send, act.kernels)(
                g_chunk, y_send, route.send_inv, route.send_copy_idx, topk_weight_TK[t0:t1])
            dy_recv, _ = all_to_all(dy_send, route.recv_splits, route.send_splits, group)
            torch.autograd.backward(y_recv, dy_recv)
            d_recv = recv.grad if recv.grad is not None else torch.zeros_like(recv)
            d_send, _ = all_to_all(d_recv, route.send_splits, route.recv_splits, group)
            # Dispatch backward: each token has exactly K copies; gather them in (t, k) order and sum
            # in fp32 (no atomic index_add_ in the input dtype; deterministic).
            dx_TH[t0:t1] = kernel("gather_sum", d_send, act.kernels)(d_send, route.send_inv, K).to(dx_TH.dtype)
            if not recompute:
                ctx.chunks[c] = None  # free this chunk's graph now

        home_g = [w.grad if w.grad is not None else torch.zeros_like(w) for w in home]
        foreign_g = [w.grad if w.grad is not None else torch.zeros_like(w) for w in foreign]
        return_expert_grads(home_g, foreign_g, plan.transfers, plan.foreign, dispatcher.me,
                            dispatcher.experts_per_rank, group)
        shard_g = [reduce_scatter_shards(gw, d, spec.group).to(w.dtype) for gw, d, w in zip(home_g, spec.dims, shards)]
        ctx.weights = ctx.chunks = None
        return dx_TH, dw_TK, None, None, None, None, None, None, *shard_g
