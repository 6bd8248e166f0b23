# Sourced by the device scripts: environment, result archive and launcher shared by all of them.
# Needs NPROC (GPUs per run) set before sourcing. Files go to a scratch $OUT and are packed into one
# archive under $FINAL by `pack NAME` ($OUT returns at most 8 files from a device call).
set -u
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
FINAL=${OUT:-bench/results/raw}
OUT=$(mktemp -d)
mkdir -p "$FINAL"
TR="python -m torch.distributed.run --standalone --nproc-per-node ${NPROC}"
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/hardware.txt" 2>&1
python -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', os.cpu_count())" \
  >> "$OUT/hardware.txt"

pack() {
  tar czf "$FINAL/$1.tgz" -C "$OUT" .
  echo "== done: $FINAL/$1.tgz"
}
