#!/usr/bin/env bash
# The 4 x H200 runs that issues #4-#8 still need, in three device calls of under 10 minutes each
# (a 30-minute session: ask `status` first; x4 was withheld in session 2, x2 halves everything).
#   PART=a  bf16 lossless check, expert layer at Ep=4 (skews, both widths), vocabulary loss at P=1,2,4
#   PART=b  mop (pipelined LLEP, host AdamW) vs the FSDP-best baseline, 8K-128K, one sequence per step
#   PART=c  2^20 tokens per step at 32K/128K (optimizer exposed time), mop alone at 256K-1M (2 layers)
# Usage: OUT=some/dir PART=a bash bench/scripts/next_4gpu.sh
NPROC=${NPROC:-4} source "$(dirname "$0")/common.sh"
G=$NPROC
MOP="--parallel.experts.dispatcher=llep_pipelined --optimizer.offload=gpu_stream"
left() { echo $(( ${1:-570} - SECONDS )); }  # seconds left before this call's budget

case ${PART:-a} in
a)
  timeout 150 python scripts/gpu_lossless.py --gpus $G --layout seq.degree=2,experts.degree=2,vocab.degree=$G,experts.dispatcher=llep \
    --out "$OUT/lossless_bf16.json" > "$OUT/lossless_bf16.log" 2>&1; tail -4 "$OUT/lossless_bf16.log"
  timeout 150 $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 \
    --skew 0,0.3,0.5,0.8,0.95 --checkpointed --out "$OUT/experts_qwen3.jsonl" > "$OUT/experts_qwen3.log" 2>&1
  grep "^|" "$OUT/experts_qwen3.log"
  timeout 80 $TR -m mop.bench.experts --shape kimi-k2-slice --tokens 16384 --skew 0,0.95 --checkpointed \
    --out "$OUT/experts_kimi.jsonl" > "$OUT/experts_kimi.log" 2>&1; grep "^|" "$OUT/experts_kimi.log"
  timeout $(left) $TR -m mop.bench.vocab --vocab 151936,200000 --hidden 2048,7168 --tokens 8192,32768,65536 \
    --P 1,2,$G --methods plain-compiled,chunked,ring-weights,ring-activations --warmup 1 --iters 3 \
    --out "$OUT/vocab.json" > "$OUT/vocab.log" 2>&1; grep "^|" "$OUT/vocab.log" | head -60
  ;;
b)
  timeout $(left 580) python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 8K,32K,128K --gpus $G \
    --batch-setting paper --optimizer-ablation --mop-overrides "$MOP" --sweep-max 3 --warmup 1 --steps 2 \
    --timeout 100 --out "$OUT/bench_paper" > "$OUT/bench_paper.log" 2>&1
  grep -E "^\| (mop|baseline)" "$OUT/bench_paper/results.md" | head -12; rm -rf "$OUT/bench_paper/work"
  ;;
c)
  timeout 300 python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 32K,128K --gpus $G --systems mop \
    --batch-setting 1M --optimizer-ablation --mop-overrides "$MOP" --warmup 1 --steps 1 --timeout 140 \
    --out "$OUT/bench_1M" > "$OUT/bench_1M.log" 2>&1
  grep -E "^\| mop" "$OUT/bench_1M/results.md"; rm -rf "$OUT/bench_1M/work"
  for S in 262144 524288 1048576; do
    [ "$(left)" -gt 60 ] || break
    timeout $(left) $TR -m mop.train --config configs/qwen3-30b-a3b.toml --model.n_layers=2 --training.seq_len=$S \
      --training.steps=2 --training.warmup_steps=1 --parallel.seq.head_chunks=4 --logging.run_dir=/tmp/ctx$S \
      --logging.memory_step=2 > "$OUT/ctx_$S.log" 2>&1; echo "rc=$?" >> "$OUT/ctx_$S.log"
    cp /tmp/ctx$S/memory_rank0.txt "$OUT/memory_$S.txt" 2>/dev/null  # where the memory goes (issue #5)
    grep -E "^step|rc=|OutOfMemory" "$OUT/ctx_$S.log" | tail -3
  done
  if [ "$(left)" -gt 90 ]; then  # selective checkpoint offload (first GPU run of it): 1M, every block's input on the host
    timeout $(left) $TR -m mop.train --config configs/qwen3-30b-a3b.toml --model.n_layers=2 --training.seq_len=1048576 \
      --training.steps=2 --training.warmup_steps=1 --parallel.seq.head_chunks=4 --training.activation_checkpoint=offload \
      --logging.run_dir=/tmp/ctx1m_off > "$OUT/ctx_1048576_offload.log" 2>&1; echo "rc=$?" >> "$OUT/ctx_1048576_offload.log"
    grep -E "^step|rc=|OutOfMemory" "$OUT/ctx_1048576_offload.log" | tail -3
  fi
  ;;
esac
pack next_4gpu_${PART:-a}
