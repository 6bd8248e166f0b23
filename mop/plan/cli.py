"""`mop plan`: will it fit, with which settings, how fast; `mop plan calibrate`; `mop plan accuracy`.

    mop plan --shape qwen3-30b-a3b --gpus 2 --context 128K --layers 24
    mop plan --shape qwen3-30b-a3b --gpus 2 --context 8K --layers 24 --param-dtype bf16
    mop plan --shape qwen3-30b-a3b --gpus 2 --context 32K --layers 24 --tokens-per-step 1M   # + accumulation mode
    mop plan --shape qwen3-235b-a22b --gpus 64 --gpus-per-node 8 --context 256K --host-mem-gib 2000 \
        --host-link-node-bw 220                                 # the node's host links, if known (GB/s)
    mop plan calibrate --out mop/plan/calibration/mygpu.json     # micro-benchmarks on this machine
    torchrun --nproc-per-node 8 -m mop.cli plan calibrate        # ... and the collectives of 8 GPUs
    mop plan accuracy bench/results/*/*/results.json             # predicted vs measured, Markdown
    mop plan fit --calibration calibration.json --out fitted.json # in-step efficiencies from measured steps
    mop plan explain --gpus 2 --model.shape=qwen3-30b-a3b --parallel.seq.degree=2 --training.seq_len=131072 ...
                                                                 # one configuration, term by term
"""

from __future__ import annotations

import argparse
import sys

from mop.plan.step import ACCUMULATIONS, GIB


