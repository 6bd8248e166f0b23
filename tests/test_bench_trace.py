"""mop.bench.trace: device time by launching op, idle time and blocking host calls of a trace."""

from mop.bench.trace import attribute, summarize


def _trace():
    ev = [
        {"cat": "cpu_op", "name": "MoELayer", "ts": 0, "dur": 100, "tid": 1},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 10, "dur": 5, "tid": 1},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 12, "dur": 1, "tid": 1, "args": {"correlation": 1}},
        {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 20, "dur": 300, "tid": 1, "args": {"correlation": 2}},
        {"cat": "kernel", "name": "gemm", "ts": 100, "dur": 400, "args": {"correlation": 1}},
        # overlapping kernel on another stream, launched by a library (no runtime match)
        {"cat": "kernel", "name": "nccl_allgather", "ts": 300, "dur": 400, "args": {"correlation": 99}},
        # a gap of 300 us, then one more kernel
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 1000, "dur": 100, "args": {"correlation": 3}},
    ]
    return {"traceEvents": ev}


def test_attribute_splits_active_idle_and_charges_launching_ops():
    a = attribute(_trace())
    assert a["span_ms"] == 1.0  # 100 .. 1100 us
    assert a["active_ms"] == 0.7  # [100, 700) and [1000, 1100)
    assert abs(a["idle_ms"] - 0.3) < 1e-12
    assert a["busy_ms"] == 0.9
    assert a["by_op"]["MoELayer > aten::mm"] == 400
    assert a["by_op"]["(library) nccl_allgather"] == 400
    assert a["blocking"]["cudaStreamSynchronize"] == 300


def test_summary_names_idle_time_and_blocking_calls():
    text = summarize(_trace())
    assert "idle 0.3 ms" in text and "can block: cudaStreamSynchronize 0.3 ms" in text
    assert "MoELayer > aten::mm" in text


def test_idle_is_charged_to_what_the_host_ran_meanwhile():
    """The 300 us gap [700, 1000) is split over the launching thread's innermost ops: a planning op,
    the item() inside it and the sync inside that, then a launch; the rest is Python between ops."""
    ev = [
        {"cat": "cpu_op", "name": "Plan", "ts": 650, "dur": 150, "tid": 1},          # 650..800
        {"cat": "cpu_op", "name": "aten::item", "ts": 700, "dur": 50, "tid": 1},     # 700..750 (inside Plan)
        {"cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 710, "dur": 30, "tid": 1,
         "args": {"correlation": 5}},                                                 # 710..740
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 900, "dur": 10, "tid": 1, "args": {"correlation": 3}},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 50, "dur": 5, "tid": 1, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "gemm", "ts": 100, "dur": 600, "args": {"correlation": 1}},
        {"cat": "kernel", "name": "copy", "ts": 1000, "dur": 100, "args": {"correlation": 3}},
        # another thread's ops are not the launching thread's
        {"cat": "cpu_op", "name": "other", "ts": 700, "dur": 300, "tid": 2},
    ]
    a = attribute({"traceEvents": ev})
    idle = a["idle_by_host"]
    assert abs(a["idle_ms"] - 0.3) < 1e-12
    assert idle["Plan > aten::item"] == 10 + 10       # 700..710 and 740..750
    assert idle["Plan > aten::item > cudaStreamSynchronize"] == 30
    assert idle["Plan"] == 50                          # 750..800
    assert idle["cudaLaunchKernel"] == 10              # 900..910
    assert idle["(python between ops)"] == 100 + 90    # 800..900 and 910..1000
    assert sum(idle.values()) == 300
    assert "device idle, by what the launching host thread ran meanwhile" in summarize({"traceEvents": ev})
