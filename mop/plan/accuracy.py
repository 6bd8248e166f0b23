"""Predicted against measured: peak device memory and step time of every mop point in bench results.

Each `results.json` point carries the exact worker command, so the prediction is made for exactly
that configuration (`step_from_overrides`). Points measured outside `mop bench` (a `mop train` log,
or numbers reported before their results.json is committed) are listed in `EXTRA_POINTS` with their
source. The table says, per point, which predicted term is the largest, and a note where the code
that was measured is known to differ from the code modelled (older commits).
"""

from __future__ import annotations

import glob
import json
import math
import shlex
from dataclasses import replace
from pathlib import Path

from mop.config import build_config
from mop.plan.calibration import Calibration
from mop.plan.memory import estimate_memory
from mop.plan.search import FASTEST_FIRST, _policy_candidates, split_candidate
from mop.plan.step import GIB, Cluster, policy_spec, step_from_overrides
from mop.plan.timing import estimate_time

# Measurements not (yet) in a results.json: (source, device, world, options, measured peak GiB
# allocated or None, measured tokens/s/GPU or None). The 2xH200 report's points were measured
# before 9eaa9cc (Ulysses attention ran forward three times in a checkpointed block):
# LEGACY_ULYSSES below.
H200 = "NVIDIA H200"
EXTRA_POINTS = [
    ("session-2 train_128K.log (mop train, identity all-to-all)", H200, 1,
     "--model.shape=qwen3-30b-a3b --model.n_layers=4 --parallel.experts.dispatcher=alltoall --training.seq_len=131072 "
     "--training.batch_size=1 --training.activation_checkpoint=true --optimizer.offload=none", 90.1, 21634.0),
    ("2xH200 report (GPU engineer, 2026-11-29), no AC", H200, 2,
     "--model.shape=qwen3-30b-a3b --model.n_layers=24 "
     "--parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 "
     "--parallel.experts.dispatcher=llep_pipelined --training.seq_len=32768 --training.batch_size=1 "
     "--training.activation_checkpoint=none --optimizer.offload=gpu_stream --optimizer.device_fraction=-1",
     126.7, 6425.0),
    ("2xH200 report (GPU engineer, 2026-11-29), AC", H200, 2,
     "--model.shape=qwen3-30b-a3b --model.n_layers=24 "
     "--parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 "
     "--parallel.experts.dispatcher=llep_pipelined --training.seq_len=131072 --training.batch_size=1 "
     "--training.activation_checkpoint=full --optimizer.offload=gpu_stream --optimizer.device_fraction=-1",
     None, 3017.0),
    ("2xH200 report (GPU engineer, 2026-11-29), AC", H200, 2,
     "--model.shape=qwen3-30b-a3b --model.n_layers=24 "
     "--parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 "
     "--parallel.experts.dispatcher=llep_pipelined --training.seq_len=262144 --training.batch_size=1 "
     "--training.activation_checkpoint=full --optimizer.offload=gpu_stream --optimizer.device_fraction=-1",
     None, 1640.0),
    # Session 6 (code at 4eefe57): the run's results.json did not come back, its results.md did
    # (peak allocated 124.3 GiB, 63.104 s per step of 262,144 tokens; policies not recorded).
    ("2026-11-30-session6-2xh200/b-256k (results.md)", H200, 2,
     "--model.shape=qwen3-30b-a3b --model.n_layers=24 "
     "--parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 "
     "--parallel.experts.dispatcher=llep --training.seq_len=262144 --training.batch_size=1 "
     "--training.activation_checkpoint=auto --optimizer.offload=gpu_stream --training.param_dtype=bf16",
     124.3, 131072 / 63.104),
]

# Sources measured before 9eaa9cc, whose Ulysses attention (D > 1) ran forward 3x per checkpointed block.
LEGACY_ULYSSES = ("2026-11-28-qwen3-30b-a3b-4xh200", "2xH200 report")

# Sources measured before a271e05: activation_checkpoint=auto gave the kept activations all the
# memory and the host optimizer's device share what was left (no `optimizer_rival` in the split).
LEGACY_SPLIT = ("2026-11-28-", "2026-11-29-qwen3-30b-a3b-24l-2xh200", "2026-11-29-session4-2xh200", "2xH200 report",
                "session-2")

