"""Lossless for the model families: MLA (DeepSeek-V3 / Kimi-K2 features) and gpt-oss attention
(sinks + sliding windows) train under Ulysses + EP + P exactly like one process (fp32, CPU, gloo).

`debug-gpt-oss` has plain SwiGLU experts; gpt-oss' own experts (biases, clamped SwiGLU) are the
last cases, under every dispatcher and under the FSDP-best baseline's plain all-to-all EP.
"""

import pytest

from tests.lossless import compare_with_reference


@pytest.mark.parametrize("world,layout", [
    (4, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2, "seq.head_chunks": 2}),
    (4, {"seq.degree": 4, "experts.degree": 2, "vocab.degree": 4}),
])
def test_mla_equals_single_process(world, layout, tmp_path):
    compare_with_reference(world, layout, tmp_path, extra=["--model.shape=debug-mla"])


@pytest.mark.parametrize("world,layout", [
    (4, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2}),
    (4, {"seq.degree": 4, "experts.degree": 4, "vocab.degree": 2}),  # D=4 > 2 KV heads: KV heads replicated
])
def test_gpt_oss_attention_equals_single_process(world, layout, tmp_path):
    compare_with_reference(world, layout, tmp_path, extra=["--model.shape=debug-gpt-oss"])


@pytest.mark.parametrize("shape,policy", [("debug-mla", "selective"), ("debug-gpt-oss", "full")])
def test_families_under_activation_checkpointing_equal_single_process(shape, policy, tmp_path):
    """Checkpointed blocks recompute MLA and sink/window attention (plain autograd under Ulysses'
    variant Function) and still train exactly like one process."""
    compare_with_reference(4, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2}, tmp_path,
                           extra=[f"--model.shape={shape}", f"--training.activation_checkpoint={policy}"])


GPT_OSS_EXPERTS = ["--model.shape=debug-gpt-oss", "--model.moe_bias=true", "--model.swiglu_limit=0.7"]


@pytest.mark.parametrize("layout", [
    {"experts.degree": 2, "experts.dispatcher": "alltoall"},
    {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2, "experts.dispatcher": "llep", "experts.llep_min_chunk": 8,
     "experts.llep_imbalance_threshold": 1.0},
    {"experts.degree": 2, "experts.dispatcher": "llep_pipelined", "experts.llep_min_chunk": 8,
     "experts.chunk_tokens": 32},
])
def test_gpt_oss_experts_equal_single_process(layout, tmp_path):
    """Expert biases (sharded with the weights, spilled with them under LLEP) and the clamped SwiGLU."""
    world = 4 if layout.get("seq.degree", 1) > 1 else 2
    compare_with_reference(world, layout, tmp_path, extra=GPT_OSS_EXPERTS)


def _baseline_gpt_oss_rank(rank, world, run_dir):
    import torch
    import torch.distributed as dist

    from mop.baselines import BaselineConfig, baseline_trainer
    from mop.distributed import ProcessInfo
    from tests.test_baseline import _job, _summary

    proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                       device=torch.device("cpu"))
    trainer = baseline_trainer(_job(run_dir, 2, GPT_OSS_EXPERTS), BaselineConfig(ep=2, compile_loss=False), proc)
    summary = _summary(trainer, trainer.train(capture_grads_at=(1,)))
    return summary if rank == 0 else None


def test_gpt_oss_experts_under_the_baseline_equal_single_process(tmp_path):
    """The FSDP-best baseline's all-to-all EP runs gpt-oss' experts too (same comparison, both systems)."""
    import torch

    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer
    from tests.dist_utils import run_distributed
    from tests.test_baseline import _assert_same, _job, _summary

    got = run_distributed(_baseline_gpt_oss_rank, 2, str(tmp_path / "base"))[0]
    ref = Trainer(_job(str(tmp_path / "ref"), 4, GPT_OSS_EXPERTS), ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
    _assert_same(got, _summary(ref, ref.train(capture_grads_at=(1,))))
