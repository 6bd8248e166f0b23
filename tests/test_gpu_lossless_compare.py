"""The verdict of scripts/gpu_lossless.py (bf16 GPU check): a parallel run within the one-GPU
reference's own run-to-run noise passes; one outside it fails."""

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("gpu_lossless", Path(__file__).parents[1] / "scripts" / "gpu_lossless.py")
gpu_lossless = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_lossless)


def _runs(values):
    return [{"step": i + 1, "loss": v, "grad_norm": 1.0 + v / 10} for i, v in enumerate(values)]


def test_within_the_reference_noise_passes_and_outside_fails():
    ref1 = _runs([10.0, 9.0, 8.0, 7.0])
    ref2 = _runs([10.0, 9.02, 8.01, 7.03])  # run-to-run noise up to 0.03
    inside = _runs([10.0, 9.03, 8.04, 6.98])
    rows, ok = gpu_lossless.compare(inside, ref1, ref2)
    assert ok and abs(rows[-1]["loss_noise"] - 0.03) < 1e-9
    _, ok = gpu_lossless.compare(_runs([10.0, 9.0, 8.5, 7.0]), ref1, ref2)  # 0.5 at step 3 > 2 x 0.02
    assert not ok


def test_deterministic_reference_uses_the_floor():
    ref = _runs([10.0, 9.0])
    _, ok = gpu_lossless.compare(_runs([10.0, 9.005]), ref, ref)  # 5e-4 relative: within the 1e-3 floor
    assert ok
    _, ok = gpu_lossless.compare(_runs([10.0, 9.1]), ref, ref)
    assert not ok
