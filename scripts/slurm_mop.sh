#!/bin/bash
# Train with mop on a SLURM GPU cluster: one torchrun agent per node, c10d rendezvous on the first
# node, a run directory on a shared file system, and automatic resume after preemption or a crash.
#
#   sbatch --nodes=4 scripts/slurm_mop.sh --config configs/qwen3-30b-a3b.toml \
#       --parallel.seq.degree=8 --parallel.experts.degree=8 --parallel.vocab.degree=8
#
# Anything after the script name is passed to `mop.train` (any --section.key=value option).
# Re-submitting the same script with the same RUN_DIR continues the run from its newest checkpoint
# that verifies (see "Runs that survive" in README.md); a NaN/Inf stops the job with exit code 3
# rather than overwriting good checkpoints.
#
#SBATCH --job-name=mop
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --output=%x-%j.out

set -euo pipefail

RUN_DIR=${RUN_DIR:-/shared/runs/${SLURM_JOB_NAME}}   # must be visible from every node
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=${PORT:-29500}

# Resume whenever the run directory already holds a checkpoint (a requeued or re-submitted job);
# a fresh directory starts from step 0. mop refuses to start a new run on top of old checkpoints.
RESUME=false
if compgen -G "${RUN_DIR}/checkpoints/step_*/COMPLETE" > /dev/null; then
  RESUME=true
fi

# Requeue on the pre-timeout signal: the next job resumes from the last periodic checkpoint.
trap 'echo "mop: time limit near, requeueing"; scontrol requeue "$SLURM_JOB_ID"' USR1

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1

export RUN_DIR GPUS_PER_NODE HEAD_NODE PORT
# One task per node; SLURM_NODEID (set by srun per task) is the node rank. "$@" keeps the options as given.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c '
  exec torchrun --nnodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$HEAD_NODE:$PORT" --rdzv-id "$SLURM_JOB_ID" --max-restarts 0 \
    -m mop.train "$@"
' mop-node --logging.run_dir="$RUN_DIR" --checkpoint.enabled=true --checkpoint.every=500 \
    --checkpoint.resume="$RESUME" "$@" &
wait $!
