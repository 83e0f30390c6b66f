"""`python -m fastdp.bench.audit_table` at toy size: the code path and its result files, not the numbers."""
import json

from fastdp.bench import audit_table


def test_audit_table_writes_rows_and_the_markdown(tmp_path):
    info = audit_table.main(["--methods", "dpsgd,bitfit", "--epsilons", "8", "--canaries", "200", "--hidden", "8",
                             "--epochs", "2", "--limit", "60", "--seeds", "2", "--ideal-draws", "1", "--accountant", "rdp",
                             "--out-dir", str(tmp_path)])
    rows = info["rows"]
    assert [(r["method"], r["seed"]) for r in rows] == [("dpsgd", 0), ("dpsgd", 1), ("bitfit", 0), ("bitfit", 1)]
    assert all(0 <= r["eps_lower"] <= r["epsilon"] <= 8 and r["ideal_eps_lower"] is not None for r in rows)
    assert all(r["max_unreleased"] == 0 for r in rows)
    saved = json.loads(next(tmp_path.glob("audit_table_*.json")).read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    table = next(tmp_path.glob("audit_table_*.md")).read_text()
    assert table.count("\n| dpsgd |") == 1 and " ± " in table
    assert (tmp_path / "dpsgd_eps8.json").exists() and (tmp_path / "dpsgd_eps8.txt").exists()


def test_ideal_audit_grows_with_the_separation():
    low = audit_table.ideal_eps_lower(8.0, 10, 1000, delta=1e-5, confidence=0.95, seed=0, draws=3)
    high = audit_table.ideal_eps_lower(1.0, 10, 1000, delta=1e-5, confidence=0.95, seed=0, draws=3)
    assert high > 2  # separation sqrt(10): most of the 1000 guesses right
    assert 0 <= low < high
