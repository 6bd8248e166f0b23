"""The FSDP-best baseline: the same model trained the way a careful user of stock PyTorch would.

`baseline_trainer(job, baseline_cfg, proc)` is mop's `Trainer` with the `FSDPBestStrategy`
(mop.strategies): data placement, loss normaliser, gradient norm and micro-batch context are the
baseline's, and its model is sharded by `parallelize_baseline`, in this order on the meta device:

1. `apply_loss_head`   output projection + loss as one (compiled) `cross_entropy(hidden @ W.T)`, or
                        with `chunked_loss` the model's own strip-wise loss (no N x V logits)
2. `apply_tp`          `parallelize_module`: attention's head projections colwise (GQA wq/wk/wv; MLA
                        the up-projections wq_b or wq, wkv_b), wo rowwise; dense FFN and shared
                        experts w1/w3 colwise, w2 rowwise (the model infers local head counts)
3. `apply_ep`          routed experts -> `AllToAllExperts` (DTensor Shard(0) over the EP dim)
4. router statistics summed over the ranks that hold distinct tokens (global aux loss)
5. activation checkpointing, optional `torch.compile` of each block
6. `apply_fsdp`        FSDP2 `fully_shard` per block (+ experts on their own mesh) and the root, over
                        dp_shard x cp (HSDP with dp_replicate), optional `CPUOffloadPolicy`

With `optimizer_offload` the strategy builds `HostOffloadAdamW` instead of the device AdamW
(mop.baselines.optimizer_offload: fp32 master shards and moments on the host, torch AdamW on the CPU).

Context parallelism wraps each micro-batch in `context_parallel` (PyTorch's ring attention over
SDPA), which shards tokens / positions / labels along the sequence in place (head-tail load balanced).

Exactness: the Trainer divides each rank's summed loss by the global target count, and FSDP sums
(never averages) gradients. tp x cp ranks share a sequence, so the target count is divided by that
replication; GQA's q/k-norm weights see only the local heads under TP, so their gradients are summed
over the TP group (MLA's replicated RoPE key has its activation gradient summed instead, see
`SharedRopeKeyParallel`); the gradient norm counts each replicated shard once.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from mop.baselines.config import BaselineConfig
from mop.baselines.expert_parallel import AllToAllExperts
from mop.baselines.optimizer_offload import HostOffloadAdamW, check_host_memory
from mop.config import JobConfig
from mop.distributed import ProcessInfo
from mop.models.layers import Attention
from mop.models.mla import MultiHeadLatentAttention
from mop.parallel.layout import LayoutSpec
from mop.parallel.parallelize import configure_fsdp_units
from mop.distributed import local_shard
from mop.strategies import MoPStrategy, build_loader, mixed_precision_dtypes
from mop.trainer import Trainer


# -- meshes -------------------------------------------------------------------------------------------
class BaselineMeshes:
    """Every DeviceMesh of one baseline config, built once from the world (rank = row-major index).

    world = dp_replicate x dp_shard x cp x tp (tp innermost). Meshes that feed FSDP2 and a DTensor
    param (TP, EP) come from the same root so FSDP can compose them into 2-D/3-D placements.
    """

    def __init__(self, cfg: BaselineConfig, device: torch.device):
        from torch.distributed.device_mesh import DeviceMesh

        dr, ds, cp, tp, ep = cfg.dp_replicate, cfg.dp_shard, cfg.cp, cfg.tp, cfg.ep
        world = dr * ds * cp * tp
        ranks = torch.arange(world)
        dev = device.type
        self.cfg = cfg
        # Dense path: FSDP over dp_shard x cp, TP innermost.
        self.dense = DeviceMesh(dev, ranks.view(dr, ds * cp, tp), mesh_dim_names=("dp_replicate", "dp_shard_cp", "tp"))
        self.fsdp = self.dense["dp_replicate", "dp_shard_cp"] if dr > 1 else self.dense["dp_shard_cp"]
        self.tp = self.dense["tp"] if tp > 1 else None
        self.cp = None
        if cp > 1:
            self.cp = DeviceMesh(dev, ranks.view(dr, ds, cp, tp), mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))["cp"]
        self.ep = self.expert_fsdp = None
        if ep > 1:
            experts = DeviceMesh(dev, ranks.view(dr, ds * cp // ep, ep, tp),
                                 mesh_dim_names=("dp_replicate", "dp_mod_ep", "ep", "tp"))
            self.ep = experts["ep"]
            self.expert_fsdp = experts["dp_replicate", "dp_mod_ep"] if dr > 1 else experts["dp_mod_ep"]
        # Ranks with distinct tokens (everything but TP): router statistics are summed over them.
        self.batch_group = None
        if tp > 1:
            self.batch_group = DeviceMesh(dev, ranks.view(world // tp, tp), mesh_dim_names=("batch", "tp")).get_group("batch")
        else:
            self.batch_group = dist.group.WORLD


# -- model transformations (meta device) ----------------------------------------------------------
def linear_cross_entropy_sum(hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Sum over target tokens of CE(hidden @ W.T) with fp32 log-softmax (labels -100 ignored)."""
    logits_NV = hidden_NH @ weight_VH.t()
    return F.cross_entropy(logits_NV.float(), labels_N, ignore_index=-100, reduction="sum")


