"""Round latency: from the last upload of a round to the next round's start reaching the clients.

`python -m benchmarks.round_latency --params 10000000 --clients 10 --json out.json`

Starts the server (the embedded profile; the production profile, gunicorn + Celery workers + beat, when
`--database-url` and `--broker-url` are given), creates a FedAvg training without model-test rounds, and runs
N simulated clients over real HTTP: on `UPDATE_ROUND_START` each downloads the global model (safetensors) and
uploads its update (a float32 safetensors file of P parameters). Per round, the close latency is the time from
the last upload's 201 response to the moment the last client received the next round's `UPDATE_ROUND_START`
(or `TRAINING_FINISHED` after the last round): the server validates nothing more then, it aggregates, stores
the new global weights, opens the next round and pushes the notifications. (A notification can reach a client
before the uploading client has finished reading its 201; such a round counts 0.) Upload throughput is the uploaded
MiB of a round over the time from its first upload request to its last 201, averaged over the rounds. The
server's own aggregation time per round (from the rounds API) shows how much of the latency is aggregation.

`--compare-embedded` (with the production options) runs the embedded profile too, in the same run, and
reports both side by side. The final global weights are checked against the expected weighted mean.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks import live
from benchmarks.aggregation import machine_description
from benchmarks.live import MIB, Outcome, run_profiles

TARGET_SECONDS = 0.5


def measure(outcome: Outcome, rounds: int) -> dict[str, Any]:
    """Close latencies and upload throughput of one training."""
    fleet = outcome.fleet
    latencies, throughputs = [], []
    for number in range(rounds):
        uploads = [r for r in fleet.requests if r.what == f"upload:{number}"]
        if not uploads:
            raise RuntimeError(f"no upload for round {number}")
        last_201 = max(r.ended for r in uploads)
        follows = [
            a.at
            for a in fleet.arrivals
            if (a.kind == "UPDATE_ROUND_START" and a.body["round"] == number + 1)
            or (number == rounds - 1 and a.kind == "TRAINING_FINISHED")
        ]
        if not follows:
            raise RuntimeError(f"nothing followed round {number}")
        latencies.append(max(0.0, max(follows) - last_201))
        phase = last_201 - min(r.started for r in uploads)
        throughputs.append(sum(r.sent_bytes for r in uploads) / MIB / phase)
    aggregation = [r["aggregation_seconds"] for r in outcome.rounds if r.get("aggregation_seconds") is not None]
    return {
        "aggregation_s": {"median": round(statistics.median(aggregation), 3), "max": round(max(aggregation), 3)},
        "close_latency_s": {
            "median": round(statistics.median(latencies), 3),
            "max": round(max(latencies), 3),
            "per_round": [round(x, 3) for x in latencies],
        },
        "upload_mib_per_s": round(statistics.mean(throughputs), 1),
        "training_seconds": round(outcome.seconds, 2),
        "server_peak_rss_mib": outcome.server_peak_mib,
        "max_abs_diff_vs_expected": outcome.max_abs_diff_vs_expected,
        "connection_retries": outcome.fleet.connection_retries,
        "errors": len(outcome.errors),
        "error_samples": outcome.errors[:20],
        "profile": outcome.description,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the training on each profile asked for; the JSON report (the first profile's numbers on top)."""
    results = run_profiles(args, {"skip_model_tests": True}, lambda outcome: measure(outcome, args.rounds))
    first = next(iter(results.values()))
    return {
        "benchmark": "round_latency",
        "params": args.params,
        "clients": args.clients,
        "rounds": args.rounds,
        "close_latency_s": {k: first["close_latency_s"][k] for k in ("median", "max")},
        "upload_mib_per_s": first["upload_mib_per_s"],
        "results": results,
        "target_median_s": TARGET_SECONDS,
        "errors": sum(r["errors"] for r in results.values()),
        "machine": machine_description(),
    }


def print_table(report: dict[str, Any]) -> None:
    """The readable summary."""
    print(
        f"\nround latency: {report['params']:,} parameters, {report['clients']} clients, {report['rounds']} rounds "
        f"({report['machine']})"
    )
    print(
        f"{'profile':<12}{'median s':>10}{'max s':>10}{'aggregation s':>15}{'upload MiB/s':>14}{'server MiB':>12}"
        f"{'errors':>8}"
    )
    for name, r in report["results"].items():
        latency = r["close_latency_s"]
        print(
            f"{name:<12}{latency['median']:>10.3f}{latency['max']:>10.3f}{r['aggregation_s']['median']:>15.3f}"
            f"{r['upload_mib_per_s']:>14.1f}"
            f"{r['server_peak_rss_mib']:>12.1f}{r['errors']:>8}"
        )
    print(f"target: median close latency under {report['target_median_s']} s")
    for name, r in report["results"].items():
        for line in r["error_samples"]:
            print(f"  {name} error: {line}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; exit status 1 if the benchmark failed or saw errors."""
    parser = live.parser_for("round_latency", __doc__ or "", clients=10, params=10_000_000)
    return live.main(argv, parser, run, print_table)


if __name__ == "__main__":
    sys.exit(main())
