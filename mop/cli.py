"""The `mop` command: `mop train`, `mop data prepare`, `mop bench`, `mop plot`, `mop export`."""

from __future__ import annotations

import sys

USAGE = """usage: mop COMMAND [ARGS]

commands:
  train           train a model (mop train --help)
  data prepare    tokenize text/jsonl/parquet files into token shards (mop data prepare --help)
  bench           mop against the FSDP-best baseline on this machine's GPUs (mop bench --help)
  plan            will it fit? the fastest configuration, predicted memory and speed (mop plan --help)
  plot RUN_DIR    PNG plots of loss and throughput from RUN_DIR/metrics.jsonl
  export RUN OUT  a run's newest checkpoint as a Hugging Face checkpoint (mop export --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from mop.train import main as train_main

        return train_main(rest)
    if cmd == "data":
        if not rest or rest[0] != "prepare":
            print("usage: mop data prepare INPUT... --out DIR [--tokenizer byte|tokenizer.json]", file=sys.stderr)
            return 2
        from mop.data.prepare import prepare_main

        return prepare_main(rest[1:])
    if cmd == "bench":
        from mop.bench.cli import main as bench_main

        return bench_main(rest)
    if cmd == "plan":
        from mop.plan.cli import main as plan_main

        return plan_main(rest)
    if cmd == "export":
        return export(rest)
    if cmd == "plot":
        from mop.plot import main as plot_main

        return plot_main(rest)
    print(f"mop: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


def export(argv: list[str]) -> int:
    """`mop export`: find the checkpoint, verify it against its manifest (falling back to the newest
    one that verifies, saying so), then hand that checkpoint directory to `mop.hf.export_main`."""
    import argparse
    from pathlib import Path

    from mop.checkpoint import COMPLETE, CheckpointError, CheckpointManager, verify_checkpoint

    if any(a in ("-h", "--help") for a in argv) or not argv:
        from mop.hf import export_main

        return export_main(argv)
    ap = argparse.ArgumentParser(prog="mop export", add_help=False)
    ap.add_argument("src")
    known, _ = ap.parse_known_args(argv)
    src = Path(known.src)
    try:
        if (src / COMPLETE).is_file():  # one checkpoint directory: verify it, no fallback
            problem = verify_checkpoint(src)
            if problem:
                raise CheckpointError(f"checkpoint {src} is damaged: {problem}")
            ckpt = src
        else:
            ckpt = CheckpointManager(src).latest_verified(log=lambda m: print(m, file=sys.stderr), set_aside=False)
    except CheckpointError as e:
        print(f"mop export: {e}", file=sys.stderr)
        return 4
    if ckpt is None:
        print(f"mop export: {src} holds no complete checkpoint (looked for {src}/checkpoints/step_*/{COMPLETE}); "
              "train with --checkpoint.enabled=true (and --checkpoint.every=N for periodic saves) to write them",
              file=sys.stderr)
        return 2
    from mop.hf import export_main

    args = list(argv)
    args[args.index(known.src)] = str(ckpt)
    from torch.distributed.checkpoint.api import CheckpointException

    from mop.checkpoint import short_reason

    try:
        return export_main(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"mop export: {e}", file=sys.stderr)
        return 2
    except CheckpointException as e:  # a checkpoint without a manifest (older mop) that turns out damaged
        print(f"mop export: reading {ckpt} failed: {short_reason(e)}", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
