"""End-to-end training on CPU: the loss falls, resume is exact, checkpoints are atomic, the CLI runs."""

import json
import os
import subprocess
import sys

import torch

from mop.checkpoint import CheckpointManager
from mop.config import build_config
from mop.distributed import ProcessInfo
from mop.trainer import Trainer

CPU = ProcessInfo(0, 1, 0, 1, torch.device("cpu"))


def _job(tmp_path, *extra):
    return build_config(overrides=[
        "--model.shape=debug", "--model.vocab_size=258", "--training.seq_len=64", "--training.batch_size=4",
        "--training.device=cpu", "--logging.progress=none", "--logging.log_every=1",
        f"--data.cache_dir={tmp_path / 'cache'}", f"--logging.run_dir={tmp_path / 'run'}", *extra])


def test_tiny_training_loss_falls_on_bundled_corpus(tmp_path):
    job = _job(tmp_path, "--training.steps=40", "--training.warmup_steps=4", "--optimizer.lr=1e-2")
    hist = Trainer(job, CPU).train().history
    first, last = hist[0]["loss"], sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first - 1.0, (first, last)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 40 and {"loss", "grad_norm", "lr", "tokens_per_s_per_device"} <= set(json.loads(lines[0]))


def test_resume_reproduces_uninterrupted_losses_exactly(tmp_path):
    common = ["--training.steps=6", "--training.grad_accum=2", "--model.aux_loss_coef=0.01",
              "--model.expert_bias=true"]
    full = Trainer(_job(tmp_path / "a", *common), CPU).train().history
    first = Trainer(_job(tmp_path / "b", *common, "--checkpoint.enabled=true", "--checkpoint.every=3"), CPU)
    first.job.training.steps = 3  # stop after the step-3 checkpoint, as if the job died
    first.train()
    resumed = Trainer(_job(tmp_path / "b", *common, "--checkpoint.enabled=true", "--checkpoint.resume=true"), CPU)
    assert resumed.step == 3
    after = resumed.train().history
    assert [h["loss"] for h in after] == [h["loss"] for h in full[3:]]
    assert [h["grad_norm"] for h in after] == [h["grad_norm"] for h in full[3:]]


def test_checkpoint_is_atomic_and_keeps_last_k(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3):
        mgr.save(step, {"x": torch.tensor([float(step)])})
    names = [p.name for p in mgr.complete_checkpoints()]
    assert names == ["step_00000002", "step_00000003"]
    # A crash mid-save leaves a .partial directory, which is never taken as the latest.
    (tmp_path / "checkpoints" / "step_00000004.partial").mkdir()
    assert mgr.latest().name == "step_00000003"
    state = {"x": torch.zeros(1)}
    mgr.load(mgr.latest(), state)
    assert state["x"].item() == 3.0


