"""The baseline sweep's offload stages: optimizer-only offload before FSDP2's CPUOffloadPolicy."""

from __future__ import annotations

from mop.baselines import BaselineConfig
from mop.bench.sweep import _at_least_as_frugal, _frugality, candidate_configs, run_sweep
from mop.models.shapes import get_shape


def _sweep(fits, offload="auto", gpus=4):
    """Run the full candidate list through a fake `run`: "ok" where `fits(cfg)`, else "oom"."""
    cfgs = candidate_configs(get_shape("qwen3-30b-a3b"), 131072, gpus, mode="full", cuda=True)
    ran = []

    def fake(cfg):
        ran.append(cfg)
        if fits(cfg):
            return {"status": "ok", "tokens_per_s_per_gpu": 100.0 + 10 * cfg.ep - cfg.recompute_level}
        return {"status": "oom", "error": "CUDA out of memory"}

    best, records = run_sweep(cfgs, fake, offload=offload, log=lambda s: None)
    return cfgs, ran, best, records


def test_optimizer_offload_tried_before_cpu_offload():
    # Nothing fits on the device; optimizer offload fits only with full recomputation and the chunked loss.
    cfgs, ran, best, records = _sweep(lambda c: c.offload_level == 2 or (
        c.optimizer_offload and c.recompute_level == 2 and c.chunked_loss))
    kinds = [c.offload_level for c in ran]
    assert kinds == sorted(kinds) and 1 in kinds  # every plain run, then optimizer offload, then none of CPU offload
    assert 2 not in kinds  # "auto": an optimizer-offload config fitted, so CPUOffloadPolicy (slower) never ran
    assert best["config"]["optimizer_offload"] and not best["config"]["cpu_offload"]
    assert best["tokens_per_s_per_gpu"] == max(r["tokens_per_s_per_gpu"] for r in records if r["status"] == "ok")
    # A variant with less recomputation than an OOM'd variant of the same layout is skipped, not run.
    skipped = [r for r in records if r["status"] == "skipped" and r["config"]["optimizer_offload"]]
    assert skipped and all("opt-offload" in r["error"] for r in skipped)


def test_cpu_offload_after_every_optimizer_offload_oom():
    cfgs, ran, best, records = _sweep(lambda c: c.cpu_offload)
    kinds = [c.offload_level for c in ran]
    assert kinds == sorted(kinds) and {0, 1, 2} <= set(kinds)
    assert best["config"]["cpu_offload"]
    # Each stage's pruning is its own: an optimizer-offload OOM never skips a CPU-offload config.
    for r in records:
        if r["status"] == "skipped" and r["config"]["cpu_offload"]:
            assert "opt-offload" not in r["error"], r
    assert sum(c.cpu_offload for c in ran) == len({(c.tp, c.cp, c.ep, c.chunked_loss) for c in cfgs})


def test_offload_never_and_always():
    _, ran, best, _ = _sweep(lambda c: c.offload_level > 0, offload="never")
    assert best is None and all(c.offload_level == 0 for c in ran)
    _, ran, _, _ = _sweep(lambda c: True, offload="always", gpus=2)
    assert {c.offload_level for c in ran} == {0, 1, 2}


def test_frugality_ranks_optimizer_offload_between_none_and_cpu_offload():
    plain = BaselineConfig(ep=2).resolved(2)
    opt = BaselineConfig(ep=2, optimizer_offload=True).resolved(2)
    cpu = BaselineConfig(ep=2, cpu_offload=True).resolved(2)
    assert _frugality(plain) < _frugality(opt) < _frugality(cpu)
    assert _at_least_as_frugal(cpu, opt) and _at_least_as_frugal(opt, plain)
    assert not _at_least_as_frugal(plain, opt) and not _at_least_as_frugal(opt, cpu)
    # Offload does not make up for less recomputation on the other axes: no pruning across them.
    no_ac = BaselineConfig(ep=2, activation_checkpoint=False).resolved(2)
    assert not _at_least_as_frugal(BaselineConfig(ep=2, optimizer_offload=True, activation_checkpoint=False)
                                   .resolved(2), plain)
    assert _at_least_as_frugal(opt, no_ac)


def test_explicit_offloaded_configs_run_once_as_given():
    given = [BaselineConfig(ep=2).resolved(2), BaselineConfig(ep=2, optimizer_offload=True).resolved(2)]
    ran = []

    def fake(cfg):
        ran.append(cfg)
        return {"status": "oom", "error": "CUDA out of memory"}

    run_sweep(given, fake, offload="auto", log=lambda s: None)
    assert ran.count(given[1]) == 1  # not again as the sweep's own variant of given[0]
    assert ran[:2] == given and ran[2].cpu_offload
