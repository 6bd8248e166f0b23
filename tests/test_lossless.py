"""Lossless: every MoP layout trains exactly like one process (fp32, CPU, gloo)."""

import pytest

from tests.lossless import compare_with_reference


@pytest.mark.parametrize("world", [2, 4])
def test_dense_path_sharded_equals_single_process(world, tmp_path):
    compare_with_reference(world, {}, tmp_path)


@pytest.mark.parametrize("world,layout", [
    (2, {"experts.degree": 2}),
    (4, {"experts.degree": 2}),  # Ep=2 x W/Ep=2: experts partitioned and each sharded
    (4, {"experts.degree": 4, "experts.dispatcher": "llep", "experts.llep_min_chunk": 8,
         "experts.llep_imbalance_threshold": 1.0}),
    (4, {"experts.degree": 2, "experts.dispatcher": "llep_pipelined", "experts.llep_min_chunk": 8,
         "experts.chunk_tokens": 32}),
])
def test_expert_parallel_equals_single_process(world, layout, tmp_path):
    compare_with_reference(world, layout, tmp_path)


def test_experts_sharded_as_dense_with_policies_and_host_optimizer_equal_single_process(tmp_path):
    """Ep=1 over W=2: the experts are FSDP-sharded like dense weights (no dispatcher), under mixed
    block policies (whose recomputes reuse the routers' reduced aux statistics) and the streamed host
    optimizer with its device share."""
    compare_with_reference(2, {"vocab.degree": 2}, tmp_path, extra=[
        "--model.n_layers=3", "--model.aux_loss_coef=0.01", "--training.activation_checkpoint=selective*1,full*1,none",
        "--optimizer.offload=gpu_stream", "--optimizer.device_fraction=0.5"])


@pytest.mark.parametrize("mode,layout,extra", [
    # Experts at Ep=1 are FSDP's: kept gathered too. With what `mop plan` picks at 8K x 2^20 on 2 GPUs
    # (the streamed host optimizer and its device share updating while the next step's forward runs,
    # blocks kept and selective), every step's first forward gathers the freshly updated weights.
    ("keep_gathered", {"vocab.degree": 2}, ["--optimizer.offload=gpu_stream", "--optimizer.device_fraction=0.5",
                                            "--training.activation_checkpoint=none*1,selective"]),
    ("keep_all", {"experts.degree": 2}, ["--optimizer.offload=gpu_stream", "--optimizer.device_fraction=0.5"]),
])
def test_fsdp_accumulation_equals_single_process(mode, layout, extra, tmp_path):
    """parallel.fsdp.accumulation keeps weights (and gradients) between micro-batches: same numbers
    as one process with the same three micro-batches per step."""
    common = ["--training.grad_accum=3", *extra]
    compare_with_reference(2, layout, tmp_path, extra=[f"--parallel.fsdp.accumulation={mode}", *common],
                           ref_extra=common)


@pytest.mark.parametrize("world,layout", [(2, {"vocab.degree": 2}), (4, {"vocab.degree": 2}),
                                          (4, {"vocab.degree": 4, "vocab.schedule": "activations"})])
def test_vocab_parallel_equals_single_process(world, layout, tmp_path):
    compare_with_reference(world, layout, tmp_path)


@pytest.mark.parametrize("world,layout,extra", [
    (2, {"seq.degree": 2, "seq.head_chunks": 2}, []),
    (4, {"seq.degree": 4}, []),  # D=4 > 2 KV heads: KV heads replicated
    (4, {"seq.degree": 4}, ["--model.n_heads=2", "--model.n_kv_heads=1"]),  # D > heads: Ulysses x all-gather-KV
])
def test_ulysses_equals_single_process(world, layout, extra, tmp_path):
    compare_with_reference(world, layout, tmp_path, extra=extra)


def test_full_mop_layout_equals_single_process(tmp_path):
    """All components at once: D=2, Ep=2 (x2 sharding), P=4, LLEP, aux loss, grad accumulation."""
    compare_with_reference(4, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 4, "experts.dispatcher": "llep",
                               "experts.llep_min_chunk": 8},
                           tmp_path, extra=["--training.grad_accum=2", "--model.aux_loss_coef=0.01"])


@pytest.mark.parametrize("engine", ["cpu", "gpu_stream"])
def test_host_optimizer_equals_single_process(engine, tmp_path):
    """Host-resident AdamW (clip folded into the update, grad accumulation) under a MoP layout."""
    common = ["--training.grad_accum=2", "--training.max_grad_norm=0.5"]
    compare_with_reference(2, {"experts.degree": 2}, tmp_path, ref_extra=common,  # reference: torch.optim.AdamW
                           extra=[f"--optimizer.offload={engine}", "--optimizer.device_fraction=0.3", *common])


def test_activation_checkpointing_equals_single_process(tmp_path):
    """Per-block recomputation under FSDP2, Ulysses, pipelined LLEP (which recomputes itself) and P=2."""
    compare_with_reference(4, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2,
                               "experts.dispatcher": "llep_pipelined", "experts.llep_min_chunk": 8,
                               "experts.chunk_tokens": 32}, tmp_path,
                           extra=["--training.activation_checkpoint=true"])


def test_checkpoint_offload_equals_single_process(tmp_path):
    """Every block's checkpointed input kept on the host (selective checkpoint offload) under D=2, Ep=2."""
    compare_with_reference(4, {"seq.degree": 2, "experts.degree": 2, "experts.dispatcher": "llep_pipelined",
                               "experts.llep_min_chunk": 8, "experts.chunk_tokens": 32}, tmp_path,
                           extra=["--training.activation_checkpoint=offload"])


@pytest.mark.parametrize("dispatcher", ["alltoall", "llep"])
def test_activation_policy_mix_equals_single_process(tmp_path, dispatcher):
    """Per-block policies mixed (selective keeps attention and skips its Ulysses all-to-alls in the
    recompute pass; offload; full; none) under D=2, Ep=2, P=2 with packed documents."""
    compare_with_reference(4, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2,
                               "experts.dispatcher": dispatcher, "experts.llep_min_chunk": 8}, tmp_path, extra=["--model.n_layers=4",
                                             "--training.activation_checkpoint=selective*1,offload*1,none*1,full"])


def test_planned_configuration_equals_single_process(tmp_path):
    """parallel.plan=auto: the layout, policies and optimizer placement `mop plan` picks (CPU
    calibration; the tokens per step kept) train exactly like one process."""
    compare_with_reference(2, {"plan": "auto"}, tmp_path)


def test_fused_elementwise_kernels_equal_single_process(tmp_path):
    """training.elementwise_kernels=fused (torch.compile'd RoPE, SwiGLU, weighted sum) under D=2, Ep=2
    with LLEP, whose expert layer recomputes its SwiGLU in backward, and P=2, against the eager
    single process."""
    compare_with_reference(2, {"seq.degree": 2, "experts.degree": 2, "vocab.degree": 2, "experts.dispatcher": "llep",
                               "experts.llep_min_chunk": 8}, tmp_path,
                           extra=["--training.elementwise_kernels=fused", "--training.activation_checkpoint=selective"],
                           ref_extra=[])
