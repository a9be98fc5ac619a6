"""Uncertainty benchmark: NONE, MC dropout, SWAG and a deep ensemble, federated and queried through the real API.

`python -m benchmarks.uncertainty [--clients 5 --rounds 8 --epochs 2 --seed 0] --json out.json`

A fresh server on the embedded profile (a subprocess, its data in a temporary directory) federates the demo's
digits task (non-IID: Dirichlet(alpha) label skew, FedAvg) once per uncertainty method, all trainings at the same
time with the same participants (one `fl_client.Participant` per client, served on its push endpoint):

* NONE: the plain model, the baseline (the server returns logits; the softmax is applied here);
* MC_DROPOUT: `options.uncertainty = {N, softmax: true}`, N stochastic passes with dropout on;
* SWAG: same options; after the last update round the server opens a SWAG round, in which every participant's
  `swag` callable trains a few more epochs from the final global model, takes a snapshot of its parameters every
  few batches and at each epoch end, and uploads the mean and the mean square of the snapshots (flat over
  `model.parameters()`) with its sample size; the server aggregates them into the diagonal SWAG posterior;
* ENSEMBLE: three trainings of initial models drawn with different seeds, then a MEAN model over their final
  global models (`POST /api/models/` with `type=MEAN`).

Then `POST /api/inference/` is queried with the held-out test set (in distribution) and two out-of-distribution
sets of the same size: uniform noise in [0, 1]^64, and the test images mirrored left to right (a near-OOD set:
symmetric digits such as 0, 1 and 8 stay plausible). Per method: test accuracy, ECE (15 equal-width confidence
bins) of the predictive mean, AUROC of the predictive entropy (and of the mutual information where the method
has one) for detecting misclassified test inputs, and AUROC for separating the test set from the pooled OOD
inputs (with the noise/mirrored split in the JSON). Higher entropy / mutual information means "more likely
wrong / OOD". Needs no network beyond the loopback interface; the server subprocess is always stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fl_client.api import ApiClient
from fl_client.demo.run import free_port, start_server, torchscript
from fl_client.demo.task import DigitsNet, Split, accuracy, load_task, train_locally
from fl_client.participant import NotificationServer, Participant

METHODS = ("NONE", "MC_DROPOUT", "SWAG", "ENSEMBLE")
ENSEMBLE_MEMBERS = 3
SAMPLES = 30
ECE_BINS = 15
BATCH_SIZE = 32
PASSWORD = "bench-user-pass"


@dataclass
class TrainingRun:
    """One federated training of the benchmark."""

    label: str
    method: str
    model_id: str
    training_id: str
    started: float = field(default_factory=time.monotonic)
    seconds: float | None = None
    state: str = "I"


@dataclass
class Prediction:
    """Predictive distribution and uncertainty per input row, as obtained from the inference endpoint."""

    probabilities: np.ndarray
    entropy: np.ndarray
    mutual_info: np.ndarray | None
    samples: int
    method: str
    source: str


# participants


def flat_parameters(model: Any) -> torch.Tensor:
    """The model's parameters in `parameters()` order as one flat float64 vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()


def swag_moments(
    model: Any, data: Split, epochs: int, seed: int, every: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SGD from `model` for `epochs` epochs; first and second moments of the parameter snapshots.

    A snapshot is taken after every `every` batches and at the end of each epoch. Returns (mean of the
    snapshots, mean of their squares, number of snapshots), flat over `model.parameters()`, float32.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    total = torch.zeros_like(flat_parameters(model))
    total_squares = torch.zeros_like(total)
    count = 0
    model.train()
    for _ in range(epochs):
        batches = torch.randperm(len(data), generator=generator).split(BATCH_SIZE)
        for step, batch in enumerate(batches, start=1):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(data.x[batch]), data.y[batch]).backward()
            optimizer.step()
            if step % every == 0 or step == len(batches):
                snapshot = flat_parameters(model)
                total += snapshot
                total_squares += snapshot**2
                count += 1
    model.eval()
    return (total / count).float(), (total_squares / count).float(), count


