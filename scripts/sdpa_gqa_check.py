"""Which SDPA backends take GQA directly (`enable_gqa=True`, K/V with fewer heads) on this GPU, and
what that saves against expanding K/V first (`repeat_interleave`, what mop.ops.attention does on
CUDA today). One JSON line per (sequence length, variant): forward+backward ms, or the error.

    python scripts/sdpa_gqa_check.py --seq 8192,32768 --heads 32 --kv-heads 4 --head-dim 128
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from sdpa_backends_mla import _time as time_ms  # scripts/ is on the path when run as a script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", default="8192,32768")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    args = ap.parse_args()
    dev = torch.device("cuda")
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    rep = args.heads // args.kv_heads
    for S in (int(s) for s in args.seq.split(",")):
        q = torch.randn(1, args.heads, S, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, args.kv_heads, S, args.head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn_like(k, requires_grad=True)
        g = torch.randn_like(q)
        for name, backend in backends.items():
            for variant in ("enable_gqa", "repeat_interleave"):
                def step():
                    with sdpa_kernel([backend]):
                        if variant == "enable_gqa":
                            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        else:
                            out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1),
                                                                 v.repeat_interleave(rep, 1), is_causal=True)
                    out.backward(g)
                try:
                    rec = {"ms_fwd_bwd": round(time_ms(step), 3)}
                except Exception as e:  # not supported by this backend: say which and why
                    rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(json.dumps({"seq": S, "backend": name, "variant": variant, **rec}), flush=True)
                q.grad = k.grad = v.grad = None


if __name__ == "__main__":
    main()
