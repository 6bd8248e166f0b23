"""HostAdamW against torch.optim.AdamW in fp32: every engine, bucket layout, schedule, clip, async and
checkpoint path, and FSDP2 on 2 gloo ranks against a single-process reference."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch
import torch.nn as nn

from mop.optim import HostAdamW
from mop.optim.buckets import AdamWHyper, HostThreadPool, adamw_flat_, plan_buckets
from tests.dist_utils import run_distributed

LR, WD, BETAS = 1e-2, 0.1, (0.9, 0.95)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5))


def two_groups(model: nn.Module, **no_decay) -> list[dict]:
    """Matrices with weight decay, vectors (norms, biases) without, as a trainer builds them."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim == 2]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, **no_decay},
    ]


def host_adamw(model: nn.Module, **kw) -> HostAdamW:
    """HostAdamW over `two_groups(model)` with the test hyper-parameters (LR, BETAS, WD)."""
    return HostAdamW(two_groups(model), lr=LR, betas=BETAS, weight_decay=WD, **kw)


def batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 8, generator=g) for _ in range(n)]


def loss_fn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).pow(2).mean()


def train(model, opt, xs, clip_coef_of=None, scheduler=None) -> None:
    for x in xs:
        opt.zero_grad()
        loss_fn(model, x).backward()
        if clip_coef_of is None:
            opt.step()
        else:
            opt.step(clip_coef_of(model))
        if scheduler is not None:
            scheduler.step()


def assert_same_params(a: nn.Module, b: nn.Module, atol=1e-6, rtol=1e-6) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def reference(xs, **kw) -> nn.Module:
    model = make_model()
    train(model, torch.optim.AdamW(two_groups(model), lr=LR, betas=BETAS, weight_decay=WD), xs, **kw)
    return model


CONFIGS = [(e, f, b) for e in ("cpu", "gpu_stream") for f in (0.0, 0.5, 1.0) for b in (7, 64, 2**20)]
CONFIGS += [("device", 0.0, b) for b in (7, 64, 2**20)]


@pytest.mark.parametrize("engine,fraction,bucket_numel", CONFIGS)
def test_matches_torch_adamw(engine, fraction, bucket_numel):
    xs = batches(5)
    model = make_model()
    opt = host_adamw(model, engine=engine, device_fraction=fraction, bucket_numel=bucket_numel)
    train(model, opt, xs)
    assert_same_params(model, reference(xs))
    if bucket_numel == 7:  # the 16x8 weight cannot fit one bucket: params really straddle buckets
        assert len(opt._buckets_of_param[0]) > 1


def test_plan_buckets_layout():
    buckets = plan_buckets([10, 3, 4, 6], [0, 0, 1, 1], [torch.float32] * 3 + [torch.bfloat16], 5, 4)
    got = [
        (
            b.group_index,
            b.dtype,
            b.on_device,
            [(p.param_index, p.param_offset, p.bucket_offset, p.numel) for p in b.pieces],
        )
        for b in buckets
    ]
    f32, bf16 = torch.float32, torch.bfloat16
    assert got == [
        (0, f32, True, [(0, 0, 0, 4)]),
        (0, f32, True, [(0, 4, 0, 1)]),  # the device region ends after 5 elements
        (0, f32, False, [(0, 5, 0, 4)]),
        (0, f32, False, [(0, 9, 0, 1), (1, 0, 1, 3)]),
        (1, f32, False, [(2, 0, 0, 4)]),  # new group
        (1, bf16, False, [(3, 0, 0, 4)]),  # new dtype
        (1, bf16, False, [(3, 4, 0, 2)]),
    ]