def make_participant(server: str, token: str, data: Split, index: int, args: argparse.Namespace) -> Participant:
    """A participant that trains on its own share (like the demo's) and computes SWAG moments when asked."""

    def train(model: Any, round: int, config: dict[str, Any]) -> tuple[Any, dict[str, float], int]:
        train_locally(model, data, args.epochs, seed=1000 * round + index)
        return model, {"local_accuracy": accuracy(model, data)}, len(data)

    def test(model: Any, round: int) -> dict[str, float]:
        return {"accuracy": accuracy(model, data)}

    def swag(model: Any, round: int, config: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
        seed = 1000 * round + index + 500
        first, second, _ = swag_moments(model, data, args.swag_epochs, seed, args.swag_every, args.swag_lr)
        return first, second, len(data)

    return Participant(server, token=token, train=train, test=test, swag=swag)


# trainings


def create_training(
    api: ApiClient,
    client_ids: Sequence[str],
    label: str,
    method: str,
    init_seed: int,
    args: argparse.Namespace,
) -> TrainingRun:
    """Upload an initial model drawn with `init_seed`, create and start its training with `method`."""
    torch.manual_seed(init_seed)
    model_id = api.upload_global_model(torchscript(DigitsNet()), f"digits-{label}", label, input_shape=[None, 64])
    options: dict[str, Any] = {"seed": args.seed, "skip_model_tests": True}
    if method in ("MC_DROPOUT", "SWAG"):
        options["uncertainty"] = {"N": args.samples, "softmax": True}
    elif method == "ENSEMBLE":
        options["uncertainty"] = {"softmax": True}  # a member's own inference: one softmax pass
    training_id = api.create_training(
        model_id,
        client_ids,
        args.rounds,
        "FedAvg",
        metric_names=["accuracy"],
        uncertainty_method=method,
        options=options,
    )
    api.start_training(training_id)
    return TrainingRun(label, method, model_id, training_id)


def wait_for(api: ApiClient, runs: Sequence[TrainingRun], timeout: float) -> None:
    """Poll until every training is COMPLETED or ERROR; RuntimeError on an error or at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        pending = [run for run in runs if run.state not in ("C", "E")]
        for run in pending:
            detail = api.training(run.training_id)
            run.state = detail["state"]
            if run.state == "E":
                raise RuntimeError(f"training {run.label} failed: {detail.get('error_reason')}")
            if run.state == "C":
                run.seconds = time.monotonic() - run.started
                print(f"  {run.label:<12} completed in {run.seconds:5.1f} s", flush=True)
        if all(run.state == "C" for run in runs):
            return
        if time.monotonic() > deadline:
            states = ", ".join(f"{run.label}={run.state}" for run in runs)
            raise RuntimeError(f"the trainings did not complete within {timeout:g} s ({states})")
        time.sleep(0.25)


def create_mean_model(api: ApiClient, members: Sequence[TrainingRun]) -> str:
    """A MEAN model (ensemble) over the members' global models; returns its id."""
    body = {"type": "MEAN", "name": "digits-ensemble", "models": [run.model_id for run in members]}
    return str(api.request("POST", "models/", json=body, what="mean model creation")["model_id"])


# predictions and metrics


def infer(api: ApiClient, model_id: str, x: torch.Tensor, seed: int) -> dict[str, Any]:
    """`POST /api/inference/` with the rows of `x`."""
    body = {"model_id": model_id, "model_input": x.tolist(), "seed": seed}
    return api.request("POST", "inference/", json=body, what="inference")


def softmax(values: np.ndarray) -> np.ndarray:
    """Softmax over the last axis."""
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def is_distribution(values: np.ndarray) -> bool:
    """Whether every row is a probability distribution."""
    return bool((values >= -1e-6).all() and np.allclose(values.sum(axis=-1), 1.0, atol=1e-3))


def entropy(probabilities: np.ndarray) -> np.ndarray:
    """Shannon entropy (natural log) over the last axis."""
    p = np.clip(probabilities, 0.0, 1.0)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=-1)


def from_response(body: dict[str, Any], source: str = "server") -> Prediction:
    """The predictive distribution of an inference answer (logits get a softmax here) and its uncertainty."""
    mean = np.asarray(body["inference"], dtype=np.float64)
    measures = body["uncertainty"]
    samples = int(body["samples"])
    if "predictive_entropy" in measures:
        mutual_info = np.asarray(measures["mutual_info"], dtype=np.float64) if samples > 1 else None
        return Prediction(
            mean, np.asarray(measures["predictive_entropy"], dtype=np.float64), mutual_info, samples, body["method"],
            source,
        )  # fmt: skip
    probabilities = mean if is_distribution(mean) else softmax(mean)
    if probabilities is not mean:
        source += " (softmax of logits client-side)"
    return Prediction(probabilities, entropy(probabilities), None, samples, body["method"], source)


def from_members(bodies: Sequence[dict[str, Any]], method: str) -> Prediction:
    """An ensemble's prediction from its members' answers: mean of their distributions, entropy decomposition."""
    stacked = np.stack([from_response(body).probabilities for body in bodies])
    mean = stacked.mean(axis=0)
    predictive = entropy(mean)
    mutual_info = np.clip(predictive - entropy(stacked).mean(axis=0), 0.0, None)
    source = "members' softmax outputs via the API, averaged client-side"
    return Prediction(mean, predictive, mutual_info, len(bodies), method, source)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: confidence (max probability) in `bins` equal-width bins, |accuracy - confidence| weighted by bin size."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


