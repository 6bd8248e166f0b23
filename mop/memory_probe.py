"""Start-up memory planning on the device: the trainer's side of mop.memory_budget.

Before step 1, `plan_memory(trainer, memory)` runs measuring micro-batches of the real model on the
first batch (no update; the loader is rewound; gradients dropped), through a `DeviceMemory` meter:
`torch.cuda`'s allocator on a GPU, a stand-in in tests (so this GPU-only path also runs on CPU).

- `training.activation_checkpoint=auto`: per-block policies by `memory_budget.plan_activation_policies`
  (`ActivationProbe` is its `Probe`: a forward with allocator readings between blocks, micro-batch
  peaks, OOMs caught and freed, every number agreed over ranks);
- a host optimizer with `optimizer.device_fraction=-1`: the peak of one micro-batch, so the
  optimizer's device share takes only what the step leaves. Under "auto" the optimizer competes
  with the kept activations for that memory by seconds saved per byte (`memory_budget.split_memory`).

The device budget (`cap`) is 90% of the device (allocator slack) less what the optimizer allocates
later: AdamW's two moments on the device (8 B/param) or the host optimizer's staging slots.
"""

from __future__ import annotations

import gc

import torch
import torch.distributed as dist

from mop import memory_budget as mb
from mop.metrics import DeviceClock


class DeviceMemory:
    """The allocator readings the planner uses (CUDA caching allocator)."""

    def __init__(self, device: torch.device):
        self.device = device

    def total(self) -> float:
        return float(torch.cuda.get_device_properties(self.device).total_memory)

    def allocated(self) -> float:
        return float(torch.cuda.memory_allocated(self.device))

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> float:
        return float(torch.cuda.max_memory_allocated(self.device))

    def free_cached(self) -> None:
        torch.cuda.empty_cache()


def _local_numel(model) -> int:
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())


def _drop_grads(model) -> None:
    for p in model.parameters():
        p.grad = None


def drop_attention_slots(model) -> None:
    """Forget attention outputs/states handed between passes (after a forward with no backward)."""
    for m in model.modules():
        slots = getattr(m, "_slots", None)
        if slots is not None:
            slots.output = slots.state = None


class ActivationProbe:
    """`memory_budget.Probe` over a trainer's model and first batch."""

    def __init__(self, trainer, memory: DeviceMemory, accumulate: bool):
        self.trainer, self.memory, self.accumulate = trainer, memory, accumulate
        self.blocks = list(trainer.model.layers.values())
        # Forward seconds of each block in the last pattern forward, and the share of the tokens it
        # ran on: what recomputing a block really costs, beside `recompute_seconds`' FLOP estimate.
        self.block_seconds: list[float] = []
        self.timed_fraction = 1.0

    def _phase(self, mode: str, last: bool) -> None:
        """FSDP's accumulation behaviour for the next micro-batch, as the trainer sets it (no-op
        without FSDP units)."""
        from mop.parallel.parallelize import set_accumulation_phase

        set_accumulation_phase(self.trainer.model, mode, last, self.trainer.job.parallel.fsdp.reshard_after_forward)

    def micro_batch(self, backward: bool = True, keep_grads: bool = False, fraction: float = 1.0) -> float:
        """One forward (and backward) on the first batch's first `fraction` of each rank's tokens (a
        shorter sequence, same layout; the memory, not the values, is measured): peak bytes."""
        tr = self.trainer
        state = tr.loader.state_dict()
        batch = next(tr.loader)
        tr.loader.load_state_dict(state)
        self.memory.reset_peak()
        n = max(1, int(batch["tokens"].shape[1] * fraction))
        tokens, positions, labels = (batch[k][:, :n].to(tr.device) for k in ("tokens", "positions", "labels"))
        normalizer = tr._all_reduce((labels != -100).sum().float()).clamp(min=1.0)
        ce, aux = tr.model(tokens, positions, labels, normalizer)
        if backward:
            (ce + aux).backward()
        del ce, aux
        if not keep_grads:
            _drop_grads(tr.model)
        return self.memory.peak()

    def step_peak(self, fraction: float = 1.0) -> float:
        """A training micro-batch's peak on this rank. With accumulation the previous micro-batch's
        gradients are alive during the next one's forward: the second of two is measured."""
        if not self.accumulate:
            return self.micro_batch(fraction=fraction)
        # With parallel.fsdp.accumulation keeping weights (and gradients) between micro-batches, the
        # second one runs with the first one's gathered weights and unsharded gradients alive.
        mode = self.trainer.job.parallel.fsdp.accumulation
        self._phase(mode, last=False)
        self.micro_batch(keep_grads=True, fraction=fraction)
        self._phase(mode, last=True)
        try:
            return self.micro_batch(keep_grads=True, fraction=fraction)
        finally:
            self._phase("reshard", last=True)

    # -- memory_budget.Probe ------------------------------------------------------------------------
    def pattern_marks(self, policies: list[str], fraction: float = 1.0) -> list[float]:
        self.trainer.model.block_policies = policies
        marks: list[float] = []
        clock = DeviceClock(self.trainer.device)

        def before_block(*_) -> None:  # a pre-hook that returned a value would replace the block's input
            marks.append(self.memory.allocated())
            clock.tick()

        hooks = [b.register_forward_pre_hook(before_block) for b in self.blocks]
        hooks.append(self.blocks[-1].register_forward_hook(lambda *_: clock.tick()))
        try:
            self.micro_batch(backward=False, fraction=fraction)
        finally:
            for h in hooks:
                h.remove()
            drop_attention_slots(self.trainer.model)
        self.block_seconds, self.timed_fraction = clock.intervals(), fraction
        return marks

    def micro_batch_peak(self, policies: list[str], fraction: float = 1.0) -> float:
        self.trainer.model.block_policies = policies
        return self.step_peak(fraction)

    def agree_max(self, values: list[float]) -> list[float]:
        """The same numbers on every rank (one host sync): every rank must choose the same policies,
        since policies change which collectives a block runs."""
        t = torch.tensor(values, dtype=torch.float64, device=self.trainer.device)
        if dist.is_initialized() and self.trainer.proc.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def recover(self) -> None:
        from mop.parallel.parallelize import reset_accumulation

        self._phase("reshard", last=True)
        reset_accumulation(self.trainer.model)
        _drop_grads(self.trainer.model)
        drop_attention_slots(self.trainer.model)
        gc.collect()
        self.memory.free_cached()


