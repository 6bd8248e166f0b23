"""`mop plan`: the memory model against exact state sizes and a CPU run, a deterministic search, clear
refusals, calibration files that round-trip, and overrides that `mop train` accepts."""

import gc
import json
import shutil
import tempfile

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from mop.config import build_config
from mop.models.shapes import get_shape
from mop.models.transformer import Transformer
from mop.parallel.layout import LayoutSpec
from mop.plan import state_memory
from mop.plan.calibration import Calibration
from mop.plan.cli import main as plan_cli
from mop.plan.memory import estimate_memory, kept_bytes, loss_grad_weight_bytes, outside_blocks_bytes
from mop.plan.search import NoPlan, check_step_fits, choose, plan_for_job
from mop.plan.step import Step, parse_policy_spec, policy_spec, step_from_overrides


class _LiveStorages(TorchDispatchMode):
    """Every storage an op creates, by weak reference: what is still alive afterwards is what was kept.

    Counts more than saved-tensor hooks see: state held on autograd ctx objects (the attention
    core's kernel state, the loss's gradients formed in forward) is memory too.
    """

    def __init__(self):
        super().__init__()
        self.refs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ref = StorageWeakRef(st)
                # Keyed by the storage, not its address: an address is reused while the storage that
                # held it is still alive when that storage is resized to 0 (FSDP frees its unsharded
                # weights so after each block), and by address the newer storage hid the older.
                self.refs[ref.cdata] = (ref, st.nbytes(), st.data_ptr())
        return out

    def kept(self, owned: set[int]) -> int:
        """Bytes of the storages still alive, those at the addresses in `owned` excepted."""
        return sum(n for ref, n, ptr in self.refs.values() if not ref.expired() and ptr not in owned)


