"""`parallelize()`: the one place where the MoP layout is applied to a model.

Steps, in this fixed order (each a small `apply_*` function; later steps see earlier results):

1. `apply_sequence_parallel`  attention cores -> Ulysses over the D-group (D > 1)
2. `apply_expert_parallel`    routed experts -> Ep x (W/Ep) sharded, token dispatch (alltoall/LLEP);
                              at Ep = 1 left to step 6 (sharded like dense weights, no dispatch)
3. `apply_vocab_parallel`     embedding and output head -> vocabulary blocks over the P-group (P > 1)
4. `apply_router_stats`       routers' load statistics summed over all W ranks (global aux loss)
5. `apply_activation_policy`     per-block checkpointing policy (none / selective / full / offload)
6. `apply_fsdp`               every remaining (dense) parameter sharded over all W with FSDP2

Steps 2 and 3 turn their parameters into DTensors on their own meshes; step 6 shards everything
that is still a plain tensor, so each parameter is sharded exactly once. The model must still be on
the meta device; materialise with `to_empty()` and `mop.parallel.weight_init.init_weights_sharded` after.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mop.parallel.config import ParallelConfig
from mop.parallel.experts.config import ExpertParallelConfig
from mop.parallel.layout import Layout
from mop.parallel.ulysses_config import SeqParallelConfig
from mop.parallel.vocab_config import VocabParallelConfig


class AllReduceSum:
    """A picklable callable that sums a small statistics tensor over a process group."""

    def __init__(self, group):
        self.group = group

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        # Differentiability is not needed: routers reduce detached counts only.
        out = stats.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    def start(self, stats: torch.Tensor) -> "_PendingSum":
        """Launch the sum and return at once; `wait()` on the result gives it (a router's aux loss
        waits after the model's last block: mop.models.moe.PendingAux)."""
        out = stats.detach().clone()
        return _PendingSum(out, dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group, async_op=True))


class _PendingSum:
    def __init__(self, out: torch.Tensor, work):
        self.out, self.work = out, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()  # on CUDA: the current stream waits for the collective, the host does not
            self.work = None
        return self.out


def apply_sequence_parallel(model, layout: Layout, cfg: SeqParallelConfig) -> None:
    """Swap each attention core for Ulysses attention over the sequence group.

    The cores share one document-spans memo: every layer sees the same positions tensor of a
    micro-batch, whose spans then cost one host sync per micro-batch, not one per layer.
    """
    if layout.spec.seq == 1:
        return
    from mop.ops.attention import SpansMemo
    from mop.parallel.ulysses import UlyssesAttention

    heads, kv_heads = model.cfg.n_heads, model.cfg.n_kv_heads
    spans_memo = SpansMemo()
    for block in model.layers.values():
        block.attention.core = UlyssesAttention(layout.seq_group, heads, kv_heads, head_chunks=cfg.head_chunks,
                                                spans_memo=spans_memo)


def experts_sharded_as_dense(layout: Layout, cfg: ExpertParallelConfig) -> bool:
    """Ep = 1: the routed experts stay the model's own module and FSDP shards them over W like any
    dense weight (step 6).

    Why: with one rank per expert group there are no tokens to move, so a dispatcher only adds its
    per-layer host sync, and the expert weights are then best all-gathered the way FSDP2 gathers a
    block, one block ahead on its own stream, overlapped with the previous block's compute. (Measured
    on 2 x H200, 24 layers of qwen3-30b-a3b: the baseline with its experts gathered this way ran
    27% faster at 8K and 25% at 32K than with EP2; bench/results/2026-11-30-session5-2xh200/.) A
    chunked dispatcher (`bounds_memory`, llep_pipelined) is still applied at Ep = 1: its chunks bound
    the routed activations of long sequences.
    """
    from mop.parallel.experts.registry import dispatcher_class

    return layout.spec.expert == 1 and not dispatcher_class(cfg.dispatcher).bounds_memory


def apply_expert_parallel(model, layout: Layout, cfg: ExpertParallelConfig, param_dtype: torch.dtype | None) -> None:
    """Replace routed experts by the hybrid EP x (W/Ep) sharding module with the configured dispatcher
    (nothing at Ep = 1 without a chunked dispatcher: `experts_sharded_as_dense`)."""
    from mop.parallel.experts import ExpertParallelExperts

    if experts_sharded_as_dense(layout, cfg):
        return

    for block in model.layers.values():
        if block.is_moe:
            block.moe.experts = ExpertParallelExperts.from_module(block.moe.experts, layout, cfg)
            block.moe.experts.param_dtype = param_dtype


def apply_vocab_parallel(model, layout: Layout, cfg: VocabParallelConfig, param_dtype: torch.dtype | None) -> None:
    """Embedding and output head as vocabulary blocks over the P-group (sharded over W at rest)."""
    if layout.spec.vocab == 1:
        return  # one block: FSDP over W is the same data movement
    from mop.parallel.vocab import VocabParallelEmbedding, VocabParallelOutputHead

    model.tok_embeddings = VocabParallelEmbedding.from_module(model.tok_embeddings, layout)
    tied = model.tok_embeddings.weight if model.cfg.tie_embeddings else None
    model.output = VocabParallelOutputHead.from_module(model.output, layout, schedule=cfg.schedule, weight=tied)
    model.tok_embeddings.param_dtype = model.output.param_dtype = param_dtype


