"""`Participant` end to end: push and pull, FedAvg, FedProx, FedDC, signatures, external scripts."""

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
import torch

from fl_client import Participant, ServerRequestException, sign
from fl_server_core.models import User
from tests.client.conftest import (
    SECRET,
    TRAINING_TIMEOUT,
    api_for,
    comm_for,
    new_training,
    parameters_of,
    shift_parameters,
    token_of,
    wait_finished,
)
from tests.helpers import tiny_net

REPO = Path(__file__).resolve().parents[2]


class Recorder:
    """The user's code: shifts the parameters by `delta`, reports `samples`, records every call."""

    def __init__(self, delta: float, samples: int) -> None:
        self.delta = delta
        self.samples = samples
        self.trained: list[tuple[int, dict]] = []
        self.tested: list[int] = []

    def train(self, model: Any, round_number: int, config: dict) -> tuple[Any, dict, int]:
        self.trained.append((round_number, dict(config)))
        return shift_parameters(model, self.delta), {"loss": 1.0 / (round_number + 1)}, self.samples

    def test(self, model: Any, round_number: int) -> dict:
        assert isinstance(model, torch.jit.ScriptModule)
        self.tested.append(round_number)
        return {"accuracy": 0.5 + round_number / 10}


def pulling(participant: Participant, training_id: str, cleanup: list) -> dict:
    """Run `participant.pull` on a thread; the returned dict gets its result or error."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["last_seq"] = participant.pull(training_id, wait=2, timeout=TRAINING_TIMEOUT)
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    cleanup.append(lambda: thread.join(TRAINING_TIMEOUT + 5))
    outcome["thread"] = thread
    return outcome


def expected_parameters(deltas: list[float], samples: list[int], rounds: int) -> dict[str, torch.Tensor]:
    """FedAvg of parameter shifts: the initial parameters plus `rounds` sample-weighted mean shifts."""
    mean_shift = sum(d * n for d, n in zip(deltas, samples, strict=True)) / sum(samples)
    return {name: p + rounds * mean_shift for name, p in parameters_of(tiny_net()).items()}


def assert_global_parameters(server_url: str, actor: User, training_id: str, model_id: str, expected: dict) -> None:
    final = comm_for(server_url, actor, training_id, 0, model_id).download_model()
    for name, tensor in parameters_of(final).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.django_db(transaction=True)
def test_push_fedavg_two_rounds_with_signed_notifications(server_url, actor, make_user, cleanup):
    clients = [make_user(f"push{i}", client=True) for i in range(2)]
    recorders = [Recorder(0.1, 10), Recorder(0.2, 20)]
    servers = []
    for user, recorder in zip(clients, recorders, strict=True):
        participant = Participant(server_url, token=token_of(user), train=recorder.train, test=recorder.test)
        server = participant.serve("127.0.0.1", 0, secret=SECRET)
        cleanup.append(server.shutdown)
        User.objects.filter(pk=user.pk).update(message_endpoint=server.url)
        servers.append(server)
    training_id, model_id = new_training(server_url, actor, clients, rounds=2, start=True)

    for server in servers:
        assert server.wait(TRAINING_TIMEOUT), api_for(server_url, actor).training(training_id)
    training = wait_finished(server_url, actor, training_id)
    assert training["state"] == "C", training
    assert sorted(training["participants"]) == sorted(str(c.pk) for c in clients)  # nobody declined
    for recorder in recorders:
        assert [r for r, _ in recorder.trained] == [0, 1]
        assert recorder.tested == [1, 2]
    assert_global_parameters(server_url, actor, training_id, model_id, expected_parameters([0.1, 0.2], [10, 20], 2))
    for server in servers:  # stopped by itself after TRAINING_FINISHED
        with pytest.raises(requests.ConnectionError):
            requests.get(server.url, timeout=2)


@pytest.mark.django_db(transaction=True)
def test_pull_fedavg_two_rounds(server_url, actor, make_user, cleanup):
    clients = [make_user(f"pull{i}", client=True) for i in range(2)]
    recorders = [Recorder(0.3, 5), Recorder(-0.1, 15)]
    training_id, model_id = new_training(server_url, actor, clients, rounds=2)
    outcomes = [
        pulling(Participant(server_url, token=token_of(u), train=r.train, test=r.test), training_id, cleanup)
        for u, r in zip(clients, recorders, strict=True)
    ]
    api_for(server_url, actor).start_training(training_id)

    training = wait_finished(server_url, actor, training_id)
    for outcome in outcomes:
        outcome["thread"].join(TRAINING_TIMEOUT)
        assert "error" not in outcome, outcome
        assert outcome["last_seq"] > 0
    assert training["state"] == "C", training
    for recorder in recorders:
        assert [r for r, _ in recorder.trained] == [0, 1]
        assert recorder.tested == [1, 2]
    assert_global_parameters(server_url, actor, training_id, model_id, expected_parameters([0.3, -0.1], [5, 15], 2))


@pytest.mark.django_db(transaction=True)
def test_fedprox_passes_proximal_mu_to_train(server_url, actor, make_user, cleanup):
    clients = [make_user(f"prox{i}", client=True) for i in range(2)]
    recorders = [Recorder(0.1, 10), Recorder(0.1, 10)]
    options = {"proximal_mu": 0.05, "skip_model_tests": True}
    training_id, _ = new_training(server_url, actor, clients, rounds=2, method="FedProx", options=options, start=True)
    outcomes = [
        pulling(Participant(server_url, token=token_of(u), train=r.train), training_id, cleanup)
        for u, r in zip(clients, recorders, strict=True)
    ]
    assert wait_finished(server_url, actor, training_id)["state"] == "C"
    for outcome, recorder in zip(outcomes, recorders, strict=True):
        outcome["thread"].join(TRAINING_TIMEOUT)
        assert "error" not in outcome, outcome
        assert recorder.trained == [(0, {"proximal_mu": 0.05}), (1, {"proximal_mu": 0.05})]


class ChainRecorder(Participant):
    """Records which model each update round continued from."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.models: list[tuple[int, str]] = []

    def start_training(self, training_id: str, round: int, model_id: str, config: Any = None) -> None:
        self.models.append((round, model_id))
        super().start_training(training_id, round, model_id, config)


