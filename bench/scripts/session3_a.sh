#!/usr/bin/env bash
# Session 3, device call A (2 x H200): the attention kernel no longer recomputed (selective /
# kept Ulysses state) and the measured per-block activation policy, in the benchmark regime.
# 1. bf16 smoke on CUDA/NCCL of the new attention paths: 2 layers, 32K, D=Ep=P=2, policies full
#    and selective: same losses within bf16 noise, time and memory per policy;
# 2. mop bench, 24 layers of qwen3-30b-a3b (12 per GPU), 128K, paper batch: mop (auto policy,
#    host optimizer with its measured device share) vs the baseline's known-best config there
#    (FSDP2 + EP2 + CP2 ring attention + compiled loss + full AC, on the device).
# Usage: OUT=dir bash bench/scripts/session3_a.sh
NPROC=2 source "$(dirname "$0")/common.sh"
S2="--config configs/qwen3-30b-a3b.toml --parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2 \
  --parallel.experts.dispatcher=llep --model.n_layers=2 --training.seq_len=32768 --training.steps=6 \
  --training.warmup_steps=2 --optimizer.offload=none --logging.progress=none --logging.log_every=1"
for P in full selective; do
  timeout 70 $TR -m mop.train $S2 --training.activation_checkpoint=$P --logging.run_dir=/tmp/smoke_$P \
    > "$OUT/smoke_$P.log" 2>&1; echo "rc=$?" >> "$OUT/smoke_$P.log"
  cp /tmp/smoke_$P/metrics.jsonl "$OUT/smoke_$P.jsonl" 2>/dev/null
  tail -3 "$OUT/smoke_$P.log"
done
python - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
runs = {}
for p in ("full", "selective"):
    try:
        runs[p] = [json.loads(l) for l in open(f"{o}/smoke_{p}.jsonl")]
    except OSError:
        print(p, "no metrics")
for p, r in runs.items():
    print(p, "loss", [round(x["loss"], 4) for x in r], "tok/s/dev", [round(x["tokens_per_s_per_device"]) for x in r][-2:],
          "peak GiB", max(x.get("mem_peak_alloc_gib", 0) for x in r))
if len(runs) == 2:
    print("max |loss diff| full vs selective:", max(abs(a["loss"] - b["loss"]) for a, b in zip(runs["full"], runs["selective"])))
PY
echo "== bench 24 layers, 128K, paper batch"
timeout 480 python -m mop.cli bench --shape qwen3-30b-a3b --layers 24 --contexts 128K --gpus 2 \
  --batch-setting paper --warmup 1 --steps 2 --timeout 300 \
  --baseline-configs '[{"ep": 2, "cp": 2}]' \
  --mop-overrides "--parallel.experts.dispatcher=llep --optimizer.offload=gpu_stream" \
  --out "$OUT/bench_128k" > "$OUT/bench_128k.log" 2>&1
cat "$OUT/bench_128k/results.md" | head -30
grep -h "activation policy\|Error\|error" "$OUT/bench_128k.log" | head
python - "$OUT/bench_128k/results.json" <<'PY'
import json, sys
for p in json.load(open(sys.argv[1]))["points"]:
    if p.get("status") != "ok":
        print(p["system"], p.get("status"), (p.get("output_tail") or p.get("error") or "")[-2500:])
    else:
        print(p["system"], [l for l in (p.get("output_tail") or "").splitlines() if "activation policy" in l or "mop:" in l][:4])
PY
rm -rf "$OUT"/bench_*/work
pack session3_a
