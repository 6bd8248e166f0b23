"""`mop plan fit` and the in-step efficiencies: the fit recovers factors from points the model made
itself, deterministically; forward selection keeps only what the points determine; the record
round-trips; `mop plan calibrate` carries the factors over; the host AdamW micro-benchmark runs with
the trainer's threads, not torchrun's OMP_NUM_THREADS=1."""

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from mop.models.shapes import get_shape
from mop.parallel.layout import LayoutSpec
from mop.plan import Calibration, Step, estimate_time
from mop.plan.calibration import EFFICIENCIES
from mop.plan.fit import BOUNDS, FitPoint, fit_calibration, fit_factors, leave_one_out, log_errors, select_terms
from mop.plan.microbench import HBM_FITTED, calibrate, host_adamw_rate, with_base_in_step

H200 = Calibration.load("h200")
RAW = H200.with_efficiencies({t: 1.0 for t in EFFICIENCIES})  # the micro-benchmarks as measured
CFG = get_shape("qwen3-30b-a3b", n_layers=4)
# Layouts whose step times weigh the terms differently: one GPU (no link), Ulysses and experts over
# 2, experts over 8 with an exposed all-to-all, the experts as dense weights over 8, pipelined chunks.
LAYOUTS = ((1, 1, 1, 1, "alltoall"), (2, 2, 2, 2, "alltoall"), (8, 1, 8, 1, "alltoall"), (8, 8, 1, 1, "alltoall"),
           (4, 1, 4, 4, "llep_pipelined"))


def _steps(contexts=(2048, 16384, 131072), policies=("none", "full"), layouts=LAYOUTS) -> list[Step]:
    return [Step(model=CFG, layout=LayoutSpec(W, D, Ep, P), seq_len=S, batch_size=1, policies=pol, dispatcher=disp)
            for W, D, Ep, P, disp in layouts for S in contexts for pol in policies]


def _measured(steps, truth: Calibration, noise=None) -> list[FitPoint]:
    """Points 'measured' by the model itself under `truth`, times exp(noise)."""
    noise = noise or [0.0] * len(steps)
    return [FitPoint(f"p{i} {s.layout} {s.seq_len}", s, 0.0, estimate_time(s, truth).step * math.exp(n))
            for i, (s, n) in enumerate(zip(steps, noise))]


def test_efficiencies_scale_their_terms_and_nothing_else():
    step = _steps(contexts=(32768,), policies=("full",), layouts=LAYOUTS[1:2])[0]
    ref = estimate_time(step, RAW)
    slow = estimate_time(step, RAW.with_efficiencies({"attention": 0.5}))
    assert slow.attention == pytest.approx(2 * ref.attention)
    assert (slow.expert_gemm, slow.dense_gemm, slow.memory_bound) == (ref.expert_gemm, ref.dense_gemm, ref.memory_bound)
    assert RAW.with_efficiencies({"gemm": 0.5}).in_step().gemm_flops == RAW.gemm_flops / 2
    link = RAW.with_efficiencies({"link": 0.5}).in_step()
    assert (link.intra_bw, link.alltoall_bw, link.inter_bw) == (RAW.intra_bw / 2, RAW.alltoall_bw / 2, RAW.inter_bw / 2)
    assert link.in_step() == link  # applied once: the factors are then 1.0
    with pytest.raises(ValueError, match="unknown"):
        RAW.with_efficiencies({"softmax": 0.5})


def test_fit_recovers_known_factors_deterministically():
    truth = {"attention": 0.6, "expert": 0.8, "gemm": 0.9, "memory": 1.1, "link": 0.5}
    points = _measured(_steps(), RAW.with_efficiencies(truth))
    fitted = fit_factors(points, RAW, tuple(EFFICIENCIES))
    for term, factor in truth.items():
        assert fitted[term] == pytest.approx(factor, rel=1e-4), term
    assert fit_factors(points, RAW, tuple(EFFICIENCIES)) == fitted  # bit for bit
    assert np.abs(log_errors(points, RAW.with_efficiencies(fitted))).max() < 1e-6
    # The input's own factors do not matter: the fit starts from the micro-benchmarks.
    assert fit_factors(points, H200.with_efficiencies({"attention": 0.3}), tuple(EFFICIENCIES)) == fitted


def test_factors_stay_in_their_bounds():
    points = _measured(_steps(contexts=(131072,), layouts=LAYOUTS[:1]), RAW.with_efficiencies({"attention": 0.05}))
    assert fit_factors(points, RAW, ("attention",))["attention"] == pytest.approx(BOUNDS[0])