@pytest.mark.django_db(transaction=True)
def test_feddc_daisy_chaining_completes(server_url, actor, make_user, cleanup):
    clients = [make_user(f"chain{i}", client=True) for i in range(2)]
    recorders = [Recorder(0.1, 10), Recorder(0.2, 10)]
    options = {"daisy_chain_period": 2, "skip_model_tests": True}
    training_id, model_id = new_training(server_url, actor, clients, rounds=2, method="FedDC", options=options)
    participants = [
        ChainRecorder(server_url, token=token_of(u), train=r.train) for u, r in zip(clients, recorders, strict=True)
    ]
    servers = []
    for user, participant in zip(clients, participants, strict=True):
        server = participant.serve("127.0.0.1", 0, secret=SECRET)
        cleanup.append(server.shutdown)
        User.objects.filter(pk=user.pk).update(message_endpoint=server.url)
        servers.append(server)
    api_for(server_url, actor).start_training(training_id)

    for server in servers:
        assert server.wait(TRAINING_TIMEOUT), api_for(server_url, actor).training(training_id)
    assert wait_finished(server_url, actor, training_id)["state"] == "C"
    models = {m["id"]: m for m in api_for(server_url, actor).request("GET", f"trainings/{training_id}/models/")}
    for user, participant in zip(clients, participants, strict=True):
        assert [r for r, _ in participant.models] == [0, 1, 2, 3]  # 2 aggregations x daisy_chain_period 2
        for round_number, continued in participant.models:
            if round_number % 2 == 0:  # right after an aggregation: the global model
                assert continued == model_id
            else:  # in between: another client's local model of the previous round
                local = models[continued]
                assert (local["type"], local["round"]) == ("LOCAL", round_number - 1)
                assert local["owner"] != str(user.pk)