def _kept_after_forward(cfg, seq_len: int, policy: str) -> int:
    """Bytes alive after a CPU training forward of `cfg`, parameters and buffers excluded."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(0)
    model.train()
    model.block_policies = [policy] * cfg.n_layers
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len))
    positions = torch.arange(seq_len).expand(1, seq_len).contiguous()
    mode = _LiveStorages()
    with mode:
        ce, aux = model(tokens, positions, tokens, None)
    gc.collect()
    owned = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    return mode.kept(owned)


def _predicted(cfg, seq_len: int, policy: str) -> float:
    step = Step(model=cfg, layout=LayoutSpec(1), seq_len=seq_len, policies=policy, dispatcher="alltoall",
                act_bytes=4, cpu=True)
    moe = [i >= cfg.n_dense_layers for i in range(cfg.n_layers)]
    per_token = sum(kept_bytes(step, p, e) for p, e in zip(step.policies, moe)) + outside_blocks_bytes(step)
    return seq_len * per_token + loss_grad_weight_bytes(step)


@pytest.mark.parametrize("shape", ["debug", "tiny"])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_activation_bytes_match_a_cpu_run(shape, policy):
    cfg = get_shape(shape)
    for seq_len in ((64, 128) if shape == "debug" else (64,)):  # two lengths: the bytes scale per token
        measured = _kept_after_forward(cfg, seq_len, policy)
        # Exact per token; a few hundred bytes of per-step scalars (losses, router statistics) aside.
        assert _predicted(cfg, seq_len, policy) == pytest.approx(measured, abs=512), (shape, policy, seq_len)


def test_memory_model_reproduces_the_exact_state():
    cfg = get_shape("qwen3-30b-a3b", n_layers=4)
    for W, offload, frac in [(1, "none", 0.0), (4, "none", 0.0), (2, "gpu_stream", 0.25), (8, "cpu", 0.0)]:
        step = Step(model=cfg, layout=LayoutSpec(W), seq_len=8192, offload=offload, device_fraction=frac)
        mem = estimate_memory(step, Calibration.load("h200"))
        exact = state_memory(cfg, W, offload, frac)
        assert (mem.weights, mem.optimizer, mem.host_pinned_state) == (
            exact.weights, exact.optimizer_device, exact.optimizer_host)
        assert 0 < mem.grads <= exact.grads  # the gradients alive at the peak (backward_peak)


def test_search_is_deterministic_and_its_overrides_run_in_mop_train():
    cfg = get_shape("qwen3-30b-a3b", n_layers=8)
    a = choose(cfg, gpus=4, context=65536)
    b = choose(cfg, gpus=4, context=65536)
    assert a.render() == b.render() and a.overrides() == b.overrides()
    assert a.best.fits and all(c.fits for c in a.runners_up)
    assert all(c.time.tokens_per_s_per_gpu <= a.best.time.tokens_per_s_per_gpu for c in a.runners_up)
    job = build_config(None, a.overrides())  # every option exists and validates
    assert job.parallel.seq.degree == a.best.step.layout.seq and job.training.seq_len == 65536
    back = step_from_overrides(job.model, a.best.step.overrides(), 4)
    assert back.policies == a.best.step.policies and back.layout == a.best.step.layout


def test_impossible_requests_are_refused_with_numbers():
    cfg = get_shape("qwen3-235b-a22b")
    with pytest.raises(NoPlan, match=r"(?s)no configuration .* fits on 4 GPU\(s\).*\d+\.\d GiB.*at least \d+ GPUs"):
        choose(cfg, gpus=4, context=2**20, suggest=False)
    with pytest.raises(NoPlan, match="multiple of --gpus-per-node"):
        choose(cfg, gpus=12, context=8192, gpus_per_node=8)


def test_rejections_name_the_term_and_the_limit(capsys):
    assert plan_cli(["--shape", "qwen3-30b-a3b", "--layers", "24", "--gpus", "2", "--context", "128K"]) == 0
    out = capsys.readouterr().out
    assert "run it:" in out and "--parallel.seq.degree=" in out
    assert "ac=none" in out and "GiB >" in out and "activations_kept" in out  # why not the faster ones
    assert plan_cli(["--shape", "qwen3-30b-a3b", "--layers", "4", "--gpus", "1", "--context", "8K", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best"]["fits"] and "--parallel.seq.degree=1" in data["best"]["overrides"]
    assert plan_cli(["--shape", "nope", "--gpus", "1", "--context", "8K"]) == 2
    assert "unknown shape 'nope'" in capsys.readouterr().err
    assert plan_cli(["--shape", "qwen3-30b-a3b", "--gpus", "2", "--context", "128K"]) == 1  # all 48 layers
    err = capsys.readouterr().err
    assert "closest: D=" in err and "GiB >" in err and "4 GPUs would fit: D=" in err
    # bf16 weights would fit these GPUs: the refusal says so, with the host memory that needs
    assert "with --param-dtype bf16" in err and "GiB of host memory per node" in err and "--host-mem-gib" in err
    assert plan_cli(["--shape", "qwen3-30b-a3b", "--gpus", "2", "--context", "128K", "--host-mem-gib", "252"]) == 1
    assert "--param-dtype bf16" not in capsys.readouterr().err  # nor with the host it names
    assert plan_cli(["explain", "--gpus", "2", "--model.shape=qwen3-30b-a3b", "--parallel.seq.degree=2",
                     "--training.seq_len=65536", "--training.activation_checkpoint=full"]) == 0
    out = capsys.readouterr().out
    assert "activations_kept" in out and "attention" in out and "tokens/s/GPU" in out


def test_calibration_round_trips(tmp_path):
    cal = Calibration.load("h200")
    path = cal.save(tmp_path / "x.json")
    assert Calibration.load(path) == cal
    with pytest.raises(ValueError, match="unknown fields"):
        Calibration.from_dict({**json.loads(path.read_text()), "bogus": 1})
    from mop.plan.microbench import calibrate

    measured, out = calibrate(device="cpu", quick=True, out=tmp_path / "cpu.json")
    assert Calibration.load(out) == measured and measured.gemm_flops > 0 and measured.device_name == "cpu"


def test_policy_specs_round_trip():
    assert parse_policy_spec("none*2,full", 5) == ("none", "none", "full", "full", "full")
    assert policy_spec(("selective",) * 3 + ("full",) * 2) == "selective*3,full"
    assert parse_policy_spec(policy_spec(("none", "full", "full", "offload")), 4) == ("none", "full", "full", "offload")
    with pytest.raises(ValueError, match="covers 2 blocks"):
        parse_policy_spec("none*2", 3)


def test_slower_links_never_predict_faster_and_jobs_plan_and_preflight():
    cfg = get_shape("qwen3-30b-a3b", n_layers=8)
    fast = choose(cfg, gpus=16, gpus_per_node=8, context=65536, inter_bw=100e9)
    slow = choose(cfg, gpus=16, gpus_per_node=8, context=65536, inter_bw=10e9)
    assert slow.best.time.tokens_per_s_per_gpu <= fast.best.time.tokens_per_s_per_gpu
    assert fast.command().startswith("torchrun --nnodes 2 --nproc-per-node 8")
    job = build_config(None, ["--model.shape=qwen3-30b-a3b", "--model.n_layers=8", "--training.seq_len=65536",
                              "--training.batch_size=1", "--training.grad_accum=4", "--parallel.seq.degree=2"])
    plan = plan_for_job(job, 4)
    assert plan.best.step.tokens_per_step == 2 * 65536 * 4  # the job's tokens per step, kept
    check_step_fits(job, 4, 141 * 2**30)  # fits: returns the estimate
    with pytest.raises(ValueError, match=r"predicted peak .* GiB per GPU exceeds .*mop plan --shape"):
        check_step_fits(build_config(None, ["--model.shape=qwen3-30b-a3b", "--training.seq_len=1048576",
                                            "--training.batch_size=1"]), 1, 141 * 2**30)


def _kept_on_rank(rank: int, world: int, layout: tuple[int, int, int], seq_len: int) -> dict[str, int]:
    """Bytes alive after a forward on this rank, per policy (parameters' local shards excluded)."""
    from mop.distributed import ProcessInfo
    from mop.trainer import Trainer

    out = {}
    for policy in ("none", "selective", "full"):
        run_dir = tempfile.mkdtemp()  # one per trainer: a run directory is locked by its trainer
        job = build_config(overrides=[
            "--model.shape=debug", "--data.dataset=synthetic", f"--training.seq_len={seq_len}",
            "--training.batch_size=1", "--training.device=cpu", "--training.dtype=fp32",
            f"--parallel.seq.degree={layout[0]}", f"--parallel.experts.degree={layout[1]}",
            f"--parallel.vocab.degree={layout[2]}",
            "--parallel.experts.dispatcher=alltoall", f"--training.activation_checkpoint={policy}",
            "--logging.progress=none", f"--logging.run_dir={run_dir}"])
        trainer = Trainer(job, ProcessInfo(rank=rank, world=world, local_rank=rank, local_world=world,
                                           device=torch.device("cpu")))
        batch = next(trainer.loader)
        owned = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
                 for p in [*trainer.model.parameters(), *trainer.model.buffers()]}
        mode = _LiveStorages()
        with mode:  # the losses hold the autograd graph (what backward will need) while we count
            losses = trainer.model(*(batch[k] for k in ("tokens", "positions", "labels")),
                                   torch.tensor(float(seq_len)))
        gc.collect()
        out[policy] = mode.kept(owned)
        del losses, trainer
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


