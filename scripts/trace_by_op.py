"""Device time of a torch.profiler Chrome trace, attributed to the CPU op stack that launched it.

    python scripts/trace_by_op.py runs/x/trace_rank0.json[.gz] [--top 40]

`logging.profile_step=N` writes such a trace. Each kernel / memcpy / memset is matched to its
launching runtime call (by correlation id) and charged to the chain of CPU ops enclosing that call
(e.g. "MoELayerFunctionBackward > aten::index_add_"), which key_averages() cannot show. Kernels
without a CPU-side match (cuBLAS/cuDNN launched from inside other libraries) are listed by name.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json


def attribute(trace: dict) -> tuple[collections.Counter, float, float]:
    events = trace["traceEvents"]
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: (e["ts"], -e["dur"]))
    by_thread = collections.defaultdict(list)
    for e in cpu_ops:
        by_thread[e["tid"]].append(e)
    runtime = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"}
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    totals: collections.Counter = collections.Counter()
    for k in kernels:
        launch = runtime.get(k["args"].get("correlation"))
        if launch is None:
            key = f"(library) {k['name'][:60]}"
        else:
            stack = [e["name"] for e in by_thread[launch["tid"]] if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
            key = " > ".join(stack)[-160:] or "(no cpu op)"
        totals[key] += k["dur"]
    busy = sum(k["dur"] for k in kernels) / 1e3
    span = (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) / 1e3 if kernels else 0.0
    return totals, busy, span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        totals, busy, span = attribute(json.load(f))
    print(f"device busy {busy:.1f} ms (kernels summed; streams may overlap) over a span of {span:.1f} ms")
    for key, us in totals.most_common(args.top):
        print(f"{us / 1e3:9.1f} ms  {key}")


if __name__ == "__main__":
    main()
