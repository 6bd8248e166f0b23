"""The FSDP-best baseline with optimizer-only offload (`BaselineConfig.optimizer_offload`) trains exactly
like the baseline without it (fp32, CPU, gloo): losses, gradients, weights and the lr schedule.

The two differ only in the AdamW kernel (the host's fused CPU AdamW against the device path's foreach
AdamW over DTensors): a few ulp per update, so the tolerance is atol 1e-6 with rtol 1e-5 (weights are
~0.02..1; the lr is 1e-2, so a wrong clip coefficient, lr or weight decay moves weights by ~1e-3).
"""

from __future__ import annotations

import pytest
import torch

from mop.baselines import BaselineConfig
from tests.dist_utils import run_distributed
from tests.lossless import BASE

STEPS = 4
MAX_GRAD_NORM = 0.05  # below every step's gradient norm: clipping scales every update
TOL = dict(rtol=1e-5, atol=1e-6)

CONFIGS = {
    "ep1": BaselineConfig(compile_loss=False),
    "ep1_offload": BaselineConfig(compile_loss=False, optimizer_offload=True),
    "ep2": BaselineConfig(ep=2, compile_loss=False),
    "ep2_offload": BaselineConfig(ep=2, compile_loss=False, optimizer_offload=True),
}


def _job(run_dir: str, extra: list[str] = ()):
    from mop.config import build_config

    # Warm-up over 3 of the 4 steps, then cosine: every step has its own lr, set by the scheduler.
    return build_config(overrides=BASE + [f"--logging.run_dir={run_dir}", f"--training.steps={STEPS}",
                                          "--training.warmup_steps=3", f"--training.max_grad_norm={MAX_GRAD_NORM}",
                                          "--training.batch_size=2", "--model.aux_loss_coef=0.01", *extra])


def _rank(rank: int, world: int, run_dir: str) -> dict:
    import torch.distributed as dist

    from mop.baselines import baseline_trainer
    from mop.baselines.optimizer_offload import HOST_BYTES_PER_PARAM, HostOffloadAdamW
    from mop.distributed import ProcessInfo, local_shard

    out = {}
    for name, cfg in CONFIGS.items():
        proc = ProcessInfo(rank=dist.get_rank(), world=world, local_rank=rank, local_world=world,
                           device=torch.device("cpu"))
        trainer = baseline_trainer(_job(f"{run_dir}/{name}"), cfg, proc)
        result = trainer.train(capture_grads_at=(2,))
        opt = trainer.optimizer
        checks = {}
        if cfg.optimizer_offload:
            assert isinstance(opt, HostOffloadAdamW)
            params = [p for p in trainer.model.parameters() if p.requires_grad]
            numel = sum(local_shard(p).numel() for p in params)
            checks = {
                "zero_grad": all(p.grad is None for p in params),
                # The device shards are the host masters (copied back), in separate storage.
                "masters_match": all(torch.equal(local_shard(p).detach(), opt.master(p)) for p in params),
                "separate": all(local_shard(p).data_ptr() != opt.master(p).data_ptr() for p in params),
                "host_bytes": (opt.host_bytes, HOST_BYTES_PER_PARAM * numel),
                "host_lr": [g["lr"] for g in opt.host.param_groups],
                "lr": [g["lr"] for g in opt.param_groups],
            }
        summary = {"losses": [h["loss"] for h in result.history], "grad_norms": [h["grad_norm"] for h in result.history],
                   "lrs": [h["lr"] for h in result.history], "grads": result.captured_grads[2],
                   "weights": trainer.full_state_dict(), "checks": checks}
        out[name] = summary if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return run_distributed(_rank, 2, str(tmp_path_factory.mktemp("optimizer_offload")))[0]


