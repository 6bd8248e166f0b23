"""`mop plot RUN_DIR` writes PNGs from a metrics.jsonl."""

import json

import pytest

from mop.plot import main, read_metrics


def _write_metrics(run_dir, n=5):
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, n + 1):
            f.write(json.dumps({"step": step, "loss": 5.0 / step, "aux_loss": 0.01, "lr": 1e-3,
                                "tokens_per_s_per_device": 1000.0 + step, "mfu": 0.2}) + "\n")


def test_plot_writes_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _write_metrics(run)
    assert main([str(run)]) == 0
    for name in ("loss.png", "throughput.png"):
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_errors(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 1
    assert "metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        read_metrics(bad / "metrics.jsonl")