def parse_tokens(text: str) -> int:
    """'8192', '8K', '1M' -> tokens (K = 1024, M = 2^20)."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": 2**20}.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length like 8192, 8K or 1M") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 token")
    return value


def _plan_args(argv):
    p = argparse.ArgumentParser(prog="mop plan", description="The fastest configuration that fits (mop.plan).",
                                epilog="also: mop plan explain (one configuration, term by term), mop plan calibrate "
                                       "(measure this machine), mop plan fit (in-step efficiencies from measured "
                                       "steps), mop plan accuracy (predicted vs measured)")
    p.add_argument("--shape", required=True, help="a registered shape (mop.models.shapes) or hf:PATH")
    p.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    p.add_argument("--gpus", type=int, required=True, help="total GPUs (W)")
    p.add_argument("--context", type=parse_tokens, required=True, help="tokens per sequence: 8192, 128K, 1M")
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: --gpus / --gpus-per-node)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: --gpus (one node), or --gpus / --nodes")
    p.add_argument("--host-mem-gib", type=float, default=None, help="host memory per node (checked when given)")
    p.add_argument("--device-mem-gib", type=float, default=None, help="device memory per GPU (default: calibration)")
    p.add_argument("--intra-bw", type=float, default=None, help="GB/s per GPU inside a node (default: calibration)")
    p.add_argument("--inter-bw", type=float, default=None, help="GB/s per GPU across nodes (default: calibration)")
    p.add_argument("--host-link-node-bw", type=float, default=None,
                   help="GB/s over a node's host links with all its GPUs copying at once: a ceiling on the "
                        "calibration's total, which is measured only for nodes of up to the GPUs it was measured "
                        "with (h2d_node_gpus) and assumed one link per GPU at the one-GPU rate beyond")
    p.add_argument("--tokens-per-step", type=parse_tokens, default=None,
                   help="tokens per optimizer step (default: one sequence per sequence group)")
    p.add_argument("--param-dtype", choices=("fp32", "bf16", "any"), default="fp32",
                   help="training.param_dtype to consider: bf16 keeps weights and gradients in bf16 (2 + 2 B/param, "
                        "host optimizer only); any: both")
    p.add_argument("--accumulation", choices=("any",) + ACCUMULATIONS, default="any",
                   help="parallel.fsdp.accumulation to consider where a layout accumulates gradients "
                        "(--tokens-per-step): keep the gathered weights (keep_gathered) and the unsharded "
                        "gradients (keep_all) between micro-batches; any: the fastest that fits")
    p.add_argument("--elementwise-kernels", choices=("eager", "fused"), default="eager",
                   help="training.elementwise_kernels of the run (fused: torch.compile'd RoPE, SwiGLU and expert "
                        "gathers; its memory-bound time is counted, not yet measured)")
    p.add_argument("--calibration", default=None, help="a calibration name (h200, cpu) or .json path")
    p.add_argument("--headroom", type=float, default=0.95, help="share of device memory a plan may reserve")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p.parse_args(argv)


def plan_main(argv: list[str]) -> int:
    from mop.config import resolve_shape
    from mop.plan.calibration import Calibration, for_device
    from mop.plan.search import NoPlan, choose

    args = _plan_args(argv)
    overrides = {"n_layers": args.layers} if args.layers else {}
    model = resolve_shape(args.shape, **overrides)
    cal = Calibration.load(args.calibration) if args.calibration else for_device(None)
    G = args.gpus_per_node or (args.gpus // args.nodes if args.nodes else args.gpus)
    if args.nodes and G * args.nodes != args.gpus:
        print(f"mop plan: --gpus {args.gpus} != --nodes {args.nodes} x --gpus-per-node {G}", file=sys.stderr)
        return 2
    def search(param_dtypes, suggest=True):
        return choose(model, gpus=args.gpus, context=args.context, gpus_per_node=G,
                      tokens_per_step=args.tokens_per_step,
                      host_bytes=args.host_mem_gib * GIB if args.host_mem_gib else None,
                      intra_bw=args.intra_bw * 1e9 if args.intra_bw else None,
                      inter_bw=args.inter_bw * 1e9 if args.inter_bw else None, calibration=cal,
                      host_link_node_bw=args.host_link_node_bw * 1e9 if args.host_link_node_bw else None,
                      device_bytes=args.device_mem_gib * GIB if args.device_mem_gib else None,
                      headroom=args.headroom, param_dtypes=param_dtypes, suggest=suggest,
                      accumulations=ACCUMULATIONS if args.accumulation == "any" else (args.accumulation,),
                      elementwise_kernels=args.elementwise_kernels)

    dtypes = ("fp32", "bf16") if args.param_dtype == "any" else (args.param_dtype,)
    try:
        plan = search(dtypes)
    except NoPlan as e:
        print(f"mop plan: {e}", file=sys.stderr)
        if "bf16" not in dtypes:  # the cheaper weights: would they fit these GPUs?
            try:
                best = search(("bf16",), suggest=False).best
            except NoPlan:
                return 1
            host = best.memory.host * G / GIB
            print(f"with --param-dtype bf16 (bf16 weights and gradients on the devices, fp32 masters in the host "
                  f"optimizer) it would fit: {best.summary()}; {host:.1f} GiB of host memory per node"
                  + ("" if args.host_mem_gib else " (give --host-mem-gib to check the host)"), file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps(plan.to_dict(), indent=1))
        return 0
    counts = model.param_counts()
    print(f"{model.shape}: {counts['total'] / 1e9:.2f}B parameters ({counts['active'] / 1e9:.2f}B active), "
          f"{model.n_layers} layers; {args.gpus} x {cal.device_name} ({G} per node), context {args.context:,}; "
          f"calibration {cal.name}\n")
    print(plan.render())
    return 0


def calibrate_main(argv: list[str]) -> int:
    from mop.plan.microbench import calibrate

    p = argparse.ArgumentParser(prog="mop plan calibrate",
                                description="Measure kernel rates and bandwidths; write a calibration file.")
    p.add_argument("--out", default=None, help="default: mop/plan/calibration/<name>.json")
    p.add_argument("--name", default=None, help="calibration name (default: from the device)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--quick", action="store_true", help="small sizes (seconds; for tests)")
    args = p.parse_args(argv)
    import os

    rank = int(os.environ.get("RANK", "0"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: also all-gather / all-to-all bandwidth
        import torch
        import torch.distributed as dist

        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    log = print if rank == 0 else (lambda *a: None)
    cal, path = calibrate(device=args.device, name=args.name, out=args.out if rank == 0 else os.devnull,
                          quick=args.quick, log=log)
    log(f"wrote {path}")
    return 0


def accuracy_main(argv: list[str]) -> int:
    from mop.plan.accuracy import accuracy_table

    p = argparse.ArgumentParser(prog="mop plan accuracy", description="Predicted vs measured, as Markdown.")
    p.add_argument("results", nargs="*", help="results.json files (default: every bench/results/**/results.json)")
    p.add_argument("--calibration", default="h200")
    args = p.parse_args(argv)
    print(accuracy_table(args.results or None, calibration=args.calibration))
    return 0


def fit_main(argv: list[str]) -> int:
    """Fit a calibration's in-step efficiencies to measured steps (mop.plan.fit); write it, print the fit."""
    from pathlib import Path

    from mop.plan.accuracy import accuracy_rows
    from mop.plan.calibration import CALIBRATION_DIR, EFFICIENCIES, Calibration
    from mop.plan.fit import fit_calibration, render

    p = argparse.ArgumentParser(prog="mop plan fit",
                                description="Fit the in-step efficiency of each term (attention, expert and dense "
                                            "GEMMs, memory-bound work, links) to measured step times.")
    p.add_argument("results", nargs="*", help="results.json files (default: every bench/results/**/results.json); "
                                               "the report points of mop.plan.accuracy (EXTRA_POINTS) always join "
                                               "them; points of the calibration's device type only")
    p.add_argument("--calibration", default="h200", help="a calibration name (h200) or .json path (from `mop plan "
                                                          "calibrate`)")
    p.add_argument("--out", default=None, help="where to write the fitted calibration (default: over --calibration)")
    p.add_argument("--terms", default="auto", help="comma-separated terms to fit, of " + ",".join(EFFICIENCIES)
                   + "; auto: forward selection by leave-one-out error")
    args = p.parse_args(argv)
    cal = Calibration.load(args.calibration)
    terms = None if args.terms == "auto" else tuple(t.strip() for t in args.terms.split(",") if t.strip())
    result = fit_calibration(cal, accuracy_rows(args.results or None, cal), terms, base=str(args.calibration))
    out = args.out or (args.calibration if Path(args.calibration).suffix else CALIBRATION_DIR / f"{args.calibration}.json")
    path = result.calibration.save(out)
    print(render(result))
    print(f"\nwrote {path}")
    return 0


