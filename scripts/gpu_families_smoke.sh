export OMP_NUM_THREADS=4
C="--model.n_layers=2 --model.vocab_size=32768 --data.dataset=synthetic --training.seq_len=16384 --training.steps=8 --training.warmup_steps=2 --optimizer.lr=1e-3 --logging.log_every=1 --logging.progress=none --training.device=cuda --training.batch_size=1 --parallel.nproc=1"
run() { name=$1; n=$2; shift 2; timeout 170 python -m torch.distributed.run --standalone --nproc-per-node=$n -m mop.train $C --logging.run_dir=$OUT/$name "$@" > $OUT/$name.log 2>&1; echo "$name rc=$?"; python - $OUT/$name <<'PY'
import json, sys
p = sys.argv[1] + "/metrics.jsonl"
try:
    rows = [json.loads(l) for l in open(p)]
except OSError:
    print("  no metrics"); sys.exit()
print("  loss", [round(r.get("loss", 0), 4) for r in rows])
last = rows[-1]
print("  ", {k: last[k] for k in last if any(w in k for w in ("tok", "mfu", "mem", "peak"))})
PY
tail -3 $OUT/$name.log | cut -c1-300; }
run mla1 1 --model.shape=kimi-k2 --model.n_experts=32 --parallel.seq.degree=1 --parallel.experts.degree=1 --parallel.vocab.degree=1
run mla2 2 --model.shape=kimi-k2 --model.n_experts=32 --parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2
run oss1 1 --model.shape=gpt-oss-20b --model.moe_bias=false --model.swiglu_limit=0 --parallel.seq.degree=1 --parallel.experts.degree=1 --parallel.vocab.degree=1
run oss2 2 --model.shape=gpt-oss-20b --model.moe_bias=false --model.swiglu_limit=0 --parallel.seq.degree=2 --parallel.experts.degree=2 --parallel.vocab.degree=2