# Sources measured before 2e437ce, which kept the dispatcher (ExpertParallelExperts) at Ep = 1: since
# then the experts are sharded as dense weights there (`Step.experts_as_dense`).
LEGACY_EP1_DISPATCHER = ("2026-11-28-", "2026-11-29-", "2xH200 report", "session-2", "2026-11-30-session5-2xh200/d-")

# Sources measured while `parallel.fsdp.reduce_dtype` defaulted to fp32 (before "auto": bf16 with bf16
# parameters); a command that names the dtype is read as it is.
LEGACY_REDUCE_FP32 = ("2026-11-28-", "2026-11-29-", "2xH200 report", "session-2", "2026-11-30-session5-2xh200/d-",
                      "2026-11-30-session5-2xh200/f-")

# Sources measured before 4e813c6, whose checkpoint recomputes all-reduced the routers' statistics
# again (`Step.router_recompute_sync`): every source measured so far. A source measured on later code
# must not match these prefixes.
LEGACY_ROUTER_RECOMPUTE_SYNC = ("2026-11-28-", "2026-11-29-", "2xH200 report", "session-2", "bench-1gpu",
                                "2026-11-30-session5-2xh200/")

# Sources measured before b186d27, whose routers all-reduced their statistics synchronously in every
# MoE block's forward (`Step.router_forward_sync`): every source up to session 6.
LEGACY_ROUTER_FORWARD_SYNC = LEGACY_ROUTER_RECOMPUTE_SYNC + ("2026-11-30-session6-2xh200/",)

# Sources `mop plan fit` leaves out (their step times describe code whose cost the model does not
# describe), with why; the accuracy table still predicts them.
FIT_EXCLUDED = {
    "2026-11-28-qwen3-30b-a3b-4xh200": "session 1 code: kernels 1.24x slower than today's at 32K on 1 GPU (before "
                                       "session 2's kernel fixes), the dispatcher's copies at Ep = 1",
}

# Known differences between the measured code and the modelled one, by results directory.
NOTES = {
    "2026-11-28-qwen3-30b-a3b-4xh200": "session 1 code: before the kernel fixes (1.24x slower at 32K on 1 GPU), "
                                       "all-to-all copies at Ep=1",
    "bench-1gpu-offload-no-overlap-32K": "update not overlapped (code before optimizer.overlap_update); "
                                         "Ep=1 all-to-all copies (2 k H a per token) not yet removed",
    "2026-11-28-session2-1xh200": "code before the Ep=1 all-to-all became the identity (2 k H a bytes per "
                                  "token more in the expert layer than modelled)",
    "2026-11-30-session5-2xh200/f-": "code before a61ebe2: the grouped experts' combine wrote its products in fp32 "
                                     "(2 k H a bytes per token more at its forward peak than modelled)",
    "2026-11-30-session5-2xh200/g-": "code before a61ebe2: the grouped experts' combine wrote its products in fp32 "
                                     "(2 k H a bytes per token more at its forward peak than modelled)",
    "2026-11-30-session5-2xh200/h-": "code before a61ebe2: the grouped experts' combine wrote its products in fp32 "
                                     "(2 k H a bytes per token more at its forward peak than modelled)",
}


def _options(command: str) -> list[str]:
    args = shlex.split(command)
    if "mop.bench.worker" in args:
        args = args[args.index("mop.bench.worker") + 1:]
    return [a for a in args if a.startswith("--") and "." in a.split("=")[0]]


def legacy_code(label: str) -> dict:
    """`predict`'s keywords for the code a source was measured on (`LEGACY_*` above)."""
    return dict(attention_forwards=3 if any(k in label for k in LEGACY_ULYSSES) else 2,
                optimizer_competes=not any(k in label for k in LEGACY_SPLIT),
                ep1_dispatcher=any(k in label for k in LEGACY_EP1_DISPATCHER),
                reduce_default="fp32" if any(k in label for k in LEGACY_REDUCE_FP32) else "auto",
                router_recompute_sync=any(k in label for k in LEGACY_ROUTER_RECOMPUTE_SYNC),
                router_forward_sync=any(k in label for k in LEGACY_ROUTER_FORWARD_SYNC))


