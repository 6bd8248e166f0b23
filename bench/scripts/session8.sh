#!/usr/bin/env bash
# Session 8's device calls (2 x H200, qwen3-30b-a3b, 24 layers = 12 per GPU), after session 7
# (bench/results/2026-11-30-session7-2xh200/SUMMARY.md). One PART per call, in this order; each
# fits one 10-minute call with margin, and $OUT/partial.tgz comes back even if a call is cut short.
#   PART=h  first (~2 min): the fused elementwise kernels (training.elementwise_kernels, session 7)
#           against op by op, one block fwd+bwd on one GPU each: qwen3-30b-a3b at 8K and 32K tokens
#           (GPU 0) and kimi-k2 with MLA at 8K (GPU 1), policies none and selective. If fused wins,
#           run the parts below with KERNELS=fused (both systems get it: same model code).
#   PART=a  #12, 2^20 tokens per step: 8K as `mop plan` lays it out (keep_gathered, P = 1; policies
#           and optimizer share by the start-up probe) against the baseline's best (plain FSDP2,
#           experts gathered, full AC), then 32K as the plan lays it out. No profile: session 7's
#           profiled 8K point outlived its 240 s timeout (its measurement is now kept, but the
#           trace export still costs a minute of device time).
#   PART=b  #12: 512K with all 24 layers through `mop train`, one step, as `mop plan --host-mem-gib 235`
#           lays it out (its policies, no start-up probe: a probe micro-batch at 512K costs minutes;
#           without the host limit it picks the cpu engine at 255 of the 256 GiB host), and that
#           step's memory breakdown. Predicted 246 s per step; the one step includes first-step costs.
#   PART=c  #12/#13: 128K side by side in one invocation: mop as `mop plan` lays it out (D2 Ep2 P1
#           llep_pipelined, selective + offloaded checkpoints: predicted 4,063 tok/s/GPU, never run)
#           against the baseline that ran there in session 7 (EP2 + CP2 + full AC + chunked loss +
#           its optimizer on the host: 1,924 tok/s/GPU), given selective checkpointing first.
#   PART=d  #12: the baseline at 256K with its optimizer on the host (session 7's attempt reached
#           its 240 s timeout: start-up 25 s plus two ~100 s steps).
#   PART=e  #17 items 2-4 (session7.sh PART=c); PART=f  #15 (families_2gpu.sh PART=a);
#   PART=g  #12/#13 paper batch at 8K and 32K as the plan lays them out (session7.sh PART=f).
# Usage: OUT=dir PART=a bash bench/scripts/session8.sh
NPROC=2 source "$(dirname "$0")/common.sh"
left() { echo $(( ${1:-560} - SECONDS )); }
K=${KERNELS:-eager}
B="python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --gpus 2 --overrides=--training.elementwise_kernels=$K"
show() { sed -n '/## Results/,/## Baseline sweeps/p' "$1/results.md"; rm -rf "$1/work"; }
ONE_M="--batch-setting 1M --warmup 1 --warmup-micro-batches 2 --steps 1"
FULL='{"ep": 2, "cp": 2, "chunked_loss": true, "optimizer_offload": true}'
# Session 7's offloading baseline peaked at 90 of 140 GiB with full AC: the room left buys it
# selective checkpointing (attention kept), tried first; full AC is its session-7 configuration.
SEL='{"ep": 2, "cp": 2, "chunked_loss": true, "optimizer_offload": true, "selective": true}'

case ${PART:-a} in
h)
  CUDA_VISIBLE_DEVICES=0 tmo $(left 300) python -m mop.bench.block --shape qwen3-30b-a3b --tokens 8192,32768 \
    --kernels eager,fused --policies none,selective --iters 10 --out "$OUT/block_qwen3.json" > "$OUT/block_qwen3.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 tmo $(left 300) python -m mop.bench.block --shape kimi-k2 --tokens 8192 \
    --kernels eager,fused --policies none,selective --iters 10 --out "$OUT/block_kimi.json" > "$OUT/block_kimi.log" 2>&1 &
  wait; cat "$OUT"/block_qwen3.md "$OUT"/block_kimi.md 2>/dev/null; tail -3 "$OUT"/block_*.log
  ;;
a)
  tmo $(left 330) $B --contexts 8K $ONE_M --timeout 300 --mop-layout plan \
    --baseline-configs '[{"ep": 1}]' --out "$OUT/p8k" > "$OUT/p8k.log" 2>&1
  show "$OUT/p8k"
  tmo $(left 560) $B --contexts 32K $ONE_M --timeout 220 --systems mop --mop-layout plan \
    --out "$OUT/p32k" > "$OUT/p32k.log" 2>&1; show "$OUT/p32k"
  ;;
b)
  tmo $(left 560) $TR -m mop.train --model.shape=qwen3-30b-a3b --model.n_layers=24 --training.seq_len=524288 \
    --parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=1 \
    --parallel.experts.dispatcher=llep_pipelined --parallel.experts.chunk_tokens=16384 --parallel.seq.head_chunks=4 \
    --optimizer.offload=gpu_stream --optimizer.device_fraction=0.067 --training.param_dtype=bf16 \
    --training.activation_checkpoint=selective*3,full*5,offload --data.dataset=synthetic --data.synthetic_doc_len=0 \
    --training.steps=1 --checkpoint.enabled=false --logging.progress=none --training.elementwise_kernels=$K \
    --logging.log_every=1 --logging.memory_step=1 --logging.run_dir=/tmp/r512 > "$OUT/train_512k.log" 2>&1
  echo "rc=$?" >> "$OUT/train_512k.log"; tail -8 "$OUT/train_512k.log"
  cp /tmp/r512/metrics.jsonl /tmp/r512/memory_rank0.txt "$OUT/" 2>/dev/null
  ;;
c)
  tmo $(left 560) $B --contexts 128K --batch-setting paper --warmup 1 --steps 1 --timeout 220 --mop-layout plan \
    --baseline-configs "[$SEL, $FULL]" --out "$OUT/p128k" > "$OUT/p128k.log" 2>&1
  show "$OUT/p128k"; grep "parallel.plan=auto chose" "$OUT/p128k.log" | head -1
  ;;
d)
  tmo $(left 560) $B --contexts 256K --batch-setting paper --systems baseline --warmup 1 --steps 1 --timeout 520 \
    --baseline-configs "[$SEL]" --out "$OUT/b256k" > "$OUT/b256k.log" 2>&1; show "$OUT/b256k"
  ;;
e) OUT="$FINAL" PART=c tmo $(left 580) bash "$(dirname "$0")/session7.sh" > "$OUT/session7_c.log" 2>&1; tail -30 "$OUT/session7_c.log" ;;
f) OUT="$FINAL" PART=a tmo $(left 580) bash "$(dirname "$0")/families_2gpu.sh" > "$OUT/families_a.log" 2>&1; tail -30 "$OUT/families_a.log" ;;
g) OUT="$FINAL" PART=f tmo $(left 580) bash "$(dirname "$0")/session7.sh" > "$OUT/session7_f.log" 2>&1; tail -30 "$OUT/session7_f.log" ;;
esac
pack session8_${PART:-a}
