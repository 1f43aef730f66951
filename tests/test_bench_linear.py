"""bench.py --linear: one row per preset and row count, both products timed in the same run."""
import json

import bench


def test_linear_benchmark_reports_both_products(capsys):
    assert bench.main(["--linear", "1", "3", "--presets", "tiny", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["preset"], r["rows"]) for r in rows] == [("tiny", 1), ("tiny", 3)]
    for r in rows:
        assert r["plain_ms"] > 0 and r["split_ms"] > 0
        assert abs(r["split_x_plain"] - r["plain_ms"] / r["split_ms"]) < 1e-9