def explain_main(argv: list[str]) -> int:
    """Predicted memory and time, by term, of one given configuration (its `mop train` options)."""
    from mop.plan.accuracy import predict
    from mop.plan.calibration import Calibration

    p = argparse.ArgumentParser(prog="mop plan explain", description="Predict one configuration, term by term.",
                                epilog="example: mop plan explain --gpus 2 --model.shape=qwen3-30b-a3b "
                                       "--model.n_layers=24 --parallel.seq.degree=2 --training.seq_len=131072")
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--calibration", default="h200")
    args, options = p.parse_known_args(argv)
    step, mem, t, note = predict(options, args.gpus, Calibration.load(args.calibration))
    print(f"{step.model.shape} ({step.model.n_layers} layers) on {args.gpus} GPU(s): "
          + " ".join(step.overrides()) + (f"\n({note})" if note else ""))
    if step.offload != "none" and step.device_fraction < 0:
        print(f"(optimizer.device_fraction=-1 resolves as the trainer does: {mem.device_fraction:.2f})")
    print(f"\npeak device memory {mem.reserved / GIB:.1f} GiB reserved ({mem.allocated / GIB:.1f} allocated):")
    for k, v in mem.device_terms().items():
        print(f"  {k:18s} {v / GIB:8.2f} GiB")
    print(f"host per rank {mem.host / GIB:.1f} GiB: pinned state {mem.host_pinned_state / GIB:.1f}, staging "
          f"{mem.host_staging / GIB:.1f}, offloaded checkpoints {mem.host_checkpoints / GIB:.1f}, process "
          f"{mem.host_process / GIB:.1f}")
    print(f"\nstep {t.step:.3f} s, {t.tokens_per_s_per_gpu:,.0f} tokens/s/GPU:")
    for k, v in t.terms().items():
        print(f"  {k:18s} {v:8.3f} s" + ("  (not in the step)" if k in ("comm_hidden", "optimizer_total") else ""))
    return 0


def main(argv: list[str]) -> int:
    """Dispatch `mop plan [calibrate|accuracy|fit|explain] ...`; a bad option is one line, not a traceback."""
    sub = {"explain": explain_main, "calibrate": calibrate_main, "accuracy": accuracy_main, "fit": fit_main}
    run = sub.get(argv[0], plan_main) if argv else plan_main
    try:
        return run(argv[1:] if argv and argv[0] in sub else argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"mop plan: {e}", file=sys.stderr)
        return 2