@pytest.mark.slow  # two spawned ranks: ~10 s of CPU
def test_ulysses_activation_bytes_match_two_ranks():
    """D = 2 on 2 gloo ranks: what none and selective keep beyond full (gathered parameters cancel out)."""
    from mop.plan.calibration import Calibration
    from mop.plan.memory import activation_peak
    from tests.dist_utils import run_distributed

    cfg, seq_len = get_shape("debug"), 128
    ranks = run_distributed(_kept_on_rank, 2, (2, 1, 1), seq_len)
    # Buffers of an all-to-all still in flight when we count come and go with timing (~10 KB here):
    # the smaller of the two ranks' counts, and a tolerance of that size.
    measured = {p: min(r[p] - r["full"] for r in ranks) for p in ("none", "selective")}
    kept = {}
    for policy in ("none", "selective", "full"):
        step = Step(model=cfg, layout=LayoutSpec(2, 2, 1, 1), seq_len=seq_len, policies=policy,
                    dispatcher="alltoall", act_bytes=4, cpu=True)
        kept[policy] = activation_peak(step, Calibration.load("cpu"))["activations_kept"]
    for policy in ("none", "selective"):
        assert kept[policy] - kept["full"] == pytest.approx(measured[policy], abs=12_000), policy


def test_a_fit_judged_without_the_automatic_optimizer_share_says_so():
    """The automatic device share of the host optimizer fills what the step leaves, so the best
    plan's reserved bytes may exceed the limit printed beside them: the render says what the fit
    was judged on, and that number is under the limit."""
    plan = choose(get_shape("qwen3-30b-a3b", n_layers=24), gpus=2, context=8192, tokens_per_step=2**20,
                  calibration=Calibration.load("h200"))
    b = plan.best
    assert b.step.offload != "none" and b.judged_reserved is not None
    limit = plan.headroom * plan.device_bytes
    assert b.judged_reserved <= limit < b.memory.reserved
    assert f"fits at {b.judged_reserved / 2**30:.1f} GiB without the optimizer's device share" in plan.render()
    # Without a host optimizer there is no automatic share and no such line.
    dev = choose(get_shape("debug"), gpus=1, context=64, calibration=Calibration.load("cpu"), offloads=("none",))
    assert dev.best.judged_reserved is None and "without the optimizer's device share" not in dev.render()
