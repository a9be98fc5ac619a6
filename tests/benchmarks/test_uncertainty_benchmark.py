"""`python -m benchmarks.uncertainty` runs end to end with tiny settings and writes a complete JSON report."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("NONE", "MC_DROPOUT", "SWAG", "ENSEMBLE")
METRICS = (
    "accuracy",
    "ece",
    "auroc_error_entropy",
    "auroc_error_mutual_info",
    "auroc_ood_entropy",
    "auroc_ood_mutual_info",
)


def test_uncertainty_benchmark_reports_every_method(tmp_path):
    out = tmp_path / "uncertainty.json"
    command = [sys.executable, "-m", "benchmarks.uncertainty", "--clients", "3", "--rounds", "2", "--epochs", "1"]
    command += ["--samples", "10", "--swag-epochs", "1", "--seed", "1", "--json", str(out)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=85)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ENSEMBLE" in result.stdout and "accuracy" in result.stdout  # the table

    report = json.loads(out.read_text())
    assert report["benchmark"] == "uncertainty"
    assert (report["clients"], report["rounds"], report["seed"]) == (3, 2, 1)
    results = report["results"]
    assert set(results) == set(METHODS)
    for method in METHODS:
        values = results[method]
        assert set(METRICS) <= set(values), method
        assert 0.5 < values["accuracy"] <= 1.0, (method, values["accuracy"])  # it learned (10 classes)
        assert 0.0 <= values["ece"] <= 1.0
        for key in ("auroc_error_entropy", "auroc_ood_entropy"):
            assert 0.0 <= values[key] <= 1.0, (method, key, values[key])
        for key in ("auroc_error_mutual_info", "auroc_ood_mutual_info"):
            if method == "NONE":
                assert values[key] is None  # a single deterministic pass has no mutual information
            else:
                assert 0.0 <= values[key] <= 1.0, (method, key, values[key])

    # the sampling methods really sampled: N passes, N weight samples, every ensemble member
    assert results["NONE"]["samples"] == 1
    assert results["MC_DROPOUT"]["samples"] == 10 and results["MC_DROPOUT"]["server_method"] == "MC_DROPOUT"
    assert results["SWAG"]["samples"] == 10 and results["SWAG"]["server_method"] == "SWAG"
    assert results["ENSEMBLE"]["samples"] == 3 and results["ENSEMBLE"]["server_method"] == "ENSEMBLE"
    mean_model = results["ENSEMBLE"]["mean_model"]
    assert mean_model["method"] == "ENSEMBLE" and mean_model["samples"] == 3
