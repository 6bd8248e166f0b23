"""The FSDP-best sweep: enumerate sensible baseline configs for a shape / context / GPU count, run
each in its own subprocess, record every attempt and keep the fastest that fits.

Order and pruning: configs are tried from the most memory-frugal to the least, and a config is
skipped (recorded as "skipped") when a config at least as frugal on every axis (tp, cp, ep,
activation checkpointing, chunked loss, offload) already ran out of memory. Offloaded variants are
tried only when nothing fits on the device, unless `offload="always"`: first optimizer-only offload
(`optimizer_offload`: weights and gradients stay on the device, 8 B/param freed, the faster of the
two), then, if none of those fits either, FSDP2's CPUOffloadPolicy (`cpu_offload`: 16 B/param freed).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from mop.baselines.config import BaselineConfig
from mop.parallel.layout import divisors


def candidate_configs(model_cfg, seq_len: int, gpus: int, *, mode: str = "quick", cuda: bool = True,
                      compile_loss: bool = True) -> list[BaselineConfig]:
    """Valid, non-offloaded configs, most frugal first. `mode`: "quick" (a few per axis) or "full"."""
    if mode not in ("quick", "full"):
        raise ValueError(f"sweep mode {mode!r} is not one of 'quick', 'full'")
    out = []
    for tp in divisors(gpus):
        for cp in divisors(gpus // tp):
            if cp > 1 and not cuda:
                continue  # context_parallel needs CUDA SDPA kernels
            eps = [ep for ep in divisors(gpus // tp) if model_cfg.n_experts % ep == 0]
            for ep in eps:
                for ac, selective, chunked in ((True, False, False), (True, True, False), (False, False, False),
                                               (True, False, True)):
                    # The chunked loss only in the most frugal recomputation: where the logits decide
                    # whether a config fits at all (long context), not as a speed variant.
                    cfg = BaselineConfig(tp=tp, cp=cp, ep=ep, activation_checkpoint=ac, selective=selective,
                                         compile_loss=compile_loss, chunked_loss=chunked)
                    try:
                        cfg = cfg.resolved(gpus)
                        cfg.validate_model(model_cfg, seq_len)
                    except ValueError:
                        continue
                    if mode == "quick" and not _in_quick(cfg, gpus, eps):
                        continue
                    out.append(cfg)
    return sorted(out, key=_frugality, reverse=True)


def _in_quick(cfg: BaselineConfig, gpus: int, eps: list[int]) -> bool:
    """A small, sensible subset: EP none or widest; (tp, cp) in {(1,1), (1,2), (1,G), (2,1)}; no-AC only plain."""
    if cfg.ep not in (1, max(e for e in eps if (cfg.dp_shard * cfg.cp) % e == 0)):
        return False
    if (cfg.tp, cfg.cp) not in {(1, 1), (1, 2), (1, gpus), (2, 1)}:
        return False
    return cfg.activation_checkpoint or (cfg.tp == 1 and cfg.cp == 1)


def _frugality(cfg: BaselineConfig) -> tuple:
    """Sort key, larger = less device memory; offload first (CPUOffloadPolicy frees 16 B/param, optimizer
    offload 8 B/param: more than any other axis saves on a model whose state fills the device)."""
    return (cfg.offload_level, cfg.recompute_level, cfg.chunked_loss, cfg.cp * cfg.tp, cfg.ep, cfg.cp)


def _at_least_as_frugal(a: BaselineConfig, b: BaselineConfig) -> bool:
    """a saves at least as much memory as b on every axis (so b cannot fit where a did not)."""
    return (a.tp >= b.tp and a.cp >= b.cp and a.ep >= b.ep and a.recompute_level >= b.recompute_level
            and a.offload_level >= b.offload_level and a.chunked_loss >= b.chunked_loss)


def run_sweep(configs: list[BaselineConfig], run: Callable[[BaselineConfig], dict], *, offload: str = "auto",
              max_runs: int | None = None, log: Callable[[str], None] = print,
              on_record: Callable[[list[dict]], None] | None = None) -> tuple[dict | None, list[dict]]:
    """Run `configs` (then offloaded variants per `offload`: "auto" | "always" | "never").

    `run(cfg)` returns a point record with a `status`. Returns (best record or None, all records);
    every record carries `config` (dict) and `label`. `on_record(records)` is called after each
    attempt (to save them: a sweep cut short keeps what it measured).
    """
    if offload not in ("auto", "always", "never"):
        raise ValueError(f"offload {offload!r} is not one of 'auto', 'always', 'never'")
    records: list[dict] = []
    ooms: list[BaselineConfig] = []
    runs = 0

    def attempt(cfg: BaselineConfig) -> None:
        nonlocal runs
        base = {"config": dataclasses.asdict(cfg), "label": cfg.label}
        blocker = next((o for o in ooms if _at_least_as_frugal(o, cfg)), None)
        if blocker is not None:
            records.append({**base, "status": "skipped", "error": f"OOM of at least as frugal '{blocker.label}'"})
            return
        if max_runs is not None and runs >= max_runs:
            records.append({**base, "status": "skipped", "error": f"sweep budget of {max_runs} runs spent"})
            return
        runs += 1
        log(f"  baseline sweep: {cfg.label} ...")
        rec = {**base, **run(cfg)}
        log(f"    -> {rec['status']}" + (f" {rec['tokens_per_s_per_gpu']:.0f} tok/s/GPU" if rec["status"] == "ok" else ""))
        if rec["status"] == "oom":
            ooms.append(cfg)
        records.append(rec)
        if on_record is not None:
            on_record(records)

    def fits() -> bool:
        return any(r["status"] == "ok" for r in records)

    plain = [c for c in configs if not c.offload_level]
    for cfg in plain:
        attempt(cfg)
    for cfg in configs:  # offloaded configs given explicitly run as given, whatever `offload` says
        if cfg.offload_level:
            attempt(cfg)
    given = set(configs)
    # Optimizer-only offload keeps each config's recomputation and loss (weights stay on the device, so
    # a lighter recomputation may pay); CPUOffloadPolicy moves the weights every step, so only its most
    # frugal recomputation is worth a run.
    stages = [lambda c: dataclasses.replace(c, optimizer_offload=True),
              lambda c: dataclasses.replace(c, cpu_offload=True, activation_checkpoint=True, selective=False)]
    for variant in stages:
        if not (offload == "always" or (offload == "auto" and not fits())):
            break
        seen = set(given)
        for cfg in plain:
            off = variant(cfg)
            if off not in seen:
                seen.add(off)
                attempt(off)
    return best_record(records), records


def best_record(records: list[dict]) -> dict | None:
    """The fastest record that ran, or None."""
    ok = [r for r in records if r["status"] == "ok"]
    return max(ok, key=lambda r: r["tokens_per_s_per_gpu"]) if ok else None
