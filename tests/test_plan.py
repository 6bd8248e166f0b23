"""The context-independent memory check: exact state bytes per rank, and a clear refusal before allocation."""

import pytest

from mop.config import build_config
from mop.plan import GIB, check_state_fits, state_memory


def _cfg(shape):
    return build_config(None, [f"--model.shape={shape}"]).model


def test_state_bytes_are_exact():
    cfg = _cfg("debug")
    n = cfg.param_counts()["total"]
    mem = state_memory(cfg, 4)
    assert (mem.weights, mem.grads, mem.optimizer_device, mem.optimizer_host) == (n, n, 2 * n, 0.0)  # 4 B each / 4
    off = state_memory(cfg, 4, "gpu_stream", 0.25)
    assert off.optimizer_device == pytest.approx(3 * n * 0.25) and off.optimizer_host == pytest.approx(3 * n * 0.75)


def test_impossible_layout_is_refused_with_numbers_and_hints():
    cfg = _cfg("qwen3-235b-a22b")  # 235B parameters: 16 B/param is 3.5 TB of state
    with pytest.raises(ValueError, match=r"cannot fit on 8 GPU\(s\) of 141 GiB.*offload=gpu_stream.*at least \d+ GPUs"):
        check_state_fits(cfg, 8, 141 * GIB)
    check_state_fits(cfg, 64, 141 * GIB)  # 55 GiB per rank: fits
    check_state_fits(cfg, 32, 141 * GIB, offload="gpu_stream")  # the optimizer state on the host: fits
