"""`Communication` against the live server: model transfers, metrics, safe unpacking and every error path."""

import builtins
import io
import os
import pickle
import socket
import time
import uuid

import pytest
import torch
from safetensors.torch import save as save_safetensors

from fl_client import (
    Communication,
    MetricsUploadException,
    ModelDownloadException,
    ModelFormatException,
    ModelUploadException,
    pack_model,
    unpack_model,
)
from fl_client.packing import detect_format
from tests.client.conftest import (
    api_for,
    comm_for,
    new_training,
    parameters_of,
    shift_parameters,
    wait_finished,
)
from tests.helpers import pickled_module_bytes, shifted_weights, tiny_net


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.django_db(transaction=True)
def test_download_upload_and_metrics_round_trip(server_url, actor, make_user):
    client = make_user("solo", client=True)
    training_id, model_id = new_training(server_url, actor, [client], rounds=1, start=True)
    comm = comm_for(server_url, client, training_id, 0, model_id)

    model = comm.download_model(progress=True)
    assert isinstance(model, torch.jit.ScriptModule)
    original = parameters_of(tiny_net())
    for name, tensor in parameters_of(model).items():
        torch.testing.assert_close(tensor, original[name])

    assert comm.upload_model(shift_parameters(model, 0.25), {"loss": 0.5}, 12, progress=True) is True
    training = api_for(server_url, actor).training(training_id)
    assert training["current_round"]["kind"] == "TEST"  # one client: the update round closed and was aggregated

    test_round = comm_for(server_url, client, training_id, training["current_round"]["number"], model_id)
    assert test_round.upload_metrics({"accuracy": 0.75}) is True
    assert wait_finished(server_url, actor, training_id)["state"] == "C"

    aggregated = comm.download_model()
    for name, tensor in parameters_of(aggregated).items():
        torch.testing.assert_close(tensor, original[name] + 0.25)
    rows = api_for(server_url, actor).request("GET", f"trainings/{training_id}/metrics/")
    assert {(row["key"], row["value"]) for row in rows} >= {("loss", 0.5), ("accuracy", 0.75)}


@pytest.mark.django_db(transaction=True)
def test_updates_in_every_packed_format_are_accepted(server_url, actor, make_user):
    clients = [make_user(f"fmt{i}", client=True) for i in range(3)]
    training_id, model_id = new_training(
        server_url, actor, clients, rounds=1, options={"skip_model_tests": True}, start=True
    )
    state_dict_module = tiny_net(1)  # a plain nn.Module: its state_dict is sent
    weights = shifted_weights(2, 0.1)  # a dict of tensors
    script = torch.jit.script(tiny_net(3))  # TorchScript
    for client, update in zip(clients, [state_dict_module, weights, script], strict=True):
        assert comm_for(server_url, client, training_id, 0, model_id).upload_model(update, {"loss": 1.0}, 5)
    assert wait_finished(server_url, actor, training_id)["state"] == "C"


@pytest.mark.django_db(transaction=True)
def test_error_paths_raise_with_status_code_and_server_detail(server_url, actor, make_user):
    client = make_user("member", client=True)
    outsider = make_user("stranger", client=True)
    training_id, model_id = new_training(server_url, actor, [client], rounds=1, start=True)
    model = comm_for(server_url, client, training_id, 0, model_id).download_model()

    wrong_password = Communication.from_user_password(client.pk, training_id, 0, model_id, "member", "nope", server_url)
    with pytest.raises(ModelDownloadException) as caught:
        wrong_password.download_model()
    assert caught.value.status_code == 401 and caught.value.detail

    stranger = comm_for(server_url, outsider, training_id, 0, model_id)
    with pytest.raises(ModelDownloadException) as caught:
        stranger.download_model()
    assert caught.value.status_code == 403 and caught.value.detail
    with pytest.raises(ModelUploadException) as caught:
        stranger.upload_model(model, {"loss": 1.0}, 3)
    assert caught.value.status_code == 403 and "participant" in caught.value.detail
    with pytest.raises(MetricsUploadException) as caught:
        stranger.upload_metrics({"accuracy": 1.0})
    assert caught.value.status_code == 403

    with pytest.raises(ModelUploadException) as caught:
        comm_for(server_url, client, training_id, 5, model_id).upload_model(model, {"loss": 1.0}, 3)
    assert caught.value.status_code == 409 and "round" in caught.value.detail.lower()

    broken = {
        name: torch.full_like(t, float("nan")) if t.is_floating_point() else t for name, t in model.state_dict().items()
    }
    with pytest.raises(ModelUploadException) as caught:
        comm_for(server_url, client, training_id, 0, model_id).upload_model(broken, {}, 3)
    assert caught.value.status_code == 400

    with pytest.raises(ModelDownloadException) as caught:
        comm_for(server_url, client, training_id, 0, str(uuid.uuid4())).download_model()
    assert caught.value.status_code == 404

    assert comm_for(server_url, client, training_id, 0, model_id).upload_model(model, {"loss": 1.0}, 3)
    with pytest.raises(ModelUploadException) as caught:  # the round closed with the only client's update
        comm_for(server_url, client, training_id, 0, model_id).upload_model(model, {"loss": 1.0}, 3)
    assert caught.value.status_code == 409

    numel = sum(p.numel() for p in model.parameters())
    with pytest.raises(ModelUploadException) as caught:
        comm_for(server_url, client, training_id, 0, model_id).upload_swag(torch.zeros(numel), torch.ones(numel), 3)
    assert caught.value.status_code == 409  # no SWAG round


