"""Checkpoint integrity and run-directory safety: manifests, damage found and named, fallback to the
newest checkpoint that verifies, a different model refused, a run directory never silently reused."""

import errno
import json

import pytest
import torch

from mop.checkpoint import COMPLETE, CheckpointError, CheckpointManager, RunDir, RunDirError, verify_checkpoint
from mop.config import build_config
from mop.distributed import ProcessInfo
from mop.trainer import Trainer

CPU = ProcessInfo(0, 1, 0, 1, torch.device("cpu"))


def _job(run_dir, *extra):
    return build_config(overrides=[
        "--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=32", "--training.batch_size=2",
        "--training.device=cpu", "--logging.progress=none", "--logging.log_every=1", "--training.warmup_steps=1",
        f"--logging.run_dir={run_dir}", *extra])


def _saved(tmp_path, steps=(1, 2), keep=3) -> CheckpointManager:
    mgr = CheckpointManager(tmp_path, keep=keep)
    for step in steps:
        mgr.save(step, {"x": torch.full((1000,), float(step))}, files={"model.json": "{}"})
    return mgr


def _distcp(path):
    return next(p for p in path.iterdir() if p.suffix == ".distcp")


def test_manifest_lists_every_file_with_its_checksum(tmp_path):
    mgr = _saved(tmp_path, steps=(1,))
    path = mgr.latest()
    record = json.loads((path / COMPLETE).read_text())
    assert record["step"] == 1
    assert set(record["files"]) == {p.name for p in path.iterdir() if p.name != COMPLETE}
    assert {".metadata", "model.json"} <= set(record["files"])
    assert verify_checkpoint(path) is None


