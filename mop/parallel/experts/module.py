"""`ExpertParallelExperts`: the experts module for hybrid expert parallelism x sharding.

Weights `w1` [E, H, I], `w3` [E, H, I], `w2` [E, I, H] are DTensors of the full shapes on
`layout.expert_mesh` [W/Ep, Ep] ("expert_shard", "expert"): Shard(0) over "expert" (expert-group
position p owns experts [p*E/Ep, (p+1)*E/Ep)) and the I dim sharded over "expert_shard", so each
rank persistently holds Θ_exp / W. Every Ep-group (row of the mesh) logically holds all experts:
the shards are all-gathered over "expert_shard" before the GEMMs and the gradients reduce-scattered
with SUM back into the shards, which sums the contributions of all Ep-groups' tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function
from torch.distributed.tensor import Shard, distribute_tensor

from mop.models.activation_policy import checkpoint_phase
from mop.parallel.experts.config import ExpertParallelConfig
from mop.parallel.experts.dispatch import ExpertActivation, TokenDispatcher
from mop.parallel.experts.pipeline import MoELayerFunction, ShardSpec
from mop.parallel.experts.registry import dispatcher_class


def make_dispatcher(cfg: ExpertParallelConfig, n_experts: int, group) -> TokenDispatcher:
    """The dispatcher registered as `cfg.dispatcher`, built from `cfg`, for the expert group `group`."""
    return dispatcher_class(cfg.dispatcher).from_config(cfg, n_experts, group)


class ExpertParallelExperts(nn.Module):
    """Drop-in experts module: `forward(x_TH, topk_idx_TK, topk_weight_TK) -> y_TH`, dropless SwiGLU.

    Build with `from_module(orig, layout, cfg)` from the (meta-device) single-device module; the
    parameters are then meta DTensors to be materialised with `to_empty()` and initialised.
    """

    # Sharded dim of w1 [E, H, I], w3 [E, H, I], w2 [E, I, H] (the expert width I) and of the optional
    # biases b1 [E, I], b3 [E, I] (I) and b2 [E, H] (H: any dim shards the same way; gathered alike).
    SHARD_DIMS = (2, 2, 1)
    BIAS_SHARD_DIMS = (1, 1, 1)

    def __init__(self, n_experts: int, dim: int, hidden: int, layout, cfg: ExpertParallelConfig,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "meta", bias: bool = False,
                 act: ExpertActivation | None = None):
        super().__init__()
        ep = layout.spec.expert
        if n_experts % ep:
            raise ValueError(f"parallel.experts.degree (Ep)={ep} must divide the number of experts {n_experts}")
        self.n_experts, self.dim, self.hidden, self.cfg = n_experts, dim, hidden, cfg
        self.act = act or ExpertActivation()
        self.mesh = layout.expert_mesh
        shapes = {"w1": (n_experts, dim, hidden), "w3": (n_experts, dim, hidden), "w2": (n_experts, hidden, dim)}
        dims, sizes = list(self.SHARD_DIMS), [hidden, hidden, hidden]
        if bias:  # gpt-oss
            shapes.update({"b1": (n_experts, hidden), "b3": (n_experts, hidden), "b2": (n_experts, dim)})
            dims += self.BIAS_SHARD_DIMS
            sizes += [hidden, hidden, dim]
        for (name, shape), sdim in zip(shapes.items(), dims):
            full = torch.empty(shape, dtype=dtype, device=device)
            # src_data_rank=None: no communication, each rank just keeps its own chunk.
            dt = distribute_tensor(full, self.mesh, (Shard(sdim), Shard(0)), src_data_rank=None)
            self.register_parameter(name, nn.Parameter(dt))
        self.weight_names = tuple(shapes)
        self.dispatcher = make_dispatcher(cfg, n_experts, layout.expert_group)
        self.shard_spec = ShardSpec(layout.expert_shard_group, tuple(dims), tuple(sizes))

    @classmethod
    def from_module(cls, orig: nn.Module, layout, cfg=None) -> "ExpertParallelExperts":
        """Parallel twin of `orig` (params w1 [E,H,I], w3 [E,H,I], w2 [E,I,H]; shapes only are read)."""
        E, H, I = orig.w1.shape
        if tuple(orig.w3.shape) != (E, H, I) or tuple(orig.w2.shape) != (E, I, H):
            raise ValueError(f"experts weights must be w1/w3 [E,H,I] and w2 [E,I,H]; got w1 {tuple(orig.w1.shape)}, "
                             f"w3 {tuple(orig.w3.shape)}, w2 {tuple(orig.w2.shape)}")
        act = ExpertActivation(getattr(orig, "swiglu_limit", 0.0), getattr(orig, "swiglu_alpha", 1.702),
                               getattr(orig, "elementwise_kernels", "eager"))
        return cls(E, H, I, layout, ExpertParallelConfig.from_any(cfg), dtype=orig.w1.dtype, device="meta",
                   bias=getattr(orig, "b1", None) is not None, act=act)

    def forward(self, x_TH: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor) -> torch.Tensor:
        if x_TH.shape[-1] != self.dim:
            raise ValueError(f"experts input has width {x_TH.shape[-1]}, expected {self.dim}")
        phase = checkpoint_phase()
        # Recompute pass of a checkpointed block: no plan, no work (see MoELayerFunction.forward).
        if phase == "recompute":
            plan = None
        else:
            with record_function("mop.experts.plan"):  # a profiler label: the layer's one host sync
                plan = self.dispatcher.plan(topk_idx_TK)
        recompute = self.dispatcher.recompute or phase is not None
        # Mixed precision (set by parallelize): the Function casts the shards to param_dtype before
        # the gather and returns grads in the shards' dtype (no autograd cast, none in a recompute).
        shards = [getattr(self, name).to_local() for name in self.weight_names]
        return MoELayerFunction.apply(x_TH, topk_weight_TK, self.dispatcher, plan, self.shard_spec, recompute,
                                      self.param_dtype, self.act, *shards)

    param_dtype: torch.dtype | None = None  # compute dtype of the gathered weights (None: storage dtype)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, dispatcher={self.cfg.dispatcher}, "
                f"bias={'b1' in self.weight_names}, swiglu_limit={self.act.swiglu_limit}")
