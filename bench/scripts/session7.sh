#!/usr/bin/env bash
# Session 7's device calls (2 x H200, qwen3-30b-a3b, 24 layers = 12 per GPU unless said), after
# session 6 (bench/results/2026-11-30-session6-2xh200/SUMMARY.md). Run in this order.
#   PART=a  #12, 2^20 tokens per step at 8K: mop as `mop plan` lays it out (--mop-layout plan:
#           keep_gathered, P = 1; policies and optimizer share by the start-up probe) against the
#           baseline's best, both profiled over two micro-batches; then mop by the rule with
#           parallel.fsdp.accumulation=keep_gathered alone; then 32K the same way as the first.
#   PART=b  #12: 512K with all 24 layers through `mop train`, one step (a 24-layer 512K step and a
#           warm-up step do not fit one call; the step's time includes first-step costs: say so),
#           with that step's memory breakdown.
#   PART=c  #17 items 2-3 at the widths still owed (session5.sh PART=e) then item 4, the host
#           optimizer's exposed share at W = 2 (session5.sh PART=c's first stage).
#   PART=d  #15: Kimi-K2 with MLA (families_2gpu.sh PART=a).
#   PART=f  #12/#13, paper batch: mop as `mop plan` lays it out (8K: Ep = 2 with the pipelined
#           dispatcher, no block checkpointing, the optimizer on the device: predicted 12,280
#           tok/s/GPU against the rule's measured 10,464) against the baseline's best, 8K and 32K.
#   PART=e  #12: the baseline at 128K and 256K with its optimizer on the host (BaselineConfig.
#           optimizer_offload, new in session 6: FSDP2 keeps fp32 weights and gradients on the
#           device; 16 B/param on the host = 232 GiB for both ranks of 252), CP2 + EP2 + full AC +
#           chunked loss; the first FSDP-best numbers from 128K on.
# Usage: OUT=dir PART=a bash bench/scripts/session7.sh
NPROC=2 source "$(dirname "$0")/common.sh"
left() { echo $(( ${1:-570} - SECONDS )); }
B="python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --gpus 2"
show() { sed -n '/## Results/,/## Baseline/p' "$1/results.md"; rm -rf "$1/work"; }
ONE_M="--batch-setting 1M --warmup 1 --warmup-micro-batches 2 --steps 1"

case ${PART:-a} in
a)
  timeout $(left 320) $B --contexts 8K $ONE_M --timeout 240 --profile --mop-layout plan \
    --baseline-configs '[{"ep": 1}]' --out "$OUT/p8k" > "$OUT/p8k.log" 2>&1
  show "$OUT/p8k"; grep "parallel.plan=auto chose" "$OUT/p8k.log" | head -1
  sed -n '1,25p' "$OUT"/p8k/profiles/*.txt 2>/dev/null; pack session7_a
  timeout $(left 440) $B --contexts 8K $ONE_M --timeout 170 --systems mop \
    --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream --parallel.fsdp.accumulation=keep_gathered" \
    --out "$OUT/k8k" > "$OUT/k8k.log" 2>&1; show "$OUT/k8k"; pack session7_a
  timeout $(left 575) $B --contexts 32K $ONE_M --timeout 170 --systems mop --mop-layout plan \
    --out "$OUT/p32k" > "$OUT/p32k.log" 2>&1; show "$OUT/p32k"
  ;;
b)
  timeout $(left 575) $TR -m mop.train --model.shape=qwen3-30b-a3b --model.n_layers=24 --training.seq_len=524288 \
    --parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 \
    --parallel.experts.dispatcher=llep_pipelined --optimizer.offload=gpu_stream --training.param_dtype=bf16 \
    --training.activation_checkpoint=auto --data.dataset=synthetic --data.synthetic_doc_len=0 \
    --training.steps=1 --checkpoint.enabled=false --logging.progress=none \
    --logging.log_every=1 --logging.memory_step=1 --logging.run_dir=/tmp/r512 > "$OUT/train_512k.log" 2>&1
  echo "rc=$?" >> "$OUT/train_512k.log"; tail -6 "$OUT/train_512k.log"
  cp /tmp/r512/metrics.jsonl "$OUT/train_512k_metrics.jsonl" 2>/dev/null
  cp /tmp/r512/memory_rank0.txt "$OUT/train_512k_memory_rank0.txt" 2>/dev/null
  ;;
c)
  OUT="$OUT" PART=e timeout $(left 330) bash "$(dirname "$0")/session5.sh" > "$OUT/session5_e.log" 2>&1
  tail -30 "$OUT/session5_e.log"
  timeout $(left 575) $B --contexts 32K --batch-setting paper --systems mop --warmup 1 --steps 2 --timeout 200 \
    --optimizer-ablation --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream --training.param_dtype=bf16" \
    --out "$OUT/ablation_32k" > "$OUT/ablation_32k.log" 2>&1; show "$OUT/ablation_32k"
  sed -n '/Optimizer exposed/,$p' "$OUT/ablation_32k/results.md" 2>/dev/null
  ;;
f)
  for X in 8K 32K; do
    timeout $(left $([ $X = 8K ] && echo 270 || echo 575)) $B --contexts $X --batch-setting paper --warmup 1 --steps 2 \
      --timeout 200 --mop-layout plan --baseline-configs '[{"ep": 1}]' --out "$OUT/plan_$X" > "$OUT/plan_$X.log" 2>&1
    show "$OUT/plan_$X"; grep "parallel.plan=auto chose" "$OUT/plan_$X.log" | head -1; pack session7_f
  done
  ;;
e)
  C='[{"ep": 2, "cp": 2, "chunked_loss": true, "optimizer_offload": true}]'
  for X in 128K 256K; do
    timeout $(left $([ $X = 128K ] && echo 250 || echo 575)) $B --contexts $X --batch-setting paper --systems baseline \
      --warmup 1 --steps 1 --timeout 240 --baseline-configs "$C" --out "$OUT/optoff_$X" > "$OUT/optoff_$X.log" 2>&1
    show "$OUT/optoff_$X"; sed -n '/Baseline sweeps/,$p' "$OUT/optoff_$X/results.md" | grep -v "^$" | tail -3
    pack session7_e
  done
  ;;
d)
  OUT="$OUT" PART=a timeout $(left 575) bash "$(dirname "$0")/families_2gpu.sh" > "$OUT/families_a.log" 2>&1
  tail -30 "$OUT/families_a.log"
  ;;
esac
pack session7_${PART:-a}