def test_selection_keeps_only_what_the_points_determine():
    steps = _steps(contexts=(2048, 131072), policies=("full",), layouts=LAYOUTS[:4])
    noise = [0.02 * ((i * 7) % 5 - 2) / 2 for i in range(len(steps))]  # +-2%, deterministic
    points = _measured(steps, RAW.with_efficiencies({"attention": 0.6}), noise)
    terms, rounds = select_terms(points, RAW)
    assert terms == ("attention",)
    assert rounds[1]["best"] == "attention" and rounds[1]["joins"] and not rounds[2]["joins"]
    loo = leave_one_out(points, RAW, terms)
    assert np.sqrt(np.mean(loo**2)) < 0.03  # a prediction: each point from the factors fitted without it


def _row(step: Step, measured_s: float, source: str, device: str = "NVIDIA H200") -> dict:
    """The keys of an `accuracy_rows` dict that the fit reads."""
    return dict(source=source, context=step.seq_len, config=f"W{step.layout.world} D{step.layout.seq}",
                step_meas=measured_s, device=device, step=step, device_fraction=0.0)


def test_fit_record_round_trips_and_names_its_points(tmp_path):
    truth = RAW.with_efficiencies({"attention": 0.65})
    steps = _steps(contexts=(2048, 131072), policies=("full",), layouts=LAYOUTS[:3])
    rows = [_row(s, estimate_time(s, truth).step, f"run-{i}") for i, s in enumerate(steps)]
    rows.append(_row(steps[0], 1.0, "other-gpu", device="NVIDIA B200"))
    rows.append(_row(steps[0], 1.0, "2026-11-28-qwen3-30b-a3b-4xh200/x"))  # accuracy.FIT_EXCLUDED
    result = fit_calibration(RAW, rows, terms=("attention",), base="test")
    fit = result.calibration.fit
    assert fit["fitted"] == {"attention": pytest.approx(0.65, abs=1e-4)}
    assert len(fit["points"]) == len(steps) and fit["points"][0].startswith("run-0 2K")
    reasons = list(fit["excluded"])
    assert any("NVIDIA B200" in r for r in reasons) and any("session 1" in r for r in reasons)
    assert fit["in_sample"]["within_15"] == f"{len(steps)} of {len(steps)}" and fit["leave_one_out"]["rms_log"] < 1e-3
    path = result.calibration.save(tmp_path / "fitted.json")
    assert Calibration.load(path) == result.calibration
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("fit", "notes") and not k.endswith("_efficiency")}
    assert Calibration.from_dict(old).efficiencies() == {t: 1.0 for t in EFFICIENCIES}  # files from before
    with pytest.raises(ValueError, match="no measured step"):
        fit_calibration(RAW, rows[-2:-1])


def test_shipped_h200_is_fitted_and_carries_its_record():
    fit = H200.fit
    assert set(fit["fitted"]) and all(BOUNDS[0] <= f <= BOUNDS[1] for f in fit["fitted"].values())
    assert H200.efficiencies()["attention"] == fit["fitted"]["attention"]
    assert int(fit["leave_one_out"]["within_15"].split()[0]) >= 30 and fit["points"]
    assert H200.host_adam_cpu == 2.2e9 and "OMP_NUM_THREADS" in H200.notes["host_adam_cpu"]


def test_calibrate_carries_the_in_step_constants_over(tmp_path):
    measured = dataclasses.replace(RAW, hbm_bw=RAW.hbm_bw / 2, expert_half_rows=700.0, fit={})
    said = []
    cal = with_base_in_step(measured, H200, said.append)
    assert cal.efficiencies() == H200.efficiencies() and cal.expert_half_rows == H200.expert_half_rows
    for name in HBM_FITTED:  # fitted as seconds: the same seconds at the new bandwidth
        assert getattr(cal, name) == pytest.approx(getattr(H200, name) / 2, abs=1e-3)
    assert cal.fit["carried_over"] == "h200" and cal.fit["fitted"] == H200.fit["fitted"]
    assert "carried over from h200" in said[0] and "700" in cal.notes["expert_half_rows"]
    other = with_base_in_step(dataclasses.replace(measured, device_name="NVIDIA B200"), H200, said.append)
    assert other.elementwise_factor == H200.elementwise_factor and "a guess" in said[1]
    # A whole (quick, CPU) calibration keeps its base's factors and says so.
    base = Calibration.load("cpu").with_efficiencies({"attention": 0.7, "link": 0.9}).save(tmp_path / "base.json")
    log = []
    cal, path = calibrate(device="cpu", quick=True, out=tmp_path / "new.json", base=str(base), log=log.append)
    assert Calibration.load(path) == cal and cal.efficiencies()["attention"] == 0.7
    assert any("carried over" in line for line in log)


def test_host_adamw_microbenchmark_uses_the_trainers_threads(monkeypatch):
    from mop.optim import HostAdamW

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun's OMP_NUM_THREADS=1 leaves
    try:
        rate, threads = host_adamw_rate(2**16)
        trainer = HostAdamW([torch.nn.Parameter(torch.zeros(4))], engine="cpu").cpu_threads
    finally:
        torch.set_num_threads(before)
    assert threads == trainer == 4 and rate > 0