@pytest.mark.parametrize("fused", [False, True])
def test_flat_kernel_matches_torch(fused):
    torch.manual_seed(0)
    p = torch.randn(300)
    ref = p.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([ref], lr=LR, betas=BETAS, weight_decay=WD)
    m, v = torch.zeros(300), torch.zeros(300)
    hyper = AdamWHyper(LR, *BETAS, 1e-8, WD)
    for step in range(1, 6):
        g = torch.randn(300)
        ref.grad = g * 0.5
        ref_opt.step()
        adamw_flat_(p, m, v, g.clone(), hyper, step, torch.tensor(0.5), fused=fused)
    torch.testing.assert_close(p, ref.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("engine", ["cpu", "gpu_stream", "device"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_clip_coef_folded_in(engine, as_tensor):
    def clip_coef(model):
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        coef = torch.clamp(0.05 / (norm + 1e-6), max=1.0)
        return coef if as_tensor else float(coef)

    def clip_grads(model):
        nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        return None

    xs = batches(5)
    ref = make_model()
    ref_opt = torch.optim.AdamW(two_groups(ref), lr=LR, betas=BETAS, weight_decay=WD)
    for x in xs:
        ref_opt.zero_grad()
        loss_fn(ref, x).backward()
        clip_grads(ref)
        ref_opt.step()
    model = make_model()
    opt = host_adamw(model, engine=engine, device_fraction=0.5, bucket_numel=50)
    train(model, opt, xs, clip_coef_of=clip_coef)
    assert_same_params(model, ref, atol=2e-6, rtol=1e-5)


def test_lambda_lr_schedule_and_group_hyperparameters():
    xs = batches(5)
    warmup = lambda step: min(1.0, (step + 1) / 3)  # noqa: E731

    def run(make_opt):
        model = make_model()
        opt = make_opt(two_groups(model, lr=3e-3, betas=(0.8, 0.9)))
        train(model, opt, xs, scheduler=torch.optim.lr_scheduler.LambdaLR(opt, warmup))
        return model

    ref = run(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, weight_decay=WD))
    got = run(lambda g: HostAdamW(g, lr=LR, betas=BETAS, weight_decay=WD, engine="cpu", bucket_numel=32))
    assert_same_params(got, ref)


@pytest.mark.parametrize("engine", ["cpu", "gpu_stream"])
def test_step_async_wait_params_synchronize(engine):
    xs = batches(4)
    model = make_model()
    opt = host_adamw(model, engine=engine, device_fraction=0.3, bucket_numel=40)
    params = list(model.parameters())
    for x in xs:
        opt.zero_grad()
        loss_fn(model, x).backward()
        opt.offload_grads_async(params[2:])  # as backward hooks would, for the layers finished first
        before = params[0].detach().clone()
        opt.step_async(0.7)
        opt.wait_params(params[0])
        assert not torch.equal(params[0].detach(), before)  # its new value is in place
        opt.wait_params(params[:2])
        opt.synchronize()
    ref = make_model()
    ref_opt = torch.optim.AdamW(two_groups(ref), lr=LR, betas=BETAS, weight_decay=WD)
    for x in xs:
        ref_opt.zero_grad()
        loss_fn(ref, x).backward()
        for p in ref.parameters():
            p.grad.mul_(0.7)
        ref_opt.step()
    assert_same_params(model, ref)


def test_params_without_grads_are_skipped_like_torch():
    xs = batches(5)

    def run(make_opt):
        model = make_model()
        opt = make_opt(two_groups(model))
        for i, x in enumerate(xs):
            opt.zero_grad()
            loss_fn(model, x).backward()
            if i in (1, 3):
                model[1].weight.grad = None  # a frozen-this-step parameter keeps its step count
            opt.step()
        return model

    ref = run(lambda g: torch.optim.AdamW(g, lr=LR, betas=BETAS, weight_decay=WD))
    got = run(lambda g: HostAdamW(g, lr=LR, betas=BETAS, weight_decay=WD, bucket_numel=24))
    assert_same_params(got, ref)


def test_gradient_accumulation_two_micro_batches():
    xs = batches(3)
    ref = reference(xs)
    model = make_model()
    opt = host_adamw(model, engine="cpu", bucket_numel=33)
    for x in xs:
        opt.zero_grad()
        for half in x.chunk(2):
            (loss_fn(model, half) / 2).backward()
        opt.step()
    assert_same_params(model, ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("engine,fraction", [("cpu", 0.5), ("gpu_stream", 0.0), ("device", 0.0)])
def test_state_dict_round_trip(engine, fraction):
    xs = batches(5)
    kw = dict(lr=LR, betas=BETAS, weight_decay=WD, engine=engine, device_fraction=fraction, bucket_numel=50)
    model = make_model()
    opt = HostAdamW(two_groups(model), **kw)
    train(model, opt, xs[:3])
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    assert saved_opt["state"][0]["step"].item() == 3 and saved_opt["state"][0]["master"].shape == (16, 8)

    resumed = make_model(seed=123)
    resumed.load_state_dict(saved_model)
    opt2 = HostAdamW(two_groups(resumed), **kw)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, xs[3:])
    assert_same_params(resumed, reference(xs))


def test_named_parameters_input():
    xs = batches(3)
    model = make_model()
    opt = HostAdamW(model.named_parameters(), lr=LR, betas=BETAS, weight_decay=WD, bucket_numel=64)
    train(model, opt, xs)
    ref = make_model()
    train(ref, torch.optim.AdamW(ref.parameters(), lr=LR, betas=BETAS, weight_decay=WD), xs)
    assert_same_params(model, ref)
    assert opt.state_dict()["param_groups"][0]["param_names"][0] == "0.weight"


def test_thread_pool_slices_and_intra_op_pinning():
    caller = torch.get_num_threads()
    pool = HostThreadPool(2, min_slice_numel=4)
    try:
        assert pool.worker_intra_op_threads() == [1, 1]
        assert torch.get_num_threads() == caller
        assert pool.slices(3, 20) == [(3, 11), (11, 20)]
    finally:
        pool.shutdown()
    xs = batches(4)
    model = make_model()
    opt = host_adamw(model, engine="cpu", cpu_threads=2, bucket_numel=100)
    opt._engine.pool.min_slice_numel = 8  # tiny buckets still split across both threads
    train(model, opt, xs)
    assert_same_params(model, reference(xs))


def test_memory_accounting_and_check():
    model = make_model()
    numel = sum(p.numel() for p in model.parameters())
    opt = HostAdamW(model.parameters(), engine="cpu", device_fraction=0.5, bucket_numel=64)
    offloaded = numel - round(0.5 * numel)
    assert opt.host_memory_bytes() == offloaded * (12 + 4) + 4  # fp32 state + fp32 grad staging + clip
    assert opt.device_memory_bytes() == (numel - offloaded) * 12 + 4 * 64
    assert HostAdamW.check_host_memory(10, 2, available_bytes=1000) == 240
    with pytest.raises(
        ValueError,
        match=r"4 local rank\(s\).*1,000,000,000,000 offloaded params.*44703.48 GiB needed.*1.00 GiB available",
    ):
        HostAdamW.check_host_memory(10**12, 4, available_bytes=2**30)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(engine="gpu"), "engine="),
        (dict(device_fraction=1.5), "device_fraction="),
        (dict(bucket_numel=0), "bucket_numel="),
        (dict(staging_slots=0), "staging_slots="),
        (dict(cpu_threads=0), "cpu_threads="),
        (dict(betas=(0.9, 1.0)), "betas="),
    ],
)
def test_bad_options_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        HostAdamW(make_model().parameters(), **kw)


