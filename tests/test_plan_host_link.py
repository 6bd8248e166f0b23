"""The host link of a node's GPUs: a total measured with N GPUs copying at once holds for nodes of
up to N GPUs; a larger node's is assumed (one link per GPU at the one-GPU rate), under a ceiling
the user can give (`mop plan --host-link-node-bw`). CPU only, no GPU needed."""

from __future__ import annotations

import dataclasses

import pytest

from mop.models.shapes import get_shape
from mop.parallel.layout import LayoutSpec
from mop.plan import Calibration, Step, estimate_time
from mop.plan.cli import _plan_args
from mop.plan.step import Cluster

H200 = Calibration.load("h200")


def test_the_shipped_total_was_measured_on_two_gpus():
    assert H200.h2d_node_gpus == 2
    assert H200.h2d_node_bw == pytest.approx(2 * 54.85e9, rel=0.01)  # both GPUs at their one-GPU rate
    assert "h2d_node_gpus" in H200.notes["h2d_node_bw"]


def test_measured_total_up_to_its_gpus_assumed_beyond():
    # Up to the GPUs it was measured with: the measured total, shared evenly (as before this rule).
    for G in (1, 2):
        assert H200.host_link_node_total(G) == H200.h2d_node_bw
        assert H200.host_link_per_gpu(G) == min(H200.h2d_bw, H200.h2d_node_bw / G)
    # Beyond: one link per GPU at the one-GPU rate, not the 2-GPU total spread over 8 (13.7 GB/s).
    assert H200.host_link_node_total(8) == pytest.approx(8 * H200.h2d_bw)
    assert H200.host_link_per_gpu(8) == H200.h2d_bw
    assert "assumed, not measured" in H200.host_link_basis(8)
    assert "measured with 2 GPUs" in H200.host_link_basis(2)


def test_a_ceiling_caps_any_node():
    assert H200.host_link_per_gpu(8, 220e9) == pytest.approx(27.5e9)
    assert H200.host_link_per_gpu(8, 1e13) == H200.h2d_bw  # a ceiling never raises the rate
    assert H200.host_link_per_gpu(2, 55e9) == pytest.approx(27.5e9)  # the user knows their node
    assert "ceiling" in H200.host_link_basis(8, 220e9)
    assert Cluster(gpus_per_node=8, host_link_node_bw=220e9).host_link_per_gpu(H200) == pytest.approx(27.5e9)


def test_an_unrecorded_gpu_count_keeps_the_total_for_any_node():
    """Calibration files from before `h2d_node_gpus` (cpu.json) mean what they meant then."""
    old = dataclasses.replace(H200, h2d_node_gpus=0)
    assert old.host_link_per_gpu(8) == pytest.approx(H200.h2d_node_bw / 8)
    assert Calibration.load("cpu").h2d_node_gpus == 0
    assert "not recorded" in old.host_link_basis(8)


def _host_step(W: int) -> Step:
    """A step whose optimizer lives on the host (gpu_stream, no device share): bound by the host link."""
    return Step(model=get_shape("qwen3-30b-a3b", n_layers=8), layout=LayoutSpec(W, 1, W, 1), seq_len=8192,
                policies="full", offload="gpu_stream", device_fraction=0.0, dispatcher="llep")


def test_the_time_model_uses_the_rule():
    step = _host_step(16)
    free = estimate_time(step, H200, Cluster(gpus_per_node=8, nodes=2))
    capped = estimate_time(step, H200, Cluster(gpus_per_node=8, nodes=2, host_link_node_bw=110e9))
    # gpu_stream's host rate scales with the GPU's share of its link: 55 -> 13.75 GB/s, 4x the time.
    assert capped.optimizer_total == pytest.approx(4 * free.optimizer_total)
    # On a 2-GPU node the measured total gives each GPU its one-GPU rate, as the accuracy table had it.
    two = estimate_time(_host_step(2), H200, Cluster(gpus_per_node=2))
    assert two.optimizer_total == pytest.approx(estimate_time(_host_step(2), H200).optimizer_total)
    # Offloaded block inputs go over the same link.
    off = dataclasses.replace(step, policies="offload")
    assert (estimate_time(off, H200, Cluster(gpus_per_node=8, nodes=2, host_link_node_bw=8e9)).comm_exposed
            > estimate_time(off, H200, Cluster(gpus_per_node=8, nodes=2)).comm_exposed)


def test_mop_plan_takes_the_ceiling_in_gb_per_s():
    args = _plan_args(["--shape", "mop-1t", "--gpus", "96", "--gpus-per-node", "8", "--context", "128K",
                       "--host-link-node-bw", "220"])
    assert args.host_link_node_bw == 220.0


def test_calibrate_records_how_many_gpus_copied(tmp_path, monkeypatch):
    from mop.plan import microbench

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(microbench, "collective_bandwidths", lambda dev, numel: (1e9, 1e9))
    monkeypatch.setattr(microbench, "host_link_bandwidth", lambda dev, numel: 3e9)
    cal, _ = microbench.calibrate(device="cpu", quick=True, out=tmp_path / "node.json", base="cpu")
    assert cal.h2d_node_gpus == 4 and cal.h2d_node_bw == pytest.approx(12e9)


def test_a_plan_says_where_its_host_link_comes_from():
    from mop.plan.search import choose

    cfg = get_shape("qwen3-30b-a3b", n_layers=4)
    plan = choose(cfg, gpus=16, gpus_per_node=8, context=8192, offloads=("gpu_stream",))
    assert "assumed, not measured" in plan.host_link and plan.host_link in plan.render()
    capped = choose(cfg, gpus=16, gpus_per_node=8, context=8192, offloads=("gpu_stream",), host_link_node_bw=220e9)
    assert capped.to_dict()["host_link"].startswith("220 GB/s per node: the given ceiling")
