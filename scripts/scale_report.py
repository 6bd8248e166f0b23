"""The MoP paper's settings on paper: what `mop plan` predicts for 120B / 600B / 1T on 16 / 64 / 96 H200s.

    python scripts/scale_report.py [--out bench/results/2026-11-29-plan-scale-report] [--host-mem-gib 2048]

For each model (`mop-120b`, `mop-600b`, `mop-1t`: Kimi-K2-like, MLA, H 7168, 384 experts top-8 of
width 2048, V 200K) and context (64K to 1M) on 8-GPU nodes: the configuration `mop plan` chooses,
its per-GPU device memory and per-node host memory, the predicted tokens/s/GPU, and what an
FSDP-style layout (D = 1: every rank holds whole sequences) would need. Writes REPORT.md (with the
paper's numbers beside ours), scale.png, plans.json and ACCURACY.md (predicted vs measured on the
GPUs we have, `mop plan accuracy`). Predictions, not measurements: this machine has no GPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mop.models.shapes import get_shape
from mop.plan.accuracy import accuracy_table
from mop.plan.calibration import Calibration
from mop.plan.search import NoPlan, choose
from mop.plan.step import GIB, Step, policy_spec
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


def fsdp_style(model, gpus: int, context: int, cal: Calibration, host_bytes: float) -> dict:
    """The fastest D = 1 configuration that fits, or the leanest one's memory when none does."""
    try:
        plan = choose(model, gpus=gpus, context=context, gpus_per_node=8, host_bytes=host_bytes, calibration=cal,
                      seq_degrees=(1,))
        b = plan.best
        return {"fits": True, "tokens_per_s_per_gpu": b.time.tokens_per_s_per_gpu,
                "device_gib": b.memory.reserved / GIB, "config": b.label()}
    except NoPlan:
        lean = Step(model=model, layout=LayoutSpec(gpus, 1, gpus, 8), seq_len=context, policies="offload",
                    offload="gpu_stream", device_fraction=0.0, dispatcher="llep_pipelined")
        mem = estimate_memory(lean, cal)
        return {"fits": False, "device_gib": mem.reserved / GIB, "largest": mem.largest(),
                "config": "D=1 Ep=W P=8 offload, optimizer on the host"}


def run(out: Path, host_gib: float) -> list[dict]:
    cal = Calibration.load("h200")
    rows = []
    for shape, gpus in SETTINGS:
        model = get_shape(shape)
        for ctx in CONTEXTS:
            row = {"model": shape, "params_b": model.param_counts()["total"] / 1e9, "gpus": gpus, "context": ctx,
                   "paper": PAPER.get((shape, ctx))}
            try:
                plan = choose(model, gpus=gpus, context=ctx, gpus_per_node=8, host_bytes=host_gib * GIB,
                              calibration=cal)
                b = plan.best
                s, m, t = b.step, b.memory, b.time
                row.update(fits=True, D=s.layout.seq, Ep=s.layout.expert, P=s.layout.vocab, dispatcher=s.dispatcher,
                           ac=policy_spec(s.policies), optimizer=s.offload, device_fraction=s.device_fraction,
                           tokens_per_s_per_gpu=t.tokens_per_s_per_gpu, step_s=t.step,
                           # a bound: every collective and the whole optimizer update exposed
                           no_overlap_tokens_per_s_per_gpu=t.tokens_per_step / gpus / (
                               t.step + t.comm_hidden + t.optimizer_total - t.optimizer_exposed),
                           device_gib=m.reserved / GIB, host_gib_per_gpu=m.host / GIB,
                           # what the step needs without the optional device share of the optimizer state
                           needed_gib=(m.reserved - m.optimizer * (1 + cal.allocator_slack)) / GIB,
                           host_gib_per_node=m.host * 8 / GIB,
                           time_terms={k: round(v, 3) for k, v in t.terms().items()},
                           memory_terms={k: round(v / GIB, 2) for k, v in m.device_terms().items()},
                           overrides=plan.overrides())
            except NoPlan as e:
                row.update(fits=False, reason=str(e).splitlines()[1] if "\n" in str(e) else str(e))
            row["fsdp"] = fsdp_style(model, gpus, ctx, cal, host_gib * GIB)
            rows.append(row)
            print(shape, _k(ctx), row.get("tokens_per_s_per_gpu"), row["fsdp"].get("device_gib"), flush=True)
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


def table(rows: list[dict]) -> str:
    out = ["| model | GPUs | context | layout (D, Ep, P), dispatcher | activations | optimizer | predicted tok/s/GPU "
           "(nothing overlapped) | paper MoP | paper FSDP-best | device GiB/GPU (needed) | host GiB/GPU "
           "| host GiB/node | FSDP-style (D=1) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = r["paper"] or (None, None)
        f = r["fsdp"]
        fs = (f"fits: {f['tokens_per_s_per_gpu']:,.0f} tok/s/GPU" if f["fits"] else
              f"needs {f['device_gib']:,.0f} GiB/GPU ({f['largest']})")
        pm = "-" if paper[0] is None else f"{paper[0]:,}"
        pb = "-" if paper[0] is None else ("OOM" if paper[1] is None else f"{paper[1]:,}")
        if not r["fits"]:
            out.append(f"| {r['model']} | {r['gpus']} | {_k(r['context'])} | no fit: {r['reason']} | | | | {pm} | "
                       f"{pb} | | | | {fs} |")
            continue
        out.append(f"| {r['model']} ({r['params_b']:.0f}B) | {r['gpus']} | {_k(r['context'])} | "
                   f"{r['D']}, {r['Ep']}, {r['P']}, {r['dispatcher']} | {r['ac']} | {r['optimizer']} "
                   f"(device {r['device_fraction']:.2f}) | **{r['tokens_per_s_per_gpu']:,.0f}** "
                   f"({r['no_overlap_tokens_per_s_per_gpu']:,.0f}) | {pm} | {pb} | "
                   f"{r['device_gib']:.0f} ({r['needed_gib']:.0f}) | {r['host_gib_per_gpu']:.0f} | "
                   f"{r['host_gib_per_node']:.0f} | {fs} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/2026-11-29-plan-scale-report")
    ap.add_argument("--host-mem-gib", type=float, default=2048.0, help="host memory per 8-GPU node")
    args = ap.parse_args()
    out = Path(args.out)
    rows = run(out, args.host_mem_gib)
    plot(rows, out / "scale.png")
    (out / "TABLE.md").write_text(table(rows) + "\n")
    (out / "ACCURACY.md").write_text("# mop plan: predicted vs measured (calibration h200)\n\n"
                                     "Generated by `mop plan accuracy`.\n\n" + accuracy_table() + "\n")
    print(f"wrote {out}/plans.json, TABLE.md, ACCURACY.md, scale.png")


if __name__ == "__main__":
    main()
