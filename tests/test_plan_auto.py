"""`parallel.plan = "auto"`: the trainer applies `mop plan`'s choice (options validated as on the CLI)."""

import pytest
import torch

from mop.config import apply_overrides, build_config


def test_apply_overrides_coerces_and_validates():
    job = build_config(None, ["--model.shape=debug"])
    new = apply_overrides(job, ["--parallel.seq.degree=2", "--training.activation_checkpoint=selective*1,full",
                                "--optimizer.device_fraction=0.25"])
    assert (new.parallel.seq.degree, new.training.activation_checkpoint, new.optimizer.device_fraction) == \
        (2, "selective*1,full", 0.25)
    assert job.parallel.seq.degree == 1  # the original is unchanged
    with pytest.raises(ValueError, match="parallel.experts.dispatcher"):
        apply_overrides(job, ["--parallel.experts.dispatcher=nope"])
    with pytest.raises(ValueError, match="model.n_layers"):
        apply_overrides(job, ["--model.n_layers=3"])


def test_trainer_applies_the_plan(tmp_path):
    from mop.distributed import ProcessInfo
    from mop.plan import Calibration, plan_for_job
    from mop.trainer import Trainer

    opts = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=64", "--training.batch_size=2",
            "--training.device=cpu", "--training.steps=1", "--logging.progress=none",
            f"--logging.run_dir={tmp_path / 'run'}"]
    job = build_config(None, opts + ["--parallel.plan=auto"])
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    expected = plan_for_job(job, 1, gpus_per_node=1, calibration=Calibration.load("cpu"),
                            offloads=("none", "cpu")).best.step.overrides()
    # The job's optimizer device share is "auto" (-1): measured at start-up, not taken from the plan.
    expected = [o for o in expected if not o.startswith("--optimizer.device_fraction")]
    want = apply_overrides(job, expected + ["--parallel.plan=none"])
    assert trainer.job == want and trainer.job.parallel.plan == "none"
    assert trainer.job.optimizer.device_fraction == -1.0
    assert trainer.tokens_per_device_per_step() * 1 == job.training.batch_size * job.training.seq_len
    trainer.train()


def test_auto_activation_policy_survives_the_plan(tmp_path):
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = build_config(None, ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=64",
                              "--training.device=cpu", "--training.activation_checkpoint=auto",
                              "--parallel.plan=auto", f"--logging.run_dir={tmp_path / 'run'}"])
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    assert trainer.job.training.activation_checkpoint == "auto"


def test_the_plan_respects_this_nodes_host_memory(tmp_path, monkeypatch):
    """parallel.plan=auto plans within the host memory the node has (a pick that pins more than the
    host holds would be killed minutes into start-up): with none available, no plan fits, and the
    refusal says it was the host."""
    from mop.distributed import ProcessInfo
    from mop.optim import buckets
    from mop.plan.search import NoPlan
    from mop.trainer import Trainer

    opts = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=64", "--training.device=cpu",
            "--parallel.plan=auto"]
    monkeypatch.setattr(buckets, "host_available_bytes", lambda: 2**20)  # 1 MiB: rounds to 0 GiB
    with pytest.raises(NoPlan, match="host"):
        Trainer(build_config(None, opts + [f"--logging.run_dir={tmp_path / 'a'}"]), ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    monkeypatch.setattr(buckets, "host_available_bytes", lambda: 64 * 2**30)
    trainer = Trainer(build_config(None, opts + [f"--logging.run_dir={tmp_path / 'b'}"]),
                      ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    assert trainer._node_host_bytes() == (0.95 * 64) // 1 * 2**30
    monkeypatch.setattr(buckets, "host_available_bytes", lambda: None)  # unknown: not checked
    assert trainer._node_host_bytes() is None
