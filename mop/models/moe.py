"""Mixture-of-Experts layer: router, stacked routed experts (dropless grouped GEMM), shared experts.

Family variants: DeepSeek-V3's sigmoid router with a selection-only correction bias, group-limited
routing and a routed scaling factor; gpt-oss' router and expert biases and its clamped SwiGLU.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from mop.models.activation_policy import checkpoint_phase
from mop.models.config import ModelConfig
from mop.models.layers import FeedForward
from mop.ops.fused import is_fused, kernel
from mop.ops.grouped_mm import grouped_mm


class PendingAux:
    """A router's auxiliary loss whose global statistics are still being summed over the ranks.

    With a reducer that can start a sum without waiting (`start(stats)` -> handle with `wait()`),
    the router launches the all-reduce in its forward and the model forms the loss after its last
    block (`value()`), where the loss is first needed. A synchronous all-reduce per layer stalled
    each block's forward until the slowest rank arrived, behind whatever collectives were queued
    before it (FSDP's prefetched all-gather of the next block); now one wait per forward remains.
    The arithmetic is unchanged, so the loss and gradients keep their bits. Autograd flows through
    `probs_sum_E`, a block output, so a checkpoint's recompute rebuilds it; the recompute itself
    launches nothing (`handle` None: its loss is never formed).
    """

    def __init__(self, router: "Router", probs_sum_E: torch.Tensor, handle):
        self.router, self.probs_sum_E, self.handle = router, probs_sum_E, handle

    def value(self) -> torch.Tensor:
        if self.handle is None:
            raise RuntimeError("PendingAux.value() of a recompute: its statistics were never reduced")
        return self.router.aux_from(self.handle.wait(), self.probs_sum_E)


def resolve_aux(aux) -> torch.Tensor:
    """A block's auxiliary loss as a tensor (`PendingAux` waits for its statistics here)."""
    return aux.value() if isinstance(aux, PendingAux) else aux


class Router(nn.Module):
    """Token-choice top-k router (softmax or sigmoid scores), optional aux loss and selection bias.

    `reduce_stats` sums per-expert statistics over every rank that shares the global batch; it is
    the identity on one device, and `parallelize()` sets it to an all-reduce so the auxiliary loss
    uses global load fractions (lossless: the sum of per-rank aux losses equals the global one).
    When the reducer can start a sum asynchronously (`start`), the forward returns a `PendingAux`
    instead of the loss (see there).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k = cfg.n_experts, cfg.top_k
        self.score_func, self.norm_topk, self.route_scale = cfg.score_func, cfg.norm_topk, cfg.route_scale
        self.aux_loss_coef = cfg.aux_loss_coef
        self.n_groups, self.topk_groups = cfg.n_groups, cfg.topk_groups
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=cfg.moe_bias)
        # Aux-loss-free balancing (DeepSeek-V3): a bias added to the scores for selection only,
        # nudged after each optimizer step towards the mean load. Not a parameter (no gradient).
        self.use_expert_bias = cfg.expert_bias
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts), persistent=True)
        # Tokens per expert of the last forward (overwritten, so recomputation does not double count).
        self.register_buffer("last_tokens_per_expert", torch.zeros(cfg.n_experts), persistent=False)
        self.reduce_stats: Callable[[torch.Tensor], torch.Tensor] | None = None
        # The last forward's reduced statistics, reused by its checkpoint recompute (the backward of
        # the same micro-batch comes before the next forward of this router). Synchronous path only.
        self._reduced_stats: torch.Tensor | None = None

    def forward(self, x_TH: torch.Tensor):
        """Returns (topk_idx [T,k] int64, topk_weight [T,k] in x dtype, aux_loss: a scalar fp32 tensor,
        or a `PendingAux` while its global statistics are in flight)."""
        bias = self.gate.bias.float() if self.gate.bias is not None else None
        logits_TE = F.linear(x_TH.float(), self.gate.weight.float(), bias)
        scores_TE = logits_TE.softmax(-1) if self.score_func == "softmax" else logits_TE.sigmoid()
        select_TE = scores_TE + self.expert_bias if self.use_expert_bias else scores_TE
        if self.n_groups > 1:
            select_TE = self._limit_to_groups(select_TE)
        topk_idx_TK = select_TE.topk(self.top_k, dim=-1).indices
        topk_w_TK = scores_TE.gather(-1, topk_idx_TK)
        if self.norm_topk:
            topk_w_TK = topk_w_TK / (topk_w_TK.sum(-1, keepdim=True) + 1e-20)
        topk_w_TK = topk_w_TK * self.route_scale
        counts_E = expert_counts(topk_idx_TK, self.n_experts).float()
        self.last_tokens_per_expert.copy_(counts_E.detach())
        aux = x_TH.new_zeros((), dtype=torch.float32)
        if self.aux_loss_coef > 0 and self.training:
            # Switch-style: coef * E * sum_e f_e * P_e with global f (detached) and global mean prob P.
            probs_TE = scores_TE if self.score_func == "softmax" else scores_TE / scores_TE.sum(-1, keepdim=True)
            probs_sum_E = probs_TE.sum(0)
            stats = torch.cat([counts_E, counts_E.new_tensor([x_TH.shape[0]])])
            # Not inside torch.compile: an async collective and its handle would break the graph.
            if (self.reduce_stats is not None and hasattr(self.reduce_stats, "start")
                    and not torch.compiler.is_compiling()):
                recompute = checkpoint_phase() == "recompute"
                return (topk_idx_TK, topk_w_TK.to(x_TH.dtype),
                        PendingAux(self, probs_sum_E, None if recompute else self.reduce_stats.start(stats)))
            if self.reduce_stats is not None:
                if checkpoint_phase() == "recompute" and self._reduced_stats is not None:
                    # A checkpointed block's recompute: the statistics this forward all-reduced, not
                    # a second all-reduce (a wait for the slowest rank, per layer). The same bits, so
                    # the recomputed aux graph saves exactly what the original one did.
                    stats = self._reduced_stats
                else:
                    stats = self._reduced_stats = self.reduce_stats(stats)
            aux = self.aux_from(stats, probs_sum_E)
        return topk_idx_TK, topk_w_TK.to(x_TH.dtype), aux

    def aux_from(self, stats: torch.Tensor, probs_sum_E: torch.Tensor) -> torch.Tensor:
        """The auxiliary loss from global statistics [counts_E..., tokens] and this rank's summed
        routing probabilities (the only term with a gradient)."""
        global_counts_E, global_tokens = stats[:-1], stats[-1]
        f_E = global_counts_E / (global_tokens * self.top_k)
        return self.aux_loss_coef * self.n_experts * (f_E * probs_sum_E / global_tokens).sum()

    def _limit_to_groups(self, select_TE: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3): keep the experts of each token's best `topk_groups`
        groups, a group scored by the sum of its two best selection scores; the rest get -inf."""
        T = select_TE.shape[0]
        grouped_TGe = select_TE.view(T, self.n_groups, -1)
        group_score_TG = grouped_TGe.topk(min(2, grouped_TGe.shape[-1]), dim=-1).values.sum(-1)
        best_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, -1)


