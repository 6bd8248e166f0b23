"""Where a profiled step's device time went: a torch.profiler Chrome trace, summarised.

Each kernel / memcpy / memset is matched to its launching runtime call (by correlation id) and charged
to the chain of CPU ops enclosing that call (e.g. "MoELayerFunctionBackward > aten::index_add_"),
which `key_averages()` cannot show. Kernels launched from inside other libraries (cuBLAS, cuDNN,
NCCL's own streams) are listed by name. Beside the attribution, the summary says how long the device
sat idle within the step (the span minus the union of all kernel intervals: launch-bound or
host-synchronised time) and which runtime calls blocked the host (stream / event / device
synchronisations and synchronous copies): at short context these, not the kernels, set the pace.
"""

from __future__ import annotations

import collections

# Runtime calls that can make the host wait for the device (the launch queue drains behind them):
# the synchronisations, and copies (an async copy blocks too when its host side is pageable).
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                  "cudaMemcpyAsync")


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total / 1e3


def attribute(trace: dict) -> dict:
    """{"by_op": Counter(key -> us), "busy_ms", "span_ms", "active_ms", "idle_ms", "blocking": Counter}."""
    events = trace["traceEvents"]
    cpu_ops = sorted((e for e in events if e.get("cat") == "cpu_op"), key=lambda e: (e["ts"], -e["dur"]))
    by_thread = collections.defaultdict(list)
    for e in cpu_ops:
        by_thread[e["tid"]].append(e)
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    by_corr = {e["args"].get("correlation"): e for e in runtime}
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    totals: collections.Counter = collections.Counter()
    for k in kernels:
        launch = by_corr.get(k["args"].get("correlation"))
        if launch is None:
            key = f"(library) {k['name'][:60]}"
        else:
            stack = [e["name"] for e in by_thread[launch["tid"]] if e["ts"] <= launch["ts"] <= e["ts"] + e["dur"]]
            key = " > ".join(stack)[-160:] or "(no cpu op)"
        totals[key] += k["dur"]
    blocking: collections.Counter = collections.Counter()
    for e in runtime:
        if e["name"] in BLOCKING_CALLS:
            blocking[e["name"]] += e["dur"]
    busy = sum(k["dur"] for k in kernels) / 1e3
    span = (max(k["ts"] + k["dur"] for k in kernels) - min(k["ts"] for k in kernels)) / 1e3 if kernels else 0.0
    active = _union_ms([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    return {"by_op": totals, "busy_ms": busy, "span_ms": span, "active_ms": active, "idle_ms": span - active,
            "blocking": blocking}


def summarize(trace: dict, top: int = 40) -> str:
    a = attribute(trace)
    lines = [f"device span {a['span_ms']:.1f} ms: active {a['active_ms']:.1f} ms (any kernel running), "
             f"idle {a['idle_ms']:.1f} ms; kernels summed over streams {a['busy_ms']:.1f} ms",
             "host time in runtime calls that can block: " + (", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in a["blocking"].most_common())
                                    or "nothing"),
             ""]
    lines += [f"{us / 1e3:9.1f} ms  {key}" for key, us in a["by_op"].most_common(top)]
    return "\n".join(lines) + "\n"
