#!/usr/bin/env bash
# One device call: a 4-GPU mop training log, the bf16 lossless check, the expert and vocabulary
# micro-benchmarks, and mop's long-context sweep (D=4, 2 layers of the qwen3-30b-a3b shape).
# Usage (on a 4-GPU machine): OUT=some/dir bash bench/scripts/components_4gpu.sh
NPROC=4 source "$(dirname "$0")/common.sh"

echo "== 1. mop train on 4 GPUs (qwen3-30b-a3b shape, 4 layers, 32K, D=4 Ep=4 P=4, LLEP)"
timeout 120 $TR -m mop.train --config configs/qwen3-30b-a3b.toml --model.n_layers=4 --training.seq_len=32768 \
  --training.steps=6 --training.warmup_steps=1 --optimizer.offload=none --logging.run_dir=/tmp/run4 \
  > "$OUT/train_4gpu.log" 2>&1; echo "rc=$?" >> "$OUT/train_4gpu.log"; tail -12 "$OUT/train_4gpu.log"

echo "== 2. bf16 lossless: 4 GPUs (D=2, Ep=2, P=4, LLEP) vs 1 GPU"
timeout 150 python scripts/gpu_lossless.py --gpus 4 --layout seq.degree=2,experts.degree=2,vocab.degree=4,experts.dispatcher=llep \
  --out "$OUT/lossless_bf16.json" > "$OUT/lossless_bf16.log" 2>&1; echo "rc=$?" >> "$OUT/lossless_bf16.log"
grep -E "^step|lossless" "$OUT/lossless_bf16.log" | tail -12

echo "== 3. long context: peak memory and step time vs context (2 layers, D=4 Ep=4 P=4, AC, host AdamW)"
for S in 131072 262144 524288 1048576; do
  timeout 170 $TR -m mop.train --config configs/qwen3-30b-a3b.toml --model.n_layers=2 --training.seq_len=$S \
    --training.steps=2 --training.warmup_steps=1 --logging.run_dir=/tmp/ctx$S --parallel.seq.head_chunks=4 \
    --optimizer.device_fraction=0 \
    > "$OUT/ctx_$S.log" 2>&1; echo "rc=$?" >> "$OUT/ctx_$S.log"
  cp /tmp/ctx$S/metrics.jsonl "$OUT/ctx_$S.jsonl" 2>/dev/null; grep -E "^step|rc=|Error" "$OUT/ctx_$S.log" | tail -3
done
echo "== 4. experts micro-benchmark (qwen3 widths, 2 skews)"
timeout 60 $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 --skew 0,0.95 \
  --out "$OUT/experts.jsonl" > "$OUT/experts.log" 2>&1; tail -8 "$OUT/experts.log"
pack components
