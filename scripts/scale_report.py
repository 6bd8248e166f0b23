"""The MoP paper's settings on paper: what `mop plan` predicts for 120B / 600B / 1T on 16 / 64 / 96 H200s.

    python scripts/scale_report.py [--out bench/results/2026-11-29-plan-scale-report-session4] [--host-mem-gib 2048] \
        [--param-dtype any] [--compare bench/results/2026-11-29-plan-scale-report/plans.json] [--host-link-node-bw 220]

For each model (`mop-120b`, `mop-600b`, `mop-1t`: Kimi-K2-like, MLA, H 7168, 384 experts top-8 of
width 2048, V 200K) and context (64K to 1M) on 8-GPU nodes: the configuration `mop plan` chooses,
its per-GPU device memory and per-node host memory, the predicted tokens/s/GPU, and what an
FSDP-style layout (D = 1: every rank holds whole sequences) would need. Writes REPORT.md (with the
paper's numbers beside ours), scale.png, plans.json and ACCURACY.md (predicted vs measured on the
GPUs we have, `mop plan accuracy`). Predictions, not measurements: this machine has no GPU.

`--param-dtype` is `mop plan`'s: which `training.param_dtype` the planner may choose (`any`: fp32 or
bf16, each row names its choice; where it chose bf16 the fp32-only plan is recorded beside it).
`--compare` an earlier report's plans.json writes CHANGES.md: the two reports' rows side by side with
the time and memory terms that moved most. `--host-link-node-bw` is `mop plan`'s (GB/s per node): the
calibration's host-link total was measured on fewer GPUs than a node here has, so without it each GPU
is assumed its own link at the one-GPU rate (`Calibration.host_link_node_total`); TABLE.md and every
row of plans.json say which.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mop.models.shapes import get_shape
from mop.plan.accuracy import accuracy_table
from mop.plan.calibration import Calibration
from mop.plan.search import NoPlan, choose, evaluate
from mop.plan.step import GIB, OFFLOADS, Cluster, Step, policy_spec, step_from_overrides
from mop.parallel.layout import LayoutSpec
from mop.plan.memory import estimate_memory

SETTINGS = [("mop-120b", 16), ("mop-600b", 64), ("mop-1t", 96)]
CONTEXTS = [2**16, 2**17, 2**18, 2**19, 2**20]
# MOP.md section 4 (tokens/s/GPU): (model, context) -> (MoP, FSDP-best or None for OOM)
PAPER = {("mop-120b", 2**17): (1043, 223), ("mop-120b", 2**20): (393, None), ("mop-600b", 2**16): (236, 39),
         ("mop-600b", 2**20): (213, None), ("mop-1t", 2**17): (166, 25), ("mop-1t", 2**18): (140, 17),
         ("mop-1t", 2**20): (100, None)}


def _k(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 else f"{n // 1024}K"


DTYPE_CHOICES = {"fp32": ("fp32",), "bf16": ("bf16",), "any": ("fp32", "bf16")}  # as `mop plan --param-dtype`


def _dtype_options(param_dtypes: tuple[str, ...]) -> dict:
    """`choose` keywords for these param dtypes (bf16 alone needs a host optimizer, as `plan_for_job` does)."""
    if "fp32" in param_dtypes:
        return {"param_dtypes": param_dtypes}
    return {"param_dtypes": param_dtypes, "offloads": tuple(o for o in OFFLOADS if o != "none")}


def fsdp_style(model, gpus: int, context: int, cal: Calibration, host_bytes: float,
               param_dtypes: tuple[str, ...], host_link_node_bw: float | None = None) -> dict:
    """The fastest D = 1 configuration that fits, or the leanest one's memory when none does."""
    try:
        plan = choose(model, gpus=gpus, context=context, gpus_per_node=8, host_bytes=host_bytes, calibration=cal,
                      host_link_node_bw=host_link_node_bw, seq_degrees=(1,), **_dtype_options(param_dtypes))
        b = plan.best
        return {"fits": True, "tokens_per_s_per_gpu": b.time.tokens_per_s_per_gpu,
                "device_gib": b.memory.reserved / GIB, "config": b.label(), "param_dtype": b.step.param_dtype}
    except NoPlan:
        dtype = "bf16" if "bf16" in param_dtypes else "fp32"  # the leanest allowed
        lean = Step(model=model, layout=LayoutSpec(gpus, 1, gpus, 8), seq_len=context, policies="offload",
                    offload="gpu_stream", device_fraction=0.0, dispatcher="llep_pipelined", param_dtype=dtype)
        mem = estimate_memory(lean, cal)
        return {"fits": False, "device_gib": mem.reserved / GIB, "largest": mem.largest(), "param_dtype": dtype,
                "config": f"D=1 Ep=W P=8 offload, optimizer on the host, {dtype} params"}


