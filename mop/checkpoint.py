"""Checkpoints with torch.distributed.checkpoint: atomic, verified, keep-last-K, loadable on another layout.

Layout on disk: `RUN_DIR/checkpoints/step_00000100/` holds the DCP files, `model.json` and
`COMPLETE`. A save writes to `step_N.partial/` first; after every rank has finished (barrier) the
files are hashed (crc32, streamed, split over the ranks), rank 0 writes `COMPLETE` holding that
manifest, and only then renames `step_N.partial/` to `step_N/`. A crash mid-save therefore leaves a
`.partial` directory that is ignored and cleaned up, never a damaged "latest" checkpoint.

On resume (and `mop export`) the manifest is checked first: a file that is missing, truncated or
overwritten is named, the checkpoint is set aside as `step_N.damaged/`, and the next older
checkpoint that verifies is used instead, saying so. Rotation (keep-last-K) only ever removes
checkpoints older than the one just saved, renaming each to `.trash` before deleting it, so a
crash during rotation cannot leave a half-deleted directory that still looks complete.

`RunDir` guards the run directory itself: one live run at a time (an `fcntl.flock` lock), and no
new run on top of another run's checkpoints unless it resumes them.

Model and optimizer state are DTensors, so DCP reshards them when the world size or layout changes.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

COMPLETE = "COMPLETE"
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, verified or loaded; the message names the checkpoint and file."""


class RunDirError(RuntimeError):
    """The run directory cannot be used for this run (another run's checkpoints, a live run, not writable)."""


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _world() -> int:
    return dist.get_world_size() if _is_dist() else 1


def _barrier() -> None:
    if _is_dist():
        dist.barrier()


def _gather(obj) -> list:
    """Every rank's `obj` (a small picklable value), on every rank."""
    if not _is_dist() or _world() == 1:
        return [obj]
    out = [None] * _world()
    dist.all_gather_object(out, obj)
    return out


def agree(error: str | None) -> str | None:
    """The first rank's error message, on every rank (so that all ranks raise together, none hangs)."""
    return next((e for e in _gather(error) if e), None)


def short_reason(exc: BaseException) -> str:
    """One line saying why a save or load failed, from an OSError inside DCP's wrapped exceptions if any."""
    failures = getattr(exc, "failures", None) or {}
    tops = [exc] + [pair[0] if isinstance(pair, tuple) else pair for pair in failures.values()]
    for top in tops:
        e, depth = top, 0
        while e is not None and depth < 20:
            if isinstance(e, OSError):
                return f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
            e, depth = e.__cause__ or e.__context__, depth + 1
    inner = tops[-1]
    text = str(inner).strip()
    return f"{type(inner).__name__}: {text.splitlines()[0]}" if text else type(inner).__name__


# -- manifest --------------------------------------------------------------------------------------

def file_digest(path: Path) -> dict:
    """Size and crc32 of a file, read in 8 MiB chunks (crc32 runs at several GB/s: cheap next to the save)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": crc}


def _data_files(path: Path) -> list[str]:
    """Every file under a checkpoint directory but the COMPLETE marker, relative, sorted."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)


def build_manifest(path: Path) -> dict[str, dict]:
    """`relative path -> {bytes, crc32}` of every file in `path`, each rank hashing a share (collective)."""
    names = _data_files(path)
    mine = {n: file_digest(path / n) for n in names[_rank()::_world()]}
    merged: dict[str, dict] = {}
    for part in _gather(mine):
        merged.update(part)
    return merged


def verify_checkpoint(path: Path) -> str | None:
    """None if `path` matches its manifest, else what is wrong, naming the file (collective when distributed).

    Every rank hashes a share of the files, so verifying costs one read of the checkpoint in all.
    Checkpoints written before manifests existed (COMPLETE holds only the step) are accepted unverified.
    """
    problem = None
    try:
        record = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or "files" not in record:
        return agree(None if (path / COMPLETE).is_file() else f"{path / COMPLETE}: missing")
    files: dict[str, dict] = record["files"]
    names = sorted(files)
    for name in names[_rank()::_world()]:
        f = path / name
        if not f.is_file():
            problem = f"{f}: missing"
            break
        if f.stat().st_size != files[name]["bytes"]:
            problem = f"{f}: {f.stat().st_size} bytes, the manifest says {files[name]['bytes']} (truncated or replaced)"
            break
        if file_digest(f)["crc32"] != files[name]["crc32"]:
            problem = f"{f}: checksum mismatch (the file was modified or damaged after the save)"
            break
    return agree(problem)


def check_same_model(path: Path, model: dict) -> None:
    """Refuse to resume `model` (a ModelConfig as a dict) from a checkpoint of another model, naming the fields.

    The layout and world size may change (DCP reshards); the model may not: a checkpoint of 4 layers
    would silently lose one under `--model.n_layers=3`. Options added to ModelConfig after the save
    are absent from its `model.json` and not compared; checkpoints without one are not checked.
    """
    saved_file = Path(path) / "model.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text())
    now = json.loads(json.dumps(model))  # tuples as lists, like the saved file
    diffs = [f"model.{k}={saved[k]!r} in the checkpoint, {now[k]!r} now"
             for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]
    if diffs:
        raise CheckpointError(f"{path} holds a different model ({'; '.join(diffs)}): resume with the checkpoint's "
                              "model options, or start a new --logging.run_dir (the parallel layout may change; "
                              "the model may not)")