def predict(options: list[str], world: int, cal: Calibration, chosen: str | None = None,
            device_fraction: float | None = None, attention_forwards: int = 2, optimizer_competes: bool = True,
            ep1_dispatcher: bool = False, reduce_default: str = "auto", router_recompute_sync: bool = False,
            router_forward_sync: bool = False):
    """(step, memory, time, note) for the run described by `--section.key=value` options.

    `activation_checkpoint=auto`: the policies the run chose (`chosen`, recorded by newer bench
    results) or else the planner's own choice for this layout (the trainer probes; we predict):
    with a host optimizer, the memory split of `mop.memory_budget` (`search.split_candidate`;
    `optimizer_competes=False` for code before a271e05). `ep1_dispatcher`: code before 2e437ce (a
    dispatcher at Ep = 1); `reduce_default`: the reduce dtype of a command that does not name one
    (fp32 before "auto"); `router_recompute_sync`: code before 4e813c6 (a recompute all-reduced the
    routers' statistics again); `router_forward_sync`: code before b186d27 (a blocking all-reduce of
    the routers' statistics in every MoE block's forward).
    """
    model = build_config(None, [o for o in options if o.startswith("--model.")]).model
    note = ""
    if not any(o.startswith("--parallel.fsdp.reduce_dtype=") or o.startswith("--parallel.reduce_dtype=")
               for o in options):
        options = options + [f"--parallel.fsdp.reduce_dtype={reduce_default}"]
    auto = "--training.activation_checkpoint=auto" in options
    if auto:
        options = [o for o in options if o != "--training.activation_checkpoint=auto"]
        options.append(f"--training.activation_checkpoint={chosen or 'full'}")
    if device_fraction is not None:
        options = [o for o in options if not o.startswith("--optimizer.device_fraction=")]
        options.append(f"--optimizer.device_fraction={device_fraction}")
    step = step_from_overrides(model, options, world)
    if attention_forwards != 2 and step.layout.seq > 1 and any(p in ("full", "offload") for p in step.policies):
        step = replace(step, attention_forwards=attention_forwards)
        note = f"attention forward {attention_forwards}x in full blocks (the Ulysses code measured)"
    if ep1_dispatcher and step.layout.expert == 1:
        step = replace(step, ep1_dispatcher=True)
    if router_recompute_sync:
        step = replace(step, router_recompute_sync=True)
    if router_forward_sync:
        step = replace(step, router_forward_sync=True)
    if auto and not chosen:
        cluster = Cluster(gpus_per_node=world)
        if step.offload != "none":
            cand = split_candidate(step, cal, cluster, cal.device_bytes, optimizer_competes=optimizer_competes)
            step = replace(step, policies=cand.step.policies)
        else:
            cands = _policy_candidates(replace(step, device_fraction=0.0), cal, cluster, cal.device_bytes, 0.95,
                                       FASTEST_FIRST)
            fitting = [c for c in cands if c.fits] or cands
            step = replace(step, policies=max(fitting, key=lambda c: c.time.tokens_per_s_per_gpu).step.policies)
        note = f"ac=auto, policies not recorded: modelled as the trainer's split, {policy_spec(step.policies)}"
    mem = estimate_memory(step, cal)
    return step, mem, estimate_time(step, cal, device_fraction=mem.device_fraction), note


def _points(paths):
    """Measured points as dicts: where from, world, options, measured peak/step/throughput/host, what auto chose."""
    for path in paths:
        data = json.loads(Path(path).read_text())
        parts = Path(path).parts
        label = "/".join(parts[parts.index("results") + 1:-1]) if "results" in parts else str(path)
        note = next((n for key, n in NOTES.items() if key in str(path)), "")
        for p in data["points"]:
            if p.get("system") != "mop" or p.get("status") != "ok":
                continue
            # parallel.plan=auto: the plan's overrides came after the command's options (later wins)
            opts = [o for o in _options(p["command"]) if o != "--parallel.plan=auto"] + p.get("plan_overrides", [])
            yield dict(label=label, world=p["world"], opts=opts, peak=p.get("peak_alloc_gib"),
                       step_s=p.get("step_s"), tps=p.get("tokens_per_s_per_gpu"), host=p.get("host_rss_peak_gib"),
                       note=note, chosen=p.get("activation_policies"), frac=p.get("optimizer_device_fraction"),
                       device=p.get("device_name") or "")
    for source, device, world, opts, peak, tps in EXTRA_POINTS:
        yield dict(label=source, world=world, opts=opts.split(), peak=peak, step_s=None, tps=tps, host=None,
                   note="", chosen=None, frac=None, device=device)


