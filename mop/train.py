"""Train a MoE language model with mop.

The embedded default (mop/configs/default.toml): the tiny MoE on the bundled corpus, 2 CPU
workers with a MoP layout D=2 (Ulysses), Ep=2 (experts), P=2 (vocabulary); about a minute:

    mop train

One CPU process, or 4 workers with another layout:

    mop train --nproc 1 --parallel.seq=1 --parallel.expert=1 --parallel.vocab=1
    mop train --nproc 4 --parallel.seq=4 --parallel.expert=2 --parallel.vocab=4

A named config (TOML) with overrides, on one GPU:

    mop train --config configs/qwen3-30b-a3b.toml --model.n_layers=4 --training.steps=20

N GPUs on one node (torchrun starts one process per GPU; this module is the worker):

    torchrun --nproc-per-node 8 -m mop.train --config configs/qwen3-30b-a3b.toml --parallel.seq=8

N nodes (run on every node, with its own --node-rank; the endpoint is any node's host:port):

    torchrun --nnodes 4 --node-rank $NODE_RANK --nproc-per-node 8 \
        --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 -m mop.train --config ...
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from mop.config import build_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.toml"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mop train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="TOML file with [model], [parallel], [training], ... sections "
                             "(default: the embedded mop/configs/default.toml)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="launch this many local worker processes (CPU or GPUs); same as --parallel.nproc")
    args, rest = parser.parse_known_args(argv)
    bad = [a for a in rest if not (a.startswith("--") and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognised arguments {bad}: options are --config, --nproc and --section.key=value")
    # Accept "--section.key value" as well as "--section.key=value".
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    """Entry point for `mop train` and `python -m mop.train` (the torchrun worker)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    if args.nproc is not None:
        overrides.append(f"--parallel.nproc={args.nproc}")
    job = build_config(args.config, overrides)  # validate before launching anything
    if job.parallel.nproc > 1 and "LOCAL_RANK" not in os.environ:
        import torch

        from mop.launch import launch_local

        gpus = torch.cuda.device_count() if job.training.device != "cpu" else 0
        if gpus and job.parallel.nproc > gpus:
            raise SystemExit(f"mop train: parallel.nproc={job.parallel.nproc} exceeds the {gpus} visible GPU(s); use "
                             f"--nproc {gpus} with degrees that divide it, or --training.device=cpu")

        # Workers get the same options (--nproc spelled as an override, which torchrun's own parser
        # would otherwise claim); they see LOCAL_RANK and do not launch again.
        worker_argv = ([f"--config={args.config}"] if args.config else []) + overrides
        return launch_local(job.parallel.nproc, "mop.train", worker_argv, device=job.training.device)
    from mop.trainer import Trainer

    trainer = Trainer(job)
    trainer.train()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while a peer still talks to it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
