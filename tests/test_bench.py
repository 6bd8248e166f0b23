"""`mop bench` end to end on CPU: debug shape, 2 gloo ranks, mop and the baseline (no timing checks)."""

import json

import pytest

from mop.bench.cli import grad_accum_for, parse_context
from mop.bench.report import COLUMNS


def test_bench_cpu_end_to_end(tmp_path):
    from mop.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--device", "cpu", "--shape", "debug", "--gpus", "2", "--contexts", "64",
            "--warmup", "1", "--steps", "1", "--skew", "0.5", "--out", str(out),
            # Two baseline configs instead of the whole sweep keep the test fast.
            "--baseline-configs", '[{"ep": 2, "compile_loss": false}, {"tp": 2, "compile_loss": false}]']
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    env = results["environment"]
    assert env["command"].startswith("mop bench --device cpu") and env["torch"] and env["cpu_count"] >= 1
    points = {p["system"]: p for p in results["points"]}
    assert set(points) == {"mop", "baseline"}
    for p in points.values():
        assert p["status"] == "ok", p.get("output_tail", p)
        assert p["context"] == 64 and p["batch_setting"] == "paper"
        assert p["tokens_per_s_per_gpu"] > 0 and p["step_s"] > 0 and p["host_rss_peak_gib"] > 0
        assert p["imbalance_max"] >= 1.0
        assert p["mfu"] is None  # no known peak on CPU
    # Skew 0.5: experts 0..top_k-1 get about half of the slots -> clearly imbalanced routing.
    assert points["mop"]["imbalance_max"] > 1.5 and any(b > 0 for b in points["mop"]["skew_bias"])
    sweep = points["baseline"]["sweep"]
    assert [s["status"] for s in sweep] == ["ok", "ok"]
    assert points["baseline"]["tokens_per_s_per_gpu"] == max(s["tokens_per_s_per_gpu"] for s in sweep)
    table = (out / "results.md").read_text()
    header = "| " + " | ".join(COLUMNS) + " |"
    assert header in table and env["git_commit"] in table
    main_table, wall = table.split("## Wall time per point")
    rows = [line for line in main_table.splitlines() if line.startswith("| mop ") or line.startswith("| baseline ")]
    rows += [line for line in wall.split("## Baseline sweeps")[1].splitlines() if line.startswith("| baseline ")]
    assert len(rows) == 2 + 2 and all(line.count("|") == len(COLUMNS) + 1 for line in rows)
    # Each point's wall time beside its start-up phases (where device time went beyond the steps).
    walls = [line for line in wall.split("## Baseline sweeps")[0].splitlines() if line.startswith("| ")][1:]
    assert len(walls) == 2 and all(" s (setup " in line and "model" in line for line in walls)
    for png in ("throughput.png", "memory.png"):
        if (out / png).exists():
            assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_bench_helpers():
    assert [parse_context(c) for c in ("64", "8K", "1M")] == [64, 8192, 2**20]
    with pytest.raises(ValueError, match="--contexts"):
        parse_context("8Q")
    assert grad_accum_for("paper", 8192, 4) == 1
    assert grad_accum_for("1M", 8192, 4) == 32  # 32 x 4 sequence groups x 8K = 2^20
    assert grad_accum_for("1M", 2**21, 1) == 1
    from mop.bench.cli import default_mop_overrides
    from mop.models.shapes import get_shape

    m = get_shape("qwen3-30b-a3b")
    # D = 1 while a sequence fits one rank (no attention all-to-all); Ulysses over G above 64K.
    # Ep = 1 (experts sharded as dense weights) with D = 1 while a layer's experts are small.
    assert default_mop_overrides(m, 2, 8192) == ["--parallel.seq.degree=1", "--parallel.experts.degree=1",
                                                 "--parallel.vocab.degree=2"]
    assert default_mop_overrides(m, 2, 65536)[:2] == ["--parallel.seq.degree=1", "--parallel.experts.degree=1"]
    assert default_mop_overrides(m, 2, 131072)[:2] == ["--parallel.seq.degree=2", "--parallel.experts.degree=1"]
    assert default_mop_overrides(m, 2, 262144)[:2] == ["--parallel.seq.degree=2", "--parallel.experts.degree=2"]
    # Kimi-K2-wide experts (33.8 GB per layer in bf16) are never gathered whole.
    assert default_mop_overrides(get_shape("kimi-k2-slice"), 2, 8192)[1] == "--parallel.experts.degree=2"


