"""Run one benchmark point as a `torchrun` subprocess, with a timeout; never raises for a bad point."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUT_TAIL = 6000  # characters of a failed worker's stdout/stderr kept in the JSON


def worker_command(system: str, gpus: int, result_dir: str, overrides: list[str], warmup: int, steps: int,
                   skew: float, baseline_json: str | None = None, optimizer_ablation: bool = False,
                   profile: bool = False, warmup_micro_batches: int = 0) -> list[str]:
    """The exact `torchrun --nproc-per-node G -m mop.bench.worker ...` command of one point."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(gpus),
           "-m", "mop.bench.worker", "--system", system, "--result-dir", result_dir, "--warmup", str(warmup),
           "--steps", str(steps), "--skew", str(skew)]
    if baseline_json is not None:
        cmd += ["--baseline", baseline_json]
    if optimizer_ablation:
        cmd += ["--optimizer-ablation"]
    if profile:
        cmd += ["--profile"]
    if warmup_micro_batches:
        cmd += ["--warmup-micro-batches", str(warmup_micro_batches)]
    return cmd + list(overrides)


def worker_env(gpus: int, device: str) -> dict[str, str]:
    env = dict(os.environ)
    # Same allocator setting for both systems: fewer fragmentation OOMs at long context.
    env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    if device == "cpu":
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // gpus))
    env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    return env


def run_point(system: str, gpus: int, overrides: list[str], *, device: str, warmup: int, steps: int, skew: float,
              timeout: float, baseline_json: str | None = None, workdir: str | None = None,
              optimizer_ablation: bool = False, profile: bool = False, warmup_micro_batches: int = 0) -> dict:
    """Run one point; returns rank 0's record plus `status` (ok / oom / error / timeout) and the command."""
    with tempfile.TemporaryDirectory(dir=workdir, prefix=f"{system}-") as result_dir:
        cmd = worker_command(system, gpus, result_dir, overrides, warmup, steps, skew, baseline_json,
                             optimizer_ablation, profile, warmup_micro_batches)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=worker_env(gpus, device), start_new_session=True, cwd=str(REPO_ROOT))
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_point(proc)
            output, _ = proc.communicate()
        except BaseException:
            # `mop bench` itself interrupted or killed by SIGTERM (see `terminate_points_on_sigterm`):
            # without this the point's workers would outlive us, keep the GPUs and hold the run
            # directory's lock.
            kill_point(proc)
            raise
        wall_s = time.perf_counter() - t0
        ranks = {}
        for f in Path(result_dir).glob("rank*.json"):
            try:
                ranks[int(f.stem[4:])] = json.loads(f.read_text())
            except (ValueError, json.JSONDecodeError):
                continue
    record = point_record(ranks, timed_out, proc.returncode, timeout)
    record = dict(record)
    record["command"] = " ".join(cmd[:1] + ["-m", "torch.distributed.run"] + cmd[3:])
    record["wall_s"] = wall_s
    if record["status"] != "ok":
        record["output_tail"] = (output or "")[-OUTPUT_TAIL:]
    return record


def point_record(ranks: dict[int, dict], timed_out: bool, returncode: int | None, timeout: float) -> dict:
    """The point's record from what its ranks wrote (rank -> rank{R}.json) and how the run ended."""
    statuses = {r.get("status") for r in ranks.values()}
    if "oom" in statuses:
        record = next(r for r in ranks.values() if r.get("status") == "oom")
    elif "error" in statuses:
        record = next(r for r in ranks.values() if r.get("status") == "error")
    elif 0 in ranks and statuses == {"ok"} and ranks[0].get("profile_pending"):
        # Measured, then killed or failed while profiling (a long trace's export): the measurement stands.
        record = {k: v for k, v in ranks[0].items() if k != "profile_pending"}
        why = f"reached its {timeout:.0f} s timeout" if timed_out else f"exited with code {returncode}"
        record["profile_by_op"] = f"(no profile: the point {why} while profiling)"
    elif timed_out:
        record = {"status": "timeout", "error": f"no result within {timeout:.0f} s"}
    elif 0 in ranks and statuses == {"ok"}:
        record = ranks[0]  # every rank finished (a non-zero exit after that is teardown noise)
    else:
        record = {"status": "error", "error": f"worker exited with code {returncode} and no result"}
    return record


def _parents() -> dict[int, int]:
    """pid -> parent pid of every process this user can see (Linux /proc; empty elsewhere)."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    out[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces
            except (OSError, ValueError, IndexError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has released its memory, GPU memory included)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_point(proc: subprocess.Popen, wait_s: float = 60.0) -> None:
    """SIGKILL a point's torchrun and every process below it, then wait until they are gone.

    Killing torchrun's process group is not enough: torchrun starts each worker in a session of its
    own, so a worker busy in a long step outlives it and keeps its GPU memory (session 6: a killed
    256K point still held 138.9 GiB when the next command started, which then ran out of memory).
    The tree is read before anything is killed, since orphans are re-parented at once."""
    pids = [proc.pid] + descendants(proc.pid)
    for pid in pids:
        for kill in (os.killpg, os.kill):  # each worker leads its own group: take its children too
            try:
                kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    proc.wait()
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_running(p) for p in pids[1:]):
        time.sleep(0.1)


def terminate_points_on_sigterm() -> None:
    """Turn SIGTERM (e.g. `timeout`, a batch scheduler) into SystemExit, so the point in flight is
    killed with its whole process tree (`run_point`, `kill_point`) instead of being orphaned."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
