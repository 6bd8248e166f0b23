#!/usr/bin/env bash
# One device call on 4 x H200: mop vs the FSDP-best baseline (qwen3-30b-a3b shape, 4 of its 48
# layers, one sequence per sequence group per step), then a 4-GPU training log and mop at 1M tokens
# (2 layers). Outputs land in $OUT (bench table) and $OUT/extra.tgz (logs).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-bench/results/run}
EXTRA=$(mktemp -d)
TR="python -m torch.distributed.run --standalone --nproc-per-node 4"
python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 8K,32K,128K --gpus 4 --batch-setting paper \
  --mop-overrides "--parallel.experts.dispatcher=llep --training.activation_checkpoint=true" \
  --baseline-configs '[{"ep": 4}, {"ep": 4, "cp": 4}]' --warmup 1 --steps 2 --timeout 110 --out "$OUT/table" \
  > "$EXTRA/bench.log" 2>&1
tail -25 "$EXTRA/bench.log"
if [ $SECONDS -lt ${TRAIN_LOG_BEFORE:-430} ]; then
  echo "== 4-GPU training log (4 layers, 32K, D=4 Ep=4 P=4, pipelined LLEP, AC)"
  timeout 90 $TR -m mop.train --config configs/qwen3-30b-a3b.toml --model.n_layers=4 --training.seq_len=32768 \
    --training.steps=5 --training.warmup_steps=1 --optimizer.offload=none --logging.run_dir=/tmp/run4 \
    > "$EXTRA/train_4gpu.log" 2>&1; echo "rc=$?" >> "$EXTRA/train_4gpu.log"; grep -E "^mop|^step|rc=" "$EXTRA/train_4gpu.log"
fi
if [ $SECONDS -lt ${LONG_BEFORE:-470} ]; then
  echo "== mop at 1M tokens (2 layers, D=4, head chunks 4, pipelined LLEP, host AdamW)"
  timeout $((585 - SECONDS)) $TR -m mop.train --config configs/qwen3-30b-a3b.toml --model.n_layers=2 \
    --training.seq_len=1048576 --training.steps=2 --training.warmup_steps=1 --parallel.seq.head_chunks=4 \
    --optimizer.device_fraction=0 --logging.run_dir=/tmp/ctx1m > "$EXTRA/ctx_1048576.log" 2>&1
  echo "rc=$?" >> "$EXTRA/ctx_1048576.log"; grep -E "^mop|^step|rc=|OutOfMemory" "$EXTRA/ctx_1048576.log" | head -5
fi
tar czf "$OUT/extra.tgz" -C "$EXTRA" .
