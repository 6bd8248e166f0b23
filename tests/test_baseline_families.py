"""The FSDP-best baseline's tensor parallelism of the families' attention trains exactly like one
process (fp32, CPU, gloo): MLA (DeepSeek-V3 / Kimi-K2) and gpt-oss (sinks, windows, biases).

The TP plan (mop.baselines.fsdp_best.attention_tp_plan) keeps MLA's down-projections and latent norms
replicated and splits the heads of the up-projections; the shared RoPE key's gradient is summed over
the TP group; gpt-oss' sink logits are split by heads with wq. Losses, gradients and weights after a
few AdamW steps are compared with `Trainer` on one process, as in tests/test_baseline.py.
"""

from __future__ import annotations

import pytest
import torch

from mop.baselines import BaselineConfig
from tests.dist_utils import run_distributed
from tests.test_baseline import _assert_same, _job, _summary

MLA = ["--model.shape=debug-mla"]
# wq in place of wq_a / q_norm / wq_b, and biases on the replicated down-projection and on wo (rowwise).
MLA_FULL_RANK_Q = MLA + ["--model.q_lora_rank=0", "--model.attn_bias=true"]

# name -> (world, config, model options)
CASES = {
    "mla_fsdp1_tp2": (2, BaselineConfig(tp=2, compile_loss=False, activation_checkpoint=False), MLA),
    # Recomputation re-runs the RoPE key's gradient hook inside the checkpointed block.
    "mla_fsdp1_tp2_ac_full_rank_q": (2, BaselineConfig(tp=2, compile_loss=False), MLA_FULL_RANK_Q),
    "mla_fsdp2_tp2_ep2": (4, BaselineConfig(tp=2, ep=2, compile_loss=False), MLA),
    "gpt_oss_fsdp1_tp2": (2, BaselineConfig(tp=2, compile_loss=False), ["--model.shape=debug-gpt-oss"]),
}


def _baseline_rank(rank: int, world: int, cases: dict, run_dir: str) -> dict:
    import torch.distributed as dist

    from mop.baselines import baseline_trainer
    from mop.distributed import ProcessInfo

    out = {}
    for name, (_, cfg, extra) in cases.items():
        proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                           device=torch.device("cpu"))
        trainer = baseline_trainer(_job(f"{run_dir}/{name}", 2, extra), cfg, proc)
        summary = _summary(trainer, trainer.train(capture_grads_at=(1,)))
        out[name] = summary if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    tmp = tmp_path_factory.mktemp("baseline_families")
    got = {}
    for world in sorted({w for w, _, _ in CASES.values()}):
        cases = {name: case for name, case in CASES.items() if case[0] == world}
        got.update(run_distributed(_baseline_rank, world, cases, str(tmp))[0])
    refs = {}
    for name, (world, cfg, extra) in CASES.items():
        dp = world // cfg.replicas  # TP ranks read the same sequences: the reference's batch is dp x 2
        key = (dp, tuple(extra))
        if key not in refs:
            job = _job(str(tmp / f"ref{len(refs)}"), 2 * dp, extra)
            trainer = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
            refs[key] = _summary(trainer, trainer.train(capture_grads_at=(1,)))
    return got, refs


@pytest.mark.parametrize("name", sorted(CASES))
def test_baseline_tp_equals_single_process(runs, name):
    got, refs = runs
    world, cfg, extra = CASES[name]
    _assert_same(got[name], refs[(world // cfg.replicas, tuple(extra))])


def test_mla_tp_plan_splits_heads_of_the_up_projections():
    """Which MLA parameters TP splits: the head projections; the latent path stays whole."""
    from mop.baselines.fsdp_best import SharedRopeKeyParallel, attention_tp_plan
    from mop.models.shapes import get_shape
    from mop.models.transformer import Transformer

    for q_lora_rank, q_up in ((16, "wq_b"), (0, "wq")):
        with torch.device("meta"):
            model = Transformer(get_shape("debug-mla", q_lora_rank=q_lora_rank))
        plan = attention_tp_plan(model.layers["0"].attention)
        kinds = {name: type(style).__name__ for name, style in plan.items()}
        assert kinds == {f"attention.{q_up}": "ColwiseParallel", "attention.wkv_b": "ColwiseParallel",
                         "attention.wo": "RowwiseParallel", "attention.wkv_a": "SharedRopeKeyParallel"}
        assert isinstance(plan["attention.wkv_a"], SharedRopeKeyParallel) and plan["attention.wkv_a"].rope_dim == 4


def test_baseline_refuses_tp_not_dividing_mla_heads():
    from mop.models.shapes import get_shape

    with pytest.raises(ValueError, match=r"baseline.tp=3 must divide model.n_heads=64 \(MLA"):
        BaselineConfig(tp=3).validate_model(get_shape("kimi-k2"), 8192)
    BaselineConfig(tp=8).validate_model(get_shape("kimi-k2"), 8192)
    BaselineConfig(tp=8).validate_model(get_shape("deepseek-v3"), 8192)