def expert_activation(gate: torch.Tensor, up: torch.Tensor, swiglu_limit: float = 0.0,
                      alpha: float = 1.702, kernels: str = "eager") -> torch.Tensor:
    """SwiGLU silu(gate) * up, or gpt-oss' clamped form when `swiglu_limit` > 0
    (`mop.ops.fused.swiglu_math`); `kernels`: op by op or one fused kernel."""
    return kernel("swiglu", gate, kernels)(gate, up, swiglu_limit, alpha)


def expert_counts(topk_idx_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Routed slots per expert (int64 [E]). A scatter-add, not `torch.bincount`, which on CUDA reads
    the largest index back to the host: a sync per layer that drains the launch queue."""
    flat = topk_idx_TK.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


class _ExpandToSlots(torch.autograd.Function):
    """Rows of the routed slots in expert order: x_TH[order // K], each token copied K times.

    Backward gathers each token's K slot gradients through the inverse permutation and sums them in
    fp32 in slot order: index_select's own backward is an atomic index_add_ in the input dtype
    (slow in bf16 on CUDA, and its order of additions varies from run to run).
    """

    @staticmethod
    def forward(ctx, x_TH, token_of_slot, inv_order, top_k, kernels="eager"):
        ctx.save_for_backward(inv_order)
        ctx.top_k, ctx.kernels = top_k, kernels
        return x_TH.index_select(0, token_of_slot)

    @staticmethod
    def backward(ctx, g_NH):
        inv_order, = ctx.saved_tensors
        return kernel("gather_sum", g_NH, ctx.kernels)(g_NH, inv_order, ctx.top_k), None, None, None, None


class _CombineSlots(torch.autograd.Function):
    """`combine_slots` in one gather-and-weight pass each way (`mop.ops.fused.combine_math` and its
    gradients), for fused kernels; saves the expert outputs in expert order instead of a permuted copy."""

    @staticmethod
    def forward(ctx, y_NH, inv_order, order, topk_weight_TK, kernels):
        ctx.save_for_backward(y_NH, inv_order, order, topk_weight_TK)
        ctx.kernels = kernels
        return kernel("combine", y_NH, kernels)(y_NH, inv_order, topk_weight_TK)

    @staticmethod
    def backward(ctx, g_TH):
        y_NH, inv_order, order, w_TK = ctx.saved_tensors
        dy_NH, dw_TK = kernel("combine_grads", g_TH, ctx.kernels)(g_TH.contiguous(), y_NH, inv_order, order, w_TK)
        return dy_NH, None, None, dw_TK, None


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        inv, = ctx.saved_tensors
        return g.index_select(0, inv), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """`x.index_select(0, perm)` for a permutation `perm` of the rows, `inv` its inverse.

    The gradient is the inverse gather `g.index_select(0, inv)` instead of index_select's own
    backward, a zero fill plus an atomic index_add_ (slow in bf16 on CUDA).
    """
    return _PermuteRows.apply(x, perm, inv)


def combine_slots(y_NH: torch.Tensor, inv_order: torch.Tensor, order: torch.Tensor,
                  topk_weight_TK: torch.Tensor, kernels: str = "eager") -> torch.Tensor:
    """y_t = sum_k w[t,k] * y[slot (t,k)] from rows in expert order (`order[i]`: the slot of row i,
    `inv_order` its inverse): a permutation back to (t, k) order (its gradient a gather too), the
    product in the rows' dtype, the sum over k in fp32 (no atomics: the same bits every run);
    `kernels`: op by op, or the gather and weighted sum fused each way (`_CombineSlots`)."""
    if is_fused(y_NH, kernels):
        return _CombineSlots.apply(y_NH, inv_order, order, topk_weight_TK, kernels)
    T, K = topk_weight_TK.shape
    y_TKH = permute_rows(y_NH, inv_order, order).view(T, K, y_NH.shape[-1])
    return kernel("weighted_sum", y_TKH, kernels)(y_TKH, topk_weight_TK)


class GroupedExperts(nn.Module):
    """E routed SwiGLU experts stored stacked: w1/w3 [E, H, I], w2 [E, I, H]; dropless grouped GEMM.

    gpt-oss: `bias` adds b1/b3 [E, I] and b2 [E, H]; `swiglu_limit` > 0 clamps (`expert_activation`).
    """

    elementwise_kernels = "eager"  # SwiGLU and the weighted sum op by op or fused (mop.ops.fused)

    def __init__(self, n_experts: int, dim: int, hidden: int, bias: bool = False, swiglu_limit: float = 0.0,
                 swiglu_alpha: float = 1.702):
        super().__init__()
        self.n_experts = n_experts
        self.swiglu_limit, self.swiglu_alpha = swiglu_limit, swiglu_alpha
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        if bias:
            self.b1 = nn.Parameter(torch.empty(n_experts, hidden))
            self.b3 = nn.Parameter(torch.empty(n_experts, hidden))
            self.b2 = nn.Parameter(torch.empty(n_experts, dim))

    def forward(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        """No host sync: counts, offsets and permutations stay on the device."""
        K = topk_idx_TK.shape[1]
        flat_expert = topk_idx_TK.flatten()
        order = torch.argsort(flat_expert, stable=True)  # routed slots sorted by expert
        inv_order = torch.empty_like(order)
        inv_order[order] = torch.arange(order.numel(), device=order.device)
        tokens_per_expert_E = expert_counts(topk_idx_TK, self.n_experts)
        x_routed = _ExpandToSlots.apply(x_TH, order // K, inv_order, K, self.elementwise_kernels)
        gate = grouped_mm(x_routed, self.w1, tokens_per_expert_E)
        up = grouped_mm(x_routed, self.w3, tokens_per_expert_E)
        biased = "b1" in self._parameters
        if biased:  # row i of the sorted slots belongs to expert flat_expert[order[i]]
            expert_of_slot = flat_expert[order]
            gate, up = gate + self.b1[expert_of_slot], up + self.b3[expert_of_slot]
        h = expert_activation(gate, up, self.swiglu_limit, self.swiglu_alpha, self.elementwise_kernels)
        out = grouped_mm(h, self.w2, tokens_per_expert_E)
        if biased:
            out = out + self.b2[expert_of_slot]
        return combine_slots(out, inv_order, order, topk_weight_TK, self.elementwise_kernels)


class MoE(nn.Module):
    """Router + routed experts + optional shared experts (computed on every token)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.n_experts, cfg.dim, cfg.expert_dim, bias=cfg.moe_bias,
                                      swiglu_limit=cfg.swiglu_limit, swiglu_alpha=cfg.swiglu_alpha)
        self.shared_experts = FeedForward(cfg.dim, cfg.shared_dim) if cfg.shared_dim else None

    def forward(self, x_BSH: torch.Tensor):
        """Returns (y [B,S,H], aux_loss)."""
        B, S, H = x_BSH.shape
        x_TH = x_BSH.reshape(B * S, H)
        topk_idx_TK, topk_w_TK, aux = self.router(x_TH)
        # Shared experts are queued before the routed ones: an expert-parallel dispatcher waits on the
        # host for its split sizes, and the GPU works through the shared FFN meanwhile.
        shared_TH = self.shared_experts(x_TH) if self.shared_experts is not None else None
        y_TH = self.experts(x_TH, topk_idx_TK, topk_w_TK)
        if shared_TH is not None:
            y_TH = y_TH + shared_TH
        return y_TH.view(B, S, H), aux