def apply_router_stats(model, layout: Layout) -> None:
    """Routers see global load fractions: their statistics are summed over all W ranks."""
    reducer = AllReduceSum(layout.world_group)
    for router in model.routers():
        router.reduce_stats = reducer


def apply_activation_policy(model, spec: str) -> None:
    """Per-block activation policies from `training.activation_checkpoint` (mop.models.activation_policy).

    "auto" starts as "full" everywhere; the trainer replaces it before step 1 by a measured choice
    (mop.memory_budget).
    """
    from mop.models.activation_policy import parse_policies

    model.block_policies = parse_policies("full" if spec == "auto" else spec, len(model.layers))


def apply_fsdp(model, layout: Layout, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None,
               reshard_after_forward: bool = True) -> None:
    """FSDP2 over all W ranks for every parameter not already sharded by an earlier step.

    One FSDP unit per block (all-gathered just before use, freed after, grads reduce-scattered),
    plus the root (embedding, final norm, output head). Gradients are SUMMED over ranks: each rank's
    loss is already divided by the global token count.
    """
    mesh = layout.world_mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def ignored(module):
        return {p for p in module.parameters() if isinstance(p, DTensor)}

    units = []
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored(block))
        units.append(block)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward,
                ignored_params=ignored(model))
    units.append(model)
    configure_fsdp_units(units, list(model.layers.values()))


def configure_fsdp_units(units, blocks) -> None:
    """SUM-reduced gradients and explicit all-gather prefetch for a model's FSDP2 units.

    Each rank's loss is already divided by the global token count, so gradients are summed, never
    averaged. Plain SUM collectives (gloo has no PREMUL_SUM; with a factor of 1 nothing needs
    scaling). Each block prefetches the next block's all-gather in forward and the previous one's in
    backward, beyond FSDP2's implicit one-ahead.
    """
    for unit in units:
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


def set_accumulation_phase(model, mode: str, last: bool, reshard_after_forward: bool = True) -> None:
    """Before each micro-batch of a step: what the model's FSDP2 units keep (`parallel.fsdp.accumulation`).

    Every micro-batch but the last keeps its gathered weights after backward ("keep_gathered",
    "keep_all"), so the next one's forward finds them gathered and FSDP skips its all-gathers; the
    last reshards after backward, so the optimizer updates the shards and the next step gathers the
    updated weights. Forward never reshards in these modes (backward would gather again). "keep_all"
    also skips the reduce-scatter of all but the last micro-batch: the gradients accumulate unsharded
    and are reduced once. "reshard" restores FSDP's behaviour as configured (`reshard_after_forward`).
    Parameters sharded by other steps (experts at Ep > 1, vocabulary blocks) are not FSDP's and are
    unaffected.
    """
    from torch.distributed.fsdp import FSDPModule

    keep = mode != "reshard"
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            unit.set_reshard_after_forward(reshard_after_forward and not keep, recurse=False)
            unit.set_reshard_after_backward(last or not keep, recurse=False)
            unit.set_requires_gradient_sync(last or mode != "keep_all", recurse=False)


def reset_accumulation(model) -> None:
    """Reshard every FSDP2 unit and forget the gradients FSDP holds unsharded between micro-batches
    (`accumulation="keep_all"`): after measuring micro-batches that were not followed by a synced
    backward (the start-up probe, an OOM caught there), so that none of it reaches step 1's update.
    FSDP2 has no public call for the second part: its per-parameter state is read through
    `_get_fsdp_state()` (tests/test_fsdp_accumulation.py::test_reset_accumulation_forgets_a_measuring_micro_batch
    fails if these names move)."""
    from torch.distributed.fsdp import FSDPModule

    for unit in model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        unit.reshard()
        group = unit._get_fsdp_state()._fsdp_param_group
        for fp in (group.fsdp_params if group is not None else ()):
            fp.unsharded_accumulated_grad = None
            if hasattr(fp, "_unsharded_param"):
                fp._unsharded_param.grad = None


def parallelize(model, layout: Layout, parallel: ParallelConfig, activation_checkpoint: str = "none",
                param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None) -> None:
    """Apply the MoP layout to a meta-device `Transformer` in place (see the module docstring).

    `parallel` is the job's `[parallel]` section (each step reads its component's part);
    `activation_checkpoint` the per-block policy (`training.activation_checkpoint`); the dtypes are
    FSDP2's mixed-precision policy. The sequence length was checked against D with the layout.
    """
    cfg = model.cfg
    layout.spec.validate_model(n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, n_experts=cfg.n_experts)
    apply_sequence_parallel(model, layout, parallel.seq)
    apply_expert_parallel(model, layout, parallel.experts, param_dtype)
    apply_vocab_parallel(model, layout, parallel.vocab, param_dtype)
    apply_router_stats(model, layout)
    apply_activation_policy(model, activation_checkpoint)
    apply_fsdp(model, layout, param_dtype, reduce_dtype, parallel.fsdp.reshard_after_forward)