@pytest.mark.parametrize("ep", [1, 2])
def test_optimizer_offload_equals_device_adamw(runs, ep):
    got, ref = runs[f"ep{ep}_offload"], runs[f"ep{ep}"]
    assert min(ref["grad_norms"]) > MAX_GRAD_NORM  # clipping active in every step
    assert ref["lrs"][0] < ref["lrs"][1] < ref["lrs"][2]  # the scheduler's warm-up drives the updates
    assert got["lrs"] == ref["lrs"]
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), **TOL)
    torch.testing.assert_close(torch.tensor(got["grad_norms"]), torch.tensor(ref["grad_norms"]), **TOL)
    assert set(got["grads"]) == set(ref["grads"]) and set(got["weights"]) == set(ref["weights"])
    for name, g in ref["grads"].items():  # step 2: after one update under clipping and warm-up
        torch.testing.assert_close(got["grads"][name], g, **TOL, msg=lambda m: f"grad {name}: {m}")
    for name, w in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], w, **TOL, msg=lambda m: f"weight {name}: {m}")
    c = got["checks"]
    assert c["zero_grad"] and c["masters_match"] and c["separate"]
    assert c["host_bytes"][0] == c["host_bytes"][1]  # 16 B per parameter of the rank's shard
    # The host optimizer ran the last step with that step's lr; the scheduler has moved on since.
    assert c["host_lr"] == [got["lrs"][-1]] * len(c["host_lr"]) and c["lr"][0] < got["lrs"][-1]


def test_host_offload_adamw_matches_torch_adamw():
    """Alone, against torch AdamW: two groups (decay / none), a scheduler, and a step without one gradient."""
    from mop.baselines.optimizer_offload import HostOffloadAdamW

    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(6, 5, generator=gen), torch.randn(5, generator=gen), torch.randn(4, 3, generator=gen)]
    grads = [[torch.randn_like(t) for t in init] for _ in range(5)]
    weights = []
    for make in (lambda g: torch.optim.AdamW(g, lr=0.1, betas=(0.8, 0.9), eps=1e-6, foreach=True),
                 lambda g: HostOffloadAdamW(g, lr=0.1, betas=(0.8, 0.9), eps=1e-6)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make([{"params": [params[0], params[2]], "weight_decay": 0.1}, {"params": [params[1]], "weight_decay": 0.0}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / 5)
        for step, gs in enumerate(grads):
            for p, g in zip(params, gs):
                p.grad = None if (step == 2 and p is params[2]) else g.clone()  # torch AdamW skips it
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in params)
        weights.append([p.detach().clone() for p in params])
    for ref, got in zip(*weights):
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    with pytest.raises(NotImplementedError, match="checkpoint"):
        opt.state_dict()


def test_bad_combinations_refused_in_one_line(tmp_path):
    from mop.baselines import baseline_trainer
    from mop.baselines.fsdp_best import FSDPBestStrategy
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    with pytest.raises(ValueError, match="exclude each other") as e:
        BaselineConfig(optimizer_offload=True, cpu_offload=True)
    assert "\n" not in str(e.value)
    cfg = BaselineConfig(ep=2, optimizer_offload=True).resolved(2)
    assert BaselineConfig.from_json(cfg.to_json()) == cfg and cfg.label == "fsdp2 ep2 cp1 tp1 ac opt-offload"
    assert (cfg.offload_level, BaselineConfig(cpu_offload=True).offload_level, BaselineConfig().offload_level) == (1, 2, 0)
    proc = ProcessInfo(0, 1, 0, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="checkpoint.enabled=false") as e:
        baseline_trainer(_job(str(tmp_path / "ckpt"), ["--checkpoint.enabled=true"]),
                         BaselineConfig(optimizer_offload=True, compile_loss=False), proc)
    assert "\n" not in str(e.value)
    # The strategy builds the optimizer (Strategy.build_optimizer), so a Trainer built directly with
    # it gets the host optimizer too, never a silent device AdamW.
    from mop.baselines.optimizer_offload import HostOffloadAdamW

    trainer = Trainer(_job(str(tmp_path / "direct")), proc,
                      strategy=FSDPBestStrategy(BaselineConfig(optimizer_offload=True, compile_loss=False)))
    assert isinstance(trainer.optimizer, HostOffloadAdamW)
    assert trainer.scheduler.optimizer is trainer.optimizer
    trainer.train_step()
    trainer.run_dir.unlock()
