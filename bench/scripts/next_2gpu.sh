#!/usr/bin/env bash
# The 2 x H200 runs issues #12 and #17 still need, as three device calls of under 10 minutes each
# (a session has 30 minutes of device time, a machine start costs 1-2: ask `status` first, and keep
# helpers off the device while these run). Results go under $OUT as one archive per call.
#   PART=a  #17: bf16 lossless at W=2 (every component, 50 steps, against the 1-GPU noise band);
#           expert layer at Ep=2 (qwen3 and kimi widths, 16K/64K tokens/rank, skews, 3 dispatchers,
#           plain and checkpointed); vocabulary ring at P=2 against the compiled plain loss
#   PART=b  #12: 24 layers, 8K / 32K / 64K, mop vs the baseline (both batch settings at 8K)
#   PART=c  #12/#17: 24 layers, 128K: the baseline offloaded (its only config that fits); then 256K mop
#           with bf16 weights on the device (training.param_dtype=bf16: fp32 masters in the host
#           optimizer, 29 GiB per GPU freed for kept activations)
# Usage: OUT=some/dir PART=a bash bench/scripts/next_2gpu.sh
NPROC=2 source "$(dirname "$0")/common.sh"
left() { echo $(( ${1:-570} - SECONDS )); }  # seconds left of this call's budget
MOP="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream --training.param_dtype=bf16"
B="python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --gpus 2"

case ${PART:-a} in
a)
  timeout 200 python scripts/gpu_lossless.py --gpus 2 --layout seq.degree=2,experts.degree=2,vocab.degree=2,experts.dispatcher=llep \
    --optimizer cpu --steps 50 --out "$OUT/lossless_bf16.json" > "$OUT/lossless_bf16.log" 2>&1
  tail -3 "$OUT/lossless_bf16.log"
  for C in "" "--checkpointed"; do
    timeout 110 $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 --skew 0,0.3,0.5,0.8,0.95 \
      --dispatchers alltoall,llep,llep_pipelined $C --out "$OUT/experts_qwen3${C:+_ckpt}.jsonl" \
      > "$OUT/experts_qwen3${C:+_ckpt}.log" 2>&1; grep "^|" "$OUT/experts_qwen3${C:+_ckpt}.log" | head -40
  done
  timeout 80 $TR -m mop.bench.experts --shape kimi-k2-slice --tokens 16384 --skew 0,0.95 --checkpointed \
    --out "$OUT/experts_kimi_ckpt.jsonl" > "$OUT/experts_kimi_ckpt.log" 2>&1; grep "^|" "$OUT/experts_kimi_ckpt.log"
  timeout $(left) $TR -m mop.bench.vocab --vocab 151936,200000 --hidden 2048,7168 --tokens 8192,32768,65536 \
    --P 1,2 --methods plain-compiled,chunked,ring-weights,ring-activations --warmup 1 --iters 3 \
    --out "$OUT/vocab.json" > "$OUT/vocab.log" 2>&1; grep "^|" "$OUT/vocab.log" | head -50
  ;;
b)
  timeout $(left 580) $B --contexts 8K,32K,64K --batch-setting paper --optimizer-ablation --warmup 1 --steps 2 \
    --timeout 150 --baseline-configs '[{"ep": 2}, {"ep": 2, "activation_checkpoint": false}]' \
    --mop-overrides "--parallel.experts.dispatcher=llep" --out "$OUT/bench_short" > "$OUT/bench_short.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_short/results.md"; rm -rf "$OUT/bench_short/work"
  ;;
c)
  timeout 330 $B --contexts 128K --batch-setting paper --systems baseline --warmup 1 --steps 1 --timeout 320 \
    --baseline-configs '[{"ep": 2, "cp": 2, "cpu_offload": true}]' --out "$OUT/bench_long" > "$OUT/bench_long_base.log" 2>&1
  timeout $(left) $B --contexts 256K --batch-setting paper --systems mop --warmup 1 --steps 1 --timeout $(left 560) \
    --mop-overrides "$MOP" --out "$OUT/bench_long" --resume > "$OUT/bench_long_mop.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_long/results.md"; rm -rf "$OUT/bench_long/work"
  ;;
esac
pack next_2gpu_${PART:-a}
