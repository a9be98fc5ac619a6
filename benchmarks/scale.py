"""Scale: many lightweight clients through whole trainings over real HTTP; every round must complete, 0 errors.

`python -m benchmarks.scale --clients 200 --rounds 3 --json out.json`

Starts the server (the embedded profile; the production profile, gunicorn + Celery workers + beat, when
`--database-url` and `--broker-url` are given), registers the clients (each with its own push endpoint), and runs
a FedAvg training of `--rounds` update rounds with the default model-test rounds in between. Clients react to
their notifications on a pool of `--threads` threads: download the global model and upload an update, or post a
test metric. Reported: wall time per round (from the round's start notification first reaching a client to the
next round's, or TRAINING_FINISHED), client requests per second over the whole training, the notifications
received, the server's peak memory (PSS summed over its processes), and every error (must be 0: any response
other than the expected status, a bad signature, a training not ending COMPLETED or wrong final weights).
A request whose connection is refused or reset is sent again, as real clients do, up to 3 times; such
retries are counted and reported separately.

`--compare-embedded` (with the production options) runs the embedded profile too, in the same run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import live
from benchmarks.aggregation import machine_description
from benchmarks.live import Outcome, round_starts, run_profiles

LABELS = {"UPDATE_ROUND_START": "update", "MODEL_TEST_ROUND": "test", "SWAG_ROUND_START": "swag"}


def measure(outcome: Outcome) -> dict[str, Any]:
    """Per-round wall times, request rate, memory and errors of one training."""
    fleet = outcome.fleet
    starts = round_starts(fleet.arrivals)
    finished = min(a.at for a in fleet.arrivals if a.kind == "TRAINING_FINISHED")
    ends = [first for _, _, first, _ in starts[1:]] + [finished]
    rounds = [
        {"kind": kind, "round": number, "seconds": round(end - first, 3)}
        for (kind, number, first, _), end in zip(starts, ends, strict=True)
    ]
    during = [r for r in fleet.requests if r.started >= outcome.started]
    errors = outcome.errors
    return {
        "rounds": rounds,
        "training_seconds": round(outcome.seconds, 2),
        "requests": len(during),
        "requests_per_s": round(len(during) / outcome.seconds, 1),
        "notifications": outcome.notifications,
        "server_peak_rss_mib": outcome.server_peak_mib,
        "max_abs_diff_vs_expected": outcome.max_abs_diff_vs_expected,
        "connection_retries": outcome.fleet.connection_retries,
        "errors": len(errors),
        "error_samples": errors[:20],
        "profile": outcome.description,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training on each profile asked for; the JSON report (the first profile's numbers on top)."""
    results = run_profiles(args, {}, measure)
    first = next(iter(results.values()))
    return {
        "benchmark": "scale",
        "clients": args.clients,
        "rounds": args.rounds,
        "params": args.params,
        "round_seconds": [r["seconds"] for r in first["rounds"]],
        "requests_per_s": first["requests_per_s"],
        "server_peak_rss_mib": first["server_peak_rss_mib"],
        "errors": sum(r["errors"] for r in results.values()),
        "results": results,
        "machine": machine_description(),
    }


def print_table(report: dict[str, Any]) -> None:
    """The readable summary."""
    print(
        f"\nscale: {report['clients']} clients, {report['rounds']} update rounds (+ model-test rounds), "
        f"{report['params']:,} parameters ({report['machine']})"
    )
    for name, r in report["results"].items():
        print(f"\n{name}: {r['profile']}")
        print(
            "  "
            + "  ".join(f"{x['kind'].split('_')[0].lower()} {x['round']}: {x['seconds']:.2f} s" for x in r["rounds"])
        )
        print(
            f"  training {r['training_seconds']:.1f} s, {r['requests']} requests ({r['requests_per_s']:.1f}/s), "
            f"{r['notifications']} notifications, server peak {r['server_peak_rss_mib']:.0f} MiB, "
            f"errors {r['errors']}, connections retried {r['connection_retries']}"
        )
        for line in r["error_samples"]:
            print(f"  error: {line}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 1 if the benchmark failed or saw errors."""
    return live.main(argv, live.parser_for("scale", __doc__ or "", clients=200, params=4000), run, print_table)


if __name__ == "__main__":
    sys.exit(main())
