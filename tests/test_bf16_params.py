"""training.param_dtype=bf16: the model holds bf16 weights and gradients (2 + 2 bytes per parameter on
the device), the host optimizer keeps the fp32 masters; a MoP layout trains like one process holding
the same bf16 weights (bf16 tolerances), and a checkpoint resumes from the fp32 masters."""

import pytest
import torch

from tests.dist_utils import run_distributed
from tests.lossless import BASE


def _opts(run_dir, *extra):
    return BASE + [f"--logging.run_dir={run_dir}", "--training.dtype=bf16", "--training.param_dtype=bf16",
                   "--optimizer.offload=cpu", "--optimizer.device_fraction=0.5", *extra]


def _train(rank, world, opts, stop_at=None):
    import torch.distributed as dist

    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    proc = ProcessInfo(rank=dist.get_rank() if world > 1 else 0, world=world, local_rank=rank, local_world=world,
                       device=torch.device("cpu"))
    trainer = Trainer(build_config(None, opts), proc)
    if stop_at is not None:  # the same run (schedule) stopped early, as if the job died
        trainer.job.training.steps = stop_at
    dtypes = {(p.to_local() if hasattr(p, "to_local") else p).dtype for p in trainer.model.parameters()}
    hist = trainer.train().history
    masters = {b.master.dtype for b in trainer.optimizer._buckets}
    return {"losses": [h["loss"] for h in hist], "param_dtypes": dtypes, "master_dtypes": masters}


def test_bf16_weights_train_like_one_process(tmp_path):
    par = run_distributed(_train, 2, _opts(tmp_path / "par", "--parallel.seq.degree=2", "--parallel.experts.degree=2",
                                           "--parallel.vocab.degree=2", "--training.batch_size=2",
                                           "--training.steps=2"))[0]
    ref = _train(0, 1, _opts(tmp_path / "ref", "--training.batch_size=2", "--training.steps=2"))
    assert par["param_dtypes"] == ref["param_dtypes"] == {torch.bfloat16}
    assert par["master_dtypes"] == {torch.float32}
    # bf16 compute in another reduction order: loss agrees to bf16 precision, not bit for bit.
    torch.testing.assert_close(torch.tensor(par["losses"]), torch.tensor(ref["losses"]), rtol=2e-2, atol=2e-2)


def test_bf16_weights_need_a_host_optimizer():
    from mop.config import build_config

    with pytest.raises(ValueError, match="training.param_dtype"):
        build_config(None, ["--training.param_dtype=bf16"])


def test_bf16_weights_resume_from_the_fp32_masters(tmp_path):
    """Save at step 2, resume to step 4: the same losses as an uninterrupted run. Step 4's loss sees
    step 3's update, which starts from the fp32 masters: masters rebuilt from the bf16 weights would
    change it."""
    common = ["--training.batch_size=2", "--checkpoint.enabled=true", "--checkpoint.every=2"]
    full = _train(0, 1, _opts(tmp_path / "full", *common, "--training.steps=4"))
    _train(0, 1, _opts(tmp_path / "cut", *common, "--training.steps=4"), stop_at=2)
    resumed = _train(0, 1, _opts(tmp_path / "cut", *common, "--training.steps=4", "--checkpoint.resume=true"))
    assert resumed["losses"][-2:] == full["losses"][-2:]
