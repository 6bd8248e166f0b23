#!/usr/bin/env bash
# Session 4 device calls (2 x H200, 24 layers of qwen3-30b-a3b = 12 per GPU, the benchmark regime).
#   PART=a  bf16-weights smoke (2 layers, 8K, D=1 Ep=P=2: training.param_dtype=bf16 against fp32
#           weights, same losses within bf16 noise?); then 8K and 32K, paper batch, mop vs the
#           baseline's on-device config (FSDP2 + EP2 + compiled loss + full AC), one invocation.
#   PART=b  128K, paper batch, one invocation: the baseline's only config that fits (FSDP2 + EP2 +
#           CP2 + CPUOffloadPolicy) and mop (bf16 weights on the device when call A's smoke passed).
#   PART=c  issue #17: bf16 lossless at W=2 (every component, 50 steps, against the 1-GPU noise
#           band); the expert layer at Ep=2; the vocabulary ring at P=2.
#   PART=d  after the optimizer/activation memory split (mop.memory_budget.split_memory): 8K and 32K
#           again, mop vs the same baseline config, one invocation; the baseline at 128K on the device
#           with a chunked loss (BaselineConfig.chunked_loss: no N x V logits); then the bf16 lossless check
#           against a rounding-perturbed one-GPU reference.
# (Parts a-c ran at commit f99e5f0, before the [parallel.*] sections were nested: their commands
# used --parallel.dispatcher, --parallel.seq=2 etc.; the flags below are the nested ones.)
# Usage: OUT=dir PART=a bash bench/scripts/session4.sh    (each part stays under 10 minutes)
NPROC=2 source "$(dirname "$0")/common.sh"
left() { echo $(( ${1:-575} - SECONDS )); }
B="python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --gpus 2"
MOP="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream"
[ "${BF16:-1}" = 1 ] && MOP="$MOP --training.param_dtype=bf16"

case ${PART:-a} in
a)
  S="--config configs/qwen3-30b-a3b.toml --parallel.seq.degree=1 --parallel.experts.degree=2 --parallel.vocab.degree=2 \
    --parallel.experts.dispatcher=llep --model.n_layers=2 --training.seq_len=8192 --training.steps=6 \
    --training.warmup_steps=2 --optimizer.offload=gpu_stream --logging.progress=none --logging.log_every=1"
  for P in fp32 bf16; do
    timeout 75 $TR -m mop.train $S --training.param_dtype=$P --logging.run_dir=/tmp/smoke_$P \
      > "$OUT/smoke_$P.log" 2>&1; echo "rc=$?" >> "$OUT/smoke_$P.log"
    cp /tmp/smoke_$P/metrics.jsonl "$OUT/smoke_$P.jsonl" 2>/dev/null; tail -2 "$OUT/smoke_$P.log"
  done
  python scripts/compare_runs.py "$OUT/smoke_fp32.jsonl" "$OUT/smoke_bf16.jsonl" | tee "$OUT/smoke_compare.txt"
  grep -q "rc=0" "$OUT/smoke_bf16.log" || MOP="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream"
  echo "mop overrides: $MOP"
  timeout $(left) $B --contexts 8K,32K --batch-setting paper --warmup 1 --steps 2 --timeout 150 \
    --baseline-configs '[{"ep": 2}]' --mop-overrides "$MOP" --out "$OUT/bench_short" > "$OUT/bench_short.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_short/results.md"; rm -rf "$OUT/bench_short/work"
  ;;
b)
  timeout $(left 588) $B --contexts 128K --batch-setting paper --warmup 1 --steps 1 --timeout 330 \
    --baseline-configs '[{"ep": 2, "cp": 2, "cpu_offload": true}]' --mop-overrides "$MOP" \
    --out "$OUT/bench_128k" > "$OUT/bench_128k.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_128k/results.md"; rm -rf "$OUT/bench_128k/work"
  ;;
c)
  timeout 200 $B --contexts 8K --batch-setting paper --warmup 1 --steps 2 --timeout 120 --profile \
    --baseline-configs '[{"ep": 2}]' --mop-overrides "$MOP" --out "$OUT/bench_8k_profile" > "$OUT/bench_8k_profile.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_8k_profile/results.md"; rm -rf "$OUT/bench_8k_profile/work"
  head -30 "$OUT"/bench_8k_profile/profiles/*.txt
  timeout 200 python scripts/gpu_lossless.py --gpus 2 --layout seq.degree=2,experts.degree=2,vocab.degree=2,experts.dispatcher=llep \
    --optimizer cpu --steps 50 --out "$OUT/lossless_bf16.json" > "$OUT/lossless_bf16.log" 2>&1
  tail -3 "$OUT/lossless_bf16.log"
  timeout $(left 500) $TR -m mop.bench.experts --shape qwen3-30b-a3b --tokens 16384,65536 --skew 0,0.95 \
    --dispatchers alltoall,llep,llep_pipelined --out "$OUT/experts_qwen3.jsonl" \
    > "$OUT/experts_qwen3.log" 2>&1; grep "^|" "$OUT/experts_qwen3.log" | head -40
  timeout $(left 585) $TR -m mop.bench.vocab --vocab 151936 --hidden 2048,7168 --tokens 8192,32768 \
    --P 1,2 --methods plain-compiled,chunked,ring-weights,ring-activations --warmup 1 --iters 3 \
    --out "$OUT/vocab.json" > "$OUT/vocab.log" 2>&1; grep "^|" "$OUT/vocab.log" | head -50
  ;;
d)
  # Budget: the whole call within ~450 s (what this session's device time leaves after a machine start).
  timeout $(left 290) $B --contexts 8K,32K --batch-setting paper --warmup 1 --steps 2 --timeout 150 \
    --baseline-configs '[{"ep": 2}]' --mop-overrides "$MOP" --out "$OUT/bench_short2" > "$OUT/bench_short2.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_short2/results.md"; rm -rf "$OUT/bench_short2/work"
  grep -h "activation policy auto" "$OUT/bench_short2.log" | head -4
  pack session4_d  # after each stage: a call cut short by the device budget still returns what ran
  timeout $(left 375) $B --contexts 128K --batch-setting paper --systems baseline --warmup 1 --steps 1 --timeout 120 \
    --baseline-configs '[{"ep": 2, "cp": 2, "chunked_loss": true}]' --out "$OUT/bench_128k_base" > "$OUT/bench_128k_base.log" 2>&1
  sed -n '/## Results/,/## Baseline/p' "$OUT/bench_128k_base/results.md"; rm -rf "$OUT/bench_128k_base/work"
  pack session4_d
  timeout $(left 440) python scripts/gpu_lossless.py --gpus 2 --optimizer cpu --steps 50 \
    --out "$OUT/lossless_bf16.json" > "$OUT/lossless_bf16.log" 2>&1
  tail -3 "$OUT/lossless_bf16.log"
  ;;
esac
pack session4_${PART:-a}
