"""How a `Trainer` lays its model out and reduces it: one strategy object per way of training.

The loop, the optimizer, checkpoints and metrics stay in `mop.trainer.Trainer`. Everything that
depends on where the data and the parameters live is asked of its strategy:

| method | what it decides |
|---|---|
| `validate(job, proc)` | refuse, before anything is built, what this way of training cannot run |
| `check_memory(trainer)` | refuse, before allocating, a state / step that cannot fit |
| `build_loader(trainer)` | which sequences (and which chunk of each) this rank reads |
| `build_model(trainer)` | a model built another way (None: the trainer's meta -> parallelize -> init) |
| `parallelize(trainer, model)` | shard the meta-device model (meshes, process groups) |
| `tokens_per_device_per_step(trainer)` | the throughput's numerator |
| `normalizer(trainer, n_targets_local)` | the loss denominator: target tokens of the global batch |
| `micro_batch_context(trainer, tensors)` | around one micro-batch (e.g. context parallelism) |
| `after_backward(trainer)` | once per step after the last backward (e.g. TP-partial gradient sums) |
| `grad_norm_and_clip(trainer)` | global gradient norm and clipping |
| `loss_report_scale(trainer)` | makes the sum over ranks of the reported local losses the global loss |

`MoPStrategy` is the MoP layout (the default); the FSDP-best baseline is
`mop.baselines.fsdp_best.FSDPBestStrategy`. Process groups are created by `Layout` (MoP) or the
baseline's meshes, never by the trainer.
"""

from __future__ import annotations

import contextlib
import os

import torch

from mop.distributed import local_shard
from mop.parallel.fsdp_config import resolve_reduce_dtype
from mop.parallel.layout import Layout, LayoutSpec


def build_loader(job, spec: LayoutSpec, rank: int, vocab_size: int):
    """This rank's loader: its sequence group's sequences, its chunk of each (see mop.data.loader)."""
    from mop.data import PackedLoader, SyntheticLoader, TokenDataset, ensure_default_dataset

    t = job.training
    common = dict(seq_len=t.seq_len, batch_size=t.batch_size, dp_rank=spec.dp_rank(rank), dp_size=spec.data_parallel,
                  seq_rank=spec.seq_rank(rank), seq_size=spec.seq, seed=t.seed)
    if job.data.dataset == "synthetic":
        return SyntheticLoader(vocab_size, doc_len=job.data.synthetic_doc_len or None, **common)
    if job.data.dataset == "default":
        path = ensure_default_dataset(os.path.expanduser(job.data.cache_dir))
    else:
        path = job.data.dataset
    dataset = TokenDataset(path)
    if dataset.vocab_size > vocab_size:
        raise ValueError(f"data.dataset {path} has vocabulary {dataset.vocab_size} > model.vocab_size={vocab_size}; "
                         f"set --model.vocab_size={dataset.vocab_size} or use a matching tokenizer")
    return PackedLoader(dataset, **common)


def mixed_precision_dtypes(trainer) -> tuple[torch.dtype | None, torch.dtype]:
    """FSDP2's (param_dtype, reduce_dtype): bf16 compute casts the gathered weights (None: no cast);
    gradients reduce in `parallel.fsdp.reduce_dtype` ("auto": bf16 where they are stored in bf16)."""
    param = trainer.compute_dtype if trainer.compute_dtype != torch.float32 else None
    choice = resolve_reduce_dtype(trainer.job.parallel.fsdp.reduce_dtype, trainer.job.training.param_dtype)
    reduce = torch.float32 if choice == "fp32" else torch.bfloat16
    return param, reduce


class MoPStrategy:
    """The MoP layout: D / Ep / P groups over the same W ranks, every rank its own tokens, every
    parameter sharded exactly once (`mop.parallel.parallelize`)."""

    name = "mop"

    def validate(self, job, proc) -> None:
        """Nothing beyond the layout's own checks (made by the trainer's `LayoutSpec`)."""

    def check_memory(self, trainer) -> None:
        """Refuse, before allocating, a layout whose weights, gradients and optimizer state alone
        cannot fit (exact), or whose whole step cannot (the planner's model, for a fixed policy)."""
        if trainer.device.type != "cuda":
            return
        from mop.plan import check_state_fits

        job, o = trainer.job, trainer.job.optimizer
        total = torch.cuda.get_device_properties(trainer.device).total_memory
        check_state_fits(job.model, trainer.proc.world, total, o.offload, max(o.device_fraction, 0.0))
        if job.training.activation_checkpoint != "auto":
            # A fixed activation policy cannot adapt: refuse a step the planner's memory model says
            # cannot fit (beyond its measured error). "auto" adapts down to offloading every block's
            # input, so it is not refused here.
            from mop.plan import check_step_fits

            check_step_fits(job, trainer.proc.world, total)

    def build_loader(self, trainer):
        return build_loader(trainer.job, trainer.spec, trainer.proc.rank, trainer.job.model.vocab_size)

    def build_model(self, trainer):
        return None

    def build_optimizer(self, trainer, groups: list[dict]):
        """The optimizer over `groups` (params + weight_decay), or None for the trainer's own (device
        AdamW, or mop's host optimizer with `optimizer.offload`)."""
        return None

    def parallelize(self, trainer, model) -> None:
        from mop.parallel.parallelize import parallelize

        trainer.layout = Layout.build(trainer.spec, trainer.device)
        param_dtype, reduce_dtype = mixed_precision_dtypes(trainer)
        job = trainer.job
        parallelize(model, trainer.layout, job.parallel, job.training.activation_checkpoint,
                    param_dtype=param_dtype, reduce_dtype=reduce_dtype)

    def tokens_per_device_per_step(self, trainer) -> int:
        t = trainer.job.training
        return t.batch_size * (t.seq_len // trainer.spec.seq) * t.grad_accum

    def normalizer(self, trainer, n_targets_local: torch.Tensor) -> torch.Tensor:
        """Target tokens in the global batch: every rank holds distinct tokens, so a plain sum."""
        return trainer._all_reduce(n_targets_local).clamp(min=1.0)

    def micro_batch_context(self, trainer, tensors: list[torch.Tensor]):
        """None needed: GPUs always run the sharded path, whose FSDP2 policy casts to bf16."""
        return contextlib.nullcontext()

    def after_backward(self, trainer) -> None:
        """Nothing: every gradient is final after FSDP2's reduce-scatter and the layers' own reductions."""

    def grad_norm_and_clip(self, trainer) -> torch.Tensor:
        """Global L2 norm of all gradients (every parameter is sharded exactly once), then clip; with
        the host optimizer the clip coefficient is folded into its update (`trainer.clip_coef`)."""
        grads = [local_shard(p.grad) for p in trainer.model.parameters() if p.grad is not None]
        sq = torch.zeros((), device=trainer.device, dtype=torch.float32)
        if grads:
            sq = (torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)) ** 2).sum()  # fused, fp32
        norm = trainer._all_reduce(sq).sqrt()
        max_norm = trainer.job.training.max_grad_norm
        trainer.clip_coef = None
        if max_norm > 0 and grads:
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # stays on device: no host sync
            if trainer.job.optimizer.engine is not None:
                trainer.clip_coef = coef  # folded into the host optimizer's update: no extra pass
            else:
                torch._foreach_mul_(grads, coef)
        return norm

    def loss_report_scale(self, trainer) -> float:
        return 1.0

