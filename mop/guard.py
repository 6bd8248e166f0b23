"""The NaN/Inf guard of the training loop (`training.nonfinite`).

Every step's gradient norm is all-reduced, so a non-finite loss or gradient on any rank makes it
non-finite on every rank, and all ranks take the same decision without another collective:

- `stop` (default): no per-step host sync. The first bad step is remembered on the device and
  checked on logging steps and before every save; the run then ends with `NonFiniteError` naming
  the step and the ranks whose loss went bad. Nothing after the bad step is ever saved, so
  keep-last-K rotation cannot replace the good checkpoints with NaN ones.
- `skip`: one host sync per step decides before the update is issued; a bad step's update is not
  applied (nor the expert-bias update), and the skips are counted and reported.
"""

from __future__ import annotations

import torch

from mop.distributed import local_shard


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss, gradient norm or weight (the message names the step and ranks)."""


class NonFiniteGuard:
    """Decides, per step, whether the update may be applied; raises NonFiniteError under `stop`."""

    def __init__(self, policy: str, rank: int, world: int, device: torch.device, all_reduce, say):
        self.policy = policy
        self.rank, self.world, self.device = rank, world, device
        self._all_reduce = all_reduce  # sums a tensor over the ranks (identity on one process)
        self._say = say
        self.skipped = 0
        self._first_bad = None  # device [first non-finite step, this rank's loss non-finite] (stop policy)

    def _bad_loss_ranks(self, loss_bad: torch.Tensor) -> list[int]:
        """Ranks whose local loss was non-finite (collective; only on the failure path)."""
        flags = torch.zeros(self.world, device=self.device)  # on the device: NCCL reduces only device tensors
        flags[self.rank] = loss_bad.to(self.device).float()
        return [r for r, f in enumerate(self._all_reduce(flags).tolist()) if f]

    def describe(self, step: int, loss_bad: torch.Tensor) -> str:
        ranks = self._bad_loss_ranks(loss_bad)
        where = (f"the loss was non-finite on rank(s) {ranks}" if ranks else
                 "the loss was finite on every rank: a gradient overflowed")
        return f"step {step}: non-finite gradient norm ({where})"

    def allow_update(self, step: int, grad_norm: torch.Tensor, loss_local: torch.Tensor, optimizer) -> bool:
        """Whether step `step`'s (1-based) update may be applied, given its all-reduced gradient norm."""
        finite = torch.isfinite(grad_norm)
        if self.policy == "skip":
            if bool(finite):  # host sync, every step: a skip must be decided before the update is issued
                return True
            self.skipped += 1
            # HostAdamW's cpu engine copied this step's gradients to the host during backward and marks
            # them consumed only in step_async; forget them, or the next step would update with these.
            for bucket in getattr(optimizer, "_buckets", ()):
                bucket.offloaded.clear()
            text = self.describe(step, ~torch.isfinite(loss_local))
            self._say(f"mop: {text}; update skipped ({self.skipped} so far, training.nonfinite=skip)")
            return False
        record = torch.stack([torch.full_like(grad_norm, step), (~torch.isfinite(loss_local)).float()])
        if self._first_bad is None:
            self._first_bad = torch.zeros_like(record)
        self._first_bad = torch.where(~finite & (self._first_bad[0] == 0), record, self._first_bad)
        return True

    def check(self) -> None:
        """Raise NonFiniteError on every rank if a step so far had a NaN/Inf (stop policy; a host sync)."""
        if self._first_bad is None:
            return
        step, loss_bad = self._first_bad.tolist()  # host sync: logging steps and saves only
        if step:
            raise NonFiniteError(f"{self.describe(int(step), torch.tensor(bool(loss_bad)))}; stopped "
                                 "(training.nonfinite=stop) without saving it. Lower --optimizer.lr or "
                                 "--training.max_grad_norm, resume from the last checkpoint, or pass "
                                 "--training.nonfinite=skip to skip such steps")

    def check_loss(self, step: int, loss: float) -> None:
        """The logged (all-reduced) loss: non-finite with a finite gradient norm still stops the run."""
        if loss != loss or loss in (float("inf"), float("-inf")):
            if self.policy == "stop":
                raise NonFiniteError(f"step {step}: non-finite loss ({loss}) with a finite gradient norm; "
                                     "stopped (training.nonfinite=stop)")

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        """Refuse to save non-finite parameters, whatever their origin (one pass over the weights; a host sync)."""
        local = [local_shard(p) for p in model.parameters()]
        bad = torch.stack([(~torch.isfinite(p)).any().to(self.device) for p in local]).any().float()
        if self._all_reduce(bad.reshape(1)).item():
            raise NonFiniteError(f"step {step}: the weights hold NaN/Inf; not saving a checkpoint of them")
