"""Multi-node launch: two `torchrun` node agents on this machine meet through a c10d rendezvous on
127.0.0.1 (gloo, one CPU worker each), train with checkpoints, then resume on two nodes again."""

import json
import os
import socket
import subprocess
import sys

ARGS = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=32", "--training.batch_size=2",
        "--training.device=cpu", "--training.warmup_steps=1", "--logging.progress=plain", "--logging.log_every=1",
        "--parallel.seq=1", "--parallel.expert=2", "--parallel.vocab=2", "--checkpoint.enabled=true",
        "--checkpoint.every=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_two_node_run_and_resume(tmp_path):
    first = _two_nodes(tmp_path, "--training.steps=4")
    assert all(o.returncode == 0 for o in first), "\n".join(o.stdout[-3000:] for o in first)
    log = "".join(o.stdout for o in first)
    assert "layout W=2 D=1 Ep=2 P=2" in log and "step_00000004" in log
    second = _two_nodes(tmp_path, "--training.steps=6", "--checkpoint.resume=true")
    assert all(o.returncode == 0 for o in second), "\n".join(o.stdout[-3000:] for o in second)
    assert "resumed from" in "".join(o.stdout for o in second) and "at step 4" in "".join(o.stdout for o in second)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] < records[0]["loss"]
