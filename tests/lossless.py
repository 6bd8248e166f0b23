"""The lossless harness: train k steps under a MoP layout on N gloo ranks and under one process,
then compare loss per step, gradients and final weights (fp32).

Every component adds its layouts to `tests/test_lossless.py` through `compare_with_reference`.
"""

from __future__ import annotations

import torch

from tests.dist_utils import run_distributed

BASE = [
    "--model.shape=debug",
    "--data.dataset=synthetic",
    "--data.synthetic_doc_len=24",  # several documents per sequence, crossing rank chunk boundaries
    "--training.seq_len=64",
    "--training.warmup_steps=1",
    "--training.device=cpu",
    "--training.dtype=fp32",
    "--optimizer.lr=1e-2",
    # Adam divides by sqrt(v): an element whose gradient is a near-cancelling sum (~1e-6, a rarely
    # seen embedding row) gets a sign-like update with eps=1e-8, so a 1e-9 summation-order change
    # moves it by a few % of lr. With eps=1e-4 such elements update linearly in the gradient
    # (error ~ lr * dgrad / eps ~ 1e-7) while typical gradients (1e-3..1e-1) are still normalised.
    "--optimizer.eps=1e-4",
    "--logging.progress=none",
    "--logging.log_every=1",
]


def _job(overrides: list[str], run_dir: str):
    from mop.config import build_config

    return build_config(overrides=BASE + [f"--logging.run_dir={run_dir}"] + overrides)


def _train_rank(rank: int, world: int, overrides: list[str], run_dir: str, steps: int):
    """One rank of the parallel run (process group initialised by run_distributed)."""
    import torch.distributed as dist

    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = _job(overrides + [f"--training.steps={steps}"], run_dir)
    proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                       device=torch.device("cpu"))
    trainer = Trainer(job, proc)
    result = trainer.train(capture_grads_at=(1,))
    weights = trainer.full_state_dict()
    if rank != 0:
        return None
    return {"losses": [h["loss"] for h in result.history], "grad_norms": [h["grad_norm"] for h in result.history],
            "grads": result.captured_grads[1], "weights": weights, "buffers": _routing_buffers(trainer)}


def _routing_buffers(trainer) -> dict[str, torch.Tensor]:
    """Buffers that training changes (the routers' expert-selection bias): replicated, so rank 0's copy."""
    return {n: b.detach().float().cpu().clone() for n, b in trainer.model.named_buffers() if n.endswith("expert_bias")}


def run_parallel(world: int, overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    return run_distributed(_train_rank, world, overrides, run_dir, steps)[0]


def run_reference(overrides: list[str], run_dir: str, steps: int = 3) -> dict:
    """One process, same global batch: batch_size x (number of sequence groups) sequences per step."""
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = _job(overrides + [f"--training.steps={steps}"], run_dir)
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    result = trainer.train(capture_grads_at=(1,))
    return {"losses": [h["loss"] for h in result.history], "grad_norms": [h["grad_norm"] for h in result.history],
            "grads": result.captured_grads[1], "weights": trainer.full_state_dict(),
            "buffers": _routing_buffers(trainer)}


def compare_with_reference(world: int, layout: dict[str, int], tmp_path, extra: list[str] = (), steps: int = 3,
                           batch_size: int = 2, rtol: float = 1e-5, atol: float = 1e-5,
                           ref_extra: list[str] | None = None, ref_batch_size: int | None = None) -> tuple[dict, dict]:
    """Assert the parallel run equals the single-process run of the same global batch; return both runs.

    `extra` options apply to both runs unless `ref_extra` gives the reference its own (e.g. plain
    torch AdamW as the reference of the host-resident optimizer, or no gradient accumulation with
    `ref_batch_size` holding all micro-batches at once).
    """
    seq = layout.get("seq.degree", 1)
    par = [f"--parallel.{k}={v}" for k, v in layout.items()] + list(extra)
    got = run_parallel(world, par + [f"--training.batch_size={batch_size}"], str(tmp_path / "par"), steps)
    ref_batch = ref_batch_size or batch_size * (world // seq)
    ref_opts = list(extra if ref_extra is None else ref_extra)
    ref = run_reference(ref_opts + [f"--training.batch_size={ref_batch}"], str(tmp_path / "ref"), steps)
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol)
    # Guard against a vacuous comparison: the reference must have trained (non-zero gradients,
    # changing losses).
    assert min(ref["grad_norms"]) > 0 and len(set(ref["losses"])) == len(ref["losses"])
    assert set(got["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    assert set(got["weights"]) == set(ref["weights"])
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=rtol, atol=atol, msg=lambda m: f"weight {name}: {m}")
    assert set(got["buffers"]) == set(ref["buffers"])
    for name, b in ref["buffers"].items():
        torch.testing.assert_close(got["buffers"][name], b, rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}")
    return got, ref