def test_sweep_prunes_after_oom():
    from mop.baselines import BaselineConfig
    from mop.bench.sweep import candidate_configs, run_sweep
    from mop.models.shapes import get_shape

    cfgs = candidate_configs(get_shape("qwen3-30b-a3b"), 8192, 4, mode="full", cuda=True)
    assert cfgs and all(c.resolved(4) == c for c in cfgs)
    assert len(set(cfgs)) == len(cfgs) and cfgs[0].activation_checkpoint
    ran = []

    def fake(cfg):  # everything runs out of memory without offload
        ran.append(cfg)
        if cfg.cpu_offload:
            return {"status": "ok", "tokens_per_s_per_gpu": 100.0 * cfg.ep}
        return {"status": "oom", "error": "CUDA out of memory"}

    seen = []  # what a sweep cut short would have saved: the attempts so far, after each one
    best, records = run_sweep(cfgs, fake, log=lambda s: None, on_record=lambda recs: seen.append(len(recs)))
    assert records[0]["status"] == "oom" and any(r["status"] == "skipped" for r in records)
    ran_records = [i + 1 for i, r in enumerate(records) if r["status"] != "skipped"]
    assert seen == ran_records  # once per attempt that ran, with every record up to it
    assert best["config"]["cpu_offload"] and best["tokens_per_s_per_gpu"] == max(
        r["tokens_per_s_per_gpu"] for r in records if r["status"] == "ok")
    assert len(ran) < len(cfgs)  # frugal-first order plus pruning skipped hopeless configs
    with pytest.raises(ValueError, match="offload"):
        run_sweep([BaselineConfig()], fake, offload="sometimes")


def test_bench_optimizer_ablation_reports_exposed_time(tmp_path):
    """--optimizer-ablation: each point also times steps without the update (issue: optimizer share)."""
    from mop.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--device", "cpu", "--shape", "debug", "--gpus", "2", "--contexts", "64", "--systems", "mop",
            "--warmup", "1", "--steps", "2", "--optimizer-ablation", "--out", str(out),
            "--mop-overrides", "--optimizer.offload=cpu --optimizer.device_fraction=0"]
    assert main(argv) == 0
    (point,) = json.loads((out / "results.json").read_text())["points"]
    assert point["status"] == "ok", point.get("output_tail", point)
    assert point["step_s_no_optimizer"] > 0
    assert abs(point["step_s"] - point["step_s_no_optimizer"] - point["optimizer_exposed_s"]) < 1e-9
    assert "## Optimizer exposed time" in (out / "results.md").read_text()


