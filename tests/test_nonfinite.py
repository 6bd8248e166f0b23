"""The NaN/Inf guard: `training.nonfinite=stop` ends the run naming the step and never saves a NaN
checkpoint; `skip` leaves the model untouched on a bad step (device and host optimizers) and counts it."""

import subprocess
import sys

import pytest
import torch

from mop.checkpoint import CheckpointManager
from mop.config import build_config
from mop.distributed import ProcessInfo
from mop.guard import NonFiniteError
from mop.trainer import Trainer

CPU = ProcessInfo(0, 1, 0, 1, torch.device("cpu"))
COMMON = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=32", "--training.batch_size=2",
          "--training.device=cpu", "--logging.progress=none", "--training.warmup_steps=1"]


def _job(run_dir, *extra):
    return build_config(overrides=[*COMMON, f"--logging.run_dir={run_dir}", *extra])


def _poison_step(trainer: Trainer, step: int) -> None:
    """Make one gradient NaN on the given (1-based) step, after backward, as an overflow would."""
    original = trainer.strategy.after_backward

    def after_backward(tr):
        original(tr)
        if tr.step + 1 == step:
            p = next(p for p in tr.model.parameters() if p.grad is not None)
            p.grad.view(-1)[0] = float("nan")

    trainer.strategy.after_backward = after_backward


def test_stop_names_the_step_and_keeps_only_finite_checkpoints(tmp_path):
    """lr=1e30 used to run to the end with rc 0, rotating every good checkpoint away for NaN ones."""
    job = _job(tmp_path, "--optimizer.lr=1e30", "--training.steps=8", "--logging.log_every=100",
               "--checkpoint.enabled=true", "--checkpoint.every=1", "--checkpoint.keep=1")
    with pytest.raises(NonFiniteError) as e:
        Trainer(job, CPU).train()
    message = str(e.value)
    assert "non-finite gradient norm" in message and "training.nonfinite=skip" in message and "\n" not in message
    bad_step = int(message.split("step ", 1)[1].split(":", 1)[0])
    kept = CheckpointManager(tmp_path).complete_checkpoints()
    assert kept and all(CheckpointManager.step_of(p) < bad_step for p in kept)
    # The kept checkpoint is finite: a resume with a sane learning rate trains on from it.
    resumed = Trainer(_job(tmp_path, "--training.steps=3", "--checkpoint.resume=true", "--logging.log_every=1"), CPU)
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_stop_on_an_injected_nan_step(tmp_path):
    trainer = Trainer(_job(tmp_path, "--training.steps=5", "--logging.log_every=100"), CPU)
    _poison_step(trainer, 3)
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite gradient norm \(the loss was finite on every rank"):
        trainer.train()


def _skip_run(run_dir, *extra):
    trainer = Trainer(_job(run_dir, "--training.steps=5", "--training.nonfinite=skip", "--logging.log_every=1",
                           *extra), CPU)
    _poison_step(trainer, 3)
    snapshots = {}
    original = trainer.train_step

    def train_step(**kwargs):
        snapshots[trainer.step] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        return original(**kwargs)

    trainer.train_step = train_step
    history = trainer.train().history
    trainer.finish_update()
    return trainer, history, snapshots


def test_skip_leaves_the_model_untouched_and_counts(tmp_path, capsys):
    trainer, history, snaps = _skip_run(tmp_path)
    assert trainer.guard.skipped == 1 and history[-1]["skipped_steps"] == 1
    assert "step 3: non-finite gradient norm" in capsys.readouterr().out
    # Step 3 (from the state after step 2 to the state after step 3) changed nothing; step 4 did.
    assert all(torch.equal(snaps[2][n], snaps[3][n]) for n in snaps[2])
    assert any(not torch.equal(snaps[3][n], snaps[4][n]) for n in snaps[3])
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)


def test_skip_with_the_host_optimizer_equals_the_device_optimizer(tmp_path):
    """The host optimizer must not apply the skipped update, nor reuse its gradients in the next step."""
    _, ref, _ = _skip_run(tmp_path / "ref")
    _, got, _ = _skip_run(tmp_path / "host", "--optimizer.offload=cpu", "--optimizer.device_fraction=0.3")
    torch.testing.assert_close(torch.tensor([h["loss"] for h in got]), torch.tensor([h["loss"] for h in ref]),
                               rtol=1e-5, atol=1e-6)


def test_cli_exits_3_with_one_line(tmp_path):
    """Two workers (gloo): both stop at the same step, one line is printed, the exit code says why."""
    cmd = [sys.executable, "-m", "mop.cli", "train", "--nproc", "2", *COMMON, "--optimizer.lr=1e30",
           "--parallel.seq.degree=1", "--parallel.experts.degree=2", "--parallel.vocab.degree=1",
           "--training.steps=6", "--logging.log_every=2", f"--logging.run_dir={tmp_path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("mop train:")]
    assert len(lines) == 1 and "non-finite gradient norm" in lines[0]
