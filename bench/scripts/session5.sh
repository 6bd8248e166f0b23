#!/usr/bin/env bash
# Next session's device calls (2 x H200, qwen3-30b-a3b, 24 layers = 12 per GPU unless said): what
# issues #12 and #17 still owe after session 4 (bench/results/2026-11-29-session4-2xh200/SUMMARY.md).
# Each part stays under ~9.5 minutes; results are packed after every stage.
#   PART=a  #12: 256K mop (the baseline has no config that runs from 128K on: session 4), then 64K
#           mop vs the baseline (EP2, full AC), one invocation per context.
#   PART=b  #12/#17: 512K with 8 layers (a slice: a 24-layer 512K step with its warm-up does not
#           fit in one call; labelled so) through `mop train`, with the memory breakdown of its second
#           step (logging.memory_step, which the bench worker does not run); then 128K with every
#           block's input offloaded to the host against call a's auto choice (#17 item 5).
#   PART=e  #17 items 2-3 at the widths still owed: the expert layer with kimi-k2-slice widths, and
#           the vocabulary ring at V = 200,000 with 64K tokens per rank.
#   PART=c  #17 item 4 and the 2^20 batch setting: the host optimizer's exposed share at W=2
#           (--optimizer-ablation) at 32K, paper batch, both engines; then 8K with 2^20 tokens per
#           step (64 micro-batches) for both systems; then `mop plan calibrate` on this machine.
#   PART=d  the baseline's candidates at 8K and 32K (session 4 ran one config: its ratios are an upper
#           bound), mop included again so that each context is one invocation; an 8K mop profile
#           with its idle time charged to host activity.
#   PART=f  after call d: mop by the new layout rule (Ep = 1 with D = 1) against the baseline's best of
#           call d at 8K (both profiled), 32K and 64K.
#   PART=g  after call f: Ep = 1 with the gradient reduce-scatter in bf16, 8K (also Ep = 2), 32K, 64K.
#   PART=m  the 2^20-tokens-per-step setting at 8K and 32K, mop keeping the gathered weights between
#           micro-batches, against the baseline's best (run this first next session).
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
  timeout $(left 330) $TR -m mop.train --model.shape=qwen3-30b-a3b --model.n_layers=8 --training.seq_len=524288 \
    --parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 $MOP \
    --training.activation_checkpoint=auto --data.dataset=synthetic --data.synthetic_doc_len=0 \
    --training.steps=2 --training.warmup_steps=1 --checkpoint.enabled=false --logging.progress=none \
    --logging.log_every=1 --logging.memory_step=2 --logging.run_dir=/tmp/r512 > "$OUT/train_512k_8l.log" 2>&1
  echo "rc=$?" >> "$OUT/train_512k_8l.log"; tail -4 "$OUT/train_512k_8l.log"
  cp /tmp/r512/metrics.jsonl "$OUT/train_512k_8l_metrics.jsonl" 2>/dev/null
  cp /tmp/r512/memory_rank0.txt "$OUT/train_512k_8l_memory_rank0.txt" 2>/dev/null
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
  # fp32 weights here: with 64 micro-batches per step, bf16 gradients would accumulate in bf16. The
  # host optimizer frees the device, which then keeps the gathered weights between micro-batches
  # (parallel.fsdp.accumulation=keep_gathered: one all-gather per block per step). The baseline's
  # best short-context config (session 5: plain FSDP2, experts gathered, full AC).
  timeout $(left 480) $B --contexts 8K --batch-setting 1M --warmup 1 --steps 1 --timeout 110 \
    --baseline-configs '[{"ep": 1}]' --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream --parallel.fsdp.accumulation=keep_gathered" \
    --out "$OUT/bench_8k_1M" > "$OUT/bench_8k_1M.log" 2>&1
  show "$OUT/bench_8k_1M"
  pack session5_c
  timeout $(left 570) $TR -m mop.cli plan calibrate --out "$OUT/calibration.json" > "$OUT/calibrate.log" 2>&1
  tail -8 "$OUT/calibrate.log"
  ;;
e)
  timeout 150 $TR -m mop.bench.experts --shape kimi-k2-slice --tokens 16384,65536 --skew 0,0.95 \
    --dispatchers alltoall,llep,llep_pipelined --out "$OUT/experts_kimi.jsonl" > "$OUT/experts_kimi.log" 2>&1
  grep "^|" "$OUT/experts_kimi.log" | head -20; pack session5_e
  timeout $(left 570) $TR -m mop.bench.vocab --vocab 200000 --hidden 2048,7168 --tokens 65536 --P 1,2 \
    --methods plain-compiled,chunked,ring-weights,ring-activations --warmup 1 --iters 3 \
    --out "$OUT/vocab_200k.json" > "$OUT/vocab_200k.log" 2>&1; grep "^|" "$OUT/vocab_200k.log"
  ;;
