"""mop.ops.fused: the torch.compile'd RoPE, SwiGLU and weighted sum equal the op-by-op math (values and
gradients), and a model with fused elementwise kernels trains like the eager one. Compiled on CPU
(inductor's C++ backend); on CUDA the same graphs become triton kernels."""

import pytest
import torch

from mop.ops import fused


def _compare(name, make_inputs, atol, rtol, dtype):
    """Fused against the eager math run in fp32 on the same values: in fp32 the two are the same
    arithmetic; in bf16 the fused kernel computes in fp32 and rounds once, so it is held to one
    rounding of the fp32 result (op by op, bf16 rounds the intermediates too, and is further off)."""
    torch.manual_seed(0)
    fused_in = make_inputs(dtype)
    ref_in = [t.detach().float().requires_grad_(t.requires_grad) for t in fused_in]
    ref = fused.kernel(name, ref_in[0], "eager")(*ref_in)
    got = fused.kernel(name, fused_in[0], "fused")(*fused_in)
    assert got.dtype == fused_in[0].dtype and got.shape == ref.shape
    torch.testing.assert_close(got.float(), ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    ref.backward(g)
    got.backward(g.to(got.dtype))
    for a, b in zip(fused_in, ref_in):
        if b.requires_grad:
            torch.testing.assert_close(a.grad.float(), b.grad, atol=atol, rtol=rtol)


def _rope_inputs(dtype, S=24):
    ang = torch.rand(2, S, 8) * 6.0
    return [torch.randn(2, S, 3, 16, dtype=dtype, requires_grad=True), ang.cos(), ang.sin()]


# bf16: one rounding of results up to ~4 in magnitude (sums over 16 products) is ~0.016.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-2)])
def test_fused_functions_equal_the_eager_math(dtype, tol):
    _compare("rope", _rope_inputs, tol, tol, dtype)
    _compare("rope", lambda d: _rope_inputs(d, S=7), tol, tol, dtype)  # another length: no recompile needed
    _compare("swiglu", lambda d: [torch.randn(37, 12, dtype=d, requires_grad=True),
                                  torch.randn(37, 12, dtype=d, requires_grad=True)], tol, tol, dtype)
    _compare("weighted_sum", lambda d: [torch.randn(19, 4, 16, dtype=d, requires_grad=True),
                                        torch.rand(19, 4, requires_grad=True)], tol, tol, dtype)


def test_clamped_swiglu_fused_equals_eager():
    """gpt-oss' clamped form (limit, alpha) through the same compiled function."""
    torch.manual_seed(0)
    gate, up = (torch.randn(29, 8) * 10).requires_grad_(), (torch.randn(29, 8) * 10).requires_grad_()
    g2, u2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    ref = fused.swiglu_math(gate, up, 7.0, 1.702)
    got = fused.kernel("swiglu", g2, "fused")(g2, u2, 7.0, 1.702)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
    ref.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(g2.grad, gate.grad, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(u2.grad, up.grad, atol=1e-5, rtol=1e-6)


def test_auto_is_eager_on_cpu_and_bad_modes_are_refused():
    t = torch.zeros(1)
    assert fused.kernel("rope", t, "auto") is fused.rope_math
    assert fused.kernel("rope", t, "eager") is fused.rope_math
    with pytest.raises(ValueError, match="elementwise kernels must be one of"):
        fused.check_kernels("triton")
    from mop.config import build_config

    with pytest.raises(ValueError, match="training.elementwise_kernels"):
        build_config(None, ["--training.elementwise_kernels=triton"])


def test_model_with_fused_kernels_trains_like_eager():
    """A MoE model (GQA with QK-norm, a dense first layer, routed and shared experts) with every block's
    elementwise work fused: loss and every gradient equal the eager model's in fp32, under the
    selective and full block policies (the recompute pass runs the compiled functions again)."""
    from mop.models.config import ModelConfig
    from mop.models.transformer import Transformer
    from mop.parallel.parallelize import apply_activation_policy

    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, n_experts=4, top_k=2,
                      expert_dim=16, dense_dim=48, n_dense_layers=1, n_shared_experts=1, qk_norm=True)
    torch.manual_seed(0)
    tokens = torch.randint(0, 97, (2, 24))
    positions = torch.arange(24).expand(2, 24)
    labels = torch.roll(tokens, -1, 1)
    grads, losses = {}, {}
    for kernels in ("eager", "fused"):
        model = Transformer(cfg)
        model.init_weights(seed=0)
        model.set_elementwise_kernels(kernels)
        apply_activation_policy(model, "selective*1,full*1,none")
        ce, aux = model(tokens, positions, labels, torch.tensor(float(labels.numel())))
        (ce + aux).backward()
        losses[kernels] = ce.item()
        grads[kernels] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert abs(losses["fused"] - losses["eager"]) < 1e-6
    for n, g in grads["eager"].items():
        torch.testing.assert_close(grads["fused"][n], g, atol=1e-6, rtol=1e-5, msg=n)
    with pytest.raises(ValueError, match="elementwise kernels"):
        model.set_elementwise_kernels("nope")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 5e-2)])
def test_slot_gathers_fused_equal_the_eager_permutations(dtype, tol):
    """The experts' copy to slots (its backward: gather and sum per token) and the combine (gather and
    weighted sum; its backward: two gathers), fused, against the op-by-op permutations: fp32 the same
    arithmetic, bf16 within a rounding of the fp32 result (atol as in the test above)."""
    from mop.models.moe import _ExpandToSlots, combine_slots

    torch.manual_seed(0)
    T, K, H, E = 13, 3, 16, 5
    order = torch.argsort(torch.randint(0, E, (T * K,)), stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(T * K)
    ref = {}
    for kernels in ("eager", "fused"):
        torch.manual_seed(1)
        x = torch.randn(T, H, dtype=dtype, requires_grad=True)
        y = torch.randn(T * K, H, dtype=dtype, requires_grad=True)
        w = torch.rand(T, K, requires_grad=True)
        slots = _ExpandToSlots.apply(x if kernels == "fused" else x.float(), order // K, inv, K, kernels)
        out = combine_slots(y if kernels == "fused" else y.float(), inv, order, w, kernels)
        g_slots, g_out = torch.randn(T * K, H), torch.randn(T, H)
        (slots.float() * g_slots).sum().backward()
        (out.float() * g_out).sum().backward()
        got = {"slots": slots.float(), "out": out.float(), "dx": x.grad.float(), "dy": y.grad.float(), "dw": w.grad}
        if kernels == "eager":  # the reference: op by op in fp32 on the same values
            ref = got
        else:
            for k, v in got.items():
                torch.testing.assert_close(v, ref[k], atol=tol, rtol=tol, msg=k)


def _saved_bytes(shape: str, kernels: str, seq_len: int) -> int:
    """Bytes autograd saves in one forward (unique storages, parameters excluded)."""
    from mop.models.shapes import get_shape
    from mop.models.transformer import Transformer

    cfg = get_shape(shape)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights(seed=0)
    model.set_elementwise_kernels(kernels)
    model.train()
    model.block_policies = ["none"] * cfg.n_layers
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, torch.arange(seq_len)[None], tokens, None)
    return sum(seen.values())


@pytest.mark.parametrize("shape", ["debug", "tiny"])
def test_the_memory_model_knows_what_fused_kernels_save(shape):
    """Fused SwiGLU recomputes silu's output in backward instead of keeping it (dense FFN, shared and
    routed experts): the planner's kept bytes drop by exactly what a CPU run's saved tensors do."""
    from mop.models.shapes import get_shape
    from mop.parallel.layout import LayoutSpec
    from mop.plan.memory import kept_bytes
    from mop.plan.step import Step

    cfg = get_shape(shape)
    seq_len = 64
    measured = _saved_bytes(shape, "eager", seq_len) - _saved_bytes(shape, "fused", seq_len)
    moe = [i >= cfg.n_dense_layers for i in range(cfg.n_layers)]
    predicted = 0.0
    for kernels, sign in (("eager", 1), ("fused", -1)):
        step = Step(model=cfg, layout=LayoutSpec(1), seq_len=seq_len, policies="none", dispatcher="alltoall",
                    act_bytes=4, cpu=True, elementwise_kernels=kernels)
        predicted += sign * seq_len * sum(kept_bytes(step, "none", e) for e in moe)
    assert measured > 0 and predicted == measured


def test_plans_carry_the_kernels_and_fused_time_scales_the_memory_bound_term():
    from dataclasses import replace

    from mop.models.shapes import get_shape
    from mop.parallel.layout import LayoutSpec
    from mop.plan.calibration import Calibration
    from mop.plan.step import Step, resolve_elementwise_kernels, step_from_overrides
    from mop.plan.timing import estimate_time

    cfg = get_shape("qwen3-30b-a3b", n_layers=4)
    cal = Calibration.load("h200")
    eager = Step(model=cfg, layout=LayoutSpec(2), seq_len=8192, policies="none", dispatcher="alltoall")
    fused_step = replace(eager, elementwise_kernels="fused")
    assert "--training.elementwise_kernels=fused" in fused_step.overrides()
    assert not any("elementwise" in o for o in eager.overrides())
    assert step_from_overrides(cfg, fused_step.overrides(), 2).elementwise_kernels == "fused"
    assert resolve_elementwise_kernels("auto", cpu=False) == "fused"
    assert resolve_elementwise_kernels("auto", cpu=True) == "eager"
    with pytest.raises(ValueError, match="elementwise_kernels"):
        replace(eager, elementwise_kernels="auto")
    t_e, t_f = estimate_time(eager, cal), estimate_time(fused_step, cal)
    assert t_f.memory_bound == pytest.approx(cal.fused_elementwise_ratio * t_e.memory_bound)
    assert t_f.attention == t_e.attention and t_f.step < t_e.step


def test_fused_kernels_step_aside_under_a_dispatch_mode():
    """torch.compile does not trace under a Python dispatch mode (a memory or FLOP counter): fused
    kernels then run op by op instead of failing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    x, cos, sin = _rope_inputs(torch.float32)
    with Count():
        assert not fused.is_fused(x, "fused")
        out = fused.kernel("rope", x, "fused")(x, cos, sin)
    assert Count.ops > 5 and torch.equal(out, fused.rope_math(x, cos, sin))
    assert fused.is_fused(x, "fused")
    with torch.device("cpu"):  # a torch-function mode
        assert not fused.is_fused(x, "fused")


def test_the_ledger_reproduces_the_calibrated_ratio():
    """Calibration.fused_elementwise_ratio is what `python -m mop.bench.ledger` counts for one
    qwen3-30b-a3b block (2,048 tokens, bf16): fused kernels move a fraction of the op-by-op bytes,
    and every fused function is booked as one kernel."""
    from mop.bench.ledger import count, totals
    from mop.plan.calibration import Calibration

    eager, fused_ops = (count("qwen3-30b-a3b", 2048, k) for k in ("eager", "fused"))
    ratio = totals(fused_ops)["non_gemm"] / totals(eager)["non_gemm"]
    assert ratio == pytest.approx(Calibration.load("h200").fused_elementwise_ratio, abs=0.01)
    booked = {op for _, op in fused_ops if op.startswith("fused:")}
    assert booked == {"fused:rope", "fused:swiglu", "fused:gather_sum", "fused:combine", "fused:combine_grads",
                      "fused:rms_norm"}
    assert not any(op.startswith("fused:") and op != "fused:rms_norm" for _, op in eager)
    # The GEMMs are the same work either way.
    assert totals(fused_ops)["gemm_forward"] == totals(eager)["gemm_forward"]
