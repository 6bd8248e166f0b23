"""Compare two `mop train` runs step by step from their metrics.jsonl files (not in CI's path).

    python scripts/compare_runs.py runA/metrics.jsonl runB/metrics.jsonl

Prints, per step, both losses and gradient norms and their differences, then the maxima and each
run's throughput and peak memory over its last two steps. A missing or empty file is reported and
the comparison skipped (exit 1), so a device script goes on to its next run.
"""

from __future__ import annotations

import json
import sys


def load(path: str) -> list[dict]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except OSError as e:
        print(f"{path}: {e.strerror}")
        return []


def compare(a: list[dict], b: list[dict]) -> dict:
    steps = min(len(a), len(b))
    loss = [abs(a[i]["loss"] - b[i]["loss"]) for i in range(steps)]
    gnorm = [abs(a[i].get("grad_norm", 0.0) - b[i].get("grad_norm", 0.0)) for i in range(steps)]
    return {"steps": steps, "max_loss_diff": max(loss, default=float("nan")),
            "max_grad_norm_diff": max(gnorm, default=float("nan"))}


def main(argv: list[str]) -> int:
    a, b = load(argv[0]), load(argv[1])
    if not a or not b:
        print("nothing to compare")
        return 1
    for i, (x, y) in enumerate(zip(a, b)):
        print(f"step {i + 1}: loss {x['loss']:.5f} {y['loss']:.5f} (diff {abs(x['loss'] - y['loss']):.2e})  "
              f"gnorm {x.get('grad_norm', 0):.4f} {y.get('grad_norm', 0):.4f}")
    for name, run in (("A", a), ("B", b)):
        tail = run[-2:]
        print(f"{name}: tok/s/dev {sum(r.get('tokens_per_s_per_device', 0) for r in tail) / len(tail):,.0f}, "
              f"peak alloc {max(r.get('mem_peak_alloc_gib', 0) for r in run):.1f} GiB")
    print(json.dumps(compare(a, b)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