class LinearCrossEntropyHead(nn.Module):
    """The plain output head: materialises N x V logits (what stock PyTorch does).

    With `compile=True` the fp32 upcast and log-softmax are fused by inductor, so only the bf16
    logits (and their gradient) are live. Same parameter name (`weight`) as `OutputHead`.
    """

    def __init__(self, weight: nn.Parameter, compile: bool):
        super().__init__()
        self.weight = weight
        self.compiled = compile
        self._loss = torch.compile(linear_cross_entropy_sum) if compile else linear_cross_entropy_sum

    def forward(self, hidden_NH: torch.Tensor, labels_N: torch.Tensor, normalizer) -> torch.Tensor:
        return self._loss(hidden_NH, self.weight, labels_N) / normalizer

    def extra_repr(self) -> str:
        return f"vocab_size={self.weight.shape[0]}, dim={self.weight.shape[1]}, compiled={self.compiled}"


def apply_loss_head(model, compile: bool) -> None:
    model.output = LinearCrossEntropyHead(model.output.weight, compile)


def sum_grad_over(x: torch.Tensor, mesh) -> torch.Tensor:
    """Identity forward; backward sums the gradient over `mesh` (Megatron's "copy to the TP region").

    For a replicated activation that feeds rank-local computations outside a DTensor-aware layer:
    each rank's gradient is a partial sum. Stock DTensor says so: a Replicate tensor whose local
    gradient is Partial is all-reduced on the way back.
    """
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


class SharedRopeKeyParallel(ParallelStyle):
    """MLA's `wkv_a` under TP: weights replicated; the decoupled RoPE key (its last `rope_dim` output
    columns, one per token, shared by every head) gets its gradient summed over the TP group.

    The latent columns need nothing: they feed `wkv_b`, whose ColwiseParallel input already sums their
    gradient. The RoPE key instead is broadcast to this rank's heads only, so without the sum its
    gradient, `wkv_a`'s and the residual stream's would miss the other ranks' heads.
    """

    def __init__(self, rope_dim: int):
        self.rope_dim = rope_dim

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        module.register_forward_hook(functools.partial(self._sum_rope_key_grad, self.rope_dim, device_mesh))
        return module

    @staticmethod
    def _sum_rope_key_grad(rope_dim, mesh, module, inputs, out):
        latent, k_rope = out.split([out.shape[-1] - rope_dim, rope_dim], dim=-1)
        return torch.cat([latent, sum_grad_over(k_rope, mesh)], dim=-1)


class HeadSinksParallel(ParallelStyle):
    """gpt-oss' per-head sink logits under TP: the parameter sharded by heads like wq's output, and
    handed to the attention core as this rank's heads (the core sees local tensors only)."""

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        sinks = distribute_tensor(module.sinks.data, device_mesh, [Shard(0)])
        module.register_parameter("sinks", nn.Parameter(sinks, requires_grad=module.sinks.requires_grad))
        module.core.register_forward_pre_hook(self._local_sinks, with_kwargs=True)
        return module

    @staticmethod
    def _local_sinks(core, args, kwargs):
        return args, {**kwargs, "sinks": kwargs["sinks"].to_local()}


