"""benchmarks/polar.py: every way to compute U Vᵀ is timed and checked against the SVD on the shapes asked for."""

from __future__ import annotations

import json

from benchmarks import polar


def test_each_method_is_timed_and_agrees_with_the_svd(tmp_path, capsys):
    output = tmp_path / "polar.json"
    polar.main(["--device", "cpu", "--repeats", "1", "--shapes", "64x200,96x96", "--output", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert [row["shape"] for row in rows] == [[64, 200], [96, 96]]
    for row in rows:
        for method in ("svd", "gram", "newton_schulz"):
            assert row[method]["seconds"] > 0 and row[method]["max_difference"] < 1e-4, (row["shape"], method)
    table = capsys.readouterr().out
    assert "| 64×200 |" in table and table.rstrip().endswith("svd |")  # a square matrix takes the SVD on a CPU
