"""One metrics path: throughput, MFU, memory; console/progress output and sinks (JSONL, TensorBoard, W&B)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Protocol

import torch

# Dense bf16 peak (TFLOP/s) by device name fragment; MFU is reported only when the peak is known.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                "B200": 2250.0, "GB200": 2450.0}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def host_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak allocated / reserved GiB and allocator retries since the last reset."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    gib = 2**30
    return {
        "mem_peak_alloc_gib": stats.get("allocated_bytes.all.peak", 0) / gib,
        "mem_peak_reserved_gib": stats.get("reserved_bytes.all.peak", 0) / gib,
        "mem_alloc_retries": float(stats.get("num_alloc_retries", 0)),
    }


class DeviceClock:
    """Timestamps on the device's timeline: CUDA events on a GPU (recorded on the current stream, no
    sync until read), the host clock on CPU (where every op has finished when it returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stamps: list = []

    def tick(self) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.stamps.append(ev)
        else:
            self.stamps.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive ticks (waits for the last one on a GPU)."""
        if self.cuda and self.stamps:
            self.stamps[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.stamps, self.stamps[1:])]
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


class Throughput:
    """Tokens/s per device, TFLOP/s and MFU over the interval since the last call."""

    def __init__(self, flops_per_token: float, device: torch.device):
        self.flops_per_token = flops_per_token
        self.peak = device_peak_flops(device)
        self.device = device
        self.t0 = time.perf_counter()
        self.tokens = 0

    def add(self, tokens_this_device: int) -> None:
        self.tokens += tokens_this_device

    def read(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: only on logging steps
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        out = {"tokens_per_s_per_device": tps, "tflops_per_device": tps * self.flops_per_token / 1e12}
        if self.peak:
            out["mfu"] = tps * self.flops_per_token / self.peak
        self.t0, self.tokens = time.perf_counter(), 0
        return out


class MetricsSink(Protocol):
    """Where logged metrics go (rank 0): one record per logging step."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """`RUN_DIR/metrics.jsonl`, one JSON object per logging step (always on; what `mop plot` reads)."""

    def __init__(self, file):
        self.file = file

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    """`RUN_DIR/tb` event files (`logging.tensorboard=true`)."""

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Weights & Biases (`logging.wandb=PROJECT`; the optional `wandb` package, `pip install wandb`).

    The run is named after the run directory, and its config is the whole job, so runs are
    comparable in the W&B UI. W&B's own environment variables (WANDB_MODE=offline, WANDB_API_KEY,
    WANDB_ENTITY) apply as usual.
    """

    def __init__(self, project: str, run_dir: Path, config: dict | None):
        import wandb

        self.run = wandb.init(project=project, name=run_dir.name, dir=str(run_dir), config=config or {})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Rank 0's metrics: to every sink (metrics.jsonl, TensorBoard, W&B), a progress bar on a terminal
    or plain lines otherwise."""

    def __init__(self, run_dir: str | Path, total_steps: int, progress: str = "auto", tensorboard: bool = False,
                 enabled: bool = True, start_step: int = 0, wandb_project: str = "", config: dict | None = None):
        self.enabled = enabled
        self.bar = None
        self.sinks: list[MetricsSink] = []
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.sinks.append(JsonlSink(self._open_metrics(self.run_dir / "metrics.jsonl", start_step)))
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.plain = progress != "none" and not use_bar
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        # Optional sinks: a missing package costs that sink only (metrics.jsonl is always written).
        optional = [("tensorboard", tensorboard, lambda: TensorBoardSink(self.run_dir)),
                    ("wandb", bool(wandb_project), lambda: WandbSink(wandb_project, self.run_dir, config))]
        for package, wanted, make in optional:
            if not wanted:
                continue
            try:
                self.sinks.append(make())
            except ImportError:
                self.message(f"{package} is not installed (pip install {package}); metrics.jsonl is still written")

    @staticmethod
    def _open_metrics(path: Path, start_step: int):
        """A fresh run starts a fresh file; a resumed run keeps the records up to its checkpoint's step
        (records a crashed run wrote after that checkpoint are replaced by the resumed ones)."""
        if start_step == 0 or not path.exists():
            return open(path, "w")
        kept = [line for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        path.write_text("".join(line + "\n" for line in kept))
        return open(path, "a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        for sink in self.sinks:
            sink.log(step, values)
        short = (f"loss {metrics['loss']:.4f} | gnorm {metrics.get('grad_norm', 0):.3f} | lr {metrics['lr']:.2e} | "
                 f"tok/s/dev {metrics.get('tokens_per_s_per_device', 0):,.0f}")
        if "mfu" in metrics:
            short += f" | MFU {100 * metrics['mfu']:.1f}%"
        if "mem_peak_alloc_gib" in metrics:
            short += f" | mem {metrics['mem_peak_alloc_gib']:.1f} GiB"
        if self.bar is not None:
            self.bar.set_postfix_str(short, refresh=False)
        elif self.plain:
            print(f"step {step:>6} | {short} | rss {metrics.get('host_rss_gib', 0):.1f} GiB", flush=True)

    def message(self, text: str) -> None:
        """Print a line (rank 0) without breaking the progress bar: above it on a terminal, plain otherwise."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close()
        self.sinks = []


@contextlib.contextmanager
def step_profiler(run_dir: str, rank: int, device: torch.device, enabled: bool):
    """Profile the enclosed step with torch.profiler when `enabled`.

    Writes `profile_rank{R}.txt` (operators by self device time, or CPU time without a GPU) and a
    Chrome trace `trace_rank{R}.json` into `run_dir`; every rank writes its own, since expert and
    sequence parallelism make ranks differ.
    """
    if not enabled:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        yield
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    out = Path(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / f"profile_rank{rank}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=60))
    prof.export_chrome_trace(str(out / f"trace_rank{rank}.json"))


@contextlib.contextmanager
def memory_snapshot(run_dir: str, rank: int, device: torch.device, enabled: bool):
    """Record every CUDA allocation of the enclosed step; write where the memory was at its peak.

    Writes `memory_rank{R}.pickle` (open it at https://pytorch.org/memory_viz) and
    `memory_rank{R}.txt`: the allocations live at the step's peak, grouped by the innermost mop
    source line that made them, plus what was already allocated before the step (weights,
    gradients, optimizer state). CUDA only; elsewhere a no-op.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    import pickle

    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, device=device)
    try:
        yield
    finally:
        torch.cuda.synchronize(device)
        snap = torch.cuda.memory._snapshot(device)
        torch.cuda.memory._record_memory_history(enabled=None, device=device)
        out = Path(run_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"memory_rank{rank}.pickle", "wb") as f:
            pickle.dump(snap, f)
        trace = snap.get("device_traces", [[]])
        events = trace[device.index or 0] if len(trace) > (device.index or 0) else []
        (out / f"memory_rank{rank}.txt").write_text(peak_breakdown(events, base))


def _site(frames: list[dict]) -> str:
    """The innermost frame in mop's own code (else the innermost Python frame) as 'file:line function'."""
    py = [f for f in frames if f.get("filename", "").endswith(".py")]
    ours = [f for f in py if "/mop/" in f["filename"]]
    f = (ours or py or [{"filename": "?", "line": 0, "name": "?"}])[0]
    name = f["filename"].split("/mop/", 1)[-1] if "/mop/" in f["filename"] else f["filename"].rsplit("/", 1)[-1]
    return f"{name}:{f.get('line', 0)} {f.get('name', '?')}"


def peak_breakdown(events: list[dict], base_bytes: int = 0, top: int = 25) -> str:
    """Text report of the allocations live at the peak of an allocator trace (`_snapshot()['device_traces'][d]`)."""
    live, current, peak, peak_at = {}, base_bytes, base_bytes, -1
    for i, ev in enumerate(events):
        if ev.get("action") == "alloc":
            live[ev["addr"]] = ev
            current += ev["size"]
            if current > peak:
                peak, peak_at = current, i
        elif ev.get("action") == "free_completed" and ev.get("addr") in live:
            current -= live.pop(ev["addr"])["size"]
    at_peak = {}
    for ev in events[:peak_at + 1]:  # replay up to the peak
        if ev.get("action") == "alloc":
            at_peak[ev["addr"]] = ev
        elif ev.get("action") == "free_completed":
            at_peak.pop(ev.get("addr"), None)
    by_site: dict[str, list[int]] = {}
    for ev in at_peak.values():
        entry = by_site.setdefault(_site(ev.get("frames", [])), [0, 0])
        entry[0] += ev["size"]
        entry[1] += 1
    gib = 2**30
    lines = [f"peak allocated {peak / gib:.2f} GiB: {base_bytes / gib:.2f} GiB before the step (weights, gradients, "
             f"optimizer state, caches) + {(peak - base_bytes) / gib:.2f} GiB allocated during it, live at the peak:",
             f"{'GiB':>8} {'blocks':>7}  site (innermost mop frame)"]
    for site, (size, n) in sorted(by_site.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{size / gib:8.3f} {n:7d}  {site}")
    return "\n".join(lines) + "\n"


def describe_phases(phases: dict[str, float]) -> str:
    """"85.2 s (setup 2.1, model 40.3, ...)": the total first, then each phase in the order run."""
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in phases.items() if k != "total")
    total = phases.get("total", sum(phases.values()))
    return f"{total:.1f} s ({parts})"