def oom_rows(paths=None, calibration: str | Calibration = "h200") -> list[dict]:
    """Points that ran out of memory: does the model predict that their configuration cannot fit?

    `activation_checkpoint=auto` is judged by its leanest choice ("offload" on every block): the
    run could not have fitted if even that is predicted over the device.
    """
    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    paths = sorted(paths or glob.glob("bench/results/**/results.json", recursive=True))
    rows, seen = [], set()
    for path in paths:
        data = json.loads(Path(path).read_text())
        world = int(data.get("args", {}).get("gpus", 1))
        for p in data["points"]:
            if p.get("system") != "mop" or p.get("status") != "oom" or not p.get("command"):
                continue
            opts = [o for o in _options(p["command"]) if o != "--parallel.plan=auto"] + p.get("plan_overrides", [])
            if tuple(opts) in seen:
                continue
            seen.add(tuple(opts))
            if "--training.activation_checkpoint=auto" in opts:
                opts = [o for o in opts if o != "--training.activation_checkpoint=auto"]
                opts.append("--training.activation_checkpoint=offload")
            parts = Path(path).parts
            label = "/".join(parts[parts.index("results") + 1:-1]) if "results" in parts else str(path)
            step, mem, _, _ = predict(opts, world, cal, **legacy_code(label))
            if step.offload != "none":  # judge the configuration with none of the optional device share
                mem = estimate_memory(replace(step, device_fraction=0.0), cal)
            rows.append(dict(source=label,
                             world=world, layers=step.model.n_layers,
                             context=step.seq_len, config=f"D{step.layout.seq} Ep{step.layout.expert} "
                             f"P{step.layout.vocab} {step.dispatcher} ac={policy_spec(step.policies)} "
                             f"opt={step.offload}", predicted=mem.reserved / GIB,
                             predicted_oom=mem.reserved > cal.device_bytes, largest=mem.largest()))
    return rows


def _err(pred, meas) -> str:
    return "" if meas in (None, 0) else f"{(pred / meas - 1) * 100:+.0f}%"


def fit_exclusion(label: str) -> str:
    """Why `mop plan fit` leaves out the points of this source ("" when it does not: `FIT_EXCLUDED`)."""
    return next((why for key, why in FIT_EXCLUDED.items() if key in label), "")


def accuracy_rows(paths=None, calibration: str | Calibration = "h200") -> list[dict]:
    """One dict per measured point: what was run, measured and predicted memory and time, and the largest terms
    (and, for `mop plan fit`: the device it ran on, the predicted `Step`, its resolved device share, the
    `TimeEstimate` and `MemoryEstimate`)."""
    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    paths = sorted(paths or glob.glob("bench/results/**/results.json", recursive=True))
    rows, seen = [], set()
    for pt in _points(paths):
        label, world, step_s = pt["label"], pt["world"], pt["step_s"]
        key = (tuple(pt["opts"]), step_s, pt["tps"])
        if key in seen:  # a point copied into a later results file (--resume)
            continue
        seen.add(key)
        step, mem, t, auto_note = predict(pt["opts"], world, cal, pt["chosen"], pt["frac"], **legacy_code(label))
        note = "; ".join(n for n in (pt["note"], auto_note) if n)
        if step_s is None and pt["tps"]:
            step_s = step.tokens_per_step / world / pt["tps"]
        big_t = max(((k, v) for k, v in t.terms().items() if k not in ("comm_hidden", "optimizer_total")),
                    key=lambda kv: kv[1])
        rows.append(dict(source=label, world=world, layers=step.model.n_layers, context=step.seq_len,
                         config=f"D{step.layout.seq} Ep{step.layout.expert} P{step.layout.vocab} {step.dispatcher} "
                                f"ac={policy_spec(step.policies)} opt={step.offload}",
                         peak_meas=pt["peak"], peak_pred=mem.allocated / GIB, step_meas=step_s, step_pred=t.step,
                         host_meas=pt["host"], host_pred=mem.host / GIB,
                         mem_term=mem.largest(), time_term=f"{big_t[0]} {big_t[1]:.2f}s", note=note,
                         device=pt["device"], step=step, device_fraction=mem.device_fraction, time=t, memory=mem))
    return rows


