#!/usr/bin/env bash
# Session 3, device call B (2 x H200), 24 layers of qwen3-30b-a3b (12 per GPU), paper batch:
# 1. the baseline's known-best config at 128K (FSDP2 + EP2 + CP2 ring attention + compiled loss +
#    full AC; call A's attempt failed on a saved-tensor hook, fixed since);
# 2. mop at 256K (auto activation policy, host optimizer with its measured device share).
# Results are merged with call A's 128K mop point by copying that results.json first (--resume).
# Usage: OUT=dir bash bench/scripts/session3_b.sh PREVIOUS_RESULTS_DIR
NPROC=2 source "$(dirname "$0")/common.sh"
PREV=${1:-}
B="$OUT/bench"
mkdir -p "$B"
[ -n "$PREV" ] && python - "$PREV/results.json" "$B/results.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
d["points"] = [p for p in d["points"] if p.get("status") == "ok"]  # failed points run again
json.dump(d, open(sys.argv[2], "w"), indent=1)
PY
timeout 250 python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --contexts 128K --gpus 2 \
  --batch-setting paper --warmup 1 --steps 2 --timeout 230 --systems baseline --resume \
  --baseline-configs '[{"ep": 2, "cp": 2}]' --out "$B" > "$OUT/bench_128k_baseline.log" 2>&1
timeout 330 python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --contexts 256K --gpus 2 \
  --batch-setting paper --warmup 1 --steps 1 --timeout 320 --systems mop --resume \
  --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream" \
  --out "$B" > "$OUT/bench_256k_mop.log" 2>&1
cat "$B/results.md" | sed -n '/## Results/,/## Baseline/p'
python - "$B/results.json" <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["points"]:
    print(p["system"], p["context"], p.get("status"), p.get("activation_policies"), p.get("optimizer_device_fraction"),
          "build_s", p.get("build_s"))
    for r in p.get("sweep") or [p]:
        if r.get("status") not in ("ok", None):
            print((r.get("error") or r.get("output_tail") or "")[-2500:])
PY
rm -rf "$B"/work
pack session3_b