def attention_tp_plan(attention: nn.Module) -> dict:
    """Megatron-style TP plan of one attention module (names relative to the block); heads are split.

    GQA: wq/wk/wv colwise, wo rowwise, gpt-oss' sinks split by heads. MLA (as torchtitan's
    deepseek_v3 and Megatron's MLA): the down-projections wq_a / wkv_a and their norms q_norm /
    kv_norm stay replicated (every head needs the whole latent); the up-projections wq_b (or wq when
    q_lora_rank = 0) and wkv_b colwise (whole heads: their output columns are laid out head by
    head); wo rowwise; `SharedRopeKeyParallel` sums the gradient of the replicated RoPE key. The
    model infers local head counts from the widths.
    """
    if not isinstance(attention, MultiHeadLatentAttention):
        plan = {f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")}
        if attention.sinks is not None:
            plan["attention"] = HeadSinksParallel()
    else:
        q_up = "wq_b" if "wq_b" in attention._modules else "wq"
        plan = {f"attention.{q_up}": ColwiseParallel(), "attention.wkv_b": ColwiseParallel(),
                "attention.wkv_a": SharedRopeKeyParallel(attention.rope_dim)}
    plan["attention.wo"] = RowwiseParallel()
    return plan


def apply_tp(model, tp_mesh) -> list[nn.Module]:
    """Megatron-style TP of attention and dense FFNs; returns the modules whose grads are TP-partial.

    (Modules, not parameters: FSDP later replaces each parameter object by its sharded DTensor.)
    Every replicated parameter before a colwise layer gets its whole gradient (the colwise input sums
    it), except GQA's q/k norms, which act on this rank's heads only. MLA has none partial: its norms
    act on the latents, and `SharedRopeKeyParallel` sums the one per-head broadcast (the RoPE key).
    """
    partial = []
    for block in model.layers.values():
        plan = attention_tp_plan(block.attention)
        ffn = "feed_forward" if not block.is_moe else ("moe.shared_experts" if block.moe.shared_experts else None)
        if ffn:
            plan.update({f"{ffn}.w1": ColwiseParallel(), f"{ffn}.w3": ColwiseParallel(), f"{ffn}.w2": RowwiseParallel()})
        parallelize_module(block, tp_mesh, plan)
        # GQA's q/k norms are replicated but only see this rank's heads: their gradients are partial sums.
        if isinstance(block.attention, Attention):
            partial += [norm for norm in (block.attention.q_norm, block.attention.k_norm) if norm is not None]
    return partial


def apply_ep(model, ep_mesh) -> None:
    for block in model.layers.values():
        if block.is_moe:
            block.moe.experts = AllToAllExperts.from_module(block.moe.experts, ep_mesh)


def apply_fsdp(model, meshes: BaselineMeshes, param_dtype, reduce_dtype, reshard_after_forward: bool,
               cpu_offload: bool) -> None:
    """FSDP2 units: each block (and, under EP, its experts on the expert mesh), then the root.

    Gradients are summed (divide factor 1, plain SUM collectives): each rank's loss is already
    divided by the global target count.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    common = dict(mp_policy=mp, reshard_after_forward=reshard_after_forward,
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    units = []
    for block in model.layers.values():
        if block.is_moe and meshes.ep is not None:
            experts = block.moe.experts
            n_fsdp = meshes.expert_fsdp.size()
            # Few local experts for many shards: shard each expert's H dim instead (like torchtitan).
            dim = 1 if experts.w1.to_local().shape[0] < n_fsdp else 0
            fully_shard(experts, mesh=meshes.expert_fsdp, shard_placement_fn=lambda p, d=dim: Shard(d), **common)
            units.append(experts)
        fully_shard(block, mesh=meshes.fsdp, **common)
        units.append(block)
    fully_shard(model, mesh=meshes.fsdp, **common)
    units.append(model)
    configure_fsdp_units(units, list(model.layers.values()))


def parallelize_baseline(model, meshes: BaselineMeshes, cfg: BaselineConfig, job: JobConfig, param_dtype,
                         reduce_dtype) -> list[nn.Module]:
    """Apply the baseline to a meta-device `Transformer` in place; returns modules with TP-partial grads."""
    from mop.parallel.parallelize import AllReduceSum

    cfg.validate_model(model.cfg, job.training.seq_len)
    if not cfg.chunked_loss:
        apply_loss_head(model, cfg.compile_loss)
    partial = apply_tp(model, meshes.tp) if meshes.tp is not None else []
    if meshes.ep is not None:
        apply_ep(model, meshes.ep)
    reducer = AllReduceSum(meshes.batch_group)
    for router in model.routers():
        router.reduce_stats = reducer
    model.block_policies = [cfg.block_policy] * len(model.layers)
    if cfg.compile_blocks:
        for block in model.layers.values():
            block.compile()  # in place: parameter names unchanged
    apply_fsdp(model, meshes, param_dtype, reduce_dtype, job.parallel.fsdp.reshard_after_forward, cfg.cpu_offload)
    return partial


# -- the strategy ---------------------------------------------------------------------------------
class FSDPBestStrategy(MoPStrategy):
    """How the FSDP-best baseline `baseline` lays out and reduces the model (mop.strategies); the
    trainer's loop, optimizer, checkpoints and metrics are mop's own.

    The MoP strategy's memory check, bf16 weights and start-up planning do not apply: the baseline
    sweeps its configs and records an out-of-memory point instead.
    """

    name = "fsdp-best"

    def __init__(self, baseline: BaselineConfig):
        self.config = baseline
        self.meshes = None
        self.tp_partial: list[nn.Module] = []

    def validate(self, job: JobConfig, proc: ProcessInfo) -> None:
        self.config = b = self.config.resolved(proc.world)
        b.validate_model(job.model, job.training.seq_len)
        if b.cp > 1:
            if proc.device.type != "cuda":
                raise ValueError("baseline.cp > 1 needs CUDA: PyTorch's context_parallel ring attention only "
                                 "handles the CUDA SDPA kernels (flash / efficient / cuDNN); use cp=1 on CPU")
            if job.data.dataset != "synthetic" or job.data.synthetic_doc_len:
                raise ValueError("baseline.cp > 1 needs one document per sequence (ring attention is plain causal): "
                                 "set --data.dataset=synthetic --data.synthetic_doc_len=0")
        p = job.parallel
        if p.seq.degree != 1 or p.experts.degree != 1 or p.vocab.degree != 1:
            raise ValueError("the baseline takes its degrees from BaselineConfig; leave parallel.seq.degree, "
                             "parallel.experts.degree and parallel.vocab.degree at 1")
        if job.optimizer.engine is not None:
            raise ValueError("the baseline offloads with FSDP2's CPUOffloadPolicy (baseline.cpu_offload) or its own "
                             "host AdamW (baseline.optimizer_offload); set optimizer.offload=none")
        if b.optimizer_offload and (job.checkpoint.enabled or job.checkpoint.resume):
            raise ValueError("baseline.optimizer_offload does not checkpoint its host optimizer state (mop bench never "
                             "checkpoints the baseline): set checkpoint.enabled=false and checkpoint.resume=false")
        if job.training.param_dtype != "fp32":
            raise ValueError("the baseline keeps fp32 weights (its optimizer is torch AdamW): leave "
                             "training.param_dtype=fp32")

    def check_memory(self, trainer) -> None:
        """None for the device: with CPUOffloadPolicy or optimizer_offload the state lives on the host,
        and HSDP replicas hold more than 1/W of it; the sweep records an OOM instead. The host memory
        of optimizer_offload is checked when that optimizer is built (`build_optimizer`)."""

    def build_loader(self, trainer):
        """The tp x cp ranks of a replica group read the same (whole) sequences; CP shards them later."""
        r = self.config.replicas
        return build_loader(trainer.job, LayoutSpec(trainer.proc.world // r), trainer.proc.rank // r,
                            trainer.job.model.vocab_size)

    def parallelize(self, trainer, model) -> None:
        trainer.layout = None
        self.meshes = BaselineMeshes(self.config, trainer.device)
        param_dtype, reduce_dtype = mixed_precision_dtypes(trainer)
        self.tp_partial = parallelize_baseline(model, self.meshes, self.config, trainer.job, param_dtype, reduce_dtype)

    def build_model(self, trainer):
        """The CPU-offloaded model (CPUOffloadPolicy: sharded parameters on the host, buffers on the
        device), or None for the trainer's own build (then the baseline's checkpointing and loss head
        on one CPU process, which skips `parallelize`)."""
        if not (trainer.sharded and self.config.cpu_offload):
            if not trainer.sharded:
                model = trainer._build_model()
                model.block_policies = [self.config.block_policy] * len(model.layers)
                if not self.config.chunked_loss:
                    apply_loss_head(model, self.config.compile_loss)
                return model
            return None
        from mop.models.transformer import Transformer
        from mop.parallel.weight_init import init_weights_sharded

        with torch.device("meta"):
            model = Transformer(trainer.job.model)
        model.set_elementwise_kernels(trainer.job.training.elementwise_kernels)
        self.parallelize(trainer, model)
        model.to_empty(device="cpu")
        # Each full value is generated on the accelerator and only this rank's shard is copied to the
        # host: the same values as every on-device layout, and minutes faster than CPU generation.
        init_weights_sharded(model, trainer.job.training.seed, trainer.device)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(trainer.device)
        model.train()
        return model

    def build_optimizer(self, trainer, groups: list[dict]):
        """With `optimizer_offload`, `HostOffloadAdamW` over the trainer's parameter groups (host memory
        checked on every rank first); otherwise the trainer's device AdamW."""
        if not self.config.optimizer_offload:
            return None
        o = trainer.job.optimizer
        local_numel = sum(local_shard(p).numel() for g in groups for p in g["params"] if p.requires_grad)
        check_host_memory(local_numel, trainer.proc.local_world, trainer.device, trainer._all_reduce)
        return HostOffloadAdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)

    def tokens_per_device_per_step(self, trainer) -> int:
        t = trainer.job.training
        return t.batch_size * t.seq_len * t.grad_accum // self.config.replicas

    def normalizer(self, trainer, n_targets_local: torch.Tensor) -> torch.Tensor:
        # Every rank of a tp x cp replica group counted the same whole sequences.
        return (trainer._all_reduce(n_targets_local) / self.config.replicas).clamp(min=1.0)

    def micro_batch_context(self, trainer, tensors: list[torch.Tensor]):
        if self.config.cp == 1 or not trainer.sharded:
            return contextlib.nullcontext()
        from torch.distributed.tensor.experimental import context_parallel

        return context_parallel(self.meshes.cp, buffers=tensors, buffer_seq_dims=[1] * len(tensors),
                                no_restore_buffers=set(tensors))

    def after_backward(self, trainer) -> None:
        """Sum the gradients that tensor parallelism left partial (replicated norms, biases)."""
        if not self.tp_partial:
            return
        group = self.meshes.tp.get_group()
        for module in self.tp_partial:
            p = module.weight
            if p.grad is None:
                continue
            local = local_shard(p.grad)
            buf = local.to(trainer.device)  # CPU-offloaded grads: reduce on the device (NCCL)
            dist.all_reduce(buf, group=group)
            local.copy_(buf)

    def grad_norm_and_clip(self, trainer) -> torch.Tensor:
        """Global L2 norm: each local shard weighted by 1/(number of ranks holding the same shard); the
        gradients are clipped in place, so a host optimizer copies the clipped ones."""
        world = trainer.proc.world
        sq = torch.zeros((), device=trainer.device, dtype=torch.float32)
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for p in trainer.model.parameters():
            if p.grad is None:
                continue
            g = p.grad
            shards = 1
            if isinstance(g, DTensor):
                # Shard and _StridedShard (FSDP over TP on one dim) both split; only Replicate copies.
                shards = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements)
                                   if not pl.is_replicate())
                g = g.to_local()
            by_device.setdefault(g.device, []).append(g)
            sq = sq + (torch.linalg.vector_norm(g.float()) ** 2).to(trainer.device) / (world // shards)
        norm = trainer._all_reduce(sq).sqrt()
        trainer.clip_coef = None
        max_norm = trainer.job.training.max_grad_norm
        if max_norm > 0:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # stays on device: no host sync
            for dev, grads in by_device.items():
                torch._foreach_mul_(grads, coef.to(dev))
        return norm

    def loss_report_scale(self, trainer) -> float:
        # TP ranks computed the same loss: report 1/tp each so the trainer's world sum is the loss.
        return 1.0 / self.config.tp


def baseline_trainer(job: JobConfig, baseline: BaselineConfig, proc: ProcessInfo | None = None) -> Trainer:
    """A `Trainer` running the FSDP-best baseline config `baseline` (see the module docstring)."""
    return Trainer(job, proc, strategy=FSDPBestStrategy(baseline))
