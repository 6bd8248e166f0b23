"""Which fused SDPA backend takes MLA's head dims (q/k 192, v 128) and the sink-augmented head dim,
on this GPU, and how fast (bf16, causal, forward + backward). GPU only; prints one line per case.

    python scripts/sdpa_backends_mla.py
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
MOP_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]


def _case(dqk, dv, S, H=16, lower_right=0):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, H, S, dqk, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, H, S + lower_right, dqk, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, H, S + lower_right, dv, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    mask = causal_lower_right(S, S + lower_right) if lower_right else None
    return q, k, v, mask


def _step(q, k, v, mask):
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    o.backward(torch.ones_like(o))
    return o


def _time(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def _which(q, k, v, mask):
    """Kernel names the mop preference order (cuDNN, flash, efficient) launches."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with sdpa_kernel(MOP_ORDER, set_priority=True):
            _step(q, k, v, mask)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if "attention" in e.name.lower() or "fmha" in e.name.lower()
             or "flash" in e.name.lower() or "cudnn" in e.name.lower() or "sm90" in e.name.lower()}
    return sorted(n[:60] for n in names)[:3]


def main():
    print(torch.__version__, torch.cuda.get_device_name(), "cudnn", torch.backends.cudnn.version())
    cases = {"mla q/k 192, v 128": (192, 128, 0), "mla, v padded to 192": (192, 192, 0),
             "gqa 128": (128, 128, 0), "sink-augmented 64+8, lower-right +1": (72, 64, 1),
             "sink-augmented 64+8, v padded": (72, 72, 1)}
    for S in (8192, 32768):
        for label, (dqk, dv, lr) in cases.items():
            q, k, v, mask = _case(dqk, dv, S, lower_right=lr)
            row = []
            for name, be in BACKENDS.items():
                try:
                    with sdpa_kernel([be]):
                        ms = _time(lambda: _step(q, k, v, mask))
                    row.append(f"{name} {ms:7.2f} ms")
                except RuntimeError as e:
                    row.append(f"{name} refused ({str(e).splitlines()[0][:40]})")
            try:
                picked = _which(q, k, v, mask)
            except RuntimeError as e:
                picked = f"none: {str(e)[:60]}"
            print(f"S={S:6d} {label:38s} | " + " | ".join(row) + f" | mop order runs: {picked}", flush=True)


if __name__ == "__main__":
    main()