def post(url: str, raw: bytes, signature: str | None = None, event_id: str | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["X-FL-Signature"] = signature
    if event_id is not None:
        headers["X-FL-Event-Id"] = event_id
    return requests.post(url, data=raw, headers=headers, timeout=5).status_code


class InitRecorder(Participant):
    """Records `init_training` calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started: list[str] = []

    def init_training(self, training_id: str, model_id: str) -> None:
        self.started.append(training_id)


def test_serve_verifies_signatures_and_ignores_duplicates(cleanup):
    participant = InitRecorder("http://127.0.0.1:9", token="t" * 40, train=Recorder(0.1, 1).train)
    server = participant.serve("127.0.0.1", 0, secret=SECRET)
    cleanup.append(server.shutdown)

    def raw(ntype: str, body: dict) -> bytes:
        return json.dumps({"notification_type": ntype, "training_uuid": "t-1", "body": body}).encode()

    start = raw("TRAINING_START", {"global_model_uuid": "m-1"})
    assert post(server.url, start) == 401  # unsigned
    assert post(server.url, start, sign(start, "forged-secret")) == 401
    assert post(server.url, start, "sha256=" + "0" * 64) == 401
    tampered = start.replace(b"m-1", b"m-2")
    assert post(server.url, tampered, sign(start, SECRET)) == 401
    assert participant.started == []

    assert post(server.url, start, sign(start, SECRET), event_id="17") == 200
    assert post(server.url, start, sign(start, SECRET), event_id="17") == 200  # a redelivery
    swag = raw("SWAG_ROUND_START", {"round": 3, "global_model_uuid": "m-1"})
    assert post(server.url, swag, sign(swag, SECRET), event_id="18") == 400  # no SWAG code: declined
    removed = raw("CLIENT_REMOVED", {"reason": "x"})
    assert post(server.url, removed, sign(removed, SECRET), event_id="19") == 200
    assert post(server.url, b"{not json", sign(b"{not json", SECRET)) == 400
    malformed = raw("UPDATE_ROUND_START", {"global_model_uuid": "m-1"})  # no round
    assert post(server.url, malformed, sign(malformed, SECRET)) == 400

    finished = raw("TRAINING_FINISHED", {"global_model_uuid": "m-1"})
    assert post(server.url, finished, sign(finished, SECRET), event_id="20") == 200
    assert server.wait(5)
    assert participant.started == ["t-1"]
    assert participant.finished_trainings == {"t-1"}
    deadline = time.monotonic() + 5
    while True:  # it stops by itself
        try:
            requests.get(server.url, timeout=1)
        except requests.ConnectionError:
            break
        assert time.monotonic() < deadline, "the notification server did not stop after TRAINING_FINISHED"
        time.sleep(0.05)


TRAIN_SCRIPT = """
import json, sys
from pathlib import Path
import torch
from fl_client import Communication

comm = Communication.from_script_args()
Path(sys.argv[0]).with_name(f"train-{comm.round}.json").write_text(json.dumps({
    "argv": sys.argv[1:], "client_id": str(comm.client_id), "config": comm.config, "model_id": str(comm.model_id),
}))
model = comm.download_model()
with torch.no_grad():
    for parameter in model.parameters():
        parameter.add_(0.5)
comm.upload_model(model, {"loss": 0.25}, 8)
"""

TEST_SCRIPT = """
from fl_client import Communication

comm = Communication.from_script_args()
comm.download_model()
comm.upload_metrics({"accuracy": 0.875})
"""


@pytest.mark.django_db(transaction=True)
def test_external_scripts_take_part(server_url, actor, make_user, cleanup, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "test.py").write_text(TEST_SCRIPT)
    client = make_user("scripted", client=True)
    options = {"proximal_mu": 0.2}
    training_id, model_id = new_training(server_url, actor, [client], rounds=1, method="FedProx", options=options)
    participant = Participant(
        server_url,
        username="scripted",
        password="s3cret-pass",
        train_script=tmp_path / "train.py",
        test_script=tmp_path / "test.py",
        script_timeout=60,
    )
    outcome = pulling(participant, training_id, cleanup)
    api_for(server_url, actor).start_training(training_id)

    training = wait_finished(server_url, actor, training_id)
    outcome["thread"].join(TRAINING_TIMEOUT)
    assert "error" not in outcome, outcome
    assert training["state"] == "C", training
    seen = json.loads((tmp_path / "train-0.json").read_text())
    assert seen["client_id"] == str(client.pk)
    assert seen["config"] == {"proximal_mu": 0.2}
    assert seen["model_id"] == model_id
    assert seen["argv"][:2] == ["--training-id", training_id] and "--server-url" in seen["argv"]
    rows = api_for(server_url, actor).request("GET", f"trainings/{training_id}/metrics/")
    assert {(row["key"], row["value"]) for row in rows} >= {("loss", 0.25), ("accuracy", 0.875)}
    expected = {name: p + 0.5 for name, p in parameters_of(tiny_net()).items()}
    assert_global_parameters(server_url, actor, training_id, model_id, expected)


def test_participant_needs_credentials_and_training_code():
    with pytest.raises(ValueError, match="credentials"):
        Participant("http://127.0.0.1:9", train=Recorder(0, 1).train)
    with pytest.raises(ValueError, match="training code"):
        Participant("http://127.0.0.1:9", token="t")
    with pytest.raises(ValueError, match="either"):
        Participant("http://127.0.0.1:9", token="t", train=Recorder(0, 1).train, train_script=sys.argv[0])


@pytest.mark.django_db(transaction=True)
def test_pull_stops_when_removed_and_is_bounded(server_url, actor, make_user, cleanup):
    clients = [make_user(f"leaving{i}", client=True) for i in range(2)]
    training_id, _ = new_training(server_url, actor, clients, rounds=1)
    leaving = Participant(server_url, token=token_of(clients[0]), train=Recorder(0.1, 1).train)
    api = api_for(server_url, actor)
    # removed before the pull starts: the test server shares one SQLite connection between request threads,
    # so a poll racing the removal could see its half-done transaction (a deployment isolates them)
    api.request("DELETE", f"trainings/{training_id}/clients/", json={"clients": [str(clients[0].pk)]})
    outcome = pulling(leaving, training_id, cleanup)
    outcome["thread"].join(10)
    assert not outcome["thread"].is_alive() and "error" not in outcome, outcome
    assert outcome["last_seq"] > 0

    staying = Participant(server_url, token=token_of(clients[1]), train=Recorder(0.1, 1).train)
    started = time.monotonic()
    with pytest.raises(TimeoutError):  # nothing happens in a training that never starts
        staying.pull(training_id, wait=0.2, timeout=0.6)
    assert time.monotonic() - started < 5

    outsider = make_user("nosy", client=True)
    nosy = Participant(server_url, token=token_of(outsider), train=Recorder(0.1, 1).train)
    with pytest.raises(ServerRequestException) as caught:  # 4xx: no retries
        nosy.pull(training_id, wait=0, timeout=5)
    assert caught.value.status_code == 403

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = Participant(f"http://127.0.0.1:{port}", token="t" * 40, train=Recorder(0.1, 1).train)
    started = time.monotonic()
    with pytest.raises(ServerRequestException) as caught:  # retried with back-off, then given up
        unreachable.pull(training_id, wait=0, timeout=5, max_errors=3, max_backoff=0.2)
    assert caught.value.status_code is None
    assert time.monotonic() - started < 5
