"""Start the server (embedded profile), register an actor and participants, train, compare, plot.

Each participant holds a label-skewed share of the digits; every one of them also trains a
local-only model on its own share for the same number of epochs. The federated model is
evaluated on a held-out test set after every round.
"""

import argparse
import copy
import io
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import torch
from safetensors.torch import load as load_safetensors

from fl_client.api import ApiClient
from fl_client.demo.task import DigitsNet, Split, accuracy, class_counts, load_task, train_locally
from fl_client.participant import Participant

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    """The FL server on the embedded profile, in its own data directory."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "fl_server.settings.embedded", "FL_DATA_DIR": str(data_dir)}
    env.pop("DATABASE_URL", None)
    env.pop("CELERY_BROKER_URL", None)
    manage = [sys.executable, str(REPO / "manage.py")]
    subprocess.run([*manage, "migrate", "--noinput"], env=env, check=True, capture_output=True)
    log = (data_dir / "server.log").open("wb")
    server = subprocess.Popen(
        [*manage, "runserver", f"127.0.0.1:{port}", "--noreload"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/api/schema/", timeout=2).status_code == 200:
                return server
        except requests.ConnectionError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError(f"the server did not start; see {data_dir / 'server.log'}")


def torchscript(model: torch.nn.Module) -> bytes:
    """The model as a TorchScript archive."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buffer)
    return buffer.getvalue()


def make_participant(server: str, token: str, data: Split, epochs: int, index: int) -> Participant:
    """A participant that trains on its own share and reports its test metrics."""

    def train(model: torch.nn.Module, round: int, config: dict[str, Any]) -> tuple[Any, dict[str, float], int]:
        train_locally(model, data, epochs, seed=1000 * round + index, proximal_mu=config.get("proximal_mu", 0.0))
        return model, {"local_accuracy": accuracy(model, data)}, len(data)

    def test(model: torch.nn.Module, round: int) -> dict[str, float]:
        return {"accuracy": accuracy(model, data)}

    return Participant(server, token=token, train=train, test=test)


def global_accuracy(api: ApiClient, model_id: str, round_number: int, test: Split) -> float:
    """Accuracy of the global weights after `round_number` rounds on the held-out test set."""
    response = requests.get(
        api.url(f"models/{model_id}/"),
        params={"round": round_number, "format": "safetensors"},
        headers={"Authorization": api.http_authorization},
        timeout=60,
    )
    response.raise_for_status()
    model = DigitsNet()
    model.load_state_dict(load_safetensors(response.content))
    return accuracy(model, test)


def save_plot(path: Path, history: list[float], local: list[float]) -> None:
    """Accuracy per round of the federated model against every local-only model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.plot(range(len(history)), history, marker="o", linewidth=2, label="federated (global model)")
    for index, value in enumerate(local):
        axes.axhline(value, linestyle="--", linewidth=1, color=f"C{index + 1}", label=f"client {index} local only")
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy")
    axes.set_ylim(0, 1)
    axes.set_title("Federated learning on digits (non-IID, 5 clients)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fl_client.demo", description=__doc__)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet concentration of the label skew")
    parser.add_argument("--method", default="FedAvg", choices=["FedAvg", "FedProx", "FedDC"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "var" / "demo", help="where the plot and server data go")
    parser.add_argument("--timeout", type=float, default=600, help="seconds the training may take")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    shares, test = load_task(args.clients, args.alpha, args.seed)
    print(f"digits: {sum(map(len, shares))} training samples over {args.clients} clients, {len(test)} test samples")
    for index, share in enumerate(shares):
        print(f"  client {index}: {len(share):4d} samples, per class {class_counts(share)}")

    data_dir = args.out / "server"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir(parents=True)
    port = free_port()
    server_process = start_server(data_dir, port)
    server = f"http://127.0.0.1:{port}"
    receivers = []
    try:
        anonymous = ApiClient(server)
        actor = anonymous.register("demo-actor", "demo-actor-pass", actor=True)
        api = ApiClient.from_token(actor["token"], server)
        clients = []
        for index, share in enumerate(shares):
            endpoint_port = free_port()
            user = anonymous.register(
                f"demo-client-{index}",
                "demo-client-pass",
                client=True,
                message_endpoint=f"http://127.0.0.1:{endpoint_port}/",
            )
            participant = make_participant(server, user["token"], share, args.epochs, index)
            receivers.append(participant.serve("127.0.0.1", endpoint_port))
            clients.append(user)
        initial = DigitsNet()
        model_id = api.upload_global_model(torchscript(initial), "digits-mlp", "demo", input_shape=[None, 64])
        options: dict[str, Any] = {"seed": args.seed, "model_test_after_each_round": True}
        if args.method == "FedProx":
            options["proximal_mu"] = 0.01
        if args.method == "FedDC":
            options["daisy_chain_period"] = 2
        training_id = api.create_training(
            model_id, [user["id"] for user in clients], args.rounds, args.method, metric_names=["accuracy"],
            options=options,
        )  # fmt: skip
        api.start_training(training_id)
        print(f"\ntraining {training_id}: {args.method}, {args.rounds} rounds, {args.epochs} local epochs per round")
        history = [global_accuracy(api, model_id, 0, test)]
        print(f"  round  0: global test accuracy {history[0]:.3f} (initial model)")
        deadline = time.monotonic() + args.timeout
        state = "O"
        while time.monotonic() < deadline:
            detail = api.training(training_id)
            state, done = detail["state"], detail["round"]
            while len(history) <= done:
                history.append(global_accuracy(api, model_id, len(history), test))
                print(f"  round {len(history) - 1:2d}: global test accuracy {history[-1]:.3f}")
            if state in ("C", "E"):
                break
            time.sleep(0.2)
        if state != "C":
            print(f"training did not complete: state {state} {api.training(training_id).get('error_reason', '')}")
            return 1
    finally:
        for receiver in receivers:
            receiver.shutdown()
        server_process.terminate()
        server_process.wait(timeout=30)

    print("\nlocal-only baselines (each client trains alone for the same number of epochs):")
    local = []
    for index, share in enumerate(shares):
        torch.manual_seed(args.seed)
        model = train_locally(copy.deepcopy(initial), share, args.rounds * args.epochs, seed=index)
        local.append(accuracy(model, test))
        print(f"  client {index}: test accuracy {local[-1]:.3f}")
    plot = args.out / "accuracy.png"
    save_plot(plot, history, local)
    final, best_local = history[-1], max(local)
    print(f"\nfinal federated accuracy {final:.3f}; best local-only {best_local:.3f}; plot saved to {plot}")
    return 0