def test_unreachable_server_raises_instead_of_hanging():
    comm = Communication(uuid.uuid4(), uuid.uuid4(), 0, uuid.uuid4(), "Token x", f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    calls = [
        (ModelDownloadException, comm.download_model),
        (ModelUploadException, lambda: comm.upload_model(tiny_net(), {"loss": 1.0}, 1)),
        (MetricsUploadException, lambda: comm.upload_metrics({"loss": 1.0})),
        (ModelUploadException, lambda: comm.upload_swag(torch.zeros(2), torch.ones(2), 1)),
    ]
    for exception, call in calls:
        with pytest.raises(exception) as caught:
            call()
        assert caught.value.status_code is None
        assert "ConnectionError" in caught.value.detail
    assert time.monotonic() - started < 10


def test_constructors_headers_and_default_server_url(monkeypatch):
    monkeypatch.setenv("FL_SERVER_URL", "http://fl.example:9000/")
    comm = Communication.from_user_password("c", "t", 3, "m", "alice", "secret")
    assert comm.server_url == "http://fl.example:9000"
    assert comm.get_headers()["Authorization"] == "Basic YWxpY2U6c2VjcmV0"
    assert (comm.client_id, comm.training_id, comm.round, comm.model_id) == ("c", "t", 3, "m")
    other = Communication.from_http_authorization("c", "t", 0, "m", "Token abc", "http://other:1")
    assert other.http_authorization == "Token abc" and other.server_url == "http://other:1"
    monkeypatch.delenv("FL_SERVER_URL")
    assert Communication("c", "t", 0, "m", "Token abc").server_url == "http://127.0.0.1:8000"


def test_pack_and_unpack_every_safe_format():
    net = tiny_net(4)
    script = torch.jit.script(net)
    unpacked = unpack_model(pack_model(script))
    assert isinstance(unpacked, torch.jit.ScriptModule)
    x = torch.randn(2, 4)
    torch.testing.assert_close(unpacked(x), script(x))

    state_blob = pack_model(net)  # a plain module: weights only
    assert detect_format(state_blob) == "torch.save"
    state = torch.load(io.BytesIO(state_blob), weights_only=True)
    assert set(state) == set(net.state_dict())
    assert set(unpack_model(state_blob)) == set(net.state_dict())

    weights = {"w": torch.arange(4.0)}
    torch.testing.assert_close(unpack_model(pack_model(weights))["w"], weights["w"])
    torch.testing.assert_close(unpack_model(save_safetensors(weights))["w"], weights["w"])
    torch.testing.assert_close(unpack_model(pack_model(torch.ones(3))), torch.ones(3))
    assert pack_model(b"raw") == b"raw"
    with pytest.raises(TypeError):
        pack_model(object())
    with pytest.raises(ModelFormatException):
        unpack_model(b"definitely not a model")


def test_unpack_refuses_a_pickled_module():
    with pytest.raises(ModelFormatException, match="refusing to unpickle"):
        unpack_model(pickled_module_bytes(tiny_net()))


class Payload:
    """Creates a directory when unpickled: proof that unpickling ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


class OpenPayload:
    """Creates a file when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return builtins.open, (self.path, "w")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_unpack_never_executes_a_malicious_reduce(tmp_path):
    marker = tmp_path / "pwned"
    blobs = []
    for payload in (Payload(str(marker)), OpenPayload(str(marker))):
        buffer = io.BytesIO()
        torch.save({"weights": torch.zeros(1), "evil": payload}, buffer)
        blobs += [buffer.getvalue(), pickle.dumps(payload, protocol=2), pickle.dumps(payload)]
    for blob in blobs:
        with pytest.raises(ModelFormatException):
            unpack_model(blob)
        assert not marker.exists()
    with pytest.raises(ModelDownloadException):  # also on the download path
        _download_of(blobs[0])
    assert not marker.exists()
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(Payload(str(live))))  # the payload is real: plain unpickling runs it
    assert live.exists()


def _download_of(blob: bytes) -> None:
    """Run `download_model` on a blob as if the server had sent it."""

    class Canned(Communication):
        def download_model_bytes(self, *, progress: bool = False, fmt: str | None = None) -> bytes:
            return blob

    Canned("c", "t", 0, "m", "Token x").download_model()
