"""The start-up memory planning that runs on GPUs (mop.memory_probe), exercised on CPU: the real model
and trainer, the allocator replaced by a simulated device whose readings follow the blocks' policies
and the tokens in flight (so the probe's hooks, shortened micro-batches, accumulation and OOM
recovery all run)."""

import pytest
import torch

from mop.config import build_config
from mop.distributed import ProcessInfo
from mop.memory_probe import plan_memory
from mop.trainer import Trainer

PER_TOKEN = {"none": 400.0, "selective": 120.0, "full": 30.0, "offload": 0.0}  # bytes kept per token per block
TRANSIENT = 200.0  # bytes per token of a micro-batch's working set


class SimulatedDevice:
    """Readings of a device holding `state` bytes plus what the model's blocks keep for the tokens in
    flight; raises OutOfMemoryError at the first block when a micro-batch would exceed `limit`. Its
    total is sized so that the planner's cap (90% of it, less the optimizer's 8 B/param of moments)
    is `limit` exactly."""

    def __init__(self, trainer, state: float, limit: float):
        numel = sum(p.numel() for p in trainer.model.parameters())
        self.model, self.state, self.limit = trainer.model, state, limit
        self.total_bytes = (limit + 8 * numel) / 0.9
        self.tokens, self.calls, self.mark = 0, [], 0
        blocks = list(self.model.layers.values())
        blocks[0].register_forward_pre_hook(self._first_block)  # runs before the probe's own hooks

    def _first_block(self, module, args):
        self.tokens = args[0].shape[0] * args[0].shape[1]
        self.mark = 0
        if self._micro_batch_peak() > 1.02 * self.limit:
            raise torch.OutOfMemoryError("simulated")

    def _micro_batch_peak(self) -> float:
        kept = sum(PER_TOKEN[p] for p in self.model.block_policies)
        return self.state + self.tokens * (kept + TRANSIENT)

    def total(self):
        return self.total_bytes

    def allocated(self):
        done = self.model.block_policies[:self.mark]
        self.mark += 1
        return self.state + self.tokens * sum(PER_TOKEN[p] for p in done)

    def reset_peak(self):
        self.calls.append("micro-batch")

    def peak(self):
        return self._micro_batch_peak()

    def free_cached(self):
        self.calls.append("freed")


def _trainer(tmp_path, *extra):
    opts = ["--model.shape=debug", "--model.n_layers=6", "--data.dataset=synthetic", "--training.seq_len=64",
            "--training.batch_size=2", "--training.device=cpu", "--training.activation_checkpoint=auto",
            "--logging.progress=none", f"--logging.run_dir={tmp_path / 'run'}", *extra]
    return Trainer(build_config(None, opts), ProcessInfo(0, 1, 0, 1, torch.device("cpu")))


STATE, TOKENS = 1e6, 2 * 64


def test_auto_policy_on_a_simulated_device(tmp_path):
    """The probe reads what each policy keeps exactly (allocator between blocks), the choice is
    `choose_policies` on those numbers for the room left, it is verified below the cap, more room
    never means more recomputation, and the chosen policies train."""
    from mop import memory_budget as mb

    prev = None
    for kept_per_token in (6 * 120, 6 * 200, 6 * 500):  # all above what the probe's pattern keeps (640)
        trainer = _trainer(tmp_path / str(kept_per_token))
        limit = STATE + TOKENS * (TRANSIENT + kept_per_token)
        peak, room = plan_memory(trainer, SimulatedDevice(trainer, STATE, limit))
        plan = trainer.activation_plan
        assert plan.kept_bytes == {p: TOKENS * b for p, b in PER_TOKEN.items()}
        assert plan.base_bytes == STATE + TOKENS * TRANSIENT
        costs = mb.BlockCosts(plan.kept_bytes, mb.recompute_seconds(trainer.job.model, 64, TOKENS))
        assert trainer.model.block_policies == mb.choose_policies(6, costs, 0.95 * (limit - plan.base_bytes))
        assert peak is not None and peak <= limit and room >= 0
        recompute = sum(costs.recompute_seconds[p] for p in trainer.model.block_policies)
        assert prev is None or recompute <= prev
        prev = recompute
    trainer.train()  # the chosen policies train (on CPU the allocator is not consulted again)


def test_probe_out_of_memory_is_caught_and_the_choice_still_fits(tmp_path):
    """The probe's block kept whole ("none") does not fit (as at 256K on 2 GPUs): the OOM is caught
    and freed, and the choice is made without "none"."""
    trainer = _trainer(tmp_path)
    limit = STATE + TOKENS * (TRANSIENT + 6 * 60)  # the pattern keeps 640 B/token: out of memory
    device = SimulatedDevice(trainer, STATE, limit)
    peak, _ = plan_memory(trainer, device)
    assert "freed" in device.calls and "none" not in trainer.model.block_policies
    assert peak is not None and peak <= limit


def test_accumulation_measures_with_the_gradients_alive(tmp_path):
    """With gradient accumulation each measured micro-batch follows one that kept its gradients."""
    trainer = _trainer(tmp_path, "--training.grad_accum=2", "--training.activation_checkpoint=full",
                       "--optimizer.offload=cpu")
    device = SimulatedDevice(trainer, STATE, 1e12)
    peak, room = plan_memory(trainer, device)
    assert peak is not None and device.calls.count("micro-batch") == 2
    assert all(p.grad is None for p in trainer.model.parameters())  # nothing left behind


def test_the_probe_times_each_block_and_records_it_beside_the_flop_estimate(tmp_path):
    """The pattern forward also clocks every block (CUDA events on a GPU, the host clock here): the
    median interior block's forward time is noted beside recompute_seconds' estimate, to calibrate
    the split's price of recomputation."""
    trainer = _trainer(tmp_path)
    limit = STATE + TOKENS * (TRANSIENT + 6 * 200)
    plan_memory(trainer, SimulatedDevice(trainer, STATE, limit))
    notes = [n for n in trainer.activation_plan.notes if n.startswith("measured block forward")]
    assert len(notes) == 1 and "FLOP estimate" in notes[0]