def test_sigterm_to_bench_kills_the_point_in_flight(tmp_path):
    """`timeout mop bench ...` must not orphan the point's workers (they run in their own session):
    orphans kept the GPUs and the run directory's lock, failing the next run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mop.cli", "bench", "--device", "cpu", "--shape", "debug", "--gpus", "2",
           "--contexts", "64", "--warmup", "1", "--steps", "100000", "--systems", "mop", "--out", str(out)]
    bench = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workers():
        found = []
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"mop.bench.worker" in args and any(str(out).encode() in a for a in args):
                found.append(int(pid))
        return found

    try:
        deadline = time.time() + 120
        while time.time() < deadline and not workers():
            time.sleep(0.5)
        assert workers(), "the point's workers never started"
        bench.send_signal(signal.SIGTERM)
        bench.wait(timeout=60)
        deadline = time.time() + 10  # killed at once with the fix; orphans live on for minutes
        while time.time() < deadline and workers():
            time.sleep(0.5)
        assert not workers(), "workers outlived a SIGTERM'd mop bench"
    finally:
        bench.kill()
        for pid in workers():
            os.kill(pid, signal.SIGKILL)


def test_sweep_orders_selective_between_full_and_no_checkpointing():
    from mop.bench.sweep import _at_least_as_frugal, candidate_configs
    from mop.models.shapes import get_shape

    cfgs = [c for c in candidate_configs(get_shape("qwen3-30b-a3b"), 8192, 2, mode="full", cuda=True)
            if (c.tp, c.cp, c.ep) == (1, 1, 2)]
    # The chunked loss (no N x V logits) comes first, with full AC: the most frugal of all.
    assert [c.label.split()[-1] for c in cfgs] == ["cce", "ac", "sac", "tp1"]  # then full AC, selective, none
    cce, full, sel, none = cfgs
    assert _at_least_as_frugal(cce, full) and not _at_least_as_frugal(full, cce)
    assert _at_least_as_frugal(full, sel) and _at_least_as_frugal(sel, none) and not _at_least_as_frugal(none, sel)


def test_warmup_micro_batches_shortens_only_the_warmup(tmp_path):
    """--warmup-micro-batches: a warm-up step runs at most K micro-batches; the timed step runs all of
    them (tokens per step unchanged), and the trainer's grad_accum is restored even if a step fails."""
    from mop.bench.runner import worker_command
    from mop.bench.worker import warmup_steps

    class FakeTrainer:
        def __init__(self, accum):
            from types import SimpleNamespace
            self.job = SimpleNamespace(training=SimpleNamespace(grad_accum=accum))
            self.seen = []

        def train_step(self):
            self.seen.append(self.job.training.grad_accum)
            if len(self.seen) == 3:
                raise RuntimeError("boom")

    tr = FakeTrainer(64)
    warmup_steps(tr, 2, 2)
    assert tr.seen == [2, 2] and tr.job.training.grad_accum == 64
    with pytest.raises(RuntimeError):
        warmup_steps(tr, 1, 2)
    assert tr.job.training.grad_accum == 64
    tr = FakeTrainer(1)
    warmup_steps(tr, 1, 4)  # never more than the step's own count
    warmup_steps(FakeTrainer(8), 1, 0)
    assert tr.seen == [1]
    assert "--warmup-micro-batches" in worker_command("mop", 2, "/r", [], 1, 1, 0.0, warmup_micro_batches=2)
    assert "--warmup-micro-batches" not in worker_command("mop", 2, "/r", [], 1, 1, 0.0)

    from mop.cli import main

    out = tmp_path / "bench"
    argv = ["bench", "--device", "cpu", "--shape", "debug", "--gpus", "2", "--contexts", "64", "--systems", "mop",
            "--batch-setting", "1M", "--warmup", "1", "--steps", "1", "--warmup-micro-batches", "1", "--profile",
            "--layers", "1", "--out", str(out)]
    # 2^20 tokens of 64-token sequences over 2 ranks would be 8192 micro-batches: too many for a CPU
    # test. The point is what the worker was asked to run, and that it ran.
    import mop.bench.cli as cli
    old = cli.ONE_M
    cli.ONE_M = 64 * 2 * 3  # 3 micro-batches per step
    try:
        assert main(argv) == 0
    finally:
        cli.ONE_M = old
    (point,) = json.loads((out / "results.json").read_text())["points"]
    assert point["status"] == "ok", point.get("output_tail", point)
    assert point["tokens_per_device_per_step"] == 3 * 64
    assert "--warmup-micro-batches 1" in " ".join(map(str, point["command"])) if isinstance(
        point["command"], list) else "--warmup-micro-batches 1" in point["command"]
    assert "at most 1 micro-batches each" in (out / "results.md").read_text()
    # The profiled step is shortened the same way, and says so.
    assert (out / point["profile"]).read_text().startswith("profiled step: 1 of 3 micro-batches")


def test_kill_point_takes_workers_in_their_own_sessions(tmp_path):
    """torchrun starts each worker with start_new_session: killing torchrun's group left a worker busy
    in a long step alive, holding its GPU (session 6). kill_point kills the whole tree and waits."""
    import subprocess
    import sys

    from mop.bench.runner import _running, descendants, kill_point

    pid_file = tmp_path / "grandchild.pid"
    # A stand-in for torchrun: starts a "worker" in a new session that sleeps without output.
    launcher = ("import subprocess, sys, time\n"
                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], start_new_session=True,"
                " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
                "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher], start_new_session=True)
    try:
        import time
        deadline = time.time() + 30
        while time.time() < deadline and not (pid_file.exists() and pid_file.read_text()):
            time.sleep(0.1)
        worker = int(pid_file.read_text())
        assert worker in descendants(proc.pid) and _running(worker)
        kill_point(proc, wait_s=10)
        assert proc.returncode is not None and not _running(worker)
    finally:
        proc.kill()
        if pid_file.exists() and pid_file.read_text():
            import os
            import signal
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_bench_records_what_the_plan_chose(tmp_path):
    """--mop-layout plan: the point records the overrides parallel.plan=auto applied, its label shows
    them (not only the rule's layout they replaced), and mop plan accuracy predicts what ran."""
    from mop.cli import main
    from mop.plan.accuracy import _points

    out = tmp_path / "bench"
    argv = ["bench", "--device", "cpu", "--shape", "debug", "--gpus", "2", "--contexts", "64", "--systems", "mop",
            "--warmup", "1", "--steps", "1", "--mop-layout", "plan", "--out", str(out)]
    assert main(argv) == 0
    (point,) = json.loads((out / "results.json").read_text())["points"]
    assert point["status"] == "ok", point.get("output_tail", point)
    chosen = point["plan_overrides"]
    assert chosen and all(o.startswith("--") for o in chosen) and "--parallel.plan=none" not in chosen
    assert any(o.startswith("--parallel.seq.degree=") for o in chosen)
    assert "-> plan: " + " ".join(chosen) in point["label"]
    (measured,) = list(p for p in _points([out / "results.json"]) if p["label"] != "" and p["step_s"])
    assert "--parallel.plan=auto" not in measured["opts"] and measured["opts"][-len(chosen):] == chosen