def test_cli_nproc_2_runs_end_to_end(tmp_path):
    cmd = [sys.executable, "-m", "mop.cli", "train", "--nproc", "2", "--model.shape=debug", "--model.vocab_size=258",
           "--training.steps=3", "--training.seq_len=64", "--training.batch_size=2", "--parallel.seq.degree=2",
           "--training.device=cpu", "--logging.progress=plain", "--logging.log_every=1",
           f"--data.cache_dir={tmp_path / 'cache'}", f"--logging.run_dir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "layout W=2 D=2" in out.stdout
    assert out.stdout.count("step ") >= 3


def test_metrics_file_fresh_per_run_and_trimmed_on_resume(tmp_path):
    from mop.metrics import MetricsLogger

    run = tmp_path / "run"
    for start, steps in ((0, [1, 2, 3, 4]), (0, [1, 2])):  # a second fresh run replaces the first
        log = MetricsLogger(run, 10, progress="none", start_step=start)
        for s in steps:
            log.log(s, {"loss": 1.0, "lr": 0.1})
        log.close()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    log = MetricsLogger(run, 10, progress="none", start_step=1)  # resumed from the step-1 checkpoint
    log.log(2, {"loss": 0.5, "lr": 0.1})
    log.close()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 0.5


def test_profile_step_writes_table_and_trace(tmp_path):
    job = _job(tmp_path, "--training.steps=2", "--logging.profile_step=2")
    Trainer(job, CPU).train()
    table = (tmp_path / "run" / "profile_rank0.txt").read_text()
    assert "Self CPU" in table and "aten::" in table
    assert json.loads((tmp_path / "run" / "trace_rank0.json").read_text())["traceEvents"]


def test_memory_peak_breakdown_from_an_allocator_trace():
    """`logging.memory_step` (CUDA) reports the allocations live at the peak, by innermost mop frame."""
    from mop.metrics import peak_breakdown

    def frames(*sites):
        return [{"filename": f"/x/site-packages/{f}", "line": ln, "name": n} for f, ln, n in sites]

    attn = frames(("torch/nn/functional.py", 5, "sdpa"), ("mop/ops/attention.py", 42, "causal_attention"))
    moe = frames(("mop/parallel/experts/dispatch.py", 7, "compute"), ("mop/models/moe.py", 99, "forward"))
    gib = 2**30
    events = [
        {"action": "alloc", "addr": 1, "size": 2 * gib, "frames": attn},
        {"action": "alloc", "addr": 2, "size": 3 * gib, "frames": moe},
        {"action": "free_completed", "addr": 1, "size": 2 * gib, "frames": attn},
        {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": attn},
        {"action": "alloc", "addr": 4, "size": 2 * gib, "frames": moe},  # peak: 3 + 1 + 2 = 6 GiB above base
        {"action": "free_completed", "addr": 2, "size": 3 * gib, "frames": moe},
    ]
    report = peak_breakdown(events, base_bytes=10 * gib)
    assert report.startswith("peak allocated 16.00 GiB: 10.00 GiB before the step")
    lines = report.splitlines()[2:]
    assert lines[0].split()[:2] == ["5.000", "2"] and "parallel/experts/dispatch.py:7 compute" in lines[0]
    assert lines[1].split()[:2] == ["1.000", "1"] and "ops/attention.py:42 causal_attention" in lines[1]


def test_worker_exits_without_interpreter_teardown(tmp_path):
    """`python -m mop.train` leaves with os._exit once everything is written: a host-optimizer run's
    teardown (freeing ~100 GB of pinned memory) kept workers alive over a minute after the last step.
    A slow teardown is injected with an atexit handler (sitecustomize); the run must not wait for it,
    and its metrics and checkpoint must be complete."""
    import time

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import atexit, time\natexit.register(lambda: time.sleep(120))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "mop.train", "--model.shape=debug", "--model.vocab_size=258", "--training.steps=2",
           "--training.seq_len=32", "--training.batch_size=2", "--training.device=cpu", "--logging.progress=none",
           "--logging.log_every=1", "--checkpoint.enabled=true", "--data.dataset=synthetic",
           f"--logging.run_dir={tmp_path / 'run'}"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert time.monotonic() - t0 < 100, "the worker waited for interpreter teardown"
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2
    assert (tmp_path / "run" / "checkpoints").is_dir() and any((tmp_path / "run" / "checkpoints").iterdir())


def test_metrics_go_to_every_sink_and_a_missing_package_costs_only_its_sink(tmp_path, monkeypatch, capsys):
    """Sinks behind one interface: W&B (a stand-in module records the calls) gets the same records as
    metrics.jsonl, with the job as its config; without the package, one line and metrics.jsonl still."""
    import types

    from mop.metrics import MetricsLogger

    calls = []

    class Run:
        def log(self, metrics, step):
            calls.append(("log", step, metrics))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLogger(tmp_path / "run", 10, progress="none", wandb_project="proj", config={"lr": 0.1})
    log.log(1, {"loss": 2.0, "lr": 0.1})
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj" and calls[0][1]["config"] == {"lr": 0.1}
    assert calls[1] == ("log", 1, {"loss": 2.0, "lr": 0.1}) and calls[-1] == ("finish",)
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0, "lr": 0.1}

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    log = MetricsLogger(tmp_path / "run2", 10, progress="none", wandb_project="proj")
    log.log(1, {"loss": 1.0, "lr": 0.1})
    log.close()
    assert "wandb is not installed" in capsys.readouterr().out
    assert (tmp_path / "run2" / "metrics.jsonl").read_text().strip()
