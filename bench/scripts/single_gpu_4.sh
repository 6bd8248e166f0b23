#!/usr/bin/env bash
# Fourth one-H200 call of session 2: the host-optimizer update overlapped with the next forward.
# 1. correctness on CUDA streams: the same run with the overlap on and off (and off twice, for the
#    run-to-run noise of bf16 kernels): losses and gradient norms per step must agree;
# 2. exposed optimizer time with the overlap, one sequence per step and 2^20 tokens per step.
# Usage: OUT=some/dir bash bench/scripts/single_gpu_4.sh
NPROC=1 source "$(dirname "$0")/common.sh"
COMMON="--config configs/qwen3-30b-a3b.toml --parallel.seq.degree=1 --parallel.experts.degree=1 --parallel.vocab.degree=1 \
  --model.n_layers=2 --training.seq_len=8192 --training.steps=8 --training.warmup_steps=2 \
  --optimizer.offload=gpu_stream --optimizer.device_fraction=0 --logging.progress=none --logging.log_every=1"
for RUN in on:true off:false off2:false; do
  NAME=${RUN%%:*}; FLAG=${RUN##*:}
  timeout 80 $TR -m mop.train $COMMON --optimizer.overlap_update=$FLAG --logging.run_dir=/tmp/ov_$NAME \
    > "$OUT/overlap_$NAME.log" 2>&1; echo "rc=$?" >> "$OUT/overlap_$NAME.log"
  cp /tmp/ov_$NAME/metrics.jsonl "$OUT/overlap_$NAME.jsonl" 2>/dev/null
done
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
runs = {n: [json.loads(l) for l in open(f"{out}/overlap_{n}.jsonl")] for n in ("on", "off", "off2")}
for n, r in runs.items():
    print(n, [round(x["loss"], 5) for x in r], [round(x["grad_norm"], 5) for x in r],
          "tok/s", [round(x.get("tokens_per_s_per_device", 0)) for x in r][-3:])
def diff(a, b, k): return max(abs(x[k] - y[k]) for x, y in zip(runs[a], runs[b]))
for k in ("loss", "grad_norm"):
    print(f"max |{k}| diff: overlap on vs off {diff('on', 'off', k):.3e}; off vs off again {diff('off', 'off2', k):.3e}")
PY
echo "== exposed optimizer time, host-resident state (gpu_stream), overlap on, 32K, both batch settings"
timeout 110 python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 32K --gpus 1 --systems mop \
  --batch-setting paper --optimizer-ablation --warmup 1 --steps 2 --timeout 100 \
  --mop-overrides "--optimizer.offload=gpu_stream --optimizer.device_fraction=0" \
  --out "$OUT/bench_offload_paper" > "$OUT/bench_offload_paper.log" 2>&1
grep -E "^\| mop" "$OUT/bench_offload_paper/results.md" | head -4
timeout 150 python -m mop.cli bench --shape qwen3-30b-a3b --layers 4 --contexts 32K --gpus 1 --systems mop \
  --batch-setting 1M --optimizer-ablation --warmup 1 --steps 1 --timeout 140 \
  --mop-overrides "--optimizer.offload=gpu_stream --optimizer.device_fraction=0" \
  --out "$OUT/bench_offload_1M" > "$OUT/bench_offload_1M.log" 2>&1
grep -E "^\| mop" "$OUT/bench_offload_1M/results.md" | head -4
rm -rf "$OUT"/bench_*/work
pack single_gpu_4
