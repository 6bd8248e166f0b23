"""Build mop/plan/calibration/h200.json from session 6's measured calibration, before `mop plan fit`.

    git show d2f319d:mop/plan/calibration/h200.json > /tmp/h200_before.json
    python bench/results/2026-11-30-plan-accuracy-session6/h200_from_session6.py /tmp/h200_before.json
    python -m mop.cli plan fit --calibration h200          # fits the efficiencies, writes h200.json again

The micro-benchmarks are session 6's (`mop plan calibrate` on 2 x H200); the in-step constants are
the previous file's, carried over the way `mop plan calibrate` now carries them
(`mop.plan.microbench.with_base_in_step`); the host AdamW rate stays the previous file's (below).
"""

import dataclasses
import sys

from mop.plan.calibration import CALIBRATION_DIR, Calibration
from mop.plan.microbench import with_base_in_step

SESSION6 = "bench/results/2026-11-30-session6-2xh200/c-plan-calibrate-128k/calibration.json"

before = Calibration.load(sys.argv[1])
measured = Calibration.load(SESSION6)
cal = with_base_in_step(measured, before, print)
notes = dict(cal.notes)
notes.update(
    source=f"micro-benchmarks: session 6's `mop plan calibrate` on 2 x H200 ({SESSION6}); in-step constants: the "
           "hand-tuned h200.json of d2f319d, carried over by mop.plan.microbench.with_base_in_step; efficiencies: "
           "`mop plan fit` (the fit record)",
    host_adam_cpu=f"{before.host_adam_cpu:.3g} params/s per node, the previous file's (HostAdamW's cpu engine, 16 "
                  "threads on a 16-core H200 host: 2.21e9). Session 6's calibration timed torch's AdamW on one "
                  f"thread under torchrun's OMP_NUM_THREADS=1 ({measured.host_adam_cpu:.3g} per node); the "
                  "micro-benchmark now times the trainer's pool with the trainer's threads, but has not run on an "
                  "H200 host since",
    h2d_node_bw="measured with the 2 GPUs of session 6's node copying at once, each at its one-GPU rate (54.8 GB/s): "
                "the total of a 2-GPU node, a lower bound for 8 (the previous 153e9 had no recorded source)",
    intra_bw="all-gather bus bandwidth measured on 2 x H200 (NCCL, 2^26 bf16 elements per rank); the previous 330e9 "
             "had no recorded source",
    attn_bwd_ratio="measured (cuDNN SDPA at 16K); the previous 3.2 was fitted on 1xH200 steps, which the attention "
                   "efficiency now carries",
)
cal = dataclasses.replace(cal, host_adam_cpu=before.host_adam_cpu, notes=notes)
print(f"wrote {cal.save(CALIBRATION_DIR / 'h200.json')}")
