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
