#!/usr/bin/env bash
# Third one-H200 call of session 2 (after the gradient-in-forward loss): vocabulary loss vs the
# compiled plain loss, expert-layer chunk size, `mop bench` at 8K/32K/128K on one GPU, and the
# host-offloaded optimizer's exposed time (gpu_stream engine) in the same harness.
# Usage: OUT=some/dir bash bench/scripts/single_gpu_3.sh
NPROC=1 source "$(dirname "$0")/common.sh"

echo "== vocabulary loss, one device"
timeout 70 $TR -m mop.bench.vocab --vocab 151936 --hidden 2048,7168 --tokens 8192,32768 \
  --P 1 --methods plain-compiled,chunked --warmup 1 --iters 3 --out "$OUT/vocab_p1.json" \
  > "$OUT/vocab_p1.log" 2>&1; grep "^|" "$OUT/vocab_p1.log"

echo "== experts layer in a checkpointed block, chunk 16384 tokens"
timeout 40 $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 --skew 0,0.95 \
  --dispatchers alltoall,llep_pipelined --checkpointed --chunk-tokens 16384 --out "$OUT/experts_c16k_ckpt.jsonl" \
  > "$OUT/experts_c16k_ckpt.log" 2>&1; grep "^|" "$OUT/experts_c16k_ckpt.log"

echo "== mop bench, 1 GPU, 8K/32K/128K"
timeout 300 python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 8K,32K,128K \
  --gpus 1 --batch-setting paper --optimizer-ablation --sweep-max 2 --warmup 1 --steps 2 --timeout 110 \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1; echo "rc=$?" >> "$OUT/bench.log"
grep -E "^\| (mop|baseline)" "$OUT/bench/results.md" | head -9; tail -2 "$OUT/bench.log"
rm -rf "$OUT/bench/work"

echo "== mop with the host-resident optimizer (gpu_stream, all state on the host), 32K"
timeout 100 python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 32K --gpus 1 --systems mop \
  --batch-setting paper --optimizer-ablation --warmup 1 --steps 2 --timeout 95 \
  --mop-overrides "--optimizer.offload=gpu_stream --optimizer.device_fraction=0" \
  --out "$OUT/bench_offload" > "$OUT/bench_offload.log" 2>&1; echo "rc=$?" >> "$OUT/bench_offload.log"
grep -E "^\| mop" "$OUT/bench_offload/results.md" | head -4; tail -2 "$OUT/bench_offload.log"
rm -rf "$OUT/bench_offload/work"
pack single_gpu_3
