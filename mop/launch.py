"""`--nproc N`: start N local workers through torchrun's elastic launcher (same as torchrun itself)."""

from __future__ import annotations

import socket
import sys


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, module: str, argv: list[str], device: str = "auto") -> int:
    """Run `python -m module argv` on `nproc` local processes; returns the exit code."""
    from torch.distributed.run import main as torchrun_main

    args = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", module, *argv]
    if device == "cpu" or device == "auto":
        import os

        import torch

        if device == "cpu" or not torch.cuda.is_available():
            # CPU workers: keep each to a fair share of the cores so N workers do not oversubscribe.
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    try:
        torchrun_main(args)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # torchrun raises ChildFailedError with the failing rank's traceback
        print(f"mop: worker failed: {e}", file=sys.stderr)
        return 1
    return 0
