"""The plan models what session 5 changed: the routed experts sharded as dense weights at Ep = 1
(FSDP gathers them per block, no dispatcher) and `parallel.fsdp.reduce_dtype = "auto"`."""

import glob
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mop.config import build_config
from mop.models.shapes import get_shape
from mop.parallel.experts.config import ExpertParallelConfig
from mop.parallel.experts.registry import DISPATCHERS
from mop.parallel.layout import LayoutSpec
from mop.parallel.parallelize import experts_sharded_as_dense
from mop.plan import GIB, Calibration, Step, choose, estimate_memory, estimate_time, step_from_overrides
from mop.plan.accuracy import accuracy_rows, legacy_code, predict
from mop.plan.memory import activation_peak, block_kept_bytes, dense_block_params

H200 = Calibration.load("h200")
CFG = get_shape("qwen3-30b-a3b", n_layers=24)
EXPERTS = CFG.n_experts * 3 * CFG.dim * CFG.expert_dim  # one block's routed experts (no biases)


def _step(**kw) -> Step:
    """Session 5's 8K point with the experts sharded as dense (f-experts-as-dense/f8k): 2 x H200,
    D = 1, Ep = 1, P = 2, bf16 parameters, the optimizer state on the device."""
    base = dict(model=CFG, layout=LayoutSpec(2, 1, 1, 2), seq_len=8192, batch_size=1, policies="selective*2,full",
                offload="gpu_stream", device_fraction=1.0, dispatcher="llep", param_dtype="bf16")
    return Step(**{**base, **kw})


def _fsdp_seconds(step: Step, bytes_per_param: float) -> float:
    """Seconds to move `bytes_per_param` per parameter of one Ep = 1 block through an FSDP collective on 2 GPUs."""
    return (dense_block_params(step) + EXPERTS) * bytes_per_param * (2 - 1) / 2 / H200.intra_bw


@pytest.mark.parametrize("dispatcher", list(DISPATCHERS))
@pytest.mark.parametrize("ep", [1, 2])
def test_experts_as_dense_is_the_trainers_rule(dispatcher, ep):
    step = _step(layout=LayoutSpec(2, 1, ep, 2), dispatcher=dispatcher)
    layout = SimpleNamespace(spec=step.layout)
    assert step.experts_as_dense == experts_sharded_as_dense(layout, ExpertParallelConfig(dispatcher=dispatcher))
    assert step.experts_as_dense == (ep == 1 and dispatcher != "llep_pipelined")
    assert not replace(step, ep1_dispatcher=True).experts_as_dense  # code before 2e437ce


def test_ep1_gathers_the_experts_with_each_block_two_in_flight():
    ep1, ep2 = _step(), _step(layout=LayoutSpec(2, 1, 2, 2))
    dense = dense_block_params(ep1)
    m1, m2 = estimate_memory(ep1, H200), estimate_memory(ep2, H200)
    assert m1.param_gather == pytest.approx(2 * (dense + EXPERTS) * 2)  # this block and the next, in bf16
    assert m2.param_gather == pytest.approx(2 * dense * 2)  # ExpertParallelExperts gathers its own
    # The previous block's reduce-scatter input, in bf16 (auto with bf16 parameters).
    assert activation_peak(ep1, H200)["grad_reduce"] == pytest.approx((dense + EXPERTS) * 2)
    # FSDP frees the gathered experts after forward: a block without a checkpoint keeps no weights.
    none1 = replace(ep1, policies="none")
    legacy = replace(none1, ep1_dispatcher=True, layout=LayoutSpec(2, 1, 1, 2))
    gathered = block_kept_bytes(legacy)[0] - block_kept_bytes(none1)[0]
    assert gathered > EXPERTS * 2  # the old module kept its gathered experts (and more routed copies)


