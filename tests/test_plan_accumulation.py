"""The plan models `parallel.fsdp.accumulation` and what gradient accumulation keeps between micro-batches.

"keep_gathered" keeps every FSDP block's gathered weights for the whole step (one all-gather per
block per step), "keep_all" also its unsharded gradients (one reduce-scatter per step); every mode
holds the step's gradients so far through each later micro-batch. The search weighs the modes as
part of the configuration, and `parallel.plan = "auto"` applies the one it chose.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mop.config import build_config
from mop.models.shapes import get_shape
from mop.parallel.layout import LayoutSpec
from mop.plan import GIB, Calibration, Step, check_step_fits, choose, estimate_memory, estimate_time
from mop.plan.accuracy import _options, legacy_code, predict
from mop.plan.memory import accumulated_grads, fsdp_block_params, fsdp_root_params, fsdp_step_gathered_bytes
from mop.plan.search import evaluate, plan_for_job
from mop.plan.step import ACCUMULATIONS, Cluster, step_from_overrides
from mop.plan.timing import fsdp_collectives_per_step
from tests.dist_utils import run_distributed

H200 = Calibration.load("h200")
CFG = get_shape("qwen3-30b-a3b", n_layers=24)
COUNTS = CFG.param_counts()
# One block of qwen3-30b-a3b as FSDP gathers it at Ep = 1 (its experts sharded as dense): every
# parameter but the embedding, output head and final norm, over the 24 blocks.
BLOCK = (COUNTS["total"] - COUNTS["embedding"] - COUNTS["output"] - CFG.dim) / CFG.n_layers
DENSE_BLOCK = (COUNTS["dense"] - CFG.dim) / CFG.n_layers  # the same at Ep = 2 (ExpertParallelExperts owns the experts)


def _step(**kw) -> Step:
    """Session 5's 8K layout (2 x H200, D = 1, Ep = 1, P = 2, bf16 parameters and reduce, experts
    sharded as dense) with 4 micro-batches per step."""
    base = dict(model=CFG, layout=LayoutSpec(2, 1, 1, 2), seq_len=8192, batch_size=1, grad_accum=4,
                policies="selective*2,full", offload="gpu_stream", device_fraction=1.0, dispatcher="llep",
                param_dtype="bf16")
    return Step(**{**base, **kw})


def _comm(t) -> float:
    """Collective seconds of a step, exposed or hidden (at D = 1, Ep = 1: FSDP's, and the vocabulary
    ring's, which no accumulation mode changes)."""
    return t.comm_exposed + t.comm_hidden


def test_keep_gathered_holds_every_blocks_weights_for_the_step():
    reshard, kept = estimate_memory(_step(), H200), estimate_memory(_step(accumulation="keep_gathered"), H200)
    # All 24 blocks gathered in bf16 in place of the two in flight; the gradients as they were.
    assert kept.param_gather == pytest.approx(CFG.n_layers * BLOCK * 2)
    assert reshard.param_gather == pytest.approx(2 * BLOCK * 2)
    assert kept.grads == reshard.grads and kept.grad_reduce == reshard.grad_reduce
    assert kept.allocated - reshard.allocated == pytest.approx((CFG.n_layers - 2) * BLOCK * 2)
    # At Ep = 2 the experts are ExpertParallelExperts', not FSDP's: only the dense blocks are kept.
    ep2 = _step(layout=LayoutSpec(2, 1, 2, 2), accumulation="keep_gathered")
    assert estimate_memory(ep2, H200).param_gather == pytest.approx(CFG.n_layers * DENSE_BLOCK * 2)
    # reshard_after_forward=false no longer keeps a block's weights to its backward only: the step does.
    late = replace(_step(accumulation="keep_gathered"), reshard_after_forward=False)
    assert estimate_memory(late, H200).allocated == pytest.approx(kept.allocated)


def test_keep_all_also_holds_every_units_unsharded_gradients():
    kept = estimate_memory(_step(accumulation="keep_gathered"), H200)
    for reduce_dtype, r in (("auto", 2), ("fp32", 4)):
        both = estimate_memory(_step(accumulation="keep_all", reduce_dtype=reduce_dtype), H200)
        # Every FSDP unit's gradients unsharded in the reduce dtype (the root: the final norm at P = 2)
        # instead of their bf16 shards over 2 ranks and the backpropagated block's new shard ...
        fsdp = CFG.n_layers * BLOCK + CFG.dim
        assert both.grads - kept.grads == pytest.approx(fsdp * (r - 2 / 2) - BLOCK * 2 / 2)
        # ... which are the last micro-batch's reduce-scatter inputs: no separate buffer.
        assert both.grad_reduce == 0.0 and kept.grad_reduce > 0
        assert both.param_gather == kept.param_gather
    # At Ep = 2 the experts' gradients are still accumulated as shards, each block's new ones beside them.
    ep2 = _step(layout=LayoutSpec(2, 1, 2, 2), accumulation="keep_all")
    expert_shard = (BLOCK - DENSE_BLOCK) * 2 / 2
    mem = estimate_memory(ep2, H200)
    fsdp = CFG.n_layers * DENSE_BLOCK + CFG.dim
    assert mem.grads == pytest.approx(COUNTS["total"] * 2 / 2 + fsdp * (2 - 1) + expert_shard)


def test_later_micro_batches_hold_every_gradient():
    """Gradient accumulation: the peak is a later micro-batch's, with all of the step's gradients
    alive from its start and the backpropagated block's new ones beside them before they are added."""
    one, four = _step(grad_accum=1), _step()
    all_grads = COUNTS["total"] * 2 / 2  # bf16 shards over 2 ranks
    assert estimate_memory(one, H200).grads < all_grads
    assert estimate_memory(four, H200).grads == pytest.approx(all_grads + BLOCK * 2 / 2)
    assert estimate_memory(four, H200).allocated > estimate_memory(one, H200).allocated


def test_accumulated_gradients_account_for_the_measured_growth():
    """bench_offload_1M (32 micro-batches) and bench_offload_paper (one) ran the same 4-layer
    configuration on 1 x H200: the plan predicts the growth of the peak between them as measured.
    The one-micro-batch point's own error (code of session 2) is common to both and cancels."""
    root = Path("bench/results/2026-11-28-session2-1xh200/4-optimizer-overlap")
    legacy = legacy_code(str(root))
    growth = {}
    for name in ("bench_offload_paper", "bench_offload_1M"):
        point = json.loads((root / name / "results.json").read_text())["points"][0]
        _, mem, _, _ = predict(_options(point["command"]), point["world"], H200, **legacy)
        growth[name] = (point["peak_alloc_gib"], mem.allocated / GIB)
    measured = growth["bench_offload_1M"][0] - growth["bench_offload_paper"][0]
    predicted = growth["bench_offload_1M"][1] - growth["bench_offload_paper"][1]
    assert measured > 1.0  # accumulation does keep GiBs more
    assert predicted == pytest.approx(measured, rel=0.10)
    assert abs(growth["bench_offload_1M"][1] / growth["bench_offload_1M"][0] - 1) <= 0.10


@pytest.mark.parametrize("accum", [2, 3, 4])
def test_collectives_per_step_fall_by_the_micro_batches(accum):
    counts = {m: fsdp_collectives_per_step(_step(grad_accum=accum, accumulation=m)) for m in ACCUMULATIONS}
    # (all-gathers, reduce-scatters) of each block per step: forward and backward gathers every
    # micro-batch with resharding, one gather per step when kept, one reduce-scatter with keep_all.
    assert counts == {"reshard": (2 * accum, accum), "keep_gathered": (1, accum), "keep_all": (1, 1)}
    assert fsdp_collectives_per_step(replace(_step(grad_accum=accum), reshard_after_forward=False)) == (accum, accum)
    # In seconds: 25 collectives per pass that runs them (each block's, and the first gather or
    # last reduce-scatter again, exposed), each moving half a block's bf16 bytes over the link.
    t_ag = BLOCK * 2 * (2 - 1) / 2 / H200.intra_bw
    t_rs = BLOCK * 2 * (2 - 1) / 2 / H200.intra_bw  # the reduce is bf16 too ("auto" with bf16 parameters)
    t = {m: estimate_time(_step(grad_accum=accum, accumulation=m), H200) for m in ACCUMULATIONS}
    assert _comm(t["reshard"]) - _comm(t["keep_gathered"]) == \
        pytest.approx((2 * accum - 1) * (CFG.n_layers + 1) * t_ag)
    assert _comm(t["keep_gathered"]) - _comm(t["keep_all"]) == \
        pytest.approx((accum - 1) * (CFG.n_layers + 1) * t_rs)
    assert t["reshard"].param_copies > t["keep_gathered"].param_copies > t["keep_all"].param_copies
    assert t["reshard"].step > t["keep_gathered"].step > t["keep_all"].step
    # Compute is per micro-batch in every mode.
    assert len({(x.attention, x.expert_gemm, x.dense_gemm, x.memory_bound) for x in t.values()}) == 1


def _fsdp_held(rank: int, world: int, mode: str, reduce_dtype: str, run_dir: str) -> dict[str, int]:
    """After the first of 2 micro-batches on this rank (debug model, fp32 on CPU, experts sharded as
    dense): bytes FSDP2 holds gathered in the blocks' units, and unsharded gradients in all units."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from mop.distributed import ProcessInfo
    from mop.parallel.parallelize import reset_accumulation, set_accumulation_phase
    from mop.trainer import Trainer
    from tests.lossless import BASE

    job = build_config(overrides=BASE + [f"--logging.run_dir={run_dir}", "--training.steps=1",
                                         "--training.grad_accum=2", "--training.batch_size=1",
                                         f"--parallel.fsdp.accumulation={mode}",
                                         f"--parallel.fsdp.reduce_dtype={reduce_dtype}"])
    trainer = Trainer(job, ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                                       device=torch.device("cpu")))
    batch = next(trainer.loader)
    set_accumulation_phase(trainer.model, mode, last=False)
    ce, aux = trainer.model(batch["tokens"], batch["positions"], batch["labels"], torch.tensor(64.0))
    (ce + aux).backward()
    blocks = set(trainer.model.layers.values())
    weights, grads, seen = 0, 0, set()
    for unit in trainer.model.modules():
        if not isinstance(unit, FSDPModule):
            continue
        for fp in unit._get_fsdp_state()._fsdp_param_group.fsdp_params:  # the names reset_accumulation reads
            if not hasattr(fp, "_unsharded_param"):
                continue
            storage = fp._unsharded_param.untyped_storage()
            if unit in blocks and storage.nbytes() and storage.data_ptr() not in seen:  # freed: resized to 0
                seen.add(storage.data_ptr())
                weights += storage.nbytes()
            for g in (fp.unsharded_accumulated_grad, fp._unsharded_param.grad):
                grads += 0 if g is None else g.numel() * g.element_size()
    reset_accumulation(trainer.model)
    return {"weights": weights, "grads": grads, "dispatcher": job.parallel.experts.dispatcher}


@pytest.mark.slow  # two spawned ranks per mode
@pytest.mark.parametrize("mode,reduce_dtype", [(m, "auto") for m in ACCUMULATIONS] + [("keep_all", "bf16")])
def test_held_bytes_are_what_fsdp_holds_between_micro_batches(mode, reduce_dtype, tmp_path):
    """The parameters the plan counts as FSDP's (the blocks' units with their experts at Ep = 1; the
    root's embedding, output head and final norm) and the dtypes it holds them in, against FSDP2
    itself between two micro-batches on 2 gloo ranks."""
    ranks = run_distributed(_fsdp_held, 2, mode, reduce_dtype, str(tmp_path))
    step = Step(model=get_shape("debug"), layout=LayoutSpec(2), seq_len=64, batch_size=1, grad_accum=2,
                dispatcher=ranks[0]["dispatcher"], act_bytes=4, cpu=True, accumulation=mode,
                reduce_dtype=reduce_dtype)
    assert step.experts_as_dense
    # Every parameter of this layout is FSDP's (experts as dense, P = 1): with keep_all the held
    # gradients are all unsharded, in the reduce dtype (fp32 with "auto" here, or bf16).
    fsdp = fsdp_block_params(step) + fsdp_root_params(step)
    assert fsdp == step.model.param_counts()["total"]
    grad_bytes = fsdp * step.param_bytes / 2
    held, _, _ = accumulated_grads(step, grad_bytes)
    held_grads = held if mode == "keep_all" else 0.0  # otherwise reduce-scattered into shards
    for r in ranks:
        assert r["weights"] == pytest.approx(fsdp_step_gathered_bytes(step))
        assert r["grads"] == pytest.approx(held_grads)
    if mode != "reshard":
        assert fsdp_step_gathered_bytes(step) > 0


def test_one_micro_batch_is_the_same_in_every_mode():
    base = _step(grad_accum=1)
    mem, t = estimate_memory(base, H200), estimate_time(base, H200)
    for mode in ("keep_gathered", "keep_all"):
        step = _step(grad_accum=1, accumulation=mode)
        assert step.fsdp_accumulation == "reshard"
        assert estimate_memory(step, H200) == mem
        assert estimate_time(step, H200) == t
        assert fsdp_collectives_per_step(step) == fsdp_collectives_per_step(base) == (2, 1)


def test_accumulation_round_trips_through_command_lines():
    for mode in ACCUMULATIONS:
        step = _step(accumulation=mode)
        opts = step.overrides()
        # Named whenever it acts, "reshard" too: applying a plan replaces a job's own mode.
        assert f"--parallel.fsdp.accumulation={mode}" in opts
        assert step_from_overrides(CFG, opts, 2).accumulation == mode
        job = build_config(None, ["--model.shape=qwen3-30b-a3b", "--model.n_layers=24"] + opts)
        assert job.parallel.fsdp.accumulation == mode
    assert not any("accumulation" in o for o in _step(grad_accum=1).overrides())  # the default, acting on nothing
    assert step_from_overrides(CFG, _step(grad_accum=1, accumulation="keep_all").overrides(), 2).accumulation == \
        "keep_all"
    assert step_from_overrides(CFG, ["--training.grad_accum=2"], 2).accumulation == "reshard"
    with pytest.raises(ValueError, match="accumulation"):
        _step(accumulation="keep")
    # The pre-flight check reads the job's mode.
    opts = ["--model.shape=qwen3-30b-a3b", "--model.n_layers=8", "--training.seq_len=8192", "--training.batch_size=1",
            "--training.grad_accum=4", "--optimizer.offload=gpu_stream", "--optimizer.device_fraction=0",
            "--training.param_dtype=bf16", "--training.activation_checkpoint=full"]
    reshard = check_step_fits(build_config(None, opts), 2, 141 * GIB, H200)
    kept = check_step_fits(build_config(None, opts + ["--parallel.fsdp.accumulation=keep_gathered"]), 2, 141 * GIB,
                           H200)
    assert kept.param_gather > reshard.param_gather


SMALL = get_shape("qwen3-30b-a3b", n_layers=8)


def test_search_keeps_the_gathered_weights_where_they_fit_and_are_faster():
    """2 x H200-like devices, 4 micro-batches of 8K, the optimizer on the device: sized so that the
    experts-as-dense layout's keep_gathered fits and its keep_all does not."""
    kw = dict(gpus=2, context=8192, tokens_per_step=4 * 2 * 8192, seq_degrees=(1,), dispatchers=("alltoall",),
              offloads=("none",), calibration=H200, suggest=False)
    layout = Step(model=SMALL, layout=LayoutSpec(2), seq_len=8192, grad_accum=4, policies="none",
                  dispatcher="alltoall")
    cluster = Cluster(gpus_per_node=2)
    mem = {m: estimate_memory(replace(layout, accumulation=m), H200).reserved for m in ACCUMULATIONS}
    assert mem["reshard"] < mem["keep_gathered"] < mem["keep_all"]
    device = (mem["keep_gathered"] + mem["keep_all"]) / 2 / 0.95
    plan = choose(SMALL, device_bytes=device, **kw)
    best = plan.best.step
    assert best.accumulation == "keep_gathered" and best.layout.expert == 1
    assert "--parallel.fsdp.accumulation=keep_gathered" in plan.overrides()
    assert "accum=4:keep_gathered" in plan.render()  # `mop plan` shows the mode with the configuration
    resharding = choose(SMALL, device_bytes=device, accumulations=("reshard",), **kw).best
    assert plan.best.time.tokens_per_s_per_gpu > resharding.time.tokens_per_s_per_gpu
    faster = evaluate(replace(best, accumulation="keep_all"), H200, cluster, device)
    assert not faster.fits and faster.time.tokens_per_s_per_gpu > plan.best.time.tokens_per_s_per_gpu
    # Deterministic: the same plan again.
    assert choose(SMALL, device_bytes=device, **kw).render() == plan.render()


def test_search_reshards_where_the_kept_weights_do_not_fit():
    """One GPU sized so that every policy fits resharding and none keeping the gathered weights."""
    kw = dict(gpus=1, context=8192, tokens_per_step=4 * 8192, dispatchers=("alltoall",), offloads=("none",),
              calibration=H200, suggest=False)
    step = Step(model=SMALL, layout=LayoutSpec(1), seq_len=8192, grad_accum=4, dispatcher="alltoall")
    leanest = {m: estimate_memory(replace(step, accumulation=m, policies="offload"), H200).reserved
               for m in ("reshard", "keep_gathered")}
    fastest_kept = min(estimate_memory(replace(step, accumulation="keep_gathered", policies=p), H200).reserved
                       for p in ("none", "selective", "full", "offload"))
    assert leanest["keep_gathered"] == fastest_kept  # offloaded block inputs are the leanest policy
    device = (leanest["reshard"] + leanest["keep_gathered"]) / 2 / 0.95
    plan = choose(SMALL, device_bytes=device, accumulations=("reshard", "keep_gathered"), **kw)
    assert plan.best.step.accumulation == "reshard"
    kept = evaluate(replace(plan.best.step, accumulation="keep_gathered"), H200, Cluster(), device)
    assert not kept.fits and "device" in kept.reason
    assert kept.time.tokens_per_s_per_gpu > plan.best.time.tokens_per_s_per_gpu  # faster, but too large


def test_plan_auto_applies_the_chosen_accumulation(tmp_path, capsys):
    from mop.config import apply_overrides
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    opts = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=64", "--training.batch_size=2",
            "--training.grad_accum=2", "--training.device=cpu", "--training.steps=1", "--logging.progress=none",
            f"--logging.run_dir={tmp_path / 'run'}"]
    job = build_config(None, opts + ["--parallel.plan=auto"])
    plan = plan_for_job(job, 1, gpus_per_node=1, calibration=Calibration.load("cpu"), offloads=("none", "cpu"))
    chosen = plan.best.step.accumulation
    assert plan.best.step.grad_accum > 1
    # The job asks for another mode: the plan's replaces it.
    other = next(m for m in ACCUMULATIONS if m != chosen)
    job = apply_overrides(job, [f"--parallel.fsdp.accumulation={other}"])
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    assert trainer.job.parallel.fsdp.accumulation == chosen
    assert f"--parallel.fsdp.accumulation={chosen}" in capsys.readouterr().out  # said with the configuration
    trainer.train()



def test_bf16_weights_are_not_offered_with_accumulation_when_fp32_is():
    """bf16 weights accumulate their gradients in bf16 (FSDP's bf16 shard gradient, or keep_all's
    buffer in the bf16 reduce dtype): with fp32 on offer, a 2^20-token step keeps fp32 weights."""
    cfg = CFG
    plan = choose(cfg, gpus=2, context=8192, tokens_per_step=2**20, param_dtypes=("fp32", "bf16"),
                  offloads=("gpu_stream",))
    assert all(c.step.param_dtype == "fp32" for c in [plan.best, *plan.runners_up])
    only = choose(cfg, gpus=2, context=8192, tokens_per_step=2**20, param_dtypes=("bf16",), offloads=("gpu_stream",))
    assert only.best.step.param_dtype == "bf16"  # the caller's explicit choice stands
    one = choose(cfg, gpus=2, context=8192, param_dtypes=("fp32", "bf16"), offloads=("gpu_stream",))
    assert one.best.step.param_dtype == "bf16"  # one micro-batch: nothing accumulates