d)
  # The baseline's candidates at short context, given explicitly (the quick sweep's budget of 4 runs
  # would spend itself on its most frugal configs: CP/TP with the chunked loss): EP2 or plain FSDP
  # (experts all-gathered: no all-to-all, no host syncs), full or selective AC; at 8K also EP2 with
  # each block compiled. mop's point first in each invocation, then an 8K mop step under the profiler.
  C8='[{"ep": 2}, {"ep": 2, "selective": true}, {"ep": 1}, {"ep": 1, "selective": true}, {"ep": 2, "compile_blocks": true}]'
  C32='[{"ep": 2}, {"ep": 2, "selective": true}, {"ep": 1}, {"ep": 1, "selective": true}]'
  timeout $(left 300) $B --contexts 8K --batch-setting paper --warmup 1 --steps 2 --timeout 110 \
    --baseline-configs "$C8" --mop-overrides "$MOP" --out "$OUT/sweep_8k" > "$OUT/sweep_8k.log" 2>&1
  show "$OUT/sweep_8k"; pack session5_d
  timeout $(left 345) $B --contexts 8K --batch-setting paper --systems mop --warmup 1 --steps 1 --timeout 60 \
    --profile --mop-overrides "$MOP" --out "$OUT/p8k" > "$OUT/p8k.log" 2>&1
  sed -n '1,12p;/device idle/,$p' "$OUT"/p8k/profiles/*.txt; rm -rf "$OUT/p8k/work"; pack session5_d
  timeout $(left 570) $B --contexts 32K --batch-setting paper --warmup 1 --steps 2 --timeout 110 \
    --baseline-configs "$C32" --mop-overrides "$MOP" --out "$OUT/sweep_32k" > "$OUT/sweep_32k.log" 2>&1
  show "$OUT/sweep_32k"
  ;;
f)
  # After call d: mop by the new rule (Ep = 1 with D = 1: experts sharded as dense weights) against
  # the baseline's best config of call d (plain FSDP, experts all-gathered, full AC), one invocation
  # per context; 8K with a profile of both systems; 64K with the baseline's frugal variants too.
  timeout $(left 150) $B --contexts 8K --batch-setting paper --warmup 1 --steps 2 --timeout 140 --profile \
    --baseline-configs '[{"ep": 1}]' --mop-overrides "$MOP" --out "$OUT/f8k" > "$OUT/f8k.log" 2>&1
  show "$OUT/f8k"; sed -n '1,3p;/device idle/,$p' "$OUT"/f8k/profiles/*.txt | head -40; pack session5_f
  timeout $(left 270) $B --contexts 32K --batch-setting paper --warmup 1 --steps 2 --timeout 110 \
    --baseline-configs '[{"ep": 1}]' --mop-overrides "$MOP" --out "$OUT/f32k" > "$OUT/f32k.log" 2>&1
  show "$OUT/f32k"; pack session5_f
  timeout $(left 570) $B --contexts 64K --batch-setting paper --warmup 1 --steps 2 --timeout 150 \
    --baseline-configs '[{"ep": 1}, {"ep": 1, "chunked_loss": true}, {"ep": 2, "chunked_loss": true}]' \
    --mop-overrides "$MOP" --out "$OUT/f64k" > "$OUT/f64k.log" 2>&1
  show "$OUT/f64k"; sed -n '/Baseline sweeps/,$p' "$OUT/f64k/results.md"
  ;;
g)
  # After call f: the Ep = 1 path's gradient reduce-scatter in bf16 (the gradients are stored in bf16
  # with training.param_dtype=bf16; at W = 2 the fp32 reduction rounds to the same bits) against the
  # baseline's best; 8K also with Ep = 2 (mop alone) to settle the rule at 8K.
  R="$MOP --parallel.fsdp.reduce_dtype=bf16"
  timeout $(left 190) $B --contexts 8K --batch-setting paper --warmup 1 --steps 2 --timeout 90 \
    --baseline-configs '[{"ep": 1}]' --mop-overrides "$R" --out "$OUT/g8k" > "$OUT/g8k.log" 2>&1
  show "$OUT/g8k"; pack session5_g
  timeout $(left 250) $B --contexts 8K --batch-setting paper --systems mop --warmup 1 --steps 2 --timeout 60 \
    --mop-overrides "$R --parallel.experts.degree=2" --out "$OUT/g8k_ep2" > "$OUT/g8k_ep2.log" 2>&1
  show "$OUT/g8k_ep2"; pack session5_g
  timeout $(left 420) $B --contexts 32K --batch-setting paper --warmup 1 --steps 2 --timeout 90 \
    --baseline-configs '[{"ep": 1}]' --mop-overrides "$R" --out "$OUT/g32k" > "$OUT/g32k.log" 2>&1
  show "$OUT/g32k"; pack session5_g
  timeout $(left 560) $B --contexts 64K --batch-setting paper --systems mop --warmup 1 --steps 2 --timeout 130 \
    --mop-overrides "$R" --out "$OUT/g64k" > "$OUT/g64k.log" 2>&1
  show "$OUT/g64k"
  ;;
m)
  # #12's other batch setting, 2^20 tokens per step (64 micro-batches at 8K, 16 at 32K), against the
  # baseline's best short-context config; mop with fp32 weights (bf16 gradients would accumulate in
  # bf16) and the host optimizer; then mop alone with the gathered weights kept between micro-batches
  # (parallel.fsdp.accumulation=keep_gathered; the plan predicts 34.34 s -> 34.27 s at 8K: check it).
  M="--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream"
  timeout $(left 300) $B --contexts 8K --batch-setting 1M --warmup 1 --steps 1 --timeout 200 \
    --baseline-configs '[{"ep": 1}]' --mop-overrides "$M" --out "$OUT/m8k" > "$OUT/m8k.log" 2>&1
  show "$OUT/m8k"; pack session5_m
  timeout $(left 440) $B --contexts 8K --batch-setting 1M --systems mop --warmup 1 --steps 1 --timeout 130 \
    --mop-overrides "$M --parallel.fsdp.accumulation=keep_gathered" --out "$OUT/m8k_keep" > "$OUT/m8k_keep.log" 2>&1
  show "$OUT/m8k_keep"; pack session5_m
  timeout $(left 575) $B --contexts 32K --batch-setting 1M --systems mop --warmup 1 --steps 1 --timeout 130 \
    --mop-overrides "$M" --out "$OUT/m32k" > "$OUT/m32k.log" 2>&1
  show "$OUT/m32k"
  ;;
esac
pack session5_${PART:-a}
