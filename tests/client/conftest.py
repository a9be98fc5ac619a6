"""Fixtures of the client SDK tests: pytest-django's `live_server`, driven over real HTTP by `fl_client`.

`live_server` on in-memory SQLite hands one sqlite3 connection to every request thread, so two
requests running at once would run inside each other's transactions (Django's atomic-block state
is per connection object). The SDK tests exercise the client, not that harness artefact: the
server's WSGI app is wrapped so that requests run one at a time, except the read-only long polls
of the events endpoint, which must not hold up the uploads that produce the events they wait for.
Clients answer pushed notifications at once and do their work on their own threads, so serialized
requests never wait on each other.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from fl_client import ApiClient, Communication
from fl_client._http import token_authorization
from fl_server_core.models import User
from tests.helpers import torchscript_bytes

SECRET = "client-suite-notification-secret"
TRAINING_TIMEOUT = 30.0


class SerializedApp:
    """A WSGI app that runs one request at a time (long polls of the events endpoint excepted)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("REQUEST_METHOD") == "GET" and environ.get("PATH_INFO", "").endswith("/events/"):
            return self.app(environ, start_response)
        with self.lock:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
        return [body]


@pytest.fixture
def server_url(live_server: Any, settings: Any) -> str:
    """The live server's URL; notifications are signed with `SECRET` and time out quickly."""
    settings.FL_NOTIFICATION_SECRET = SECRET
    settings.FL_NOTIFICATION_TIMEOUT_SECONDS = 5
    httpd = live_server.thread.httpd
    if not isinstance(httpd.get_app(), SerializedApp):
        httpd.set_app(SerializedApp(httpd.get_app()))
    return live_server.url


@pytest.fixture
def cleanup() -> Iterator[list[Callable[[], None]]]:
    """Callables run after the test (stop client servers, join threads) before the database is flushed."""
    actions: list[Callable[[], None]] = []
    yield actions
    for action in reversed(actions):
        action()


def token_of(user: User) -> str:
    """The user's API token."""
    return user.auth_token.key


def api_for(server_url: str, user: User) -> ApiClient:
    """An SDK API client authenticated as the user."""
    return ApiClient(server_url, token_authorization(token_of(user)))


def comm_for(server_url: str, user: User, training_id: str, round_number: int, model_id: str) -> Communication:
    """A `Communication` of the user for one round."""
    return Communication(user.pk, training_id, round_number, model_id, token_authorization(token_of(user)), server_url)


def new_training(
    server_url: str,
    actor: User,
    clients: list[User],
    rounds: int = 2,
    method: str = "FedAvg",
    options: dict[str, Any] | None = None,
    start: bool = False,
) -> tuple[str, str]:
    """Upload a TorchScript model and create (and optionally start) a training over HTTP; returns its ids."""
    api = api_for(server_url, actor)
    model_id = api.upload_global_model(torchscript_bytes(), "tiny", "a tiny net")
    training_id = api.create_training(
        model_id, [str(c.pk) for c in clients], rounds, method, metric_names=["loss"], options=options
    )
    if start:
        api.start_training(training_id)
    return training_id, model_id


def wait_finished(server_url: str, actor: User, training_id: str, timeout: float = TRAINING_TIMEOUT) -> dict:
    """Poll the training until it is COMPLETED or ERROR; fails with its state and rounds after `timeout`."""
    api = api_for(server_url, actor)
    deadline = time.monotonic() + timeout
    while True:
        training = api.training(training_id)
        if training["state"] in ("C", "E"):
            return training
        if time.monotonic() >= deadline:
            rounds = api.request("GET", f"trainings/{training_id}/rounds/")
            raise AssertionError(f"training not finished after {timeout:g}s: {training}\nrounds: {rounds}")
        time.sleep(0.05)


def parameters_of(model: Any) -> dict[str, torch.Tensor]:
    """The parameters (not buffers) of a module, detached."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def shift_parameters(model: Any, delta: float) -> Any:
    """Add `delta` to every parameter in place; returns the model."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(delta)
    return model
