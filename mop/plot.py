"""`mop plot RUN_DIR`: PNG plots of loss and throughput from RUN_DIR/metrics.jsonl.

Writes RUN_DIR/loss.png (loss and, when logged, aux loss against step) and RUN_DIR/throughput.png
(tokens/s per device and, on GPUs with a known peak, MFU against step). Needs matplotlib.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file (one JSON object per line); ValueError on a malformed line."""
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not a JSON line ({e})") from None
    return records


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write loss.png and throughput.png for `run_dir`; returns the paths written."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; RUN_DIR must be a `mop train` run directory "
                                f"(--logging.run_dir)")
    records = [r for r in read_metrics(path) if "step" in r]
    if not records:
        raise ValueError(f"{path} has no metric records")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("mop plot needs matplotlib: pip install matplotlib") from None
    out_dir = Path(out_dir) if out_dir else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    panels = [("loss", [("loss", "loss"), ("aux_loss", "aux loss")], "loss"),
              ("throughput", [("tokens_per_s_per_device", "tokens/s per device")], "tokens/s per device")]
    for name, series, ylabel in panels:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, label in series:
            pts = [(r["step"], r[key]) for r in records if key in r]
            if pts and not (key == "aux_loss" and all(v == 0 for _, v in pts)):
                ax.plot(*zip(*pts), label=label)
        if name == "throughput":
            mfu = [(r["step"], 100 * r["mfu"]) for r in records if "mfu" in r]
            if mfu:
                ax2 = ax.twinx()
                ax2.plot(*zip(*mfu), color="tab:red", alpha=0.6, label="MFU %")
                ax2.set_ylabel("MFU %")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
        ax.set_title(f"{run_dir.name}: {name}")
        fig.tight_layout()
        out = out_dir / f"{name}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main(argv: list[str]) -> int:
    """Entry point of `mop plot RUN_DIR [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="mop plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory containing metrics.jsonl")
    parser.add_argument("--out", default=None, help="where to write the PNGs (default: RUN_DIR)")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"mop plot: {e}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
