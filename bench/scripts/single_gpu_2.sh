#!/usr/bin/env bash
# Second one-H200 call of session 2 (after the loss/MoE/norm kernel fixes): a profile of the same
# step as single_gpu.sh, the expert-layer and vocabulary-loss micro-benchmarks again, and
# `mop bench` (mop vs the FSDP-best baseline) on one GPU.
# Usage: OUT=some/dir CONTEXTS=8K,32K bash bench/scripts/single_gpu_2.sh
NPROC=1 source "$(dirname "$0")/common.sh"

S=32768
echo "== profile: mop train, 1 GPU, qwen3-30b-a3b 4 layers, $S tokens, AC, step 4 profiled"
timeout 90 $TR -m mop.train --config configs/qwen3-30b-a3b.toml --parallel.seq.degree=1 --parallel.experts.degree=1 \
  --parallel.vocab.degree=1 --model.n_layers=4 --training.seq_len=$S --training.steps=4 --training.warmup_steps=1 \
  --optimizer.offload=none --logging.run_dir=/tmp/prof$S --logging.profile_step=4 --logging.progress=plain \
  > "$OUT/profile_$S.log" 2>&1; echo "rc=$?" >> "$OUT/profile_$S.log"
cp /tmp/prof$S/profile_rank0.txt "$OUT/profile_$S.txt" 2>/dev/null
gzip -c /tmp/prof$S/trace_rank0.json > "$OUT/trace_$S.json.gz" 2>/dev/null
grep -E "^step|rc=|Error" "$OUT/profile_$S.log" | tail -5

echo "== experts layer, 1 rank: bare and inside a checkpointed block"
for C in "" "--checkpointed"; do
  timeout 45 $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 --skew 0,0.95 \
    --dispatchers alltoall,llep_pipelined $C --out "$OUT/experts_qwen3${C:+_ckpt}.jsonl" \
    > "$OUT/experts_qwen3${C:+_ckpt}.log" 2>&1; tail -5 "$OUT/experts_qwen3${C:+_ckpt}.log"
done

echo "== vocabulary loss, one device"
timeout 140 $TR -m mop.bench.vocab --vocab 151936,200000 --hidden 2048,7168 --tokens 8192,32768,65536 \
  --P 1 --methods plain,plain-compiled,chunked-eager,chunked --warmup 1 --iters 3 --out "$OUT/vocab_p1.json" \
  > "$OUT/vocab_p1.log" 2>&1; tail -30 "$OUT/vocab_p1.log" | grep "^|"

echo "== mop bench, 1 GPU: ${CONTEXTS:-8K,32K}"
timeout ${BENCH_TIMEOUT:-230} python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts ${CONTEXTS:-8K,32K} \
  --gpus 1 --batch-setting paper --optimizer-ablation --sweep-max 1 --warmup 1 --steps 2 --timeout 110 \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1; echo "rc=$?" >> "$OUT/bench.log"
grep -E "^\| (mop|baseline)" "$OUT/bench/results.md" | head -12; tail -3 "$OUT/bench.log"
rm -rf "$OUT/bench/work"
pack single_gpu_2
