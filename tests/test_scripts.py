"""Helper scripts under scripts/ that device runs rely on (their logic, on CPU)."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location("compare_runs", Path(__file__).parents[1] / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def test_compare_runs_reports_largest_differences(tmp_path, capsys):
    a = [{"loss": 10.0, "grad_norm": 1.0}, {"loss": 9.0, "grad_norm": 2.0}]
    b = [{"loss": 10.001, "grad_norm": 1.5}, {"loss": 9.01, "grad_norm": 2.0}, {"loss": 8.0}]
    for name, rows in (("a", a), ("b", b)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    verdict = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert verdict["steps"] == 2
    assert abs(verdict["max_loss_diff"] - 0.01) < 1e-9 and abs(verdict["max_grad_norm_diff"] - 0.5) < 1e-9


def test_compare_runs_skips_a_missing_run(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    assert compare_runs.main([str(tmp_path / "a.jsonl"), str(tmp_path / "missing.jsonl")]) == 1
