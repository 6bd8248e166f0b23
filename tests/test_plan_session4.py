"""The plan models what session 4 changed: bf16 parameters, the peak over backward, the memory split."""

from dataclasses import replace

import pytest

from mop import memory_budget as mb
from mop.config import build_config
from mop.models.shapes import get_shape
from mop.parallel.layout import LayoutSpec
from mop.plan import Calibration, Cluster, Step, choose, estimate_memory, state_memory, step_from_overrides
from mop.plan.memory import ADAM_STATE_BYTES, auto_device_fraction, backward_peak, trainer_memory_cap
from mop.plan.search import split_candidate, split_inputs

H200 = Calibration.load("h200")


def _step(**kw) -> Step:
    cfg = get_shape("qwen3-30b-a3b", n_layers=24)
    base = dict(model=cfg, layout=LayoutSpec(2, 1, 2, 2), seq_len=8192, batch_size=1, policies="none",
                offload="gpu_stream", device_fraction=0.5, dispatcher="llep")
    return Step(**{**base, **kw})


def test_bf16_params_halve_device_weights_and_grads_not_the_host_state():
    cfg = get_shape("qwen3-30b-a3b", n_layers=24)
    local = cfg.param_counts()["total"] / 2
    fp32, bf16 = state_memory(cfg, 2, "gpu_stream", 0.25), state_memory(cfg, 2, "gpu_stream", 0.25, param_bytes=2)
    assert (bf16.weights, bf16.grads) == (2 * local, 2 * local) and fp32.weights == 4 * local
    assert bf16.optimizer_host == fp32.optimizer_host == 12 * local * 0.75  # fp32 master + m + v
    assert bf16.optimizer_device == fp32.optimizer_device == 12 * local * 0.25
    with pytest.raises(ValueError, match="host optimizer"):
        state_memory(cfg, 2, "none", param_bytes=2)
    with pytest.raises(ValueError, match="host optimizer"):
        _step(param_dtype="bf16", offload="none")
    a, b = estimate_memory(_step(), H200), estimate_memory(_step(param_dtype="bf16"), H200)
    assert b.weights == a.weights / 2 and b.grads <= a.grads


def test_param_dtype_round_trips_through_the_options():
    step = _step(param_dtype="bf16")
    assert "--training.param_dtype=bf16" in step.overrides()
    back = step_from_overrides(step.model, step.overrides(), 2)
    assert back.param_dtype == "bf16" and back.param_bytes == 2
    job = build_config(None, ["--model.shape=qwen3-30b-a3b", "--model.n_layers=24"] + step.overrides())
    assert job.training.param_dtype == "bf16"


def test_peak_is_over_backward_gradients_replace_kept_activations():
    """No checkpoint: the peak is as backward starts (few gradients); full: as it ends (all of them)."""
    none, full = _step(policies="none", seq_len=32768), _step(policies="full", seq_len=32768)
    grads = state_memory(none.model, 2, "gpu_stream", 0.0).grads
    alive_none = backward_peak(none, grads, 0.0)
    alive_full = backward_peak(full, grads, 0.0)
    assert alive_none["grads"] < 0.1 * grads
    assert alive_full["grads"] > 0.9 * grads
    mem = estimate_memory(none, H200)
    assert mem.grads == pytest.approx(alive_none["grads"])


def test_auto_device_fraction_is_the_trainers_room():
    step = _step(device_fraction=-1.0, param_dtype="bf16")
    mem = estimate_memory(step, H200)
    zero = estimate_memory(replace(step, device_fraction=0.0), H200)
    local = step.model.param_counts()["total"] / 2
    peak = zero.allocated - zero.optimizer_staging  # what the trainer's probe reads: no optimizer state yet
    expected = (trainer_memory_cap(step, H200.device_bytes) - peak) / (ADAM_STATE_BYTES * local)
    assert mem.device_fraction == pytest.approx(min(1.0, max(0.0, expected)))
    assert mem.device_fraction == pytest.approx(auto_device_fraction(step, peak, H200.device_bytes))


@pytest.mark.parametrize("context", [8192, 131072])
def test_plan_split_is_memory_budget_split_memory(context):
    """The plan's policies for a host optimizer with an automatic share are split_memory's, for the
    same kept bytes, recompute seconds, budget and optimizer rival."""
    step = _step(seq_len=context, layout=LayoutSpec(2, 2 if context > 8192 else 1, 2, 2), device_fraction=-1.0,
                 param_dtype="bf16")
    costs, budget, rival = split_inputs(step, H200, H200.device_bytes)
    local = step.model.param_counts()["total"] / 2
    assert costs.recompute_seconds == mb.recompute_seconds(step.model, context, step.tokens)
    assert rival == mb.optimizer_rival("gpu_stream", 12 * local, 24 * costs.recompute_seconds["full"], True)
    policies, reserve = mb.split_memory(24, costs, budget, optimizer=rival)
    cand = split_candidate(step, H200, Cluster(gpus_per_node=2), H200.device_bytes)
    assert list(cand.step.policies) == policies
    if context == 8192:  # the state streaming costs more per byte than recomputing a short block
        assert reserve > 0 and cand.memory.device_fraction > 0.9
    else:  # at 128K attention is worth more than the optimizer's bytes: activations first
        assert "selective" in policies or "none" in policies


def test_choose_considers_bf16_params_when_asked():
    cfg = get_shape("qwen3-30b-a3b", n_layers=24)
    plan = choose(cfg, gpus=2, context=32768, param_dtypes=("bf16",), offloads=("gpu_stream",))
    assert plan.best.step.param_dtype == "bf16" and "--training.param_dtype=bf16" in plan.overrides()
    assert plan.best.fits
