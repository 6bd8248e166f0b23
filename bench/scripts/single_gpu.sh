#!/usr/bin/env bash
# One device call on ONE H200 (the only kind lent in session 2): profiles of a mop training step,
# the expert-layer, vocabulary-loss and host-AdamW micro-benchmarks at one rank.
# Usage: OUT=some/dir bash bench/scripts/single_gpu.sh
NPROC=1 source "$(dirname "$0")/common.sh"

for S in 8192 32768; do
  echo "== profile: mop train, 1 GPU, qwen3-30b-a3b 4 layers, $S tokens, AC, step 4 profiled"
  timeout 80 $TR -m mop.train --config configs/qwen3-30b-a3b.toml --parallel.seq.degree=1 --parallel.experts.degree=1 \
    --parallel.vocab.degree=1 --model.n_layers=4 --training.seq_len=$S --training.steps=4 --training.warmup_steps=1 \
    --optimizer.offload=none --logging.run_dir=/tmp/prof$S --logging.profile_step=4 --logging.progress=plain \
    > "$OUT/profile_$S.log" 2>&1; echo "rc=$?" >> "$OUT/profile_$S.log"
  cp /tmp/prof$S/profile_rank0.txt "$OUT/profile_$S.txt" 2>/dev/null
  gzip -c /tmp/prof$S/trace_rank0.json > "$OUT/trace_$S.json.gz" 2>/dev/null
  grep -E "^step|rc=|Error" "$OUT/profile_$S.log" | tail -4; head -30 "$OUT/profile_$S.txt" 2>/dev/null | cut -c1-200
done

echo "== experts layer, 1 rank (Ep=1): plain vs pipelined, bare and inside a checkpointed block"
for C in "" "--checkpointed"; do
  timeout 60 $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 --skew 0,0.95 \
    --dispatchers alltoall,llep_pipelined $C --out "$OUT/experts_qwen3${C:+_ckpt}.jsonl" \
    > "$OUT/experts_qwen3${C:+_ckpt}.log" 2>&1; tail -6 "$OUT/experts_qwen3${C:+_ckpt}.log"
done
timeout 50 $TR -m mop.bench.experts --shape kimi-k2-slice --tokens 8192,16384 --skew 0,0.95 \
  --dispatchers alltoall,llep_pipelined --checkpointed --out "$OUT/experts_kimi_ckpt.jsonl" \
  > "$OUT/experts_kimi_ckpt.log" 2>&1; tail -6 "$OUT/experts_kimi_ckpt.log"

echo "== vocabulary loss, P=1: ours vs F.cross_entropy on logits vs chunked"
timeout 90 $TR -m mop.bench.vocab --vocab 151936,200000 --hidden 2048,7168 --tokens 8192,32768,65536 \
  --P 1 --out "$OUT/vocab_p1.json" > "$OUT/vocab_p1.log" 2>&1; tail -20 "$OUT/vocab_p1.log"

echo "== host AdamW engines, 1e9 params"
timeout 60 python -m mop.bench.host_adamw --numel 1e9 --engine cpu,gpu_stream \
  > "$OUT/host_adamw.log" 2>&1; tail -12 "$OUT/host_adamw.log"
pack single_gpu
