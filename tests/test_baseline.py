"""The FSDP-best baseline trains exactly like one process (fp32, CPU, gloo): losses, grads, weights.

Context parallelism is not tested here: PyTorch's `context_parallel` ring attention only dispatches
the CUDA SDPA kernels (flash / efficient / cuDNN), so on CPU it cannot run; the baseline refuses
cp > 1 on CPU with a ValueError (tested), and the CUDA path runs in `mop bench` on GPUs.
"""

from __future__ import annotations

import pytest
import torch

from mop.baselines import BaselineConfig
from tests.dist_utils import run_distributed
from tests.lossless import BASE

STEPS = 3
# One document per sequence (the benchmark setting) and packed documents (exercises positions).
EXTRA = ["--training.batch_size=2"]

CONFIGS = {
    "fsdp2": BaselineConfig(compile_loss=False),
    "fsdp2_ep2": BaselineConfig(ep=2, compile_loss=False),
    "fsdp2_ep2_sac": BaselineConfig(ep=2, compile_loss=False, selective=True),  # attention kept, rest recomputed
    "fsdp2_ep2_cce": BaselineConfig(ep=2, chunked_loss=True),  # the model's strip-wise loss, no N x V logits
    "fsdp1_tp2": BaselineConfig(tp=2, compile_loss=False, activation_checkpoint=False),
    "hsdp2x1_ep1": BaselineConfig(dp_replicate=2, compile_loss=False),
}


def _job(run_dir: str, batch_size: int, extra: list[str] = ()):
    from mop.config import build_config

    return build_config(overrides=BASE + [f"--logging.run_dir={run_dir}", f"--training.steps={STEPS}",
                                          f"--training.batch_size={batch_size}", "--model.aux_loss_coef=0.01",
                                          *extra])


def _summary(trainer, result) -> dict:
    return {"losses": [h["loss"] for h in result.history], "grad_norms": [h["grad_norm"] for h in result.history],
            "grads": result.captured_grads[1], "weights": trainer.full_state_dict()}


def _baseline_rank(rank: int, world: int, cfgs: dict, run_dir: str) -> dict:
    import torch.distributed as dist

    from mop.baselines import baseline_trainer
    from mop.distributed import ProcessInfo

    out = {}
    for name, cfg in cfgs.items():
        proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                           device=torch.device("cpu"))
        job = _job(f"{run_dir}/{name}", 2)
        trainer = baseline_trainer(job, cfg, proc)
        summary = _summary(trainer, trainer.train(capture_grads_at=(1,)))
        out[name] = summary if rank == 0 else None
    return out


# Four ranks: experts further FSDP-sharded over dp_mod_ep = 2; TP x EP on the same world.
CONFIGS_W4 = {
    "fsdp4_ep2": BaselineConfig(ep=2, compile_loss=False),
    "fsdp2_tp2_ep2": BaselineConfig(tp=2, ep=2, compile_loss=False),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    tmp = tmp_path_factory.mktemp("baseline")
    got = run_distributed(_baseline_rank, 2, CONFIGS, str(tmp))[0]
    got.update(run_distributed(_baseline_rank, 4, CONFIGS_W4, str(tmp))[0])
    refs = {}
    for dp in (1, 2, 4):  # data-parallel width 2 (FSDP, EP, HSDP) or 1 (TP: both ranks read the same sequences)
        trainer = Trainer(_job(str(tmp / f"ref{dp}"), 2 * dp), ProcessInfo(0, 1, 0, 1, torch.device("cpu")))
        refs[dp] = _summary(trainer, trainer.train(capture_grads_at=(1,)))
    return got, refs


def _assert_same(got: dict, ref: dict, rtol=1e-5, atol=1e-5) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=rtol, atol=atol)
    assert min(ref["grad_norms"]) > 0 and len(set(ref["losses"])) == len(ref["losses"])
    assert set(got["grads"]) == set(ref["grads"]) and set(got["weights"]) == set(ref["weights"])
    for name, g in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], g, rtol=rtol, atol=atol, msg=lambda m: f"grad {name}: {m}")
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, rtol=rtol, atol=atol, msg=lambda m: f"weight {name}: {m}")


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(CONFIGS_W4))
def test_baseline_equals_single_process(runs, name):
    got, refs = runs
    world, cfg = (2, CONFIGS[name]) if name in CONFIGS else (4, CONFIGS_W4[name])
    dp = world // cfg.replicas
    _assert_same(got[name], refs[dp])


def test_compiled_loss_head_matches_eager():
    from mop.baselines.fsdp_best import LinearCrossEntropyHead

    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(97, 32, generator=gen))
    hidden = torch.randn(50, 32, generator=gen, requires_grad=True)
    labels = torch.randint(0, 97, (50,), generator=gen)
    labels[3] = -100
    loss = LinearCrossEntropyHead(weight, compile=True)(hidden, labels, torch.tensor(49.0))
    loss.backward()
    got = (loss.detach(), weight.grad.clone(), hidden.grad.clone())
    weight.grad = hidden.grad = None
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=-100, reduction="sum") / 49
    ref.backward()
    for a, b in zip(got, (ref.detach(), weight.grad, hidden.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_baseline_config_validation():
    with pytest.raises(ValueError, match="baseline.ep"):
        BaselineConfig(ep=3).resolved(4)
    with pytest.raises(ValueError, match="dp_replicate\\*tp\\*cp"):
        BaselineConfig(tp=3).resolved(4)
    with pytest.raises(ValueError, match="baseline.tp"):
        BaselineConfig(tp=4).validate_model(_job("/tmp/unused", 1).model, 64)
    with pytest.raises(ValueError, match="2\\*cp"):
        BaselineConfig(cp=2).validate_model(_job("/tmp/unused", 1).model, 66)
    with pytest.raises(ValueError, match="baseline.dp_shard"):
        BaselineConfig(dp_shard=0)
    cfg = BaselineConfig(ep=2, cpu_offload=True).resolved(4)
    assert cfg.dp_shard == 4 and BaselineConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        BaselineConfig.from_json('{"fsdp": 2}')


def test_context_parallel_refused_on_cpu(tmp_path):
    from mop.baselines import baseline_trainer
    from mop.distributed import ProcessInfo

    job = _job(str(tmp_path), 1)
    with pytest.raises(ValueError, match="context_parallel"):
        baseline_trainer(job, BaselineConfig(cp=1 * 1 + 1, dp_shard=1), ProcessInfo(0, 2, 0, 2, torch.device("cpu")))