class CheckpointManager:
    """Save / find / verify / load checkpoints under `run_dir/checkpoints`."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def _dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    @staticmethod
    def step_of(path: Path) -> int:
        """The step of a checkpoint directory (`step_00000100[.suffix]` -> 100)."""
        return int(path.name.split("_", 1)[1].split(".", 1)[0])

    def complete_checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (by step number)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()
                 and (p / COMPLETE).exists()]
        return sorted(found, key=self.step_of)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, not verified (see `latest_verified`)."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    def latest_verified(self, log=print, set_aside: bool = True) -> Path | None:
        """The newest checkpoint that matches its manifest (collective), or None when there is none at all.

        A damaged one is named through `log` and, with `set_aside`, renamed `step_N.damaged` (rank 0)
        so that neither a later resume nor rotation mistakes it for the newest. If checkpoints exist
        but none verifies, raises CheckpointError rather than silently starting over.
        """
        problems = []
        candidates = self.complete_checkpoints()
        for path in reversed(candidates):
            problem = verify_checkpoint(path)
            if problem is None:
                if problems:
                    log(f"mop: falling back to {path}, the newest checkpoint that verifies")
                return path
            problems.append(problem)
            note = ""
            if set_aside:
                _barrier()
                if _rank() == 0:
                    path.rename(path.with_name(path.name + ".damaged"))
                _barrier()
                note = f"; set aside as {path.name}.damaged"
            log(f"mop: checkpoint {path.name} is damaged: {problem}{note}")
        if problems:
            raise CheckpointError(f"no checkpoint under {self.root} verifies ({'; '.join(problems)}); move the "
                                  "damaged ones away to start from scratch")
        return None

    def save(self, step: int, state: dict, files: dict[str, str] | None = None) -> Path:
        """Save `state` (a dict of tensors / Stateful objects / picklable values) atomically, with a manifest.

        `files` (name -> text) are written next to the DCP files by rank 0, e.g. `model.json`, the
        model config that `mop export` needs to rebuild the model without the run's command line.
        A failure (disk full, permissions) on any rank raises CheckpointError on every rank, after
        removing the partial directory; the previous checkpoints are untouched.
        """
        final = self._dir(step)
        partial = final.with_name(final.name + ".partial")
        error = None
        if _rank() == 0:
            try:
                for stale in sorted(self.root.glob("*.partial")) + sorted(self.root.glob("*.trash")):
                    shutil.rmtree(stale, ignore_errors=True)  # a crashed save's or rotation's leftovers
                partial.mkdir(parents=True)
                for name, text in (files or {}).items():
                    (partial / name).write_text(text)
            except OSError as e:
                error = short_reason(e)
        error = agree(error)
        if error is None:
            try:
                dcp.save(state, checkpoint_id=str(partial))
            except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
                error = short_reason(e)
            error = agree(error)
        if error is None:
            manifest = build_manifest(partial)
            if _rank() == 0:
                try:
                    (partial / COMPLETE).write_text(json.dumps({"step": step, "files": manifest}, indent=0))
                    if final.exists():
                        shutil.rmtree(final)
                    partial.rename(final)
                except OSError as e:
                    error = short_reason(e)
            error = agree(error)
        if error is not None:
            if _rank() == 0:
                shutil.rmtree(partial, ignore_errors=True)
            previous = self.latest()
            kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(f"saving checkpoint {final} failed: {error}; {kept}")
        if _rank() == 0:
            self._rotate(step)
        _barrier()
        return final

    def _rotate(self, step: int) -> None:
        """Keep the newest `keep` checkpoints up to `step`; never one newer than `step`, never `step` itself."""
        older = [p for p in self.complete_checkpoints() if self.step_of(p) < step]
        for old in older[: max(0, len(older) - (self.keep - 1))]:
            trash = old.with_name(old.name + ".trash")
            old.rename(trash)  # atomic: a crash below leaves a .trash directory, never a half-deleted "complete" one
            shutil.rmtree(trash, ignore_errors=True)

    def load(self, path: str | Path, state: dict) -> None:
        """Load into `state` in place (Stateful objects get `load_state_dict` called)."""
        path = Path(path)
        if not (path / COMPLETE).exists():
            raise CheckpointError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
        try:
            dcp.load(state, checkpoint_id=str(path))
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"loading checkpoint {path} failed: {short_reason(e)}") from None


class RunDir:
    """The run directory of one live run: created and checked writable, locked, and not another run's.

    The lock is an `fcntl.flock` on `RUN_DIR/.lock`, held by global rank 0 from start-up to the end
    of training; the kernel drops it when that process dies, however it dies, so a stale lock never
    blocks a restart.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir)
        self._lock_file = None

    def check(self, resume: bool, lock: bool = True) -> None:
        """Refuse an unwritable directory, a live run in it, or another run's checkpoints without resume."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write_test.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            raise RunDirError(f"logging.run_dir={self.path}: not writable ({e.strerror}); choose another "
                              "--logging.run_dir") from None
        if lock:
            self.lock()
        if not resume:
            found = CheckpointManager(self.path).complete_checkpoints()
            if found:
                self.unlock()
                raise RunDirError(
                    f"logging.run_dir={self.path} already holds checkpoints of another run (newest {found[-1].name}); "
                    "pass --checkpoint.resume=true to continue it, or choose a new --logging.run_dir")

    def lock(self) -> None:
        """Take the run lock, or raise RunDirError naming the live run's pid."""
        import fcntl

        f = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            owner = f.read().strip() or "?"
            f.close()
            raise RunDirError(f"logging.run_dir={self.path} is in use by a live run (pid {owner}); wait for it to "
                              "end, stop it, or choose another --logging.run_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        """Release the run lock (if held)."""
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None


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
