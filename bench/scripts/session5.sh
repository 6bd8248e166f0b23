#!/usr/bin/env bash
# Next session's device calls (2 x H200, qwen3-30b-a3b, 24 layers = 12 per GPU unless said): what
# issues #12 and #17 still owe after session 4 (bench/results/2026-11-29-session4-2xh200/SUMMARY.md).
# Each part stays under ~9.5 minutes; results are packed after every stage.
#   PART=a  #12: 256K mop (the baseline has no config that runs from 128K on: session 4), then 64K
#           mop vs the baseline (EP2, full AC), one invocation per context.
#   PART=b  #12/#17: 512K mop with 8 layers (a slice: a 24-layer 512K step with its warm-up does
#           not fit in one call; labelled so), with the memory breakdown of one step
#           (logging.memory_step); then 128K with every block's input offloaded to the host
#           against call a's auto choice (#17 item 5: what offload costs, what it frees).
#   PART=c  #17 item 4 and the 2^20 batch setting: the host optimizer's exposed share at W=2
#           (--optimizer-ablation) at 32K, paper batch, both engines; then 8K with 2^20 tokens per
#           step (64 micro-batches) for both systems; then `mop plan calibrate` on this machine.
#   PART=d  the baseline's sweep at 8K and 32K (session 4 ran one config: its ratios are an upper
#           bound), mop included again so that each context is one invocation.
# Usage: OUT=dir PART=a bash bench/scripts/session5.sh
NPROC=2 source "$(dirname "$0")/common.sh"
left() { echo $(( ${1:-570} - SECONDS )); }
B="python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --gpus 2"
MOP="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream --training.param_dtype=bf16"
show() { sed -n '/## Results/,/## Baseline/p' "$1/results.md"; rm -rf "$1/work"; }

case ${PART:-a} in
a)
  timeout $(left 400) $B --contexts 256K --batch-setting paper --systems mop --warmup 1 --steps 1 --timeout 390 \
    --mop-overrides "$MOP" --out "$OUT/bench_256k" > "$OUT/bench_256k.log" 2>&1; show "$OUT/bench_256k"
  pack session5_a
  timeout $(left 570) $B --contexts 64K --batch-setting paper --warmup 1 --steps 2 --timeout 150 \
    --baseline-configs '[{"ep": 2}]' --mop-overrides "$MOP" --out "$OUT/bench_64k" > "$OUT/bench_64k.log" 2>&1
  show "$OUT/bench_64k"
  ;;
b)
  timeout $(left 330) python -m mop.cli bench --shape qwen3-30b-a3b --layers 8 --gpus 2 --contexts 512K \
    --batch-setting paper --systems mop --warmup 1 --steps 1 --timeout 320 --mop-overrides "$MOP" \
    --out "$OUT/bench_512k_8l" > "$OUT/bench_512k_8l.log" 2>&1; show "$OUT/bench_512k_8l"
  pack session5_b
  timeout $(left 570) $B --contexts 128K --batch-setting paper --systems mop --warmup 1 --steps 1 --timeout 230 \
    --mop-overrides "$MOP --training.activation_checkpoint=offload" --out "$OUT/bench_128k_offload" \
    > "$OUT/bench_128k_offload.log" 2>&1; show "$OUT/bench_128k_offload"
  ;;
c)
  for E in gpu_stream cpu; do
    LIMIT=130; [ $E = cpu ] && LIMIT=260
    timeout $(left $LIMIT) $B --contexts 32K --batch-setting paper --systems mop --warmup 1 \
      --steps 2 --timeout 120 --optimizer-ablation \
      --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=$E --training.param_dtype=bf16" \
      --out "$OUT/ablation_32k_$E" > "$OUT/ablation_32k_$E.log" 2>&1; show "$OUT/ablation_32k_$E"
  done
  pack session5_c
  # fp32 weights here: with 64 micro-batches per step, bf16 gradients would accumulate in bf16.
  timeout $(left 480) $B --contexts 8K --batch-setting 1M --warmup 1 --steps 1 --timeout 110 \
    --baseline-configs '[{"ep": 2}]' --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream" \
    --out "$OUT/bench_8k_1M" > "$OUT/bench_8k_1M.log" 2>&1
  show "$OUT/bench_8k_1M"
  pack session5_c
  timeout $(left 570) $TR -m mop.cli plan calibrate --out "$OUT/calibration.json" > "$OUT/calibrate.log" 2>&1
  tail -8 "$OUT/calibrate.log"
  ;;
d)
  timeout $(left 570) $B --contexts 8K,32K --batch-setting paper --warmup 1 --steps 2 --timeout 120 \
    --sweep quick --sweep-max 4 --mop-overrides "$MOP" --out "$OUT/sweep_short" > "$OUT/sweep_short.log" 2>&1
  sed -n '/## Results/,$p' "$OUT/sweep_short/results.md" | head -40; rm -rf "$OUT/sweep_short/work"
  ;;
esac
pack session5_${PART:-a}
