"""`mop bench`: mop against the FSDP-best baseline, side by side, on this machine.

First table (4 x H200; the lead's run):

    mop bench --shape qwen3-30b-a3b --contexts 8K,32K,64K,128K,256K,512K,1M --gpus 4 \
        --batch-setting both --out bench/results/qwen3-30b-a3b-4xh200

Longest contexts with fewer layers of the same shape (say so in the table: --layers is recorded):

    mop bench --shape qwen3-30b-a3b --layers 8 --contexts 512K,1M --gpus 4 --out bench/results/qwen3-8l

CPU smoke test (what CI runs; gloo workers, same code):

    mop bench --device cpu --shape debug --gpus 2 --contexts 64 --warmup 1 --steps 1 --out /tmp/bench

Every (system, config, context, batch setting) point is a `torchrun --nproc-per-node G -m
mop.bench.worker` subprocess with a timeout, so an OOM, a NCCL failure or a hang is recorded and the
run goes on. Results are written after every point; `--resume` skips points already in the out dir.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

ONE_M = 2**20


def parse_context(text: str) -> int:
    """'8192', '8K', '1M' -> tokens (K = 1024, M = 2^20)."""
    t = text.strip().upper()
    mult = {"K": 1024, "M": ONE_M}.get(t[-1:], 1)
    try:
        value = int(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise ValueError(f"--contexts: {text!r} is not a length like 8192, 8K or 1M") from None
    if value < 2:
        raise ValueError(f"--contexts: {text!r} must be at least 2 tokens")
    return value


def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(prog="mop bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-30b-a3b", help="named model shape (mop.models.shapes)")
    p.add_argument("--contexts", default="8K,32K", help="comma-separated tokens per sequence: 8192,32K,1M")
    p.add_argument("--gpus", type=int, default=4, help="ranks per point (GPUs; CPU processes with --device cpu)")
    p.add_argument("--layers", type=int, default=None, help="use this many layers of the shape (recorded)")
    p.add_argument("--batch-setting", choices=("paper", "1M", "both"), default="paper")
    p.add_argument("--systems", default="mop,baseline", help="comma-separated subset of mop,baseline")
    p.add_argument("--mop-overrides", action="append", default=[],
                   help="--section.key=value options for mop (quoted, repeatable); default: "
                        "D = Ep = P = G, activation checkpointing")
    p.add_argument("--overrides", action="append", default=[], help="--section.key=value options for both systems")
    p.add_argument("--baseline-configs", default=None,
                   help="JSON list of BaselineConfig dicts to run instead of the sweep, e.g. '[{\"ep\": 4}]'")
    p.add_argument("--sweep", choices=("quick", "full"), default="quick", help="baseline sweep breadth")
    p.add_argument("--sweep-offload", choices=("auto", "always", "never"), default="auto",
                   help="try offloaded baseline configs: only when nothing fits on the device (auto), first with "
                        "the optimizer alone on the host (baseline.optimizer_offload), then FSDP2's CPUOffloadPolicy")
    p.add_argument("--sweep-max", type=int, default=None, help="at most this many baseline runs per point")
    p.add_argument("--skew", type=float, default=0.0, help="share of top-k slots routed to top_k hot experts")
    p.add_argument("--mop-layout", choices=("rule", "plan"), default="rule",
                   help="mop's layout: rule = D=1 up to 64K tokens, D=G above; Ep=1 up to 64K tokens per rank "
                        "where a layer's experts are small, else Ep=G (see default_mop_overrides); "
                        "plan = parallel.plan=auto (mop plan chooses D, Ep, P, dispatcher, optimizer placement; "
                        "the tokens per step stay those of the rule's layout)")
    p.add_argument("--mop-ac", choices=("auto", "on", "off"), default="auto",
                   help="mop's activation policy: auto = chosen per block before step 1 by a measured probe "
                        "(training.activation_checkpoint=auto), on = full, off = none")
    p.add_argument("--optimizer-ablation", action="store_true",
                   help="per point, also time steps without the optimizer update and report the optimizer's "
                        "exposed time (step time minus step time without the update) and its share of the step")
    p.add_argument("--profile", action="store_true",
                   help="per point, one more (untimed) step under torch.profiler; its device time by op, idle "
                        "time and blocking host calls go to OUT/profiles/<point>.txt (rank 0)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps")
    p.add_argument("--warmup-micro-batches", type=int, default=0,
                   help="run each warm-up step with at most this many micro-batches (0: all of them). A step at "
                        "2^20 tokens holds tens of micro-batches; warming up with two of them compiles, allocates "
                        "and fills the optimizer state just the same, for a fraction of the device time. "
                        "The --profile step runs as many. Timed steps always run every micro-batch")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per point before it is killed")
    p.add_argument("--out", default="bench/results/latest", help="output directory")
    p.add_argument("--resume", action="store_true", help="keep points already in OUT/results.json")
    args = p.parse_args(argv)
    args.context_list = [parse_context(c) for c in args.contexts.split(",") if c.strip()]
    args.system_list = [s.strip() for s in args.systems.split(",") if s.strip()]
    bad = [s for s in args.system_list if s not in ("mop", "baseline")]
    if bad or not args.system_list:
        p.error(f"--systems: {bad or args.systems!r}: choose from mop, baseline")
    if args.gpus < 1 or args.warmup < 0 or args.steps < 1 or args.warmup_micro_batches < 0:
        p.error("--gpus and --steps must be >= 1, --warmup and --warmup-micro-batches >= 0")
    if not 0.0 <= args.skew <= 1.0:
        p.error(f"--skew must be in [0, 1], got {args.skew}")
    return args


def _device(option: str) -> str:
    import torch

    if option == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if option == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible; use --device cpu")
    return option


def _split(items: list[str]) -> list[str]:
    return [tok for item in items for tok in shlex.split(item)]


def grad_accum_for(setting: str, context: int, streams: int) -> int:
    """Micro-batches per step: 1 (paper), or enough for 2^20 tokens over `streams` sequence groups."""
    if setting == "paper":
        return 1
    return max(1, round(ONE_M / (context * streams)))


def common_overrides(args, device: str, context: int, accum: int, run_dir: str) -> list[str]:
    out = [f"--model.shape={args.shape}", "--data.dataset=synthetic", "--data.synthetic_doc_len=0",
           f"--training.seq_len={context}", "--training.batch_size=1", f"--training.grad_accum={accum}",
           f"--training.steps={args.warmup + args.steps + 1}", f"--training.device={device}",
           "--logging.progress=none", f"--logging.run_dir={run_dir}", "--checkpoint.enabled=false"]
    if args.layers:
        out.append(f"--model.n_layers={args.layers}")
    return out + _split(args.overrides)


SEQ_PARALLEL_FROM = 65536 + 1  # the default layout's rule: Ulysses over all G ranks above 64K tokens
# The default layout's rule: experts sharded as dense weights (Ep = 1) while one layer's experts,
# gathered in bf16, take at most this much (FSDP's one-ahead prefetch holds two layers' worth), and
# a rank's tokens at most EXPERTS_AS_DENSE_MAX_TOKENS (the plain layer routes them all at once).
EXPERTS_AS_DENSE_MAX_BYTES = 4 * 2**30
EXPERTS_AS_DENSE_MAX_TOKENS = 65536


def default_mop_overrides(model_cfg, gpus: int, context: int) -> list[str]:
    """mop's layout for a point (until `mop plan` chooses it), a documented rule:

    * D = 1 while a sequence fits one rank (up to 64K tokens): every rank trains its own sequences,
      no attention all-to-all; D = G above, where one rank's activations no longer fit with
      attention kept (selective checkpointing), and Ulysses divides them by G.
    * Ep = 1 when one layer's experts gathered in bf16 take at most 4 GiB (qwen3-30b-a3b: 1.2 GB)
      and a rank holds at most 64K tokens: the experts are then sharded as dense weights and
      gathered one block ahead, with no token all-to-all and no per-layer host sync
      (mop.parallel.parallelize.experts_sharded_as_dense). Measured on 2 x H200 with 24 layers
      against Ep = 2: +2% at 8K, +8% at 32K, +5% at 128K (bench/results/2026-11-30-session5-2xh200/).
      Otherwise (more tokens per rank, whose routed activations LLEP's chunks bound, or Kimi-wide
      experts) Ep = the largest divisor of G that divides the expert count.
    * P = G.
    """
    seq = gpus if context >= SEQ_PARALLEL_FROM else 1
    gathered = 3 * model_cfg.n_experts * model_cfg.dim * model_cfg.expert_dim * 2
    if gathered <= EXPERTS_AS_DENSE_MAX_BYTES and context // seq <= EXPERTS_AS_DENSE_MAX_TOKENS:
        ep = 1
    else:
        ep = max(d for d in range(1, gpus + 1) if gpus % d == 0 and model_cfg.n_experts % d == 0)
    return [f"--parallel.seq.degree={seq}", f"--parallel.experts.degree={ep}", f"--parallel.vocab.degree={gpus}"]


MOP_AC = {"auto": "auto", "on": "full", "off": "none"}  # --mop-ac -> training.activation_checkpoint


def main(argv: list[str]) -> int:
    """Entry point of `mop bench` (see the module docstring)."""
    from mop.baselines import BaselineConfig
    from mop.bench.sweep import best_record, candidate_configs, run_sweep
    from mop.bench.report import environment, markdown, plots
    from mop.bench.runner import run_point, terminate_points_on_sigterm
    from mop.config import build_config

    args = parse_args(argv)
    terminate_points_on_sigterm()
    device = _device(args.device)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "work"
    work.mkdir(exist_ok=True)
    model_cfg = build_config(None, [f"--model.shape={args.shape}"] +
                             ([f"--model.n_layers={args.layers}"] if args.layers else [])).model
    # User overrides are applied after the default MoP layout (later options win), so
    # `--mop-overrides "--parallel.experts.dispatcher=llep"` keeps the default layout instead of silently
    # falling back to D = Ep = P = 1.
    mop_user = _split(args.mop_overrides)
    explicit = None
    if args.baseline_configs:
        try:
            explicit = [BaselineConfig(**d) for d in json.loads(args.baseline_configs)]
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--baseline-configs: expected a JSON list of BaselineConfig dicts ({e})") from None
    settings = ["paper", "1M"] if args.batch_setting == "both" else [args.batch_setting]
    results_path = out_dir / "results.json"
    points: list[dict] = []
    if args.resume and results_path.is_file():
        points = json.loads(results_path.read_text())["points"]
    done = {(p["system"], p["context"], p["batch_setting"]) for p in points}
    results = {"environment": environment("mop bench " + shlex.join(argv)),
               "args": {k: v for k, v in vars(args).items() if k not in ("context_list", "system_list")},
               "mop_overrides": mop_user, "points": points}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1))
        (out_dir / "results.md").write_text(markdown(results))
        plots(results, out_dir)

    common = dict(device=device, warmup=args.warmup, steps=args.steps, skew=args.skew, timeout=args.timeout,
                  workdir=str(work), optimizer_ablation=args.optimizer_ablation, profile=args.profile,
                  warmup_micro_batches=args.warmup_micro_batches)
    for context in args.context_list:
        for setting in settings:
            # One run directory per point: a point killed at its timeout must not hold the next one's lock.
            run_dir = str(work / f"run-{context}-{setting}")  # per point; each system's runs are sequential
            if "mop" in args.system_list and ("mop", context, setting) not in done:
                # User overrides come last, so an explicit --training.activation_checkpoint wins.
                extra = (default_mop_overrides(model_cfg, args.gpus, context)
                         + [f"--training.activation_checkpoint={MOP_AC[args.mop_ac]}"]
                         + (["--parallel.plan=auto"] if args.mop_layout == "plan" else []) + mop_user)
                job = build_config(None, common_overrides(args, device, context, 1, run_dir) + extra)
                accum = grad_accum_for(setting, context, args.gpus // job.parallel.seq.degree)
                print(f"mop bench: mop, context {context}, batch {setting}: {' '.join(extra)} ...", flush=True)
                rec = run_point("mop", args.gpus, common_overrides(args, device, context, accum, run_dir) + extra,
                                **common)
                _store_profile(rec, out_dir, f"mop-{context}-{setting}")
                print(f"  -> {rec['status']}", flush=True)
                label = " ".join(extra)
                if rec.get("plan_overrides"):  # the layout the plan chose, not the rule's it replaced
                    label += " -> plan: " + " ".join(rec["plan_overrides"])
                points.append({"system": "mop", "label": label, "context": context,
                               "batch_setting": setting, **rec})
                save()
            if "baseline" in args.system_list and ("baseline", context, setting) not in done:
                configs = explicit or candidate_configs(model_cfg, context, args.gpus, mode=args.sweep,
                                                        cuda=device == "cuda", compile_loss=device == "cuda")

                def run_cfg(cfg, context=context, setting=setting):
                    cfg = cfg.resolved(args.gpus)
                    accum = grad_accum_for(setting, context, args.gpus // cfg.replicas)
                    rec = run_point("baseline", args.gpus, common_overrides(args, device, context, accum, run_dir),
                                    baseline_json=cfg.to_json(), **common)
                    _store_profile(rec, out_dir, f"baseline-{cfg.label.replace(' ', '_')}-{context}-{setting}")
                    return rec

                def sweep_point(records, context=context, setting=setting):
                    point = {"system": "baseline", "context": context, "batch_setting": setting, "sweep": list(records)}
                    best = best_record(records)
                    if best is not None:
                        point.update({k: v for k, v in best.items() if k != "sweep"})
                    else:
                        point.update({"label": "none fits", "status": _sweep_status(records)})
                    return point

                def save_partial(records):  # the attempts so far, saved as the point until the sweep ends
                    points.append(sweep_point(records))
                    try:
                        save()
                    finally:
                        points.pop()

                print(f"mop bench: baseline sweep, context {context}, batch {setting} ...", flush=True)
                _, records = run_sweep(configs, run_cfg, offload="never" if explicit else args.sweep_offload,
                                       max_runs=args.sweep_max, on_record=save_partial)
                points.append(sweep_point(records))
                save()
    save()
    print(f"mop bench: wrote {results_path}, {out_dir / 'results.md'} and plots", flush=True)
    return 0


def _store_profile(rec: dict, out_dir: Path, name: str) -> None:
    """Move a point's by-op summary (`--profile`) out of the JSON into OUT/profiles/NAME.txt."""
    text = rec.pop("profile_by_op", None)
    if text:
        path = out_dir / "profiles" / f"{name}.txt"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        rec["profile"] = str(path.relative_to(out_dir))


def _sweep_status(records: list[dict]) -> str:
    statuses = {r["status"] for r in records}
    return "oom" if statuses <= {"oom", "skipped"} and "oom" in statuses else (
        "error" if records else "no valid config")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
