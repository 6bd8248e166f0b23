#!/usr/bin/env bash
# Session 3, device call C (2 x H200), 24 layers of qwen3-30b-a3b (12 per GPU), paper batch:
# 1. the baseline at 128K with its optimizer state on the host (FSDP2 CPUOffloadPolicy + EP2 + CP2
#    ring attention + compiled loss + full AC): call B showed that the on-device config runs out of
#    memory (the 24-layer state is 116 GiB per GPU);
# 2. mop at 256K (auto activation policy; call B's probe ran out of memory, now caught and retried
#    with a smaller budget). One warm-up step (its host update is what the timed step waits for),
#    one timed step (~1 min each).
# Results are merged with the earlier points by copying their results.json first (--resume).
# Usage: OUT=dir bash bench/scripts/session3_c.sh PREVIOUS_RESULTS_DIR
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
timeout 210 python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --contexts 128K --gpus 2 \
  --batch-setting paper --warmup 1 --steps 2 --timeout 200 --systems baseline --resume \
  --baseline-configs '[{"ep": 2, "cp": 2, "cpu_offload": true}]' --out "$B" > "$OUT/bench_128k_baseline.log" 2>&1
timeout 345 python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --contexts 256K --gpus 2 \
  --batch-setting paper --warmup 1 --steps 1 --timeout 330 --systems mop --resume \
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
pack session3_c