def auroc(positive: np.ndarray, scores: np.ndarray | None) -> float | None:
    """AUROC of `scores` for the boolean `positive`; None without scores or when only one class occurs."""
    if scores is None or positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive.astype(int), scores))


def evaluate(prediction: Prediction, labels: np.ndarray, ood_slices: dict[str, slice]) -> dict[str, Any]:
    """The benchmark's metrics for one method; rows [0, len(labels)) are the test set, then the OOD sets."""
    n = len(labels)
    probabilities = prediction.probabilities[:n]
    wrong = probabilities.argmax(axis=1) != labels
    mutual_info = prediction.mutual_info
    ood_rows = np.concatenate([np.arange(len(prediction.entropy))[part] for part in ood_slices.values()])

    def ood_auroc(rows: np.ndarray, scores: np.ndarray | None) -> float | None:
        if scores is None:
            return None
        chosen = np.concatenate([np.arange(n), rows])
        return auroc(chosen >= n, scores[chosen])

    def per_set(part: slice) -> dict[str, float | None]:
        rows = np.arange(len(prediction.entropy))[part]
        return {"entropy": ood_auroc(rows, prediction.entropy), "mutual_info": ood_auroc(rows, mutual_info)}

    return {
        "accuracy": float((~wrong).mean()),
        "ece": expected_calibration_error(probabilities, labels),
        "auroc_error_entropy": auroc(wrong, prediction.entropy[:n]),
        "auroc_error_mutual_info": auroc(wrong, mutual_info[:n] if mutual_info is not None else None),
        "auroc_ood_entropy": ood_auroc(ood_rows, prediction.entropy),
        "auroc_ood_mutual_info": ood_auroc(ood_rows, mutual_info),
        "auroc_ood_by_set": {name: per_set(part) for name, part in ood_slices.items()},
        "samples": prediction.samples,
        "server_method": prediction.method,
        "source": prediction.source,
    }


def ood_inputs(test: Split, seed: int) -> dict[str, torch.Tensor]:
    """The OOD sets: uniform noise in [0, 1]^64 and the test images mirrored left to right."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(len(test), test.x.shape[1], generator=generator)
    mirrored = test.x.reshape(-1, 8, 8).flip(-1).reshape(len(test), -1)
    return {"noise": noise, "mirrored": mirrored}


# output


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A readable table of the results."""
    columns: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("method", lambda r: r["name"]),
        ("samples", lambda r: str(r["samples"])),
        ("accuracy", lambda r: _fmt(r["accuracy"])),
        ("ECE", lambda r: _fmt(r["ece"])),
        ("err H", lambda r: _fmt(r["auroc_error_entropy"])),
        ("err MI", lambda r: _fmt(r["auroc_error_mutual_info"])),
        ("OOD H", lambda r: _fmt(r["auroc_ood_entropy"])),
        ("OOD MI", lambda r: _fmt(r["auroc_ood_mutual_info"])),
        ("noise H", lambda r: _fmt(r["auroc_ood_by_set"]["noise"]["entropy"])),
        ("mirror H", lambda r: _fmt(r["auroc_ood_by_set"]["mirrored"]["entropy"])),
    ]
    rows = [[render({**result, "name": name}) for _, render in columns] for name, result in results.items()]
    widths = [max(len(header), *(len(row[i]) for row in rows)) for i, (header, _) in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in pairs)

    lines = [line([header for header, _ in columns]), "  ".join("-" * w for w in widths), *map(line, rows)]
    lines.append(
        "err: AUROC for misclassified test inputs; OOD: AUROC test vs. noise + mirrored test images; "
        "H: predictive entropy, MI: mutual information"
    )
    return "\n".join(lines)