def plan_row(model, gpus: int, context: int, cal: Calibration, host_bytes: float,
             param_dtypes: tuple[str, ...], host_link_node_bw: float | None = None) -> dict:
    """The plan `mop plan` chooses, as one flat row (or `fits: False` with the refusal's closest line)."""
    try:
        plan = choose(model, gpus=gpus, context=context, gpus_per_node=8, host_bytes=host_bytes, calibration=cal,
                      host_link_node_bw=host_link_node_bw, **_dtype_options(param_dtypes))
    except NoPlan as e:
        return {"fits": False, "reason": str(e).splitlines()[1] if "\n" in str(e) else str(e)}
    b = plan.best
    s, m, t = b.step, b.memory, b.time
    return dict(fits=True, D=s.layout.seq, Ep=s.layout.expert, P=s.layout.vocab, dispatcher=s.dispatcher,
                chunk_tokens=s.chunk_tokens, ac=policy_spec(s.policies), optimizer=s.offload,
                device_fraction=s.device_fraction, param_dtype=s.param_dtype,
                tokens_per_s_per_gpu=t.tokens_per_s_per_gpu, step_s=t.step,
                # a bound: every collective and the whole optimizer update exposed
                no_overlap_tokens_per_s_per_gpu=t.tokens_per_step / gpus / (
                    t.step + t.comm_hidden + t.optimizer_total - t.optimizer_exposed),
                device_gib=m.reserved / GIB, host_gib_per_gpu=m.host / GIB,
                # what the step needs without the optional device share of the optimizer state (the
                # allocator's slack is not taken on that share)
                needed_gib=(m.reserved - m.optimizer) / GIB,
                host_gib_per_node=m.host * 8 / GIB,
                time_terms={k: round(v, 3) for k, v in t.terms().items()},
                memory_terms={k: round(v / GIB, 2) for k, v in m.device_terms().items()},
                overrides=plan.overrides())


