"""`--nproc N`: start N local workers through torchrun's elastic launcher (same as torchrun itself).

Workers die with their launcher: each calls `die_with_parent()` at start-up, so a `kill -9` of
`mop train` (or of torchrun) never leaves orphans training on and writing into the run directory.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time

_LAUNCHER_PID = "MOP_LAUNCHER_PID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Worker side: exit as soon as the process that started this one dies, however it dies.

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) asks the kernel to kill us when the parent exits; the
    parent may already be gone by the time we ask, so its pid is checked afterwards. Elsewhere, a
    daemon thread polls the parent pid once a second.
    """
    parent = int(os.environ.get(_LAUNCHER_PID, "0")) or os.getppid()
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent:  # the launcher died before the signal was armed
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="mop-parent-watchdog", daemon=True).start()


def launch_local(nproc: int, module: str, argv: list[str], device: str = "auto") -> int:
    """Run `python -m module argv` on `nproc` local processes; returns the exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    args = ["--nnodes", "1", "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", module, *argv]
    if device == "cpu" or device == "auto":
        import torch

        if device == "cpu" or not torch.cuda.is_available():
            # CPU workers: keep each to a fair share of the cores so N workers do not oversubscribe.
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    os.environ[_LAUNCHER_PID] = str(os.getpid())  # the workers' parent: torchrun's agent runs in this process
    # torchrun logs every worker exit and the SIGTERMs it sends the others; the workers print the
    # reason themselves (one line) and the summary below gives the exit code.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun_main(args)
    except SystemExit as e:
        return int(e.code or 0)
    except ChildFailedError as e:
        # The workers have already said why in one line (exit codes 2-4, see mop.train.main); anything
        # else is a crash, whose traceback torchrun printed above.
        codes = sorted({f.exitcode for f in e.failures.values()})
        known = [c for c in codes if c in (2, 3, 4)]
        if not known:
            print(f"mop train: a worker failed (exit code {codes}); see its traceback above", file=sys.stderr)
        return known[0] if known else 1
    except Exception as e:
        print(f"mop train: the launcher failed: {e}", file=sys.stderr)
        return 1
    return 0
