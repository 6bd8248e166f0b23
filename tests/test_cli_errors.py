"""Errors a user sees: one line naming the option or file, a distinct exit code, no traceback, nothing
spawned for a mistake the launcher can see; and logs that report what the step actually did."""

import pytest
import torch

from mop.config import build_config
from mop.distributed import ProcessInfo
from mop.train import main as train_main
from mop.train import parse_args
from mop.trainer import Trainer

SMALL = ["--model.shape=debug", "--data.dataset=synthetic", "--training.seq_len=32", "--training.batch_size=2",
         "--training.device=cpu", "--logging.progress=none"]


def _one_line_error(capsys, argv, code=2):
    assert train_main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mop train: "), err
    return lines[0]


@pytest.mark.parametrize("option,value", [
    ("optimizer.lr", "nan"), ("optimizer.lr", "inf"), ("optimizer.lr", "-1"),
    ("optimizer.eps", "nan"), ("optimizer.eps", "0"), ("optimizer.eps", "-1e-8"),
    ("optimizer.weight_decay", "nan"), ("optimizer.weight_decay", "inf"), ("optimizer.weight_decay", "-0.1"),
    ("training.max_grad_norm", "nan"), ("training.max_grad_norm", "inf"), ("training.max_grad_norm", "-1"),
])
def test_non_finite_or_negative_hyper_parameters_are_refused(option, value):
    with pytest.raises(ValueError, match=rf"^{option}: must be"):
        build_config(overrides=[f"--{option}={value}"])


def test_config_error_is_one_line_exit_2(capsys):
    line = _one_line_error(capsys, ["--training.steps=0"])
    assert "training.steps: must be >= 1" in line


def test_old_option_name_is_one_line_naming_the_new_one(capsys):
    line = _one_line_error(capsys, ["--parallel.dispatcher=llep"])
    assert line == "mop train: parallel.dispatcher: unknown option; did you mean parallel.experts.dispatcher?"


def test_space_separated_override_is_accepted():
    _, overrides = parse_args(["--training.steps", "5", "--model.shape=debug", "--optimizer.lr", "1e-3"])
    assert overrides == ["--training.steps=5", "--model.shape=debug", "--optimizer.lr=1e-3"]
    assert build_config(overrides=overrides).training.steps == 5


def test_layout_error_is_caught_by_the_launcher(capsys, monkeypatch):
    monkeypatch.setattr("mop.launch.launch_local", lambda *a, **k: pytest.fail("spawned workers for a bad layout"))
    line = _one_line_error(capsys, ["--nproc", "2", "--parallel.seq.degree=3", *SMALL])
    assert "parallel.seq.degree (D)=3 must divide the world size 2" in line


def test_dataset_error_is_caught_by_the_launcher(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("mop.launch.launch_local", lambda *a, **k: pytest.fail("spawned workers for a bad dataset"))
    argv = ["--nproc", "2", *SMALL, f"--data.dataset={tmp_path / 'missing'}", f"--logging.run_dir={tmp_path}/run"]
    assert "does not exist" in _one_line_error(capsys, argv)


def test_run_dir_of_another_run_is_caught_by_the_launcher(capsys, monkeypatch, tmp_path):
    (tmp_path / "checkpoints" / "step_00000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000010" / "COMPLETE").write_text("10\n")
    monkeypatch.setattr("mop.launch.launch_local", lambda *a, **k: pytest.fail("spawned workers into a used run dir"))
    line = _one_line_error(capsys, ["--nproc", "2", *SMALL, f"--logging.run_dir={tmp_path}"])
    assert "--checkpoint.resume=true" in line and "step_00000010" in line


def test_data_prepare_names_the_file_that_fails_to_decode(tmp_path, capsys):
    from mop.data.prepare import prepare_main

    (tmp_path / "good.txt").write_text("hello world\n")
    (tmp_path / "bad.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert prepare_main([str(tmp_path / "good.txt"), str(tmp_path / "bad.txt"), "--out", str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err
    assert "bad.txt: not UTF-8 text" in err and "good.txt" not in err


def test_export_without_checkpoints_says_how_to_enable_them(tmp_path, capsys):
    from mop.cli import main as cli_main

    (tmp_path / "run").mkdir()
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert "--checkpoint.enabled=true" in capsys.readouterr().err


def test_export_refuses_a_damaged_checkpoint_directory(tmp_path, capsys):
    from mop.checkpoint import CheckpointManager
    from mop.cli import main as cli_main

    path = CheckpointManager(tmp_path).save(1, {"x": torch.zeros(100)}, files={"model.json": "{}"})
    (path / "model.json").write_text('{"n_layers": 3}')
    assert cli_main(["export", str(path), str(tmp_path / "out")]) == 4
    err = capsys.readouterr().err
    assert "model.json" in err and "damaged" in err and not (tmp_path / "out").exists()


def test_first_logged_step_is_step_1_and_lr_is_the_one_used(tmp_path):
    job = build_config(overrides=[*SMALL, "--training.steps=3", "--training.warmup_steps=4", "--optimizer.lr=1e-2",
                                  "--logging.log_every=10", f"--logging.run_dir={tmp_path}"])
    history = Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu"))).train().history
    assert [h["step"] for h in history] == [1, 3]  # the first step, then every log_every and the last
    # Linear warm-up over 4 steps: step 1 updates with lr/4, step 3 with 3lr/4.
    assert history[0]["lr"] == pytest.approx(0.25e-2) and history[1]["lr"] == pytest.approx(0.75e-2)


def test_export_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    from mop.checkpoint import CheckpointManager
    from mop.cli import main as cli_main

    job = build_config(overrides=[*SMALL, "--training.steps=4", "--checkpoint.enabled=true", "--checkpoint.every=2",
                                  f"--logging.run_dir={tmp_path / 'run'}"])
    Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu"))).train()
    newest = CheckpointManager(tmp_path / "run").latest()
    (newest / ".metadata").write_bytes(b"\0" * 16)
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", "fp32"]) == 0
    err = capsys.readouterr().err
    assert "step_00000004 is damaged" in err and "falling back to" in err and "step_00000002" in err
    assert (tmp_path / "out" / "config.json").is_file()
    assert newest.is_dir()  # export only reads: the damaged checkpoint is not moved


def test_export_of_an_unverifiable_damaged_checkpoint_is_one_line(tmp_path, capsys):
    """A checkpoint from before manifests (COMPLETE holds only the step) can only fail while loading."""
    from mop.cli import main as cli_main

    job = build_config(overrides=[*SMALL, "--training.steps=1", "--checkpoint.enabled=true",
                                  f"--logging.run_dir={tmp_path / 'run'}"])
    Trainer(job, ProcessInfo(0, 1, 0, 1, torch.device("cpu"))).train()
    path = tmp_path / "run" / "checkpoints" / "step_00000001"
    (path / "COMPLETE").write_text("1\n")
    distcp = next(path.glob("*.distcp"))
    distcp.write_bytes(distcp.read_bytes()[:100])
    assert cli_main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 4
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "Traceback" in ln or ln.startswith("mop export")]
    assert len(lines) == 1 and lines[0].startswith("mop export: reading") and str(path) in lines[0], lines


def test_default_dataset_vocabulary_is_checked_before_the_run(capsys, monkeypatch):
    monkeypatch.setattr("mop.launch.launch_local", lambda *a, **k: pytest.fail("spawned workers for a bad vocabulary"))
    line = _one_line_error(capsys, ["--nproc", "2", "--model.shape=debug", "--training.device=cpu"])
    assert "has vocabulary 258 > model.vocab_size=97" in line
