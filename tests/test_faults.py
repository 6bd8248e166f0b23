"""Fault injection (CPU, gloo, 2 ranks): kill -9 during a step, during a save and during rotation, then
resume and check the losses equal an uninterrupted run; a live run locks its directory; kill -9 of the
`mop train` launcher leaves no worker behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

STEPS = 6
BASE = ["--model.shape=debug", "--data.dataset=synthetic", "--data.synthetic_doc_len=12", "--training.seq_len=32",
        "--training.batch_size=2", "--training.device=cpu", "--training.warmup_steps=1", "--logging.progress=none",
        "--logging.log_every=1", "--parallel.experts.degree=2", "--model.expert_bias=true", "--training.grad_accum=2",
        "--checkpoint.enabled=true", "--checkpoint.every=2", f"--training.steps={STEPS}"]


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _run_rank(rank: int, world: int, run_dir: str, extra: list[str], fault: str | None):
    """One rank of a short run; `fault` makes one rank kill itself at a chosen point."""
    import mop.checkpoint as ckpt
    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = build_config(overrides=[*BASE, f"--logging.run_dir={run_dir}", *extra])
    trainer = Trainer(job, ProcessInfo(rank, world, rank, world, torch.device("cpu")))
    if fault == "step" and rank == 1:  # mid-step 5: after backward, before the update
        after_backward = trainer.strategy.after_backward
        trainer.strategy.after_backward = lambda tr: _kill_self() if tr.step + 1 == 5 else after_backward(tr)
    if fault == "save" and rank == 0:  # step 4's files are written, the manifest and rename are not
        save = ckpt.dcp.save

        def dying_save(state, checkpoint_id):
            save(state, checkpoint_id=checkpoint_id)
            if checkpoint_id.endswith("step_00000004.partial"):
                _kill_self()

        ckpt.dcp.save = dying_save
    if fault == "rotation" and rank == 0:  # step 4 is complete; step 2 is being deleted
        rmtree = ckpt.shutil.rmtree
        ckpt.shutil.rmtree = lambda path, *a, **k: _kill_self() if str(path).endswith(".trash") else rmtree(path, *a, **k)
    history = trainer.train().history
    return [(h["step"], h["loss"], h["grad_norm"]) for h in history] if rank == 0 else None


def _run(run_dir: Path, extra: list[str] = (), fault: str | None = None):
    return run_distributed(_run_rank, 2, str(run_dir), list(extra), fault)[0]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("fault,keep,resumes_at", [("step", 2, 4), ("save", 2, 2), ("rotation", 1, 4)])
def test_kill_9_then_resume_equals_uninterrupted(fault, keep, resumes_at, uninterrupted, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(RuntimeError):
        _run(run, [f"--checkpoint.keep={keep}"], fault)
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir())
    if fault == "save":
        assert "step_00000004.partial" in leftovers
    if fault == "rotation":
        assert "step_00000002.trash" in leftovers
    after = _run(run, [f"--checkpoint.keep={keep}", "--checkpoint.resume=true"])
    assert [s for s, _, _ in after] == list(range(resumes_at + 1, STEPS + 1))
    assert after == uninterrupted[resumes_at:]  # losses and gradient norms, exactly
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not any(n.endswith((".partial", ".trash")) for n in names), names


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry.name))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_launcher_takes_the_workers_with_it(tmp_path):
    """The workers ask the kernel to kill them with their parent: no orphan keeps training and writing."""
    cmd = [sys.executable, "-m", "mop.cli", "train", "--nproc", "2", *BASE[:-1], "--training.steps=100000",
           "--checkpoint.enabled=false", f"--logging.run_dir={tmp_path}"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):  # workers are training
            assert launcher.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.5)
        workers = [pid for pid in _children(launcher.pid) if b"mop.train" in _cmdline(pid)]
        assert len(workers) == 2, [(pid, _cmdline(pid)) for pid in _children(launcher.pid)]
        # A second run in the same directory is refused while this one lives (rank 0 holds the lock).
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "in use by a live run" in second.stderr, second.stderr[-2000:]
        launcher.kill()  # SIGKILL: no handler runs, torchrun cannot stop its workers itself
        launcher.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived their launcher"
    finally:
        for pid in [launcher.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
