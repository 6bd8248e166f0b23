"""Multi-node launch: two `torchrun` node agents on this machine meet through a c10d rendezvous on
127.0.0.1 (gloo, one CPU worker each) and train with checkpoints; then `scripts/slurm_mop.sh`, under
stand-ins for `srun` and `scontrol`, starts two node agents again and resumes the run by itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

from mop.launch import _free_port  # the launcher's own: one copy of the free-port code

ARGS = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=32", "--training.batch_size=2",
        "--training.device=cpu", "--training.warmup_steps=1", "--logging.progress=plain", "--logging.log_every=1",
        "--parallel.seq.degree=1", "--parallel.experts.degree=2", "--parallel.vocab.degree=2",
        "--checkpoint.enabled=true", "--checkpoint.every=2"]


def _two_nodes(run_dir, *extra) -> list[subprocess.CompletedProcess]:
    port = _free_port()
    nodes = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--max-restarts", "0", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mop-test",
               "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}", "--local-addr", "127.0.0.1",
               "-m", "mop.train", *ARGS, f"--logging.run_dir={run_dir}", *extra]
        nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = []
    for p in nodes:
        out, _ = p.communicate(timeout=240)
        outs.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return outs


SCONTROL = """#!/bin/bash
[ "$1" = show ] && echo 127.0.0.1
exit 0
"""
SRUN = """#!/bin/bash
# srun stand-in: drop srun's options, run the command once per node with SLURM_NODEID set
while [ $# -gt 0 ] && [ "${1#--}" != "$1" ]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait $p || rc=$?; done
exit $rc
"""


def _slurm_job(run_dir, bin_dir, *extra) -> subprocess.CompletedProcess:
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_mop.sh"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_NNODES": "2", "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "mop", "GPUS_PER_NODE": "1",
           "OMP_NUM_THREADS": "1", "PORT": str(_free_port()), "RUN_DIR": str(run_dir)}
    return subprocess.run(["bash", str(script), *ARGS, *extra], env=env, capture_output=True, text=True, timeout=240)


def test_two_node_run_then_slurm_script_resumes(tmp_path):
    first = _two_nodes(tmp_path, "--training.steps=4")
    assert all(o.returncode == 0 for o in first), "\n".join(o.stdout[-3000:] for o in first)
    log = "".join(o.stdout for o in first)
    assert "layout W=2 D=1 Ep=2 P=2" in log and "step_00000004" in log
    # The SLURM script sees the checkpoint and resumes (checkpoint.resume=true) on its own.
    second = _slurm_job(tmp_path, tmp_path / "bin", "--training.steps=6")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout and "at step 4" in second.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
