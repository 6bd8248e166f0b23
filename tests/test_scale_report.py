"""scripts/scale_report.py (the MoP paper's settings on paper) and the planner fix it needed: the
memory split of a host-optimizer plan is verified and retried as the trainer does."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

from mop.models.shapes import get_shape
from mop.parallel.layout import LayoutSpec
from mop.plan.calibration import Calibration
from mop.plan.memory import estimate_memory, trainer_memory_cap
from mop.plan.search import split_candidate, split_inputs
from mop import memory_budget as mb
from mop.plan.step import GIB, Cluster, Step

H200 = Calibration.load("h200")
_spec = importlib.util.spec_from_file_location("scale_report",
                                               Path(__file__).parents[1] / "scripts" / "scale_report.py")
scale_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scale_report)


def _one_t_at_1m(param_dtype: str = "fp32") -> Step:
    return Step(model=get_shape("mop-1t"), layout=LayoutSpec(96, 32, 96, 1), seq_len=2**20, policies="full",
                offload="gpu_stream", device_fraction=-1.0, dispatcher="llep_pipelined", head_chunks=2,
                chunk_tokens=4096, param_dtype=param_dtype)


def test_split_is_verified_and_retried_like_the_trainer():
    """1T at 1M on 96 GPUs (D = 32): the first split keeps more than fits (its budget assumes every
    kept block is alive at a peak that comes as backward ends), 154 GiB; the retry fits."""
    base = _one_t_at_1m()
    cluster = Cluster(gpus_per_node=8, nodes=12)
    costs, budget, rival = split_inputs(base, H200, H200.device_bytes)
    first, _ = mb.split_memory(base.model.n_layers, costs, budget, optimizer=rival)
    first_mem = estimate_memory(replace(base, policies=tuple(first), device_fraction=0.0), H200)
    assert first_mem.reserved > 0.95 * H200.device_bytes  # the unverified split does not fit
    cand = split_candidate(base, H200, cluster, H200.device_bytes)
    assert cand.fits, cand.reason
    zero = estimate_memory(replace(cand.step, device_fraction=0.0), H200)
    assert zero.allocated - zero.optimizer_staging <= trainer_memory_cap(base, H200.device_bytes)
    assert zero.reserved <= 0.95 * H200.device_bytes


def test_split_falls_back_to_offload_everywhere():
    """With no try verified the trainer offloads every block; so does the plan."""
    cand = split_candidate(_one_t_at_1m(), H200, Cluster(gpus_per_node=8, nodes=12), H200.device_bytes, tries=0)
    assert set(cand.step.policies) == {"offload"}


def test_dtype_options_match_mop_plan():
    assert scale_report.DTYPE_CHOICES["any"] == ("fp32", "bf16")
    assert scale_report._dtype_options(("fp32", "bf16")) == {"param_dtypes": ("fp32", "bf16")}
    bf16 = scale_report._dtype_options(("bf16",))
    assert "none" not in bf16["offloads"]  # bf16 weights need the host optimizer's fp32 master


def _row(**kw):
    row = dict(model="mop-1t", params_b=993.0, gpus=96, context=2**20, paper=(100, None), fits=True, D=32, Ep=96,
               P=1, dispatcher="llep_pipelined", chunk_tokens=4096, ac="full*35,offload", optimizer="gpu_stream",
               device_fraction=0.0, param_dtype="fp32", tokens_per_s_per_gpu=89.0, no_overlap_tokens_per_s_per_gpu=81.0,
               device_gib=132.2, needed_gib=132.2, host_gib_per_gpu=129.0, host_gib_per_node=1033.0,
               time_terms={"attention": 332.8, "comm_exposed": 8.8}, memory_terms={"weights": 38.5, "grads": 38.5},
               overrides=["--model.shape=mop-1t", "--model.n_layers=59", "--parallel.seq=32", "--parallel.expert=96",
                          "--parallel.vocab=1", "--parallel.dispatcher=llep_pipelined",
                          "--parallel.moe_chunk_tokens=4096", "--parallel.ulysses_head_chunks=2",
                          "--training.seq_len=1048576", "--training.batch_size=1", "--training.grad_accum=1",
                          "--training.activation_checkpoint=full*35,offload", "--optimizer.offload=gpu_stream",
                          "--optimizer.device_fraction=0.0"],
               fsdp={"fits": False, "device_gib": 858.0, "largest": "expert_ws 325 GiB", "param_dtype": "fp32"})
    row.update(kw)
    return row


def test_table_names_each_rows_param_dtype_and_the_fp32_plan():
    new = _row(param_dtype="bf16", fp32_only={"fits": False, "reason": "closest: ..."})
    text = scale_report.table([new, _row(fits=False, reason="closest: D=32 ...")])
    lines = text.splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    assert "| bf16 |" in lines[2] and "no fit: closest: ..." in lines[2]
    assert "no fit: closest: D=32" in lines[3]


def test_changes_predicts_the_first_reports_plan_again():
    """The old row's options (old flat names) are re-read and predicted by today's model."""
    old = _row()
    new = _row(param_dtype="bf16", tokens_per_s_per_gpu=95.0, time_terms={"attention": 330.0})
    text = scale_report.changes([old], [new], "old-report", H200, 2048 * GIB)
    assert "89 -> " in text and "1.07x" in text
    assert "recompute 0.00 -> " in text  # a term today's prediction of the same plan has and the old row lacks
    assert scale_report._moved({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 3.5, "c": 0.5}, " s") == \
        "b 2.00 -> 3.50 s; c 0.00 -> 0.50 s"