def test_ep1_has_no_all_to_all_and_no_dispatcher_idle():
    t1 = estimate_time(_step(), H200)
    # 24 blocks x (gather in forward, gather again in backward, reduce-scatter) in bf16, plus the
    # first gathers of both passes and the last reduce-scatter, and the vocabulary ring's hop of
    # its other weight block (P = 2): nothing else crosses the link.
    fsdp = 24 * _fsdp_seconds(_step(), 2 + 2 + 2) + _fsdp_seconds(_step(), 2 + 2 + 2)
    ring = 2 * (CFG.vocab_size // 2) * CFG.dim * 2 / H200.intra_bw
    assert t1.comm_exposed + t1.comm_hidden == pytest.approx(fsdp + ring)
    assert t1.overhead == pytest.approx(H200.step_overhead_s + 96 * H200.layer_overhead_s)
    t2 = estimate_time(_step(layout=LayoutSpec(2, 1, 2, 2), policies="selective*11,full"), H200)
    assert t2.overhead == pytest.approx(H200.step_overhead_s + 96 * (H200.layer_overhead_s + H200.dispatcher_sync_s))
    assert t2.comm_exposed > 0.05  # the token all-to-all
    assert t1.param_copies > 20 * t2.param_copies  # FSDP copies the experts too


def test_reduce_dtype_auto_halves_the_reduce_scatter_with_bf16_params():
    auto, fp32 = _step(), _step(reduce_dtype="fp32")
    assert (auto.reduce_bytes, fp32.reduce_bytes, _step(reduce_dtype="bf16").reduce_bytes) == (2, 4, 2)
    assert _step(param_dtype="fp32", offload="none").reduce_bytes == 4  # auto: the gradients' dtype
    assert activation_peak(fp32, H200)["grad_reduce"] == pytest.approx(2 * activation_peak(auto, H200)["grad_reduce"])
    ta, tf = estimate_time(auto, H200), estimate_time(fp32, H200)
    # 2 B/param less for 24 blocks' reduce-scatters and the last one's edge ...
    assert (tf.comm_exposed + tf.comm_hidden) - (ta.comm_exposed + ta.comm_hidden) == \
        pytest.approx(25 * _fsdp_seconds(auto, 2))
    # ... and FSDP's copy into its buffer writes 2 B/param less, with no cast of the reduced shard.
    unit = dense_block_params(auto) + EXPERTS
    assert tf.param_copies - ta.param_copies == pytest.approx(24 * (2 * unit + (4 + 2) * unit / 2) / H200.hbm_bw)
    assert tf.step > ta.step


def test_reduce_dtype_costs_the_measured_peak():
    """Session 5's trainer probe at 8K: an fp32 reduce peaked 1.16 GiB above a bf16 one (base 34.46 vs
    33.30 GiB, f-experts-as-dense/f8k against g-bf16-reduce/g8k): one block's 0.62 B gradients x 2 B."""
    a, f = estimate_memory(_step(), H200), estimate_memory(_step(reduce_dtype="fp32"), H200)
    assert (f.allocated - a.allocated) / GIB == pytest.approx(1.16, rel=0.03)


def test_fsdp_options_round_trip_and_reshard_after_forward():
    step = _step(reduce_dtype="fp32", reshard_after_forward=False)
    opts = step.overrides()
    assert "--parallel.fsdp.reduce_dtype=fp32" in opts and "--parallel.fsdp.reshard_after_forward=false" in opts
    back = step_from_overrides(CFG, opts, 2)
    assert (back.reduce_dtype, back.reshard_after_forward) == ("fp32", False)
    job = build_config(None, ["--model.shape=qwen3-30b-a3b", "--model.n_layers=24"] + opts)
    assert (job.parallel.fsdp.reduce_dtype, job.parallel.fsdp.reshard_after_forward) == ("fp32", False)
    assert "--parallel.fsdp.reduce_dtype" not in " ".join(_step().overrides())  # auto is the default
    with pytest.raises(ValueError, match="reduce_dtype"):
        _step(reduce_dtype="fp16")
    # Without resharding every block keeps its gathered weights to its backward, gathered once.
    kept = replace(_step(), reshard_after_forward=False)
    unit = dense_block_params(kept) + EXPERTS
    assert estimate_memory(kept, H200).param_gather == 0.0
    assert block_kept_bytes(kept)[5] - block_kept_bytes(_step())[5] == pytest.approx(unit * 2)
    t, t_kept = estimate_time(_step(), H200), estimate_time(kept, H200)
    assert (t.comm_exposed + t.comm_hidden) - (t_kept.comm_exposed + t_kept.comm_hidden) == \
        pytest.approx(25 * _fsdp_seconds(kept, 2))


def test_accuracy_reads_each_source_as_the_code_it_ran():
    f8k = legacy_code("2026-11-30-session5-2xh200/f-experts-as-dense/f8k")
    assert f8k["reduce_default"] == "fp32" and not f8k["ep1_dispatcher"]  # before "auto", after 2e437ce
    assert legacy_code("2026-11-30-session5-2xh200/g-bf16-reduce/g8k")["reduce_default"] == "auto"
    assert legacy_code("2026-11-29-session4-2xh200/a-8k-32k/bench_short")["ep1_dispatcher"]
    opts = [o for o in _step().overrides() if "device_fraction" not in o] + ["--model.shape=qwen3-30b-a3b",
                                                                             "--model.n_layers=24"]
    step, *_ = predict(opts, 2, H200, **f8k)
    assert step.reduce_bytes == 4 and step.experts_as_dense
    step, *_ = predict(opts + ["--parallel.fsdp.reduce_dtype=bf16"], 2, H200, **f8k)  # named: as named
    assert step.reduce_bytes == 2


def test_session5_points_are_within_the_targets():
    paths = sorted(glob.glob("bench/results/2026-11-30-session5-2xh200/**/results.json", recursive=True))
    rows = [r for r in accuracy_rows(paths) if r["source"].startswith("2026-11-30-session5-2xh200/")]
    assert len(rows) == 10  # the status "ok" mop points (d-sweep's profiled 8K run timed out)
    for r in rows:
        assert abs(r["peak_pred"] / r["peak_meas"] - 1) <= 0.10, r
        assert abs(r["step_pred"] / r["step_meas"] - 1) <= 0.15, r


def test_search_weighs_experts_as_dense_against_expert_parallelism():
    """At 32K on 2 x H200 the experts sharded as dense were measured faster (f32k 3.51 s against
    the Ep = 2 sweep_32k's 3.71 s): the plan picks Ep = 1 and keeps Ep = 2 as a runner-up."""
    plan = choose(CFG, gpus=2, context=32768, param_dtypes=("bf16",), offloads=("gpu_stream",), seq_degrees=(1,))
    assert plan.best.step.layout.expert == 1 and plan.best.step.experts_as_dense
    assert any(c.step.layout.expert == 2 for c in plan.runners_up)


def test_recompute_no_longer_reduces_router_statistics():
    """Since 4e813c6 a checkpoint's recompute reuses the forward's router statistics, so backward's
    FSDP collectives hide behind the whole backward; measured code before it narrowed that window
    (`router_recompute_sync`, applied to every source measured so far)."""
    step = _step(policies="full", device_fraction=1.0)
    # (code that all-reduced in the recompute also did in the forward: b186d27 came later)
    old = estimate_time(replace(step, router_recompute_sync=True, router_forward_sync=True), H200)
    now = estimate_time(replace(step, router_forward_sync=True), H200)
    assert now.comm_exposed < old.comm_exposed
    assert now.step < old.step
    assert legacy_code("2026-11-30-session5-2xh200/g-bf16-reduce/g8k")["router_recompute_sync"]
    assert not legacy_code("2026-12-01-session6-2xh200/m-1m/m8k")["router_recompute_sync"]


def test_forward_no_longer_waits_for_router_statistics():
    """Since b186d27 the routers start their statistics all-reduce and the model waits once after
    its last block, so a block's FSDP collectives hide behind its whole forward; code before it
    (every source up to session 6: `router_forward_sync`) waited for them after the attention half."""
    # 2K tokens per rank: a block's attention half is shorter than its gather
    step = _step(policies="none", device_fraction=1.0, seq_len=2048)
    now = estimate_time(step, H200)
    old = estimate_time(replace(step, router_forward_sync=True), H200)
    assert now.comm_exposed < old.comm_exposed and now.step < old.step
    assert legacy_code("2026-11-30-session6-2xh200/a-1M/m8K")["router_forward_sync"]
    assert legacy_code("2026-11-30-session5-2xh200/g-bf16-reduce/g8k")["router_forward_sync"]
    assert not legacy_code("2026-12-01-session7-2xh200/a/p8k")["router_forward_sync"]
