"""Checkpoints move between layouts: save under one MoP layout, resume under another (DCP reshards
the DTensors), and the losses continue exactly as an uninterrupted single-process run."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.lossless import _job


def _train(rank, world, overrides, run_dir, stop_after=None):
    import torch.distributed as dist

    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    trainer = Trainer(_job(overrides, run_dir), ProcessInfo(dist.get_rank(), world, rank, world, torch.device("cpu")))
    if stop_after is not None:
        trainer.job.training.steps = stop_after  # as if the job died after this step's checkpoint
    return [h["loss"] for h in trainer.train().history]


def _reference(overrides, run_dir):
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    trainer = Trainer(_job(overrides, run_dir), ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    return [h["loss"] for h in trainer.train().history]


@pytest.mark.parametrize("optimizer,ep_after", [("none", 2), ("cpu", 2), ("none", 1), ("cpu", 1)])
def test_resume_on_another_layout_continues_exactly(optimizer, ep_after, tmp_path):
    """Steps 1-2 on one layout, 3-4 resumed on another. `ep_after=1`: the experts, saved as expert-
    parallel DTensors, come back sharded as dense weights by FSDP (mop.parallel.parallelize.
    experts_sharded_as_dense), as when the bench's rule changes Ep with the context."""
    common = ["--training.steps=4", "--training.seq_len=64", f"--optimizer.offload={optimizer}",
              "--optimizer.device_fraction=0", "--checkpoint.enabled=true", "--checkpoint.every=2"]
    ref = _reference(common + ["--training.batch_size=4"], str(tmp_path / "ref"))
    run_dir = str(tmp_path / "run")
    # Steps 1-2 on 4 ranks: D=2 (2 sequence groups x 2 sequences), Ep=2 x 2-way sharding, P=4.
    first = run_distributed(_train, 4, common + ["--training.batch_size=2", "--parallel.seq.degree=2",
                                                 "--parallel.experts.degree=2", "--parallel.vocab.degree=4"],
                            run_dir, 2)[0]
    # Steps 3-4 on 2 ranks: D=1 (2 groups x 2 sequences), Ep=2 x 1, P=2: every DTensor is resharded.
    second = run_distributed(_train, 2, common + ["--training.batch_size=2", f"--parallel.experts.degree={ep_after}",
                                                  "--parallel.vocab.degree=2", "--checkpoint.resume=true"], run_dir)[0]
    torch.testing.assert_close(torch.tensor(first + second), torch.tensor(ref), rtol=1e-5, atol=1e-5)
