"""Checkpoints with torch.distributed.checkpoint: atomic, keep-last-K, loadable on another layout.

Layout on disk: `RUN_DIR/checkpoints/step_00000100/` holds the DCP files plus `COMPLETE`. A save
writes to `step_N.partial/` first, and rank 0 renames it to `step_N/` and writes `COMPLETE` only after
every rank has finished (barrier): a crash mid-save leaves a `.partial` directory that is ignored and
cleaned up, never a damaged "latest" checkpoint. Model and optimizer state are DTensors, so DCP
reshards them when the world size or layout changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


class CheckpointManager:
    """Save / find / load checkpoints under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def complete_checkpoints(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / "COMPLETE").exists()
                      and not p.name.endswith(".partial"))

    def latest(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def save(self, step: int, state: dict, files: dict[str, str] | None = None) -> Path:
        """Save `state` (a dict of tensors / Stateful objects / picklable values) atomically.

        `files` (name -> text) are written next to the DCP files by rank 0, e.g. `model.json`, the
        model config that `mop export` needs to rebuild the model without the run's command line.
        """
        final = self._dir(step)
        partial = final.with_name(final.name + ".partial")
        if _rank() == 0:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
            for name, text in (files or {}).items():
                (partial / name).write_text(text)
        _barrier()
        dcp.save(state, checkpoint_id=str(partial))
        _barrier()
        if _rank() == 0:
            if final.exists():
                shutil.rmtree(final)
            partial.rename(final)
            (final / "COMPLETE").write_text(f"{step}\n")
            for old in self.complete_checkpoints()[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return final

    def load(self, path: str | Path, state: dict) -> None:
        """Load into `state` in place (Stateful objects get `load_state_dict` called)."""
        path = Path(path)
        if not (path / "COMPLETE").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no COMPLETE marker)")
        dcp.load(state, checkpoint_id=str(path))


class Stateful:
    """Adapts get/set callables to DCP's Stateful protocol."""

    def __init__(self, get, set_):
        self._get, self._set = get, set_

    def state_dict(self):
        return self._get()

    def load_state_dict(self, sd) -> None:
        self._set(sd)


def rng_state() -> dict:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(sd: dict) -> None:
    torch.set_rng_state(sd["cpu"])
    if "cuda" in sd and torch.cuda.is_available():
        torch.cuda.set_rng_state(sd["cuda"])
