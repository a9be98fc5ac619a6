"""The live-server benchmarks run end to end with tiny settings and write complete JSON reports.

On SQLite (the default `make test`) they run the embedded profile; when DATABASE_URL names PostgreSQL they
run the production profile (gunicorn, two Celery workers and beat on Redis) on a throwaway database (the
scale benchmark side by side with the embedded profile, as the README's load run does).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("FL_IT_REDIS_URL", "redis://127.0.0.1:6379") + "/7"

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def production_options() -> Iterator[list[str]]:
    """`--database-url`/`--broker-url` of a throwaway PostgreSQL database, or [] on SQLite."""
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        yield []
        return
    import psycopg2

    name = f"fl_bench_test_{secrets.token_hex(4)}"
    parts = urllib.parse.urlsplit(url)
    admin = psycopg2.connect(
        host=parts.hostname, port=parts.port or 5432, user=parts.username, password=parts.password, dbname="postgres"
    )
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield ["--database-url", parts._replace(path=f"/{name}").geturl(), "--broker-url", REDIS_URL]
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def run_benchmark(name: str, options: list[str], out: Path) -> tuple[dict, str]:
    """Run `python -m benchmarks.<name>`; its JSON report and stdout (asserting exit status 0)."""
    command = [sys.executable, "-m", f"benchmarks.{name}", *options, "--json", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DJANGO_"))}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return json.loads(out.read_text()), result.stdout


def expected_profiles(production_options: list[str]) -> list[str]:
    return ["production", "embedded"] if production_options else ["embedded"]


def test_round_latency_benchmark(tmp_path: Path, production_options: list[str]) -> None:
    options = ["--params", "40000", "--clients", "3", "--rounds", "2", "--web-workers", "2", *production_options]
    report, stdout = run_benchmark("round_latency", options, tmp_path / "latency.json")
    assert "median s" in stdout  # the table

    required = {"benchmark", "params", "clients", "rounds", "close_latency_s", "upload_mib_per_s"}
    assert required <= set(report)
    assert (report["benchmark"], report["params"], report["clients"], report["rounds"]) == (
        "round_latency",
        40000,
        3,
        2,
    )
    assert list(report["results"]) == expected_profiles(production_options)[:1]
    assert report["errors"] == 0
    for result in report["results"].values():
        latency = result["close_latency_s"]
        assert len(latency["per_round"]) == 2 and all(x >= 0 for x in latency["per_round"])
        assert 0 <= latency["median"] <= latency["max"] == max(latency["per_round"])
        assert 0 < result["aggregation_s"]["median"] <= result["aggregation_s"]["max"]
        assert result["upload_mib_per_s"] > 0 and result["server_peak_rss_mib"] > 0
        assert result["max_abs_diff_vs_expected"] < 1e-5 and result["errors"] == 0
    first = next(iter(report["results"].values()))
    assert report["close_latency_s"] == {k: first["close_latency_s"][k] for k in ("median", "max")}


def test_scale_benchmark(tmp_path: Path, production_options: list[str]) -> None:
    options = ["--clients", "6", "--rounds", "2", "--threads", "4", "--web-workers", "2", *production_options]
    if production_options:
        options.append("--compare-embedded")
    report, stdout = run_benchmark("scale", options, tmp_path / "scale.json")
    assert "requests" in stdout

    assert report["benchmark"] == "scale" and (report["clients"], report["rounds"]) == (6, 2)
    assert list(report["results"]) == expected_profiles(production_options)
    assert report["errors"] == 0
    for result in report["results"].values():
        # update 0, test 1, update 1, test 2: every round completed, in order
        assert [(r["kind"], r["round"]) for r in result["rounds"]] == [
            ("UPDATE_ROUND_START", 0),
            ("MODEL_TEST_ROUND", 1),
            ("UPDATE_ROUND_START", 1),
            ("MODEL_TEST_ROUND", 2),
        ]
        assert all(r["seconds"] > 0 for r in result["rounds"])
        # per client: 2 x (download + upload) + 2 metrics; per client 2 + 2 round starts + TRAINING_START/FINISHED
        assert result["requests"] == 6 * 6
        assert result["notifications"] == 6 * 6
        assert result["requests_per_s"] > 0 and result["server_peak_rss_mib"] > 0 and result["errors"] == 0
    assert report["round_seconds"] == [r["seconds"] for r in next(iter(report["results"].values()))["rounds"]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--database-url", "postgres://x/y"], "--database-url and --broker-url go together"),
        (["--broker-url", "redis://x"], "--database-url and --broker-url go together"),
        (["--compare-embedded"], "--compare-embedded needs the production options"),
        (["--clients", "0"], "--clients and --rounds must be at least 1"),
    ],
)
@pytest.mark.parametrize("name", ["scale", "round_latency"])
def test_bad_options_are_usage_errors(name: str, options: list[str], message: str) -> None:
    command = [sys.executable, "-m", f"benchmarks.{name}", *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr
