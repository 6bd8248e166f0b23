"""Lossless for the model families: MLA (DeepSeek-V3 / Kimi-K2 features) and gpt-oss attention
(sinks + sliding windows) train under Ulysses + EP + P exactly like one process (fp32, CPU, gloo).

The gpt-oss case uses plain SwiGLU experts (`debug-gpt-oss`): the expert-parallel kernels do not take
gpt-oss' biased, clamped experts yet and refuse them (tests/test_gpt_oss.py).
"""

import pytest

from tests.lossless import compare_with_reference


@pytest.mark.parametrize("world,layout", [
    (4, {"seq": 2, "expert": 2, "vocab": 2, "ulysses_head_chunks": 2}),
    (4, {"seq": 4, "expert": 2, "vocab": 4}),
])
def test_mla_equals_single_process(world, layout, tmp_path):
    compare_with_reference(world, layout, tmp_path, extra=["--model.shape=debug-mla"])


@pytest.mark.parametrize("world,layout", [
    (4, {"seq": 2, "expert": 2, "vocab": 2}),
    (4, {"seq": 4, "expert": 4, "vocab": 2}),  # D=4 > 2 KV heads: KV heads replicated
])
def test_gpt_oss_attention_equals_single_process(world, layout, tmp_path):
    compare_with_reference(world, layout, tmp_path, extra=["--model.shape=debug-gpt-oss"])


@pytest.mark.parametrize("shape,policy", [("debug-mla", "selective"), ("debug-gpt-oss", "full")])
def test_families_under_activation_checkpointing_equal_single_process(shape, policy, tmp_path):
    """Checkpointed blocks recompute MLA and sink/window attention (plain autograd under Ulysses'
    variant Function) and still train exactly like one process."""
    compare_with_reference(4, {"seq": 2, "expert": 2, "vocab": 2}, tmp_path,
                           extra=[f"--model.shape={shape}", f"--training.activation_checkpoint={policy}"])