def run(out: Path, host_gib: float, param_dtypes: tuple[str, ...] = ("fp32", "bf16"),
        host_link_node_bw: float | None = None) -> list[dict]:
    """Every (model, context) row: the chosen plan, the fp32-only plan where bf16 was chosen, the
    FSDP-style (D = 1) plan; written to `out`/plans.json."""
    cal = Calibration.load("h200")
    link = host_link_node_bw
    rows = []
    for shape, gpus in SETTINGS:
        model = get_shape(shape)
        for ctx in CONTEXTS:
            row = {"model": shape, "params_b": model.param_counts()["total"] / 1e9, "gpus": gpus, "context": ctx,
                   "paper": PAPER.get((shape, ctx)), "param_dtypes": list(param_dtypes),
                   "host_link": cal.host_link_basis(8, link)}
            row.update(plan_row(model, gpus, ctx, cal, host_gib * GIB, param_dtypes, link))
            if len(param_dtypes) > 1 and row.get("param_dtype", "bf16") != "fp32":
                # what bf16 buys: the plan with fp32 parameters only (the first report's only choice)
                fp32 = plan_row(model, gpus, ctx, cal, host_gib * GIB, ("fp32",), link)
                row["fp32_only"] = {k: fp32[k] for k in ("fits", "reason", "D", "Ep", "P", "ac", "optimizer",
                                                         "device_fraction", "tokens_per_s_per_gpu", "device_gib")
                                    if k in fp32}
            row["fsdp"] = fsdp_style(model, gpus, ctx, cal, host_gib * GIB, param_dtypes, link)
            rows.append(row)
            print(shape, _k(ctx), row.get("param_dtype"), row.get("tokens_per_s_per_gpu"),
                  row.get("fp32_only", {}).get("tokens_per_s_per_gpu"), row["fsdp"].get("device_gib"), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plans.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for shape, gpus in SETTINGS:
        pts = [r for r in rows if r["model"] == shape and r["fits"]]
        line, = ax1.plot([r["context"] for r in pts], [r["tokens_per_s_per_gpu"] for r in pts], "o-",
                         label=f"{shape} on {gpus} GPUs (predicted)")
        paper = [(r["context"], r["paper"][0]) for r in rows if r["model"] == shape and r["paper"]]
        ax1.plot(*zip(*paper), "*", ms=12, color=line.get_color(), label=f"{shape}: paper's MoP")
        base = [(r["context"], r["paper"][1]) for r in rows if r["model"] == shape and r["paper"] and r["paper"][1]]
        if base:
            ax1.plot(*zip(*base), "x", ms=9, color=line.get_color(), label=f"{shape}: paper's FSDP-best")
        ax2.plot([r["context"] for r in pts], [r["needed_gib"] for r in pts], "o-", color=line.get_color(),
                 label=f"{shape}: mop plan needs (the rest holds optimizer state)")
        ax2.plot([r["context"] for r in rows if r["model"] == shape],
                 [r["fsdp"]["device_gib"] for r in rows if r["model"] == shape], "--", color=line.get_color(),
                 label=f"{shape}: FSDP-style (D=1) needs")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONTEXTS, [_k(c) for c in CONTEXTS])
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("tokens/s/GPU")
    ax2.set_yscale("log")
    ax2.axhline(139.8, color="k", lw=0.8)
    ax2.set_ylabel("device memory per GPU (GiB); black line: H200")
    ax1.legend(fontsize=6)
    ax2.legend(fontsize=6)
    fig.suptitle("mop plan on paper: the MoP paper's models on 8-GPU H200 nodes (predictions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _plan_label(r: dict) -> str:
    """A row's plan in one line: layout, dispatcher chunk, policies, optimizer and its device share, dtype."""
    if not r["fits"]:
        return "no fit"
    disp = "pipelined" if r["dispatcher"] == "llep_pipelined" else r["dispatcher"]
    chunk = f":{r['chunk_tokens'] // 1024}K" if r["dispatcher"] == "llep_pipelined" and "chunk_tokens" in r else ""
    return (f"D{r['D']} Ep{r['Ep']} P{r['P']} {disp}{chunk}, {r['ac']}, {r['optimizer']}@{r['device_fraction']:.2f}, "
            f"{r.get('param_dtype', 'fp32')}")


def table(rows: list[dict]) -> str:
    """TABLE.md: every row with every column."""
    out = ["| model | GPUs | context | layout (D, Ep, P), dispatcher | activations | optimizer | params "
           "| predicted tok/s/GPU (nothing overlapped) | fp32 params only | paper MoP | paper FSDP-best "
           "| device GiB/GPU (needed) | host GiB/GPU | host GiB/node | FSDP-style (D=1) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = r["paper"] or (None, None)
        f = r["fsdp"]
        fs = (f"fits: {f['tokens_per_s_per_gpu']:,.0f} tok/s/GPU ({f['param_dtype']})" if f["fits"] else
              f"needs {f['device_gib']:,.0f} GiB/GPU ({f['largest']}; {f['param_dtype']})")
        pm = "-" if paper[0] is None else f"{paper[0]:,}"
        pb = "-" if paper[0] is None else ("OOM" if paper[1] is None else f"{paper[1]:,}")
        o = r.get("fp32_only")
        f32 = "same plan" if o is None else (f"{o['tokens_per_s_per_gpu']:,.0f} (D{o['D']}, {o['ac']}, "
                                             f"{o['optimizer']}@{o['device_fraction']:.2f})"
                                             if o["fits"] else f"no fit: {o['reason']}")
        if not r["fits"]:
            out.append(f"| {r['model']} | {r['gpus']} | {_k(r['context'])} | no fit: {r['reason']} | | | | | {f32} | "
                       f"{pm} | {pb} | | | | {fs} |")
            continue
        out.append(f"| {r['model']} ({r['params_b']:.0f}B) | {r['gpus']} | {_k(r['context'])} | "
                   f"{r['D']}, {r['Ep']}, {r['P']}, {r['dispatcher']} | {r['ac']} | {r['optimizer']} "
                   f"(device {r['device_fraction']:.2f}) | {r['param_dtype']} | **{r['tokens_per_s_per_gpu']:,.0f}** "
                   f"({r['no_overlap_tokens_per_s_per_gpu']:,.0f}) | {f32} | {pm} | {pb} | "
                   f"{r['device_gib']:.0f} ({r['needed_gib']:.0f}) | {r['host_gib_per_gpu']:.0f} | "
                   f"{r['host_gib_per_node']:.0f} | {fs} |")
    return "\n".join(out)


def _moved(old: dict, new: dict, unit: str, n: int = 3) -> str:
    """The `n` terms that moved most between two reports ("expert_gemm 1.20 -> 0.80 s")."""
    keys = sorted(set(old) | set(new), key=lambda k: -abs(new.get(k, 0.0) - old.get(k, 0.0)))
    return "; ".join(f"{k} {old.get(k, 0.0):.2f} -> {new.get(k, 0.0):.2f}{unit}" for k in keys[:n]
                     if abs(new.get(k, 0.0) - old.get(k, 0.0)) >= 0.005)


def same_plan_today(old: dict, cal: Calibration, host_bytes: float, host_link_node_bw: float | None = None):
    """An earlier report's chosen plan (its exact `mop train` options) predicted by today's model."""
    model = get_shape(old["model"])
    gpus = old["gpus"]
    step = step_from_overrides(model, old["overrides"], gpus)
    cluster = Cluster(gpus_per_node=8, nodes=gpus // 8, device_bytes=cal.device_bytes, host_bytes=host_bytes,
                      host_link_node_bw=host_link_node_bw)
    return evaluate(step, cal, cluster, cal.device_bytes)


def changes(old_rows: list[dict], rows: list[dict], old_name: str, cal: Calibration, host_bytes: float,
            host_link_node_bw: float | None = None) -> str:
    """CHANGES.md: an earlier report's plans.json against this one. First each earlier plan as it was
    predicted then and as today's model predicts the same options (so the terms that moved are the
    model's doing), then the two reports' chosen plans side by side."""
    old = {(r["model"], r["context"]): r for r in old_rows}
    pairs = [(old[(r["model"], r["context"])], r) for r in rows if (r["model"], r["context"]) in old]
    out = [f"# Scale report: `{old_name}` against this one", "",
           "Generated by `scripts/scale_report.py --compare`. Predictions, not measurements.", "",
           "## The first report's plans, predicted again by today's model", "",
           "The same `mop train` options (fp32 parameters, the recorded optimizer device share); the terms are",
           "the two predictions' own, so every change here is a change of the model.", "",
           "| model | GPUs | context | first report's plan | tok/s/GPU then -> today | device GiB then -> today "
           "(limit 132.7) | time terms moved most (s per step) | device terms moved most (GiB) |",
           "|---|---|---|---|---|---|---|---|"]
    for o, _ in pairs:
        if not o["fits"]:
            continue
        c = same_plan_today(o, cal, host_bytes, host_link_node_bw)
        mem = {k: v / GIB for k, v in c.memory.device_terms().items()}
        out.append(f"| {o['model']} | {o['gpus']} | {_k(o['context'])} | {_plan_label(o)} | "
                   f"{o['tokens_per_s_per_gpu']:,.0f} -> {c.time.tokens_per_s_per_gpu:,.0f} | "
                   f"{o['device_gib']:.1f} -> {c.memory.reserved / GIB:.1f}{'' if c.fits else ' (over)'} | "
                   f"{_moved(o['time_terms'], c.time.terms(), ' s')} | {_moved(o['memory_terms'], mem, '')} |")
    out += ["", "## The chosen plans", "",
            "| model | GPUs | context | first: plan | first tok/s/GPU | now: plan | now tok/s/GPU | now / first "
            "| FSDP-style D=1, first -> now |",
            "|---|---|---|---|---|---|---|---|---|"]

    def fs(f):
        return f"fits ({f['tokens_per_s_per_gpu']:,.0f})" if f["fits"] else f"{f['device_gib']:,.0f} GiB"
    for o, r in pairs:
        t_old, t_new = o.get("tokens_per_s_per_gpu"), r.get("tokens_per_s_per_gpu")
        ratio = f"{t_new / t_old:.2f}x" if t_old and t_new else "-"
        out.append(f"| {r['model']} | {r['gpus']} | {_k(r['context'])} | {_plan_label(o)} | "
                   f"{'-' if t_old is None else f'{t_old:,.0f}'} | {_plan_label(r)} | "
                   f"{'-' if t_new is None else f'{t_new:,.0f}'} | {ratio} | {fs(o['fsdp'])} -> {fs(r['fsdp'])} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/2026-11-29-plan-scale-report-session4")
    ap.add_argument("--host-mem-gib", type=float, default=2048.0, help="host memory per 8-GPU node")
    ap.add_argument("--param-dtype", choices=tuple(DTYPE_CHOICES), default="any",
                    help="training.param_dtype the planner may choose (as mop plan --param-dtype): bf16 keeps "
                         "weights and gradients in bf16 (host optimizer only); any: either, each row says which")
    ap.add_argument("--compare", type=Path, default=None,
                    help="an earlier report's plans.json: write CHANGES.md, its rows beside these")
    ap.add_argument("--host-link-node-bw", type=float, default=None,
                    help="GB/s over an 8-GPU node's host links, all GPUs copying (as mop plan --host-link-node-bw); "
                         "default: the calibration's rule, one link per GPU beyond the GPUs it was measured with")
    args = ap.parse_args()
    out = Path(args.out)
    link = args.host_link_node_bw * 1e9 if args.host_link_node_bw else None
    rows = run(out, args.host_mem_gib, DTYPE_CHOICES[args.param_dtype], link)
    plot(rows, out / "scale.png")
    basis = Calibration.load("h200").host_link_basis(8, link)
    (out / "TABLE.md").write_text(f"Host link of each 8-GPU node (host optimizer, offloaded checkpoints): {basis}.\n\n"
                                  + table(rows) + "\n")
    if args.compare:
        old_rows = json.loads(args.compare.read_text())
        (out / "CHANGES.md").write_text(changes(old_rows, rows, str(args.compare.parent), Calibration.load("h200"),
                                                args.host_mem_gib * GIB, link) + "\n")
    (out / "ACCURACY.md").write_text("# mop plan: predicted vs measured (calibration h200)\n\n"
                                     "Generated by `mop plan accuracy`.\n\n" + accuracy_table() + "\n")
    print(f"wrote {out}/plans.json, TABLE.md, ACCURACY.md, scale.png" + (", CHANGES.md" if args.compare else ""))


if __name__ == "__main__":
    main()