def accuracy_table(paths=None, calibration: str | Calibration = "h200") -> str:
    """The Markdown table of `accuracy_rows`, with the share of points within 10% (memory) / 15% (time),
    in sample and leaving each fitted point out (`fit.leave_one_out_by_point`), and the terms of every miss."""
    from mop.plan.fit import leave_one_out_by_point, point_keys

    cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
    rows = accuracy_rows(paths, cal)
    loo = leave_one_out_by_point(rows, cal)
    out = [f"Calibration {cal.name} ({cal.device_name}); in-step efficiencies "
           + ", ".join(f"{t} {f:.4g}" for t, f in cal.efficiencies().items())
           + (f"; fitted on {len(loo)} of these points (`mop plan fit`: {', '.join(cal.fit['fitted']) or 'none'})"
              if loo else "") + ".", "",
           "| source | W | L | context | configuration | peak GiB meas / pred | err | step s meas / pred | err "
           "| leave-one-out | host GiB/rank meas / pred | largest terms (memory; time) | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    mem_ok = time_ok = loo_ok = mem_n = time_n = 0
    misses = []
    for r, key in zip(rows, point_keys(rows)):
        pm = "-" if r["peak_meas"] is None else f"{r['peak_meas']:.1f}"
        sm = "-" if r["step_meas"] is None else f"{r['step_meas']:.3f}"
        hm = "-" if r["host_meas"] is None else f"{r['host_meas']:.1f}"
        left_out = f"{math.expm1(loo[key]) * 100:+.0f}%" if key in loo else "-"
        out.append(f"| {r['source']} | {r['world']} | {r['layers']} | {r['context'] // 1024}K | {r['config']} | "
                   f"{pm} / {r['peak_pred']:.1f} | {_err(r['peak_pred'], r['peak_meas'])} | {sm} / "
                   f"{r['step_pred']:.3f} | {_err(r['step_pred'], r['step_meas'])} | {left_out} | "
                   f"{hm} / {r['host_pred']:.1f} | {r['mem_term']}; "
                   f"{r['time_term']} | {r['note']} |")
        mem_miss = time_miss = False
        if r["peak_meas"]:
            mem_n += 1
            mem_miss = abs(r["peak_pred"] / r["peak_meas"] - 1) > 0.10
            mem_ok += not mem_miss
        if r["step_meas"]:
            time_n += 1
            time_miss = abs(r["step_pred"] / r["step_meas"] - 1) > 0.15
            time_ok += not time_miss
            loo_ok += abs(math.expm1(loo[key]) if key in loo else r["step_pred"] / r["step_meas"] - 1) <= 0.15
        if mem_miss or time_miss:
            misses.append((r, mem_miss, time_miss))
    out.append("")
    out.append(f"Within 10% on peak memory: {mem_ok} of {mem_n} points; within 15% on step time: {time_ok} of "
               f"{time_n} points" + (f" in sample, {loo_ok} of {time_n} with each fitted point left out of the fit "
                                     f"(the others were not fitted on)." if loo else "."))
    if misses:
        out += ["", "Points outside the targets, with the predicted terms (time: seconds per step, the exposed "
                "ones add up to the step; memory: GiB at the peak):", ""]
        for r, mem_miss, time_miss in misses:
            what = []
            if time_miss:
                terms = ", ".join(f"{k} {v:.2f}" for k, v in r["time"].terms().items()
                                  if k not in ("comm_hidden", "optimizer_total") and v >= 0.005)
                what.append(f"time {_err(r['step_pred'], r['step_meas'])} ({r['step_meas']:.3f} s measured): {terms}")
            if mem_miss:
                terms = ", ".join(f"{k} {v / GIB:.1f}" for k, v in r["memory"].device_terms().items() if v >= 0.05 * GIB)
                what.append(f"memory {_err(r['peak_pred'], r['peak_meas'])} ({r['peak_meas']:.1f} GiB measured): "
                            f"{terms}")
            out.append(f"- {r['source']} {r['context'] // 1024}K {r['config']}: " + "; ".join(what))
    ooms = oom_rows(paths, cal)
    if ooms:
        out += ["", "Runs that ran out of memory, judged at their leanest (auto policies: offload on every block; "
                "host optimizer: no device share):", "",
                "| source | W | L | context | configuration | predicted reserved GiB | predicted OOM? | largest term |",
                "|---|---|---|---|---|---|---|---|"]
        for r in ooms:
            out.append(f"| {r['source']} | {r['world']} | {r['layers']} | {r['context'] // 1024}K | {r['config']} | "
                       f"{r['predicted']:.1f} | {'yes' if r['predicted_oom'] else '**no**'} | {r['largest']} |")
    return "\n".join(out)
