#!/usr/bin/env bash
# Session 3, device call D (2 x H200): mop at 256K, 24 layers of qwen3-30b-a3b, paper batch, auto
# activation policy, host optimizer with its measured device share (calls B and C failed on the
# probe's fallback and on a stale run-directory lock, both fixed). One warm-up step, one timed step.
# Usage: OUT=dir bash bench/scripts/session3_d.sh PREVIOUS_RESULTS_DIR
NPROC=2 source "$(dirname "$0")/common.sh"
PREV=${1:-}
B="$OUT/bench"
mkdir -p "$B"; [ -n "$PREV" ] && cp "$PREV/results.json" "$B/results.json"
timeout 420 python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --contexts 256K --gpus 2 \
  --batch-setting paper --warmup 1 --steps 1 --timeout 400 --systems mop --resume \
  --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream" \
  --out "$B" > "$OUT/bench_256k_mop.log" 2>&1
cat "$B/results.md" | sed -n '/## Results/,/## Baseline/p'
python - "$B/results.json" <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["points"]:
    print(p["system"], p["context"], p.get("status"), p.get("activation_policies"), p.get("optimizer_device_fraction"),
          "build_s", p.get("build_s"))
    if p.get("status") != "ok":
        print((p.get("error") or p.get("output_tail") or "")[-2500:])
PY
rm -rf "$B"/work
pack session3_d