def test_bad_clip_and_foreign_param_raise():
    model = make_model()
    opt = HostAdamW(model.parameters())
    loss_fn(model, batches(1)[0]).backward()
    with pytest.raises(ValueError, match="clip_coef"):
        opt.step(torch.ones(2))
    with pytest.raises(ValueError, match="not one of this optimizer's parameters"):
        opt.wait_params([torch.zeros(1)])


# ---------------------------------------------------------------------------- FSDP2 on 2 gloo ranks
FSDP_CONFIGS = [("cpu", 0.3, 16), ("gpu_stream", 0.0, 2**20)]


def _fsdp_worker(rank, world_size, ckpt_root):
    """Every FSDP config in one spawn (spawning dominates the cost of this test)."""
    return [_fsdp_run(rank, world_size, *cfg, os.path.join(ckpt_root, cfg[0])) for cfg in FSDP_CONFIGS]


def _fsdp_run(rank, world_size, engine, fraction, bucket_numel, ckpt_dir):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (world_size,))

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 5), nn.Linear(5, 3))  # 5 rows: uneven shards
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = host_adamw(model, engine=engine, device_fraction=fraction, bucket_numel=bucket_numel)
        return model, opt

    def run_steps(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            loss_fn(model, x.chunk(world_size)[rank]).backward()  # FSDP2 averages grads over ranks
            opt.step()

    xs = batches(5, seed=7)
    model, opt = build()
    run_steps(model, opt, xs[:3])
    after3 = {n: p.full_tensor() for n, p in model.named_parameters()}
    osd = get_optimizer_state_dict(model, opt)
    layouts_ok = all(isinstance(s["exp_avg"], DTensor) for s in osd["state"].values())
    dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=ckpt_dir)
    run_steps(model, opt, xs[3:])
    after5 = {n: p.full_tensor() for n, p in model.named_parameters()}

    model2, opt2 = build()
    state = {"model": model2.state_dict(), "optim": get_optimizer_state_dict(model2, opt2)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    model2.load_state_dict(state["model"])
    set_optimizer_state_dict(model2, opt2, state["optim"])
    run_steps(model2, opt2, xs[3:])
    resumed5 = {n: p.full_tensor() for n, p in model2.named_parameters()}
    dist.barrier()
    return after3, after5, resumed5, layouts_ok, sorted(osd["state"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the 1-process resume, on purpose
def test_fsdp2_two_ranks_matches_single_process_and_reshards_through_dcp():
    xs = batches(5, seed=7)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 5), nn.Linear(5, 3))
    ref_opt = torch.optim.AdamW(two_groups(ref), lr=LR, betas=BETAS, weight_decay=WD)
    snapshots = []
    for x in xs:
        ref_opt.zero_grad()
        loss_fn(ref, x).backward()
        ref_opt.step()
        snapshots.append({n: p.detach().clone() for n, p in ref.named_parameters()})
    with tempfile.TemporaryDirectory() as ckpt_dir:
        results = run_distributed(_fsdp_worker, 2, ckpt_dir)
        resharded = [_resume_single_process(os.path.join(ckpt_dir, cfg[0]), cfg, xs[3:]) for cfg in FSDP_CONFIGS]
    for after3, after5, resumed5, layouts_ok, keys in [r for rank in results for r in rank]:
        assert layouts_ok and keys == sorted(n for n, _ in ref.named_parameters())
        for name in after3:
            torch.testing.assert_close(after3[name], snapshots[2][name], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(after5[name], snapshots[4][name], atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(resumed5[name], after5[name], atol=0, rtol=0)
    for model in resharded:  # the 2-rank checkpoint, resumed on 1 process, continues like the reference
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), snapshots[4][name], atol=1e-6, rtol=1e-5)


def _resume_single_process(ckpt_dir, cfg, xs):
    """Load a checkpoint written by 2 FSDP ranks into an unsharded model + HostAdamW and train on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    engine, fraction, bucket_numel = cfg
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 5), nn.Linear(5, 3))
    opt = host_adamw(model, engine=engine, device_fraction=fraction, bucket_numel=bucket_numel)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=ckpt_dir)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    train(model, opt, xs)
    return model


def test_update_order_and_forward_waits():
    """Buckets follow forward order; the next forward waits module by module for its own parameters
    (block i also for block i+1, which FSDP prefetches in block i's pre-forward), never all at once."""
    from mop.config import build_config
    from mop.models.transformer import Transformer
    from mop.optim.overlap import UpdateOverlap, forward_order

    cfg = build_config(None, ["--model.shape=debug", "--model.vocab_size=64", "--model.n_layers=3"]).model
    model = Transformer(cfg)
    model.init_weights(0)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for p in forward_order(model)]
    assert order[0] == "tok_embeddings.weight" and order.index("output.weight") < order.index("layers.0.attention.wq.weight")
    assert [o.split(".")[1] for o in order if o.startswith("layers.")] == sorted(
        [o.split(".")[1] for o in order if o.startswith("layers.")])  # blocks in order

    opt = HostAdamW([{"params": [p for p in model.parameters() if p.ndim >= 2]},
                     {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}],
                    lr=LR, engine="cpu", bucket_numel=4096, update_order=forward_order(model))
    first_param = [names[id(opt._params[pc.param_index])] for b in opt._buckets for pc in b.pieces]
    assert first_param[0] == "tok_embeddings.weight"
    assert first_param.index("layers.0.attention_norm.weight") < first_param.index("layers.1.attention.wq.weight")

    waits = []
    real_wait = opt.wait_params
    opt.wait_params = lambda ps: (waits.append(sorted({names[id(p)].split(".")[1] if names[id(p)].startswith(
        "layers.") else "root" for p in ps})), real_wait(ps))
    overlap = UpdateOverlap(model, opt)
    tokens = torch.randint(0, 64, (1, 16))
    positions = torch.arange(16).unsqueeze(0)
    model(tokens, positions)
    assert waits == [["root"], ["0", "1"], ["1", "2"], ["2"]]
    overlap.remove()
    with pytest.raises(ValueError, match="update_order"):
        HostAdamW(list(model.parameters()), engine="cpu", update_order=list(model.parameters())[1:])


def _early_offload_worker(rank, world, run_dir):
    from mop.config import build_config
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer
    from tests.lossless import BASE

    job = build_config(overrides=BASE + [f"--logging.run_dir={run_dir}", "--parallel.experts.degree=2",
                                         "--parallel.vocab.degree=2",
                                         "--optimizer.offload=cpu", "--optimizer.device_fraction=0.2",
                                         "--training.grad_accum=2", "--training.steps=2"])
    trainer = Trainer(job, ProcessInfo(rank, world, rank, world, torch.device("cpu")))
    opt = trainer.optimizer
    offloaded_calls, left_for_step = [], []
    real_offload, real_step = opt.offload_grads_async, opt.step_async

    def offload(params):
        offloaded_calls.append(len(params))
        real_offload(params)

    def step_async(clip=None):
        left = sum(1 for b in opt._buckets if not b.on_device for k, pc in enumerate(b.pieces)
                   if opt._params[pc.param_index].grad is not None and k not in b.offloaded)
        left_for_step.append(left)
        real_step(clip)

    opt.offload_grads_async, opt.step_async = offload, step_async
    trainer.train()
    return {"calls": sum(offloaded_calls), "left": left_for_step,
            "n_params": sum(1 for _ in trainer.model.parameters())}


def test_cpu_engine_copies_gradients_during_backward(tmp_path):
    """Every offloaded gradient is on its way to the host before the step: copied from the
    post-accumulate-grad hooks (FSDP2 fires them after each reduce-scatter), last micro-batch only."""
    for out in run_distributed(_early_offload_worker, 2, str(tmp_path / "run")):
        assert out["left"] == [0, 0], out
        assert out["calls"] == 2 * out["n_params"], out  # once per parameter and step, not per micro-batch


def test_lr_scheduler_sees_the_async_update_without_warning():
    """The trainer calls step_async, then the scheduler: no "lr_scheduler.step() before optimizer.step()"."""
    import warnings

    model = make_model()
    opt = HostAdamW(two_groups(model), lr=LR, engine="cpu", bucket_numel=32)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x in batches(2):
            opt.zero_grad()
            loss_fn(model, x).backward()
            opt.step_async()
            sched.step()
    opt.synchronize()