def measured_block_note(probe: ActivationProbe, model_cfg, seq_len: int, tokens: int) -> str | None:
    """The interior blocks' median forward time against `recompute_seconds`' FLOP estimate of a full
    block at the same tokens: recorded (`activation_plan.notes`) to calibrate the split's price of
    recomputation, not yet used by it."""
    inner = sorted(probe.block_seconds[1:-1])
    if not inner:
        return None
    f = probe.timed_fraction
    estimate = mb.recompute_seconds(model_cfg, max(1, int(seq_len * f)), max(1, int(tokens * f)))["full"]
    return (f"measured block forward {inner[len(inner) // 2] * 1e3:.2f} ms on {f:g} of the tokens "
            f"(FLOP estimate {estimate * 1e3:.2f} ms)")


def plan_memory(trainer, memory: DeviceMemory) -> tuple[float | None, float]:
    """Choose the activation policies ("auto") and measure a micro-batch's peak; returns (peak bytes
    or None when nothing was measured, bytes the step leaves for the optimizer's device share)."""
    job, t, spec = trainer.job, trainer.job.training, trainer.spec
    o = job.optimizer
    local_numel = _local_numel(trainer.model)
    cap = 0.9 * memory.total()  # allocator slack and fragmentation
    if o.engine is None:
        cap -= 8 * local_numel  # AdamW's two fp32 moments, allocated at the first step
    else:
        cap -= 2 * 3 * 4 * min(o.bucket_numel, local_numel)  # gpu_stream staging slots (fp32 master, m, v)
    probe = ActivationProbe(trainer, memory, accumulate=t.grad_accum > 1)
    peak = None
    if t.activation_checkpoint == "auto":
        tokens = t.batch_size * t.seq_len // spec.seq
        recompute = mb.recompute_seconds(job.model, t.seq_len, tokens,
                                         pipelined_experts=job.parallel.experts.dispatcher == "llep_pipelined")
        rival = None
        if o.engine is not None and o.device_fraction < 0:
            # The host optimizer competes for the same bytes (mop.memory_budget.split_memory); its
            # update overlaps roughly one micro-batch's forward, estimated like the recomputation.
            rival = mb.optimizer_rival(o.offload, 12.0 * local_numel, len(probe.blocks) * recompute["full"],
                                       overlap=o.overlap_update)
        plan = mb.plan_activation_policies(probe, len(probe.blocks), recompute, cap, shrink=mb.probe_shrink(tokens),
                                           optimizer=rival, accum=t.grad_accum)
        trainer.model.block_policies = plan.policies
        note = measured_block_note(probe, job.model, t.seq_len, tokens)
        if note:
            plan.notes.append(note)
        trainer.activation_plan = plan  # what was measured and why (bench records, tests)
        kept = ", ".join(f"{p} {b / 2**30:.2f} GiB" for p, b in plan.kept_bytes.items() if b != float("inf"))
        gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"  # noqa: E731
        trainer._say(f"activation policy auto: {mb.describe(plan.policies)} (kept per block: {kept or '-'}; "
                     f"base {gib(plan.base_bytes)} GiB; verified peak {gib(plan.peak_bytes)} of {cap / 2**30:.1f} GiB; "
                     f"kept free for the optimizer's device share {plan.optimizer_bytes / 2**30:.1f} GiB)"
                     + "".join(f"; {n}" for n in plan.notes))
        peak = plan.peak_bytes
    if peak is None and o.engine is not None and o.device_fraction < 0:
        peak = probe.agree_max([probe.step_peak()])[0]
    probe.recover()  # weights resharded, no gradient of a measuring micro-batch left anywhere
    return peak, cap - (peak or 0.0)
