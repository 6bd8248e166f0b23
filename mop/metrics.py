"""One metrics path: throughput, MFU, memory; console/progress output, JSONL and TensorBoard."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path

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


class MetricsLogger:
    """Writes metrics.jsonl (rank 0), prints a progress bar on a terminal or plain lines otherwise."""

    def __init__(self, run_dir: str | Path, total_steps: int, progress: str = "auto", tensorboard: bool = False,
                 enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.file = None
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.file = self._open_metrics(self.run_dir / "metrics.jsonl", start_step)
        use_bar = progress == "bar" or (progress == "auto" and sys.stderr.isatty())
        self.plain = progress != "none" and not use_bar
        if use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                print("tensorboard is not installed; pip install tensorboard (metrics.jsonl is still written)")

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
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
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

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


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
