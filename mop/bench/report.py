"""Benchmark provenance (command, commit, torch, hardware), the Markdown table and the PNG plots."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from mop.bench.runner import REPO_ROOT

FORMULA = ("FLOPs/token = 6 x (active params - embedding table) + 6 x n_layers x seq_len x n_heads x head_dim "
           "(matmuls fwd+bwd; attention QK^T and AV with causal halving); recomputation not counted. "
           "MFU = tokens/s/GPU x FLOPs/token / peak (H200/H100: 989 TFLOP/s dense bf16).")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _host_ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def code_digest() -> str:
    """SHA-256 (12 hex) of the mop package's Python sources: identifies the code that ran even where the
    checkout's git metadata is stale (a copied working tree), and matches `git`'s tree at any commit."""
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def environment(command: str) -> dict:
    """Everything needed to reproduce and interpret a result file."""
    gpus = []
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "command": command,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "code_sha256": code_digest(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_names": gpus,
        "gpu_count": len(gpus),
        "cpu_count": os.cpu_count(),
        "host_ram_gib": round(_host_ram_gib(), 1),
        "hostname": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _context_label(n: int) -> str:
    if n % 2**20 == 0:
        return f"{n // 2**20}M"
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


COLUMNS = ["system", "config", "context", "batch", "tokens/step", "tokens/s/GPU", "TFLOP/s/GPU", "MFU", "step s",
           "peak alloc GiB", "peak reserved GiB", "host GiB", "imbalance", "status"]


def row(point: dict) -> list[str]:
    mfu = point.get("mfu")
    return [point["system"], point.get("label", ""), _context_label(point["context"]), point["batch_setting"],
            _fmt(point.get("tokens_per_step"), ","), _fmt(point.get("tokens_per_s_per_gpu"), ",.0f"),
            _fmt(point.get("tflops_per_gpu"), ".1f"), "-" if mfu is None else f"{100 * mfu:.1f}%",
            _fmt(point.get("step_s"), ".3f"), _fmt(point.get("peak_alloc_gib"), ".1f"),
            _fmt(point.get("peak_reserved_gib"), ".1f"), _fmt(point.get("host_rss_total_gib"), ".1f"),
            _fmt(point.get("imbalance_max"), ".2f"), point["status"]]


def _table(points: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(p)) + " |" for p in points]
    return lines


def markdown(results: dict) -> str:
    """results.md: provenance, the main table (mop and the baseline's best), then every sweep attempt."""
    env, args = results["environment"], results["args"]
    gpu = f"{env['gpu_count']} x {env['gpu_names'][0]}" if env["gpu_names"] else "no GPU (CPU workers, gloo)"
    lines = [f"# mop bench: {args['shape']} on {args['gpus']} ranks", "",
             f"- command: `{env['command']}`",
             f"- git commit: `{env['git_commit']}`{' (dirty tree)' if env['git_dirty'] else ''}, mop sources "
             f"sha256 `{env.get('code_sha256', '-')}`; torch {env['torch']}"
             f" (CUDA {env['cuda']})",
             f"- hardware: {gpu}; {env['cpu_count']} CPUs; {env['host_ram_gib']} GiB host RAM; host {env['hostname']}",
             f"- model: {args['shape']}" + (f" with {args['layers']} layers" if args.get("layers") else "")
             + f"; skew {args['skew']}; {args['warmup']} warm-up steps (excluded"
             + (f", at most {args['warmup_micro_batches']} micro-batches each" if args.get("warmup_micro_batches") else "")
             + f"), {args['steps']} timed steps",
             f"- {FORMULA}",
             "- batch: `paper` = one sequence per sequence-parallel group per step, no accumulation; "
             "`1M` = 2^20 tokens per optimizer step by gradient accumulation (one sequence per group above 2^20).",
             "- memory columns: max over ranks of torch.cuda.max_memory_allocated / max_memory_reserved over the "
             "timed steps; host GiB = peak RSS summed over the ranks; imbalance = max/mean tokens per expert "
             "(worst layer, summed over ranks and timed steps).",
             "", "## Results (baseline: best configuration of its sweep)", ""]
    lines += _table(results["points"])
    ablated = [p for p in results["points"] if p.get("optimizer_exposed_s") is not None]
    if ablated:
        lines += ["", "## Optimizer exposed time (step time minus step time without the update)", "",
                  "| system | config | context | batch | step s | step s without update | exposed s | share |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in ablated:
            lines.append(f"| {p['system']} | {p.get('label', '')} | {_context_label(p['context'])} | "
                         f"{p['batch_setting']} | {p['step_s']:.3f} | {p['step_s_no_optimizer']:.3f} | "
                         f"{p['optimizer_exposed_s']:.3f} | {100 * p['optimizer_exposed_share']:.1f}% |")
    timed = [p for p in results["points"] if p.get("startup_s")]
    if timed:
        from mop.metrics import describe_phases

        # What each point cost beyond its timed steps: device time is budgeted per point.
        lines += ["", "## Wall time per point (rank 0's start-up by phase, warm-up, profile)", "",
                  "| system | context | batch | wall s | start-up s | warm-up s | profile s |", "|---|---|---|---|---|---|---|"]
        for p in timed:
            lines.append(f"| {p['system']} | {_context_label(p['context'])} | {p['batch_setting']} | "
                         f"{_fmt(p.get('wall_s'), '.0f')} | {describe_phases(p['startup_s'])} | "
                         f"{_fmt(p.get('warmup_s'), '.1f')} | {_fmt(p.get('profile_s'), '.1f')} |")
    sweeps = [p for p in results["points"] if p.get("sweep")]
    if sweeps:
        lines += ["", "## Baseline sweeps (every attempt)", ""]
        for p in sweeps:
            lines += [f"### {_context_label(p['context'])}, batch {p['batch_setting']}", ""]
            attempts = [{**a, "system": "baseline", "context": p["context"], "batch_setting": p["batch_setting"]}
                        for a in p["sweep"]]
            lines += _table(attempts) + [""]
    return "\n".join(lines) + "\n"


def plots(results: dict, out_dir: Path) -> list[Path]:
    """throughput.png and memory.png (against context, one line per system and batch setting)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("mop bench: matplotlib is not installed (pip install matplotlib); skipping PNG plots")
        return []
    env = results["environment"]
    caption = f"{env['command']}\ncommit {env['git_commit'][:12]}, torch {env['torch']}, " + \
              (f"{env['gpu_count']}x {env['gpu_names'][0]}" if env["gpu_names"] else "CPU")
    series: dict[tuple[str, str], list[dict]] = {}
    for p in results["points"]:
        series.setdefault((p["system"], p["batch_setting"]), []).append(p)
    written = []
    for name, key, ylabel in (("throughput", "tokens_per_s_per_gpu", "tokens/s/GPU"),
                              ("memory", "peak_reserved_gib", "peak reserved GiB per GPU")):
        fig, ax = plt.subplots(figsize=(8, 5))
        for (system, batch), pts in sorted(series.items()):
            pts = sorted(pts, key=lambda p: p["context"])
            ok = [p for p in pts if p["status"] == "ok"]
            line = ax.plot([p["context"] for p in ok], [p.get(key) or 0 for p in ok], marker="o",
                           label=f"{system} ({batch})")[0]
            failed = [p["context"] for p in pts if p["status"] != "ok"]
            if failed:
                ax.plot(failed, [0] * len(failed), "x", color=line.get_color(), markersize=10)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens per sequence); x = OOM / failed")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
        fig.text(0.01, 0.005, caption, fontsize=6, va="bottom")
        fig.tight_layout(rect=(0, 0.06, 1, 1))
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
