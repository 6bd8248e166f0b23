"""Long context: under the full MoP layout no rank ever holds a full-width tensor of the whole sequence.

Issue #5 asks that, with activation checkpointing, nothing outside attention materialises S tokens
at full width on one rank (and the vocabulary issue that nothing is N x V). Every op's outputs,
forward and backward, of one training step are watched on every rank; the largest must stay below
S x H. A single process of the same model (the negative control) does build S x H tensors, so the
check can fail.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.dist_utils import run_distributed

S, H = 1024, 64
MODEL = ["--model.shape=debug", f"--model.dim={H}", "--model.n_heads=8", "--model.n_kv_heads=2",
         "--model.head_dim=8", "--model.expert_dim=32", "--model.vocab_size=97", f"--training.seq_len={S}", "--training.batch_size=1",
         "--data.dataset=synthetic", "--data.synthetic_doc_len=300", "--training.device=cpu",
         "--training.dtype=fp32", "--training.activation_checkpoint=true", "--logging.progress=none",
         "--training.steps=2"]


class LargestLocalTensor(TorchDispatchMode):
    """The largest rank-local tensor any op outputs (DTensors counted by their local shard)."""

    def __init__(self):
        super().__init__()
        self.numel, self.where = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                local = t.to_local() if hasattr(t, "to_local") else t
                if local.numel() > self.numel:
                    self.numel, self.where = local.numel(), f"{func} -> {tuple(local.shape)}"
        return out


def _largest_in_step(rank: int, world: int, overrides: list[str], run_dir: str):
    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = build_config(overrides=MODEL + overrides + [f"--logging.run_dir={run_dir}"])
    device = torch.device("cpu")
    proc = ProcessInfo(rank=rank, world=world, local_rank=rank, local_world=world, device=device)
    trainer = Trainer(job, proc)
    trainer.train_step()  # warm-up: lazy inits, optimizer state
    with LargestLocalTensor() as mode:
        trainer.train_step()
    return mode.numel, mode.where


def test_no_rank_holds_the_whole_sequence_at_full_width(tmp_path):
    layout = ["--parallel.seq.degree=4", "--parallel.experts.degree=4", "--parallel.vocab.degree=4",
              "--parallel.experts.dispatcher=llep_pipelined",
              "--parallel.experts.chunk_tokens=64", "--parallel.seq.head_chunks=2"]
    results = run_distributed(_largest_in_step, 4, layout, str(tmp_path / "mop"))
    for rank, (numel, where) in enumerate(results):
        assert numel < S * H, f"rank {rank}: {where} has {numel} elements >= S x H = {S * H}"

    # Negative control: one process holds the whole sequence, so it does create S x H tensors.
    import torch.distributed as dist

    from mop.distributed import ProcessInfo  # noqa: F401  (same path as the ranks)

    numel, where = _single_process_largest(str(tmp_path / "one"))
    assert numel >= S * H, where
    assert not dist.is_initialized()


def _single_process_largest(run_dir: str):
    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    job = build_config(overrides=MODEL + ["--parallel.seq.degree=1", "--parallel.experts.degree=1",
                                          "--parallel.vocab.degree=1", f"--logging.run_dir={run_dir}"])
    trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    trainer.train_step()
    with LargestLocalTensor() as mode:
        trainer.train_step()
    return mode.numel, mode.where
