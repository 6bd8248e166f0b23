"""One benchmark point on this machine's ranks: `torchrun --nproc-per-node G -m mop.bench.worker ...`.

Builds the `Trainer` (mop) or `baseline_trainer` (FSDP-best) from `--section.key=value` overrides,
optionally skews routing, runs warm-up steps (not timed), then timed steps, and writes one JSON per
rank into --result-dir: `rank{R}.json` with status "ok", "oom" or "error". A rank that hits
`torch.OutOfMemoryError` records it and exits at once, so torchrun tears the others down instead
of letting them wait in a collective.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="mop.bench.worker")
    p.add_argument("--system", choices=("mop", "baseline"), required=True)
    p.add_argument("--result-dir", required=True)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--skew", type=float, default=0.0)
    p.add_argument("--warmup-micro-batches", type=int, default=0,
                   help="micro-batches per warm-up step and per profiled step, at most (0: the step's own "
                        "grad_accum)")
    p.add_argument("--baseline", default=None, help="BaselineConfig as JSON (system=baseline)")
    p.add_argument("--optimizer-ablation", action="store_true",
                   help="also time --steps steps whose optimizer update is skipped: the optimizer's exposed time")
    p.add_argument("--profile", action="store_true",
                   help="after timing, run one more step under torch.profiler and return its summary by op")
    return p.parse_known_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized():
        dist.barrier()


def _timed_steps(trainer, n: int, device: torch.device, outs: list) -> list[float]:
    """Seconds per step in steady state, between step boundaries on the compute stream.

    No sync between steps: an asynchronous optimizer update (HostAdamW.step_async) overlaps the
    next step's forward, and whatever of it that forward waits for lands in the next step's time,
    as in training. One sync before the first step and one after the last.
    """
    from mop.metrics import DeviceClock

    _sync(device)
    clock = DeviceClock(device)
    clock.tick()
    for _ in range(n):
        outs.append(trainer.train_step())
        clock.tick()
    _sync(device)
    return clock.intervals()


class shortened_steps:
    """Within this context, a step runs at most `micro_batches` micro-batches (0: all of them).

    Every choice made before step 1 (layout, activation policies, the optimizer's device share) was
    made for the full step and stays; only the loop is shorter. Used for warm-up steps (the first
    step's one-time costs, kernel selection, the allocator's segments, the optimizer state, do not
    depend on how many micro-batches it runs) and for the profiled step (a trace of 64 micro-batches
    is gigabytes; each micro-batch repeats the same work)."""

    def __init__(self, trainer, micro_batches: int):
        self.t, self.micro_batches = trainer.job.training, micro_batches

    def __enter__(self):
        self.full = self.t.grad_accum
        if self.micro_batches > 0:
            self.t.grad_accum = min(self.full, self.micro_batches)
        return self.t.grad_accum

    def __exit__(self, *exc):
        self.t.grad_accum = self.full


def warmup_steps(trainer, n: int, micro_batches: int = 0) -> None:
    """`n` untimed steps, each with at most `micro_batches` micro-batches (0: all)."""
    with shortened_steps(trainer, micro_batches):
        for _ in range(n):
            trainer.train_step()


def _profiled_step(trainer, result_dir: str, rank: int, device: torch.device, micro_batches: int = 0) -> str:
    """One more, untimed step under torch.profiler: this rank's device time by op, its idle time and
    its blocking host calls (mop.bench.trace). The Chrome trace itself (tens of MB) is not kept.
    With `micro_batches` > 0 the step runs at most that many micro-batches (the summary says so)."""
    from mop.bench.trace import summarize
    from mop.metrics import step_profiler

    _sync(device)
    full = trainer.job.training.grad_accum
    with shortened_steps(trainer, micro_batches) as ran:
        with step_profiler(result_dir, rank, device, enabled=True):
            trainer.train_step()
    path = Path(result_dir) / f"trace_rank{rank}.json"
    trace = json.loads(path.read_text())
    path.unlink()
    head = f"profiled step: {ran} of {full} micro-batches\n" if ran != full else ""
    return head + summarize(trace)


def _describe_policies(model) -> str | None:
    from mop.memory_budget import describe

    policies = getattr(model, "block_policies", None)
    return describe(list(policies)) if policies else None


def _plan_record(plan) -> dict | None:
    """The auto policy's measurements (bytes kept per block by policy, base, verified peak) in GiB."""
    if plan is None:
        return None
    gib = 2**30
    return {"kept_gib": {p: b / gib for p, b in plan.kept_bytes.items() if b != float("inf")},
            "base_gib": None if plan.base_bytes is None else plan.base_bytes / gib,
            "peak_gib": None if plan.peak_bytes is None else plan.peak_bytes / gib, "notes": plan.notes}


def _reduce(values: list[float], op, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()  # host sync: once, after timing


def run(args, overrides: list[str], measured=lambda record: None) -> dict:
    """Build, warm up, time; returns this rank's record (rank 0's is the point's result).

    With --profile, the record is handed to `measured` before the profiled step runs: a point whose
    trace export outlives its timeout still has its measurement (`mop.bench.runner.run_point`)."""
    from mop.bench.skew import apply_skew
    from mop.config import build_config
    from mop.distributed import init_process
    from mop.metrics import device_peak_flops

    job = build_config(None, overrides)
    proc = init_process(job.training.device)
    device = proc.device
    t_build = time.perf_counter()
    if args.system == "baseline":
        from mop.baselines import BaselineConfig, baseline_trainer

        trainer = baseline_trainer(job, BaselineConfig.from_json(args.baseline), proc)
    else:
        from mop.trainer import Trainer

        trainer = Trainer(job, proc)
    build_s = time.perf_counter() - t_build
    biases = []
    if args.skew > 0:
        batch = next(trainer.loader)
        biases = apply_skew(trainer.model, args.skew, batch["tokens"].to(device), batch["positions"].to(device))
    say = print if proc.is_main else (lambda *a, **k: None)
    t0 = time.perf_counter()
    warmup_steps(trainer, args.warmup, args.warmup_micro_batches)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    # Progress as it happens: a point killed at its timeout shows in its output how far it got.
    say(f"mop bench worker: built in {build_s:.1f} s; {args.warmup} warm-up step(s) in {warmup_s:.1f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    outs = []
    step_times = _timed_steps(trainer, args.steps, device, outs)
    say(f"mop bench worker: {args.steps} timed step(s): " + ", ".join(f"{x:.2f}" for x in step_times) + " s",
        flush=True)
    loads = None
    for out in outs:
        loads = out["loads"] if loads is None else loads + out["loads"]
    ablation = {}
    if args.optimizer_ablation:
        # Exposed optimizer time = step time with the update minus step time without it (same
        # process, same warm state). Skipping the update changes no shapes, so nothing else moves.
        opt = trainer.optimizer
        real = {k: getattr(opt, k) for k in ("step", "step_async") if hasattr(opt, k)}
        for k in real:
            setattr(opt, k, lambda *a, **kw: None)
        no_opt = _timed_steps(trainer, args.steps, device, [])
        for k, fn in real.items():
            setattr(opt, k, fn)
        ablation = {"no_opt_times": no_opt}
    imbalance = {}
    if loads is not None and loads.numel():
        if dist.is_initialized():
            dist.all_reduce(loads)
        ratio_L = loads.max(-1).values / loads.mean(-1).clamp(min=1e-9)
        imbalance = {"imbalance_max": float(ratio_L.max()), "imbalance_mean": float(ratio_L.mean())}
    peak_alloc = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peak_reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    no_opt = ablation.pop("no_opt_times", [])
    maxes = _reduce(step_times + [peak_alloc, peak_reserved, rss, build_s] + no_opt, dist.ReduceOp.MAX, device)
    rss_sum = _reduce([rss], dist.ReduceOp.SUM, device)[0]
    n = len(step_times)
    step_s = sum(maxes[:n]) / max(n, 1)  # slowest rank per step
    if no_opt:
        step_no_opt = sum(maxes[n + 4:]) / len(no_opt)
        ablation = {"step_s_no_optimizer": step_no_opt, "optimizer_exposed_s": step_s - step_no_opt,
                    "optimizer_exposed_share": (step_s - step_no_opt) / step_s if step_s > 0 else None}
    tokens = trainer.tokens_per_device_per_step()
    tps = tokens / step_s if step_s > 0 else 0.0
    flops_per_token = job.model.flops_per_token(job.training.seq_len)
    peak = device_peak_flops(device)
    gib = 2**30
    record = {
        "status": "ok",
        "world": proc.world,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tokens_per_device_per_step": tokens,
        "tokens_per_step": tokens * proc.world,
        "step_s": step_s,
        "step_times_s": maxes[:n],
        "tokens_per_s_per_gpu": tps,
        "tflops_per_gpu": tps * flops_per_token / 1e12,
        "mfu": tps * flops_per_token / peak if peak else None,
        "flops_per_token": flops_per_token,
        "peak_alloc_gib": maxes[n] / gib,
        "peak_reserved_gib": maxes[n + 1] / gib,
        "host_rss_peak_gib": maxes[n + 2] / gib,
        "host_rss_total_gib": rss_sum / gib,
        "build_s": maxes[n + 3],
        # Rank 0's start-up by phase (Trainer.startup_s), warm-up and profile seconds: where a point's
        # wall time beyond its steps went.
        "startup_s": dict(getattr(trainer, "startup_s", {})),
        "warmup_s": warmup_s,
        "skew_bias": biases,
        # What mop chose before step 1 (mop.memory_budget): per-block activation policies and the
        # host optimizer's device-resident share.
        "activation_policies": _describe_policies(trainer.model),
        "optimizer_device_fraction": getattr(trainer, "device_fraction", None),
        "activation_plan": _plan_record(getattr(trainer, "activation_plan", None)),
        # What parallel.plan=auto applied on top of the command's options (empty without it): the
        # layout and settings this point really ran (mop.plan.accuracy reads them).
        "plan_overrides": list(getattr(trainer, "plan_overrides", [])),
        **imbalance,
        **ablation,
    }
    if args.profile:
        measured({**record, "profile_pending": True})
        t0 = time.perf_counter()
        record["profile_by_op"] = _profiled_step(trainer, args.result_dir, proc.rank, device, args.warmup_micro_batches)
        record["profile_s"] = time.perf_counter() - t0
        say(f"mop bench worker: profiled step and its summary in {record['profile_s']:.1f} s", flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    """Run one point on this rank, write rank{R}.json, exit with 0 / 3 (OOM) / 4 (error)."""
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    rank = int(os.environ.get("RANK", "0"))
    out_path = Path(args.result_dir) / f"rank{rank}.json"
    try:
        record = run(args, overrides, measured=lambda r: out_path.write_text(json.dumps(r, indent=1)))
        code = 0
    except torch.OutOfMemoryError as e:
        # Where it ran out: the innermost mop frames (an OOM is an expected outcome, the full
        # traceback is noise; these lines say whether it was start-up, a probe or a step).
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "/mop/" in f.filename][-6:]
        where = "".join(f"\n  at {f.filename.split('/mop/')[-1]}:{f.lineno} {f.name}" for f in frames)
        record, code = {"status": "oom", "error": str(e)[-4000:] + where}, 3
    except Exception:  # recorded, so the sweep goes on with the next point
        record, code = {"status": "error", "error": traceback.format_exc()[-8000:]}, 4
    out_path.write_text(json.dumps(record, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    # Exit without interpreter teardown: a failed rank must not wait in a collective the others never
    # join, and process-group teardown after a finished run adds nothing but occasional aborts
    # (gloo threads at exit). The result is already on disk.
    os._exit(code)


if __name__ == "__main__":
    main()
