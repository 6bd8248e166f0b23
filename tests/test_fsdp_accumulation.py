"""parallel.fsdp.accumulation: what FSDP2 keeps between the micro-batches of one step.

Counted in one step of 3 micro-batches on 2 gloo ranks, by FSDP2's own profiler labels: "reshard"
gathers every unit in every micro-batch (forward and again in backward), "keep_gathered" once per
step, "keep_all" also reduce-scatters once per step. The values are the lossless tests' business
(tests/test_lossless.py::test_fsdp_accumulation_equals_single_process).
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.lossless import BASE


def _count_worker(rank: int, world: int, mode: str, run_dir: str):
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = build_config(overrides=BASE + [f"--logging.run_dir={run_dir}", "--training.steps=2", "--training.grad_accum=3",
                                         "--training.batch_size=1", f"--parallel.fsdp.accumulation={mode}"])
    proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world, device=torch.device("cpu"))
    trainer = Trainer(job, proc)
    trainer.train_step()  # the first step outside the count
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step()
    names = [e.name for e in prof.events()]
    units = sum(1 for m in trainer.model.modules() if hasattr(m, "set_reshard_after_backward"))
    gathers = sum(n == "FSDP::all_gather" or n.startswith("FSDP::all_gather (") for n in names)  # the root has no FQN
    return {"units": units, "gathers": gathers,
            "reduces": sum(n.startswith("FSDP::post_backward_reduce") for n in names)}


@pytest.mark.parametrize("mode,gathers_per_unit,reduces_per_unit", [
    ("reshard", 6, 3),        # 3 micro-batches x (forward + backward) gathers, one reduce each
    ("keep_gathered", 1, 3),  # gathered once, in the first forward; reduced per micro-batch
    ("keep_all", 1, 1),       # gathered once, reduced once
])
def test_accumulation_modes_gather_and_reduce_as_documented(mode, gathers_per_unit, reduces_per_unit, tmp_path):
    for out in run_distributed(_count_worker, 2, mode, str(tmp_path)):
        assert out["units"] == 3  # the debug model's two blocks and the root
        assert out["gathers"] == out["units"] * gathers_per_unit
        assert out["reduces"] == out["units"] * reduces_per_unit


def _leftover_grads(model) -> int:
    """Gradients FSDP2 holds unsharded (accumulated between micro-batches) or p.grad left set."""
    from torch.distributed.fsdp import FSDPModule

    n = sum(p.grad is not None for p in model.parameters())
    for unit in model.modules():
        if isinstance(unit, FSDPModule):
            group = unit._get_fsdp_state()._fsdp_param_group
            for fp in (group.fsdp_params if group is not None else ()):
                n += fp.unsharded_accumulated_grad is not None
                n += hasattr(fp, "_unsharded_param") and fp._unsharded_param.grad is not None
    return n


def _reset_worker(rank: int, world: int, run_dir: str):
    import torch.distributed as dist

    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.parallel.parallelize import reset_accumulation, set_accumulation_phase
    from mop.trainer import Trainer

    def fresh():
        job = build_config(overrides=BASE + [f"--logging.run_dir={run_dir}/{len(runs)}", "--training.steps=1",
                                             "--training.grad_accum=2", "--training.batch_size=1",
                                             "--parallel.fsdp.accumulation=keep_all"])
        proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                           device=torch.device("cpu"))
        return Trainer(job, proc)

    runs = []
    out = {}
    for measure_first in (False, True):
        trainer = fresh()
        runs.append(trainer)
        if measure_first:  # what the start-up probe does: a micro-batch that is not the step's last
            state = trainer.loader.state_dict()
            b = next(trainer.loader)
            trainer.loader.load_state_dict(state)
            set_accumulation_phase(trainer.model, "keep_all", last=False)
            ce, aux = trainer.model(b["tokens"], b["positions"], b["labels"], torch.tensor(64.0))
            (ce + aux).backward()
            out["left_before_reset"] = _leftover_grads(trainer.model)
            reset_accumulation(trainer.model)
            out["left_after_reset"] = _leftover_grads(trainer.model)
        trainer.train_step(capture_grads=True)
        out[measure_first] = trainer.full_grads()
    out["same_grads"] = all(torch.equal(out[False][n], out[True][n]) for n in out[False])
    return {k: v for k, v in out.items() if not isinstance(k, bool)}


def test_reset_accumulation_forgets_a_measuring_micro_batch(tmp_path):
    """keep_all: a measuring micro-batch's gradients wait unsharded inside FSDP for the next one (the
    start-up probe, an OOM caught there). reset_accumulation forgets them, so step 1's gradients are
    bit-identical to a run that never measured."""
    for out in run_distributed(_reset_worker, 2, str(tmp_path)):
        assert out["left_before_reset"] > 0
        assert out["left_after_reset"] == 0
        assert out["same_grads"]
