"""Fixtures shared by every test layer."""

import base64
from collections.abc import Callable
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from fl_server_core.models import Blob, Metric, Model, SWAGUpdate, Training, User
from fl_server_core.storage import get_model_storage
from tests.helpers import safetensors_bytes, shifted_weights, torchscript_bytes


@pytest.fixture(autouse=True)
def memory_model_store(settings: Any) -> None:
    """Every test starts with an empty in-memory model store."""
    settings.FL_MODEL_STORE = {"BACKEND": "memory", "OPTIONS": {}}


@pytest.fixture(autouse=True)
def inline_tasks(settings: Any) -> None:
    """Tasks run inline after commit and no background check runs: tests see every effect deterministically."""
    settings.FL_INPROCESS_TASKS_ASYNC = False
    settings.FL_INPROCESS_SCHEDULER = False


@pytest.fixture(autouse=True)
def fast_password_hashing(settings: Any) -> None:
    """Hashing stays real but cheap: the production hasher's deliberate slowness would dominate the run."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def make_user(db: None) -> Callable[..., User]:
    """Create users: `make_user("alice", client=True)`."""

    def make(username: str, password: str = "s3cret-pass", **fields: Any) -> User:
        return User.objects.create_user(username=username, password=password, **fields)

    return make


@pytest.fixture
def client_for() -> Callable[[User | None], APIClient]:
    """An API client authenticated with the user's token (anonymous for None)."""

    def make(user: User | None) -> APIClient:
        api = APIClient()
        if user is not None:
            api.credentials(HTTP_AUTHORIZATION=f"Token {user.auth_token.key}")
        return api

    return make


@pytest.fixture
def actor(make_user: Callable[..., User]) -> User:
    """A user who runs trainings."""
    return make_user("actor", actor=True)


@pytest.fixture
def participants(make_user: Callable[..., User]) -> list[User]:
    """Three clients."""
    return [make_user(f"client{i}", client=True, message_endpoint=f"http://127.0.0.1:9/{i}") for i in range(3)]


@pytest.fixture
def outsider(make_user: Callable[..., User]) -> User:
    """A user with no part in anything."""
    return make_user("outsider", client=True)


def upload(name: str, data: bytes) -> SimpleUploadedFile:
    """A file for a multipart request."""
    return SimpleUploadedFile(name, data, content_type="application/octet-stream")


@pytest.fixture
def upload_model(client_for: Callable[[User | None], APIClient]) -> Callable[..., str]:
    """Upload a TorchScript global model as `user`; returns its id."""

    def do(user: User, data: bytes | None = None, **fields: Any) -> str:
        body = {"name": "tiny", "description": "a tiny net", "model_file": upload("m.pt", data or torchscript_bytes())}
        body.update(fields)
        response = client_for(user).post("/api/models/", body, format="multipart")
        assert response.status_code == 201, response.json()
        return response.json()["model_id"]

    return do


@pytest.fixture
def make_training(
    client_for: Callable[[User | None], APIClient], upload_model: Callable[..., str]
) -> Callable[..., Training]:
    """Create (and optionally start) a training of a fresh model."""

    def do(actor: User, clients: list[User], start: bool = False, **fields: Any) -> Training:
        body = {"model_id": upload_model(actor), "target_num_updates": 2, "metric_names": ["loss"]}
        body["clients"] = [str(c.pk) for c in clients]
        body.update(fields)
        response = client_for(actor).post("/api/trainings/", body, format="json")
        assert response.status_code == 201, response.json()
        training = Training.objects.get(pk=response.json()["training_id"])
        if start:
            assert client_for(actor).post(f"/api/trainings/{training.pk}/start/").status_code == 202
            training.refresh_from_db()
        return training

    return do


def post_update(
    api: APIClient, model_id: Any, round_number: int, weights: dict, samples: int, metrics: dict | None = None
) -> Any:
    """POST a local update (safetensors) for `model_id`."""
    body: dict[str, Any] = {
        "round": round_number,
        "sample_size": samples,
        "model_file": upload("u.st", safetensors_bytes(weights)),
    }
    if metrics:
        body["metric_names"] = list(metrics)
        body["metric_values"] = [str(v) for v in metrics.values()]
    return api.post(f"/api/models/{model_id}/", body, format="multipart")


def upload_round(
    training: Training, clients: list[User], client_for: Callable, round_number: int, seed: int = 0
) -> list[tuple[dict, float]]:
    """Each client uploads a distinct update for the round (201 expected); returns (weights, samples) pairs."""
    updates = []
    for i, client in enumerate(clients):
        weights = shifted_weights(seed + i, 0.1 * (i + 1))
        samples = 10 * (i + 1)
        response = post_update(client_for(client), training.model_id, round_number, weights, samples)
        assert response.status_code == 201, response.json()
        updates.append((weights, float(samples)))
    return updates


def snapshot() -> dict[str, Any]:
    """Everything a rejected request must leave untouched: row counts, states, rounds, store keys."""
    return {
        "users": User.objects.count(),
        "models": sorted((str(m.pk), m.kind, m.round, m.weights_id, m.preprocessing_id) for m in Model.objects.all()),
        "trainings": sorted(
            (str(t.pk), t.state, sorted(str(p) for p in t.participants.values_list("pk", flat=True)))
            for t in Training.objects.all()
        ),
        "metrics": Metric.objects.count(),
        "swag": SWAGUpdate.objects.count(),
        "blobs": Blob.objects.count(),
        "store": get_model_storage().keys(),
    }


@pytest.fixture
def unchanged() -> Callable[[], Callable[[], None]]:
    """`check = unchanged()` before a request; `check()` after asserts nothing changed."""

    def start() -> Callable[[], None]:
        before = snapshot()

        def check() -> None:
            assert snapshot() == before

        return check

    return start


def basic(username: str, password: str) -> str:
    """An HTTP Basic authorization header value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