def _overwrite(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64  # same size, different bytes
    f.write_bytes(bytes(data))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "distcp overwritten": (_distcp, _overwrite, "checksum mismatch"),
    "distcp truncated": (_distcp, _truncate, "truncated"),
    "distcp deleted": (_distcp, lambda f: f.unlink(), "missing"),
    "metadata truncated": (lambda p: p / ".metadata", _truncate, "truncated"),
    "model.json edited": (lambda p: p / "model.json", lambda f: f.write_text('{"n_layers": 9}'), "truncated"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_checkpoint_is_named_set_aside_and_the_previous_one_used(kind, tmp_path):
    pick, damage, reason = DAMAGE[kind]
    mgr = _saved(tmp_path)
    newest = mgr.latest()
    bad_file = pick(newest)
    damage(bad_file)
    said = []
    found = mgr.latest_verified(log=said.append)
    assert found.name == "step_00000001"
    assert bad_file.name in said[0] and reason in said[0] and "step_00000002" in said[0]
    assert "falling back to" in said[-1] and found.name in said[-1]
    assert (newest.parent / (newest.name + ".damaged")).is_dir()  # kept for inspection, no longer "latest"
    assert mgr.latest().name == "step_00000001"
    state = {"x": torch.zeros(1000)}
    mgr.load(found, state)
    assert state["x"].eq(1.0).all()


def test_deleted_complete_marker_means_incomplete(tmp_path):
    mgr = _saved(tmp_path)
    (mgr.latest() / COMPLETE).unlink()
    assert mgr.latest_verified(log=lambda m: None).name == "step_00000001"


def test_no_verifying_checkpoint_is_one_line_refusal(tmp_path):
    mgr = _saved(tmp_path, steps=(1,))
    _truncate(_distcp(mgr.latest()))
    with pytest.raises(CheckpointError) as e:
        mgr.latest_verified(log=lambda m: None)
    assert "\n" not in str(e.value) and ".distcp" in str(e.value) and len(str(e.value)) < 400


def test_load_failure_names_the_checkpoint_without_a_long_traceback(tmp_path):
    mgr = _saved(tmp_path, steps=(1,))
    path = mgr.latest()
    (path / COMPLETE).write_text("1\n")  # an old-style marker: no manifest, so only the load can notice
    _truncate(path / ".metadata")
    with pytest.raises(CheckpointError) as e:
        mgr.load(path, {"x": torch.zeros(1000)})
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_rotation_keeps_the_newest_and_never_a_newer_one(tmp_path):
    mgr = _saved(tmp_path, steps=(1, 2, 3), keep=2)
    assert [p.name for p in mgr.complete_checkpoints()] == ["step_00000002", "step_00000003"]
    (tmp_path / "checkpoints" / "step_00000001.trash").mkdir()  # a crash during rotation: ignored
    mgr.keep = 1
    mgr.save(2, {"x": torch.zeros(3)})  # e.g. after a fallback: step 3 is newer and stays
    assert [p.name for p in mgr.complete_checkpoints()] == ["step_00000002", "step_00000003"]


def test_disk_full_during_save_is_a_clear_error_and_keeps_the_previous(tmp_path, monkeypatch):
    mgr = _saved(tmp_path, steps=(1,))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mop.checkpoint.dcp.save", full)
    with pytest.raises(CheckpointError, match="No space left on device.*step_00000001 is intact"):
        mgr.save(2, {"x": torch.zeros(3)})
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    assert mgr.latest_verified(log=print).name == "step_00000001"


def test_unwritable_run_dir_is_refused_naming_the_option(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirError, match=r"logging.run_dir=.*not writable"):
        RunDir(tmp_path / "file" / "run").check(resume=False)


def test_run_dir_with_checkpoints_needs_resume(tmp_path):
    Trainer(_job(tmp_path, "--training.steps=2", "--checkpoint.enabled=true"), CPU).train()
    with pytest.raises(RunDirError, match=r"already holds checkpoints.*--checkpoint.resume=true"):
        Trainer(_job(tmp_path, "--training.steps=4", "--checkpoint.enabled=true"), CPU)
    resumed = Trainer(_job(tmp_path, "--training.steps=4", "--checkpoint.enabled=true",
                           "--checkpoint.resume=true"), CPU)
    assert resumed.step == 2


def test_live_run_holds_the_lock(tmp_path):
    live = RunDir(tmp_path)
    live.check(resume=False)  # takes the lock, as rank 0 of a live run does
    with pytest.raises(RunDirError, match="in use by a live run"):
        Trainer(_job(tmp_path, "--training.steps=1"), CPU)
    live.unlock()
    Trainer(_job(tmp_path, "--training.steps=1"), CPU).train()


def test_resume_without_checkpoint_says_so(tmp_path, capsys):
    trainer = Trainer(_job(tmp_path, "--training.steps=1", "--checkpoint.resume=true"), CPU)
    assert trainer.step == 0
    assert "holds no checkpoint yet: starting from step 0" in capsys.readouterr().out


def test_resume_with_a_different_model_is_refused_naming_fields(tmp_path):
    Trainer(_job(tmp_path, "--training.steps=2", "--checkpoint.enabled=true"), CPU).train()
    with pytest.raises(CheckpointError) as e:
        Trainer(_job(tmp_path, "--training.steps=4", "--checkpoint.resume=true", "--model.n_layers=1",
                     "--model.expert_dim=8"), CPU)
    assert "model.n_layers=2 in the checkpoint, 1 now" in str(e.value)
    assert "model.expert_dim=16 in the checkpoint, 8 now" in str(e.value)
    # The refused run let go of the directory's lock at once: the right model resumes straight away.
    assert Trainer(_job(tmp_path, "--training.steps=4", "--checkpoint.resume=true"), CPU).step == 2


def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys):
    Trainer(_job(tmp_path, "--training.steps=4", "--checkpoint.enabled=true", "--checkpoint.every=2"), CPU).train()
    _overwrite(_distcp(CheckpointManager(tmp_path).latest()))
    resumed = Trainer(_job(tmp_path, "--training.steps=4", "--checkpoint.resume=true"), CPU)
    out = capsys.readouterr().out
    assert resumed.step == 2
    assert "step_00000004 is damaged" in out and "falling back to" in out
