"""`python -m benchmarks.aggregation` runs end to end with tiny settings and writes a complete JSON report."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTESTANTS = ("ours", "ours_persisted", "naive", "flower")


def test_aggregation_benchmark_reports_every_contestant(tmp_path: Path) -> None:
    out = tmp_path / "aggregation.json"
    command = [sys.executable, "-m", "benchmarks.aggregation", "--params", "20000", "--clients", "4"]
    command += ["--repeat", "1", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "naive/x" in result.stdout and "ours_persisted" in result.stdout  # the table

    report = json.loads(out.read_text())
    expected_keys = {"benchmark", "params", "clients", "model_mib", "results", "max_abs_diff_vs_naive"}
    assert set(report) == expected_keys | {"baseline_rss_mib", "machine"}
    assert report["benchmark"] == "aggregation"
    assert (report["params"], report["clients"]) == (20000, 4)
    assert report["model_mib"] > 0 and report["baseline_rss_mib"] > 0 and report["machine"]
    assert set(report["results"]) == set(CONTESTANTS)
    for name in CONTESTANTS:
        entry = report["results"][name]
        if name == "flower" and entry == "skipped":
            continue  # flwr is not installed
        assert set(entry) == {"seconds", "peak_rss_mib"}, name
        assert entry["seconds"] > 0 and entry["peak_rss_mib"] > 0, name
    assert 0 <= report["max_abs_diff_vs_naive"] < 1e-5
