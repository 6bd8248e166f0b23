#!/usr/bin/env bash
# Session 6's device calls (2 x H200, qwen3-30b-a3b, 24 layers = 12 per GPU unless said).
#   PART=a  #12's 2^20-tokens-per-step setting: 8K (64 micro-batches) and 32K (16), mop by the bench's
#           rule (its probe picks the activation policies and the optimizer's device share) against the
#           baseline's best short-context config (session 5: plain FSDP2, experts gathered, full AC).
#           Warm-up steps run 2 micro-batches (--warmup-micro-batches): a full 2^20 warm-up step
#           would cost 35-60 s of device time per point and warm nothing more.
#   PART=b  #12: 256K mop (the baseline has no configuration that runs from 128K on), then the
#           planner's calibration and its 128K choice run through `mop bench` (#13).
#   (A PART=c, 512K with 24 layers, was not reached; it is session7.sh PART=b.)
# Usage: OUT=dir PART=a bash bench/scripts/session6.sh
NPROC=2 source "$(dirname "$0")/common.sh"
left() { echo $(( ${1:-570} - SECONDS )); }
B="python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --gpus 2"
show() { sed -n '/## Results/,/## Baseline/p' "$1/results.md"; rm -rf "$1/work"; }

case ${PART:-a} in
a)
  # fp32 weights on both sides: with 64 micro-batches, bf16 gradients would accumulate in bf16.
  M="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream"
  for C in 8K 32K; do
    timeout $(left $([ $C = 8K ] && echo 300 || echo 575)) $B --contexts $C --batch-setting 1M --warmup 1 \
      --warmup-micro-batches 2 --steps 1 --timeout 200 --baseline-configs '[{"ep": 1}]' --mop-overrides "$M" \
      --out "$OUT/m$C" > "$OUT/m$C.log" 2>&1
    show "$OUT/m$C"; pack session6_a
  done
  ;;
b)
  MOP="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream --training.param_dtype=bf16"
  timeout $(left 290) $B --contexts 256K --batch-setting paper --systems mop --warmup 1 --steps 1 --timeout 280 \
    --mop-overrides "$MOP" --out "$OUT/bench_256k" > "$OUT/bench_256k.log" 2>&1; show "$OUT/bench_256k"
  pack session6_b
  timeout $(left 575) env NPROC=2 CONTEXT=128K OUT="$OUT/plan" bash bench/scripts/plan_calibrate.sh \
    > "$OUT/plan_calibrate.log" 2>&1; tail -20 "$OUT/plan_calibrate.log"
  ;;
esac
pack session6_${PART:-a}