# main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.uncertainty", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label skew")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="N of MC dropout and SWAG")
    parser.add_argument("--swag-epochs", type=int, default=2, help="local epochs of the SWAG round")
    parser.add_argument("--swag-every", type=int, default=2, help="SWAG snapshot every this many batches")
    parser.add_argument("--swag-lr", type=float, default=0.05, help="constant SGD learning rate of the SWAG round")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the trainings may take")
    parser.add_argument("--data-dir", type=Path, default=None, help="server data (default: a temporary directory)")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this file")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start the server, federate with every method, query the inference endpoint; the benchmark's JSON object."""
    torch.set_num_threads(1)  # many small models on few cores: no intra-op threads fighting each other
    shares, test = load_task(args.clients, args.alpha, args.seed)
    ood = ood_inputs(test, args.seed)
    queries = torch.cat([test.x, *ood.values()])
    n = len(test)
    ood_slices = {name: slice(n * (i + 1), n * (i + 2)) for i, name in enumerate(ood)}
    print(
        f"digits: {sum(map(len, shares))} training samples over {args.clients} clients (Dirichlet {args.alpha}), "
        f"{n} test samples; OOD: {n} uniform-noise inputs, {n} mirrored test images"
    )

    temporary = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="fl-bench-uncertainty-")) if temporary else args.data_dir
    if not temporary:
        shutil.rmtree(data_dir, ignore_errors=True)
        data_dir.mkdir(parents=True)
    started = time.monotonic()
    port = free_port()
    try:
        server_process = start_server(data_dir, port)
    except BaseException:
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    server = f"http://127.0.0.1:{port}"
    receivers: list[NotificationServer] = []
    try:
        anonymous = ApiClient(server)
        actor = anonymous.register("bench-actor", PASSWORD, actor=True)
        api = ApiClient.from_token(actor["token"], server)
        client_ids = []
        for index, share in enumerate(shares):
            port = free_port()
            user = anonymous.register(
                f"bench-client-{index}", PASSWORD, client=True, message_endpoint=f"http://127.0.0.1:{port}/"
            )
            participant = make_participant(server, user["token"], share, index, args)
            receivers.append(participant.serve("127.0.0.1", port, stop_after_finished=False))
            client_ids.append(user["id"])

        print(
            f"\nfederating: FedAvg, {args.rounds} rounds x {args.epochs} local epochs, {args.clients} clients; "
            f"NONE, MC_DROPOUT, SWAG and {ENSEMBLE_MEMBERS} ensemble members at once"
        )
        setup_seconds = time.monotonic() - started
        runs = {method: create_training(api, client_ids, method, method, args.seed, args) for method in METHODS[:3]}
        members = [
            create_training(api, client_ids, f"ENSEMBLE-{k}", "ENSEMBLE", args.seed + k, args)
            for k in range(ENSEMBLE_MEMBERS)
        ]
        wait_for(api, [*runs.values(), *members], args.timeout)
        training_seconds = time.monotonic() - started - setup_seconds

        print("\nquerying POST /api/inference/ ...", flush=True)
        predictions: dict[str, Prediction] = {}
        for method, training in runs.items():
            predictions[method] = from_response(infer(api, training.model_id, queries, args.seed))
        mean_model_id = create_mean_model(api, members)
        mean_answer = infer(api, mean_model_id, queries, args.seed)
        mean_model_softmax = "predictive_entropy" in mean_answer["uncertainty"]
        if mean_model_softmax:
            predictions["ENSEMBLE"] = from_response(mean_answer, "server (MEAN model)")
        else:  # the MEAN model averages logits: average the members' softmax outputs instead
            member_answers = [infer(api, member.model_id, queries, args.seed) for member in members]
            predictions["ENSEMBLE"] = from_members(member_answers, mean_answer["method"])
    except BaseException:
        log = data_dir / "server.log"
        tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
        print("server log (last lines):\n  " + "\n  ".join(tail), file=sys.stderr)
        raise
    finally:
        for receiver in receivers:
            receiver.shutdown()
        server_process.terminate()
        try:
            server_process.wait(timeout=30)
        except Exception:
            server_process.kill()
            server_process.wait(timeout=30)
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)

    labels = test.y.numpy()
    results = {method: evaluate(predictions[method], labels, ood_slices) for method in METHODS}
    mean_model_output = np.asarray(mean_answer["inference"], dtype=np.float64)[:n]
    results["ENSEMBLE"]["mean_model"] = {
        "model_id": mean_model_id,
        "method": mean_answer["method"],
        "samples": mean_answer["samples"],
        "softmax": mean_model_softmax,
        "accuracy": float((mean_model_output.argmax(axis=1) == labels).mean()),
    }
    return {
        "benchmark": "uncertainty",
        "clients": args.clients,
        "rounds": args.rounds,
        "seed": args.seed,
        "epochs": args.epochs,
        "alpha": args.alpha,
        "samples": args.samples,
        "ensemble_members": ENSEMBLE_MEMBERS,
        "swag": {"epochs": args.swag_epochs, "snapshot_every_batches": args.swag_every, "lr": args.swag_lr},
        "test_size": n,
        "ood": {"noise": "uniform noise in [0, 1]^64", "mirrored": "held-out test images flipped left to right"},
        "ece_bins": ECE_BINS,
        "setup_seconds": round(setup_seconds, 2),
        "training_seconds": round(training_seconds, 2),
        "training_seconds_by_run": {run.label: round(run.seconds or 0.0, 2) for run in [*runs.values(), *members]},
        "seconds": round(time.monotonic() - started, 2),
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = parse_args(argv)
    try:
        report = run(args)
    except Exception as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print()
    print(format_table(report["results"]))
    print(
        f"\nwall time {report['seconds']:.1f} s: server start and registration {report['setup_seconds']:.1f} s, "
        f"federated trainings {report['training_seconds']:.1f} s"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
