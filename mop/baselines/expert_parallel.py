"""Plain all-to-all expert parallelism with grouped GEMM (torchtitan-style), for the baseline.

Experts are stored as DTensors `Shard(0)` over the EP mesh dim (each rank keeps E/ep whole experts);
FSDP2 further shards those local experts over the remaining data-parallel ranks. Every rank routes
its own tokens, sends each routed slot to the rank that owns the expert (`all_to_all_single`),
runs its local experts with one grouped GEMM per projection, and sends the results back. No
capacity factor, no dropping: the math is the single-device `GroupedExperts`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from mop.distributed import local_shard
from mop.parallel.experts.dispatch import ExpertActivation, expert_mlp


def _all_to_all_rows(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable variable-size all-to-all of rows; backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all_rows(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _all_to_all_rows(grad, in_splits, out_splits, ctx.group), None, None, None


class AllToAllExperts(nn.Module):
    """E routed SwiGLU experts split over an EP group; same signature and FQNs as `GroupedExperts`.

    forward(x_TH, topk_idx_TK, topk_weight_TK) -> y_TH. Host syncs: one `.tolist()` of the
    per-rank split sizes per call (all-to-all split sizes must be Python ints).
    """

    def __init__(self, n_experts: int, dim: int, hidden: int, ep_mesh, bias: bool = False,
                 act: ExpertActivation | None = None):
        super().__init__()
        self.act = act or ExpertActivation()
        self.n_experts, self.ep_mesh = n_experts, ep_mesh
        self.ep_size = ep_mesh.size()
        if n_experts % self.ep_size:
            raise ValueError(f"baseline.ep={self.ep_size} must divide model.n_experts={n_experts}")
        local = n_experts // self.ep_size

        def param(*shape):
            # Built on the meta device (model construction); materialised by to_empty().
            t = torch.empty(local, *shape, device="meta")
            return nn.Parameter(DTensor.from_local(t, ep_mesh, [Shard(0)], run_check=False))

        self.w1, self.w3, self.w2 = param(dim, hidden), param(dim, hidden), param(hidden, dim)
        if bias:  # gpt-oss
            self.b1, self.b3, self.b2 = param(hidden), param(hidden), param(dim)

    @classmethod
    def from_module(cls, orig: nn.Module, ep_mesh) -> "AllToAllExperts":
        """Replace a (meta-device) `GroupedExperts`."""
        E, H, I = orig.w1.shape
        act = ExpertActivation(getattr(orig, "swiglu_limit", 0.0), getattr(orig, "swiglu_alpha", 1.702),
                               getattr(orig, "elementwise_kernels", "eager"))
        return cls(E, H, I, ep_mesh, bias=getattr(orig, "b1", None) is not None, act=act)

    def forward(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        T, K = topk_idx_TK.shape
        ep, group = self.ep_size, self.ep_mesh.get_group()
        E_local = self.n_experts // ep
        flat_expert = topk_idx_TK.flatten()
        order = torch.argsort(flat_expert, stable=True)  # slots sorted by expert = by owning rank
        token_of_slot = order // K
        send_counts_E = torch.bincount(flat_expert, minlength=self.n_experts)
        # recv_counts_SE[s, e]: slots source rank s sends to my local expert e.
        recv_counts = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts, send_counts_E, group=group)
        counts = torch.stack([send_counts_E, recv_counts]).cpu()  # host sync: split sizes
        send_splits = counts[0].view(ep, E_local).sum(1).tolist()
        recv_counts_SE = counts[1].view(ep, E_local)
        recv_splits = recv_counts_SE.sum(1).tolist()

        x_recv = _AllToAll.apply(x_TH[token_of_slot], recv_splits, send_splits, group)
        # Received rows are grouped (source, expert); the grouped GEMM wants them grouped by expert.
        expert_of_row = torch.repeat_interleave(torch.arange(E_local).repeat(ep), recv_counts_SE.flatten())
        by_expert = torch.argsort(expert_of_row, stable=True).to(x_TH.device)
        tokens_per_expert_E = recv_counts_SE.sum(0).to(x_TH.device)
        x_e = x_recv[by_expert]
        names = ("w1", "w3", "w2", "b1", "b3", "b2") if "b1" in self._parameters else ("w1", "w3", "w2")
        y_e = expert_mlp(x_e, tokens_per_expert_E, *(local_shard(getattr(self, n)) for n in names), act=self.act)
        y_recv = y_e[torch.argsort(by_expert)]  # back to (source, expert) order
        y_slots = _AllToAll.apply(y_recv, send_splits, recv_splits, group)
        y_slots = y_slots * topk_weight_TK.flatten()[order, None]
        y = torch.zeros(T, x_TH.shape[1], dtype=torch.float32, device=x_TH.device)
        y.index_add_(0, token_of_slot, y_slots.float())
        return y.to(x_TH.dtype)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, ep={self.ep_size}"
