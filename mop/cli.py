"""The `mop` command: `mop train`, `mop data prepare`, `mop bench`, `mop plot`, `mop export`."""

from __future__ import annotations

import sys

USAGE = """usage: mop COMMAND [ARGS]

commands:
  train           train a model (mop train --help)
  data prepare    tokenize text/jsonl/parquet files into token shards (mop data prepare --help)
  bench           mop against the FSDP-best baseline on this machine's GPUs (mop bench --help)
  plot RUN_DIR    PNG plots of loss and throughput from RUN_DIR/metrics.jsonl
  export RUN OUT  a run's newest checkpoint as a Hugging Face checkpoint (mop export --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from mop.train import main as train_main

        return train_main(rest)
    if cmd == "data":
        if not rest or rest[0] != "prepare":
            print("usage: mop data prepare INPUT... --out DIR [--tokenizer byte|tokenizer.json]", file=sys.stderr)
            return 2
        from mop.data.prepare import prepare_main

        return prepare_main(rest[1:])
    if cmd == "bench":
        from mop.bench.cli import main as bench_main

        return bench_main(rest)
    if cmd == "export":
        from mop.hf import export_main

        return export_main(rest)
    if cmd == "plot":
        from mop.plot import main as plot_main

        return plot_main(rest)
    print(f"mop: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
