#!/usr/bin/env bash
# One device call (any GPU kind, ~2 min): measure the planner's constants on this machine and check
# `mop plan`'s choice against a real run.
# 1. `mop plan calibrate` under torchrun: GEMM, grouped GEMM, causal SDPA (forward and backward),
#    memory and host-link bandwidth, host AdamW, and all-gather / all-to-all over NPROC GPUs;
#    the file lands in the archive as calibration.json (copy it to mop/plan/calibration/ to use it).
# 2. `mop plan` for qwen3-30b-a3b with 12 layers per GPU at CONTEXT, with the new constants, then
#    that exact configuration through `mop bench` (mop only) so `mop plan accuracy` can score it.
# Usage: NPROC=2 CONTEXT=128K OUT=dir bash bench/scripts/plan_calibrate.sh
NPROC=${NPROC:-2}
CONTEXT=${CONTEXT:-128K}
source "$(dirname "$0")/common.sh"
LAYERS=$((12 * NPROC))
timeout 240 $TR -m mop.cli plan calibrate --out "$OUT/calibration.json" > "$OUT/calibrate.log" 2>&1
tail -8 "$OUT/calibrate.log"
python -m mop.cli plan --shape qwen3-30b-a3b --layers $LAYERS --gpus $NPROC --context $CONTEXT \
  --calibration "$OUT/calibration.json" --json > "$OUT/plan.json" 2> "$OUT/plan.err"
OVR=$(python -c "import json, sys; d = json.load(open(sys.argv[1])); print(' '.join(o for o in d['best']['overrides'] \
  if not o.startswith(('--model.', '--training.seq_len', '--training.batch_size', '--training.grad_accum'))))" \
  "$OUT/plan.json")
echo "plan: $OVR"
timeout 300 python -m mop.cli bench --shape qwen3-30b-a3b --layers $LAYERS --contexts $CONTEXT --gpus $NPROC \
  --batch-setting paper --warmup 1 --steps 2 --timeout 280 --systems mop --mop-overrides "$OVR" \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1
cp "$OUT/bench/results.json" "$OUT/results.json" 2>/dev/null
rm -rf "$OUT/bench"
python -m mop.cli plan accuracy "$OUT/results.json" --calibration "$OUT/calibration.json" | tail -4
pack plan_calibrate
