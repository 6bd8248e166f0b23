"""Device time of a torch.profiler Chrome trace, attributed to the CPU op stack that launched it.

    python scripts/trace_by_op.py runs/x/trace_rank0.json[.gz] [--top 40]

`logging.profile_step=N` (mop train) and `mop bench --profile` write such traces; the summary
(mop.bench.trace) also gives the device's idle time within the step and the host's blocking calls.
"""

from __future__ import annotations

import argparse
import gzip
import json

from mop.bench.trace import summarize


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as f:
        print(summarize(json.load(f), args.top), end="")


if __name__ == "__main__":
    main()