def test_a_point_killed_while_profiling_keeps_its_measurement(tmp_path, monkeypatch):
    """Session 7 lost an 8K x 2^20 point: its timed step had run, then the profiled step's trace
    export outlived the 240 s timeout and the point was recorded as a timeout. The worker now hands
    its record over before profiling, and the runner keeps it when the profile never finishes."""
    from mop.bench import worker
    from mop.bench.runner import point_record

    args, overrides = worker.parse_args([
        "--system", "mop", "--result-dir", str(tmp_path), "--warmup", "1", "--steps", "1", "--profile",
        "--model.shape=debug", "--model.n_layers=1", "--training.seq_len=64", "--training.steps=3",
        "--training.device=cpu", "--logging.progress=none", f"--logging.run_dir={tmp_path}/run",
        "--checkpoint.enabled=false", "--data.dataset=synthetic"])
    seen = []

    def killed(*a, **k):
        assert seen, "the measurement must be handed over before the profiled step"
        raise TimeoutError("killed while profiling")

    monkeypatch.setattr(worker, "_profiled_step", killed)
    with pytest.raises(TimeoutError):
        worker.run(args, overrides, measured=seen.append)
    (rec,) = seen
    assert rec["status"] == "ok" and rec["profile_pending"] and rec["step_s"] > 0
    # Where the start-up went, by phase (Trainer.startup_s), and the warm-up's seconds.
    assert {"setup", "model", "memory_plan", "optimizer", "total"} <= set(rec["startup_s"])
    assert rec["startup_s"]["total"] >= rec["startup_s"]["model"] > 0 and rec["warmup_s"] > 0

    kept = point_record({0: rec, 1: dict(rec)}, timed_out=True, returncode=-9, timeout=240)
    assert kept["status"] == "ok" and kept["step_s"] == rec["step_s"] and "profile_pending" not in kept
    assert "240 s timeout while profiling" in kept["profile_by_op"]
    # Without a measurement a timeout stays a timeout; a finished point is taken as written.
    assert point_record({}, timed_out=True, returncode=-9, timeout=240)["status"] == "timeout"
    done = {k: v for k, v in rec.items() if k != "profile_pending"}
    assert point_record({0: done, 1: done}, timed_out=False, returncode=0, timeout=240) is done
    oom = {"status": "oom", "error": "x"}
    assert point_record({0: rec, 1: oom}, timed_out=True, returncode=3, timeout=240)["status"] == "oom"


def test_startup_phases_read_in_order():
    from mop.metrics import describe_phases

    text = describe_phases({"plan": 1.0, "setup": 0.5, "model": 40.25, "memory_plan": 20.0, "total": 61.75})
    assert text == "61.8 s (plan 1.0, setup 0.5, model 40.2, memory plan 20.0)"


def test_block_bench_compares_kernel_modes(tmp_path):
    """mop.bench.block times one block under each elementwise kernels mode and says how far each is
    from the first (fp32 on CPU: the same arithmetic, so within rounding)."""
    from mop.bench.block import main

    out = tmp_path / "block.json"
    main(["--shape", "debug", "--tokens", "64", "--kernels", "eager,fused", "--policies", "none,full",
          "--iters", "1", "--device", "cpu", "--out", str(out)])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["policy"], r["kernels"]) for r in rows] == [("none", "eager"), ("none", "fused"),
                                                           ("full", "eager"), ("full", "fused")]
    assert all(r["ms"] > 0 and r["diff_y"] < 1e-5 and r["diff_dx"] < 1e-5 for r in rows)
    assert "| debug | 64 | full | fused |" in out.with_suffix(".md").read_text()
