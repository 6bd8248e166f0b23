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
  tar czf "$FINAL/$1.tgz" -C "$OUT" . 2>/dev/null
  rm -f "$FINAL/partial.tgz"
  echo "== done: $FINAL/$1.tgz"
}

# A device call that runs past its limit is killed, and only what is under $FINAL comes back: session 7
# lost a whole call (a 512K step) because the archive was written only at the end. So the scratch
# directory is archived to $FINAL/partial.tgz every PACK_EVERY seconds and when the script is
# terminated; `pack` replaces it with the named archive.
_autopack() {
  while sleep "${PACK_EVERY:-45}"; do tar czf "$FINAL/partial.tgz.tmp" -C "$OUT" . 2>/dev/null \
    && mv -f "$FINAL/partial.tgz.tmp" "$FINAL/partial.tgz"; done
}
_autopack &
_AUTOPACK=$!
trap 'kill $_AUTOPACK 2>/dev/null' EXIT
trap 'tar czf "$FINAL/partial.tgz" -C "$OUT" . 2>/dev/null; echo "== terminated: $FINAL/partial.tgz"; exit 143' TERM INT

# `timeout` for a step that must end before the call's own limit: the command gets SIGTERM at
# `left N` (seconds left until script time N) and SIGKILL 15 s later (a rank stuck in a collective
# ignores SIGTERM and would hold the call to its limit).
tmo() { timeout -k 15 "$@"; }
