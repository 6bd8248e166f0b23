r"""Train a MoE language model with mop.

The embedded default (mop/configs/default.toml): the tiny MoE on the bundled corpus, 2 CPU
workers with a MoP layout D=2 (Ulysses), Ep=2 (experts), P=2 (vocabulary); about a minute:

    mop train

One CPU process, or 4 workers with another layout:

    mop train --nproc 1 --parallel.seq.degree=1 --parallel.experts.degree=1 --parallel.vocab.degree=1
    mop train --nproc 4 --parallel.seq.degree=4 --parallel.experts.degree=2 --parallel.vocab.degree=4

A named config (TOML) with overrides, on one GPU:

    mop train --config configs/qwen3-30b-a3b.toml --model.n_layers=4 --training.steps=20

N GPUs on one node (torchrun starts one process per GPU; this module is the worker):

    torchrun --nproc-per-node 8 -m mop.train --config configs/qwen3-30b-a3b.toml --parallel.seq.degree=8

N nodes (run on every node, with its own --node-rank; the endpoint is any node's host:port; on SLURM,
scripts/slurm_mop.sh does this and resumes by itself):

    torchrun --nnodes 4 --node-rank $NODE_RANK --nproc-per-node 8 \
        --rdzv-backend c10d --rdzv-endpoint $HEAD_NODE:29500 -m mop.train --config ...

Periodic checkpoints, and a resume after a crash (on any world size or layout; the newest checkpoint
that verifies is used):

    mop train --logging.run_dir=runs/a --checkpoint.enabled=true --checkpoint.every=100
    mop train --logging.run_dir=runs/a --checkpoint.enabled=true --checkpoint.every=100 --checkpoint.resume=true
"""

from __future__ import annotations

import argparse
import os
import sys

from pathlib import Path

from mop.config import build_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.toml"


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    epilog = None
    if "-h" in argv or "--help" in argv:  # every option, from the config dataclasses (mop.config_help)
        from mop.config_help import render_options

        epilog = render_options()
    parser = argparse.ArgumentParser(prog="mop train", description=__doc__, epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="TOML file with [model], [parallel], [parallel.experts], [training], ... sections "
                             "(default: the embedded mop/configs/default.toml, whose values win over the "
                             "defaults listed below)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="launch this many local worker processes (CPU or GPUs); same as --parallel.nproc")
    args, rest = parser.parse_known_args(argv)
    # Accept "--section.key value" as well as "--section.key=value" (joined before anything is checked).
    overrides, i = [], 0
    while i < len(rest):
        item = rest[i]
        if item.startswith("--") and "=" not in item and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            item = f"{item}={rest[i + 1]}"
            i += 1
        overrides.append(item)
        i += 1
    bad = [a for a in overrides if not (a.startswith("--") and "." in a.split("=", 1)[0] and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments {bad}: options are --config, --nproc and --section.key=value "
                     "(or --section.key value); mop train --help lists them")
    return args, overrides


def preflight(job, world: int, lock: bool = True) -> str | None:
    """What would make the run fail at start-up, checked before any worker exists: one message, or None.

    The layout against the world size and the model, the dataset, and the run directory (writable,
    not locked by a live run, not another run's checkpoints unless resuming).
    """
    from mop.checkpoint import RunDir, RunDirError

    try:
        spec = job.parallel.layout_spec(world)
        spec.validate_model(n_heads=job.model.n_heads, n_kv_heads=job.model.n_kv_heads,
                            n_experts=job.model.n_experts, seq_len=job.training.seq_len)
        if job.data.dataset != "synthetic":
            import os

            from mop.data import TokenDataset, ensure_default_dataset

            path = job.data.dataset
            if path == "default":  # built once here, not raced by every worker
                path = ensure_default_dataset(os.path.expanduser(job.data.cache_dir))
            dataset = TokenDataset(path)
            if dataset.vocab_size > job.model.vocab_size:
                return (f"data.dataset {path} has vocabulary {dataset.vocab_size} > model.vocab_size="
                        f"{job.model.vocab_size}; set --model.vocab_size={dataset.vocab_size} or use a matching tokenizer")
        if lock:
            run_dir = RunDir(job.logging.run_dir)
            run_dir.check(resume=job.checkpoint.resume)
            run_dir.unlock()  # the workers' rank 0 takes it for the run
    except (ValueError, FileNotFoundError, RunDirError) as e:
        return str(e)
    return None


def _is_rank0() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for `mop train` and `python -m mop.train` (the torchrun worker).

    Exit codes: 0 done; 2 a configuration, layout, data or run-directory error (one line, no
    traceback); 3 a NaN/Inf under training.nonfinite=stop; 4 a checkpoint that cannot be saved or loaded.
    """
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    args, overrides = parse_args(argv)
    if args.nproc is not None:
        overrides.append(f"--parallel.nproc={args.nproc}")
    try:
        job = build_config(args.config, overrides)  # validate before launching anything
    except (ValueError, FileNotFoundError) as e:
        if _is_rank0():
            print(f"mop train: {e}", file=sys.stderr)
        return 2
    worker = "LOCAL_RANK" in os.environ
    if job.parallel.nproc > 1 and not worker:
        import torch

        from mop.launch import launch_local

        gpus = torch.cuda.device_count() if job.training.device != "cpu" else 0
        if gpus and job.parallel.nproc > gpus:
            print(f"mop train: parallel.nproc={job.parallel.nproc} exceeds the {gpus} visible GPU(s); use "
                  f"--nproc {gpus} with degrees that divide it, or --training.device=cpu", file=sys.stderr)
            return 2
        error = preflight(job, job.parallel.nproc)
        if error:
            print(f"mop train: {error}", file=sys.stderr)
            return 2
        # Workers get the same options (--nproc spelled as an override, which torchrun's own parser
        # would otherwise claim); they see LOCAL_RANK and do not launch again.
        worker_argv = ([f"--config={args.config}"] if args.config else []) + overrides
        return launch_local(job.parallel.nproc, "mop.train", worker_argv, device=job.training.device)
    if worker:
        from mop.launch import die_with_parent

        die_with_parent()  # kill -9 of the launcher (mop train or torchrun) must not leave this worker running
    error = preflight(job, int(os.environ.get("WORLD_SIZE", "1")), lock=False)  # the Trainer checks the run dir
    if error:
        if _is_rank0():
            print(f"mop train: {error}", file=sys.stderr)
        return 2
    return _run(job)


def _run(job) -> int:
    """Train; known failures become one line from rank 0 and an exit code (every rank raises the same)."""
    import torch.distributed as dist

    from mop.checkpoint import CheckpointError, RunDirError
    from mop.guard import NonFiniteError
    from mop.trainer import Trainer

    try:
        trainer = Trainer(job)
        trainer.train()
    except (RunDirError, CheckpointError, NonFiniteError) as e:
        if _is_rank0():
            print(f"mop train: {e}", file=sys.stderr, flush=True)
        return {RunDirError: 2, NonFiniteError: 3}.get(type(e), 4)
    if dist.is_initialized():
        dist.barrier()  # no rank tears the group down while a peer still talks to it
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    # Leave without interpreter teardown: everything is written (metrics closed, checkpoints saved,
    # process group destroyed), and tearing down a host-optimizer run frees ~100 GB of pinned host
    # memory page by page, which kept the process alive for over a minute after its last step.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
