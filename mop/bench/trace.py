"""Where a profiled step's device time went: a torch.profiler Chrome trace, summarised.

Each kernel / memcpy / memset is matched to its launching runtime call (by correlation id) and charged
to the chain of CPU ops enclosing that call (e.g. "MoELayerFunctionBackward > aten::index_add_"),
which `key_averages()` cannot show. Kernels launched from inside other libraries (cuBLAS, cuDNN,
NCCL's own streams) are listed by name. Beside the attribution, the summary says how long the device
sat idle within the step (the span minus the union of all kernel intervals: launch-bound or
host-synchronised time) and which runtime calls blocked the host (stream / event / device
synchronisations and synchronous copies): at short context these, not the kernels, set the pace.
The idle time is itself attributed: to what the launching host thread was doing while the device
had nothing to run (its innermost ops then), which names the host work a short-context step waits on.
"""

from __future__ import annotations

import collections

# Runtime calls that can make the host wait for the device (the launch queue drains behind them):
# the synchronisations, and copies (an async copy blocks too when its host side is pageable).
BLOCKING_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                  "cudaMemcpyAsync")


def _merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of [start, end) intervals given in microseconds."""
    return sum(e - s for s, e in _merged(intervals)) / 1e3


def _host_segments(events: list[dict], depth: int = 3) -> list[tuple[float, float, str]]:
    """One thread's time cut into segments, each labelled by its innermost `depth` ops ("" outside any op)."""
    segs: list[tuple[float, float, str]] = []
    stack: list[tuple[float, str]] = []  # (end, name), innermost last
    cur = None

    def emit(a: float, b: float) -> None:
        if b > a:
            segs.append((a, b, " > ".join(n for _, n in stack[-depth:])))

    def advance(to: float) -> None:
        nonlocal cur
        while stack and stack[-1][0] <= to:
            emit(cur, stack[-1][0])
            cur = stack[-1][0]
            stack.pop()
        if cur is not None:
            emit(cur, to)
        cur = to

    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        advance(e["ts"])
        stack.append((e["ts"] + e["dur"], e["name"]))
    advance(float("inf") if not stack else max(end for end, _ in stack))
    return segs


def idle_by_host_activity(trace: dict, depth: int = 3) -> collections.Counter:
    """Device idle time (us) charged to what the launching host thread ran meanwhile.

    The launching thread is the one that issued the most kernel launches. Each gap between the
    device's busy intervals (union over streams) is split over that thread's innermost ops (and
    runtime calls: a gap spent in cudaStreamSynchronize is the device draining its queue, then
    waiting for the host); time outside any recorded op is "(python between ops)".
    """
    events = trace["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    runtime = [e for e in events if e.get("cat") == "cuda_runtime"]
    if not kernels or not runtime:
        return collections.Counter()
    launches = collections.Counter(e["tid"] for e in runtime)
    tid = launches.most_common(1)[0][0]
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime") and e.get("tid") == tid]
    busy = _merged([(k["ts"], k["ts"] + k["dur"]) for k in kernels])
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] > a[1]]
    segs = _host_segments(host, depth)
    out: collections.Counter = collections.Counter()
    i = 0
    for g0, g1 in gaps:
        while i < len(segs) and segs[i][1] <= g0:
            i += 1
        covered, j = 0.0, i
        while j < len(segs) and segs[j][0] < g1:
            a, b = max(segs[j][0], g0), min(segs[j][1], g1)
            if b > a:
                out[segs[j][2] or "(python between ops)"] += b - a
                covered += b - a
            j += 1
        if g1 - g0 > covered:
            out["(python between ops)"] += g1 - g0 - covered
    return out


def attribute(trace: dict) -> dict:
    """{"by_op": Counter(key -> us), "busy_ms", "span_ms", "active_ms", "idle_ms", "blocking": Counter,
    "idle_by_host": Counter(host activity -> us of device idle)}."""
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
            "blocking": blocking, "idle_by_host": idle_by_host_activity(trace)}


def summarize(trace: dict, top: int = 40) -> str:
    a = attribute(trace)
    lines = [f"device span {a['span_ms']:.1f} ms: active {a['active_ms']:.1f} ms (any kernel running), "
             f"idle {a['idle_ms']:.1f} ms; kernels summed over streams {a['busy_ms']:.1f} ms",
             "host time in runtime calls that can block: " + (", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in a["blocking"].most_common())
                                    or "nothing"),
             ""]
    lines += [f"{us / 1e3:9.1f} ms  {key}" for key, us in a["by_op"].most_common(top)]
    if a["idle_by_host"]:
        lines += ["", "device idle, by what the launching host thread ran meanwhile (innermost ops):"]
        lines += [f"{us / 1e3:9.1f} ms  {key}" for key, us in a["idle_by_host"].most_common(top // 2)]
    return "\n".join(lines) + "\n"
