"""Spawn N CPU ranks with gloo and run a function on each: the harness for distributed tests."""

from __future__ import annotations

import os
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, fn, args, result_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        out = fn(rank, world_size, *args)
        torch.save(out, os.path.join(result_dir, f"rank{rank}.pt"))
        dist.barrier()  # nobody tears gloo down while a peer still talks to it
        open(os.path.join(result_dir, f"rank{rank}.ok"), "w").close()
    except Exception:
        with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args):
    """Run `fn(rank, world_size, *args)` on `world_size` spawned gloo ranks; return each rank's result.

    `fn` must be a module-level function (it is pickled). Its return value is `torch.save`d, so
    return tensors / dicts / lists. A failing rank's traceback is re-raised here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        try:
            mp.start_processes(
                _worker, args=(world_size, init_file, fn, args, tmp), nprocs=world_size, join=True, start_method="spawn"
            )
        except Exception as exc:
            errs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
            done = all(os.path.exists(os.path.join(tmp, f"rank{r}.ok")) for r in range(world_size))
            # gloo occasionally aborts in process teardown ("terminate called without an active
            # exception") after every rank has saved its result and passed the final barrier: the
            # results are complete, so only a failure before that point fails the test.
            if errs or not done:
                raise RuntimeError("distributed test failed:\n" + "\n".join(errs)) from exc
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
