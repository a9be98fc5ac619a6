"""A small client of the server's REST API for what is not a model transfer: users, trainings, events."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fl_client import _http
from fl_client.exceptions import CommunicationException, ModelUploadException, ServerRequestException


class ApiClient:
    """Authenticated JSON requests against `<server_url>/api/`."""

    def __init__(self, server_url: str | None = None, http_authorization: str | None = None) -> None:
        self.server_url = _http.normalize_server_url(server_url)
        self.http_authorization = http_authorization

    @classmethod
    def from_token(cls, token: str, server_url: str | None = None) -> ApiClient:
        """A client authenticated with a DRF token."""
        return cls(server_url, _http.token_authorization(token))

    @classmethod
    def from_user_password(cls, username: str, password: str, server_url: str | None = None) -> ApiClient:
        """A client authenticated with HTTP Basic."""
        return cls(server_url, _http.basic_authorization(username, password))

    def url(self, path: str) -> str:
        """The absolute URL of an API path (`"trainings/<id>/"`)."""
        return f"{self.server_url}/api/{path.lstrip('/')}"

    def request(
        self,
        method: str,
        path: str,
        *,
        what: str | None = None,
        error: type[CommunicationException] = ServerRequestException,
        **kwargs: Any,
    ) -> Any:
        """Send a request and return the decoded JSON answer (None for an empty one)."""
        response = _http.send(
            method,
            self.url(path),
            error=error,
            what=what or f"{method} /api/{path.lstrip('/')}",
            authorization=self.http_authorization,
            **kwargs,
        )
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise error(f"{what or path}: the answer is not JSON", response.status_code, response.text[:200]) from exc

    # users

    def register(
        self,
        username: str,
        password: str,
        *,
        actor: bool = False,
        client: bool = False,
        message_endpoint: str | None = None,
        **fields: str,
    ) -> dict[str, Any]:
        """Register a user; the answer carries its `id` and `token`."""
        body: dict[str, Any] = {"username": username, "password": password, "actor": actor, "client": client}
        if message_endpoint:
            body["message_endpoint"] = message_endpoint
        body.update(fields)
        return self.request("POST", "users/", json=body, what="registration")

    def myself(self) -> dict[str, Any]:
        """The authenticated user."""
        return self.request("GET", "users/myself/", what="user lookup")

    # models

    def upload_global_model(
        self,
        model_file: str | os.PathLike[str] | bytes,
        name: str,
        description: str = "",
        *,
        input_shape: Sequence[int | None] | None = None,
        preprocessing_file: str | os.PathLike[str] | bytes | None = None,
        progress: bool = False,
    ) -> str:
        """Upload a TorchScript global model; returns its id."""
        data = model_file if isinstance(model_file, bytes) else Path(model_file).read_bytes()
        filename = "model.pt" if isinstance(model_file, bytes) else Path(model_file).name
        fields: list[_http.Field] = [
            ("name", name),
            ("description", description),
            ("model_file", (filename, data, "application/octet-stream")),
        ]
        if preprocessing_file is not None:
            pre = preprocessing_file if isinstance(preprocessing_file, bytes) else Path(preprocessing_file).read_bytes()
            fields.append(("model_preprocessing_file", ("preprocessing.pt", pre, "application/octet-stream")))
        fields.extend(_http.repeated("input_shape", ["None" if d is None else d for d in input_shape or []]))
        response = _http.send_multipart(
            self.url("models/"),
            fields,
            error=ModelUploadException,
            what="model upload",
            authorization=self.http_authorization,
            progress=progress,
        )
        return str(response.json()["model_id"])

    # trainings

    def create_training(
        self,
        model_id: str,
        clients: Sequence[str],
        target_num_updates: int,
        aggregation_method: str = "FedAvg",
        *,
        metric_names: Sequence[str] = (),
        uncertainty_method: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> str:
        """Create a training of a global model; returns its id."""
        body: dict[str, Any] = {
            "model_id": str(model_id),
            "clients": [str(c) for c in clients],
            "target_num_updates": target_num_updates,
            "aggregation_method": aggregation_method,
            "metric_names": list(metric_names),
            "options": options or {},
        }
        if uncertainty_method:
            body["uncertainty_method"] = uncertainty_method
        return str(self.request("POST", "trainings/", json=body, what="training creation")["training_id"])

    def start_training(self, training_id: str) -> str:
        """Start a training; returns the server's message."""
        return str(self.request("POST", f"trainings/{training_id}/start/", what="training start")["detail"])

    def training(self, training_id: str) -> dict[str, Any]:
        """A training with its state and progress."""
        return self.request("GET", f"trainings/{training_id}/", what="training lookup")

    def events(self, training_id: str, after: int = 0, wait: float = 0.0) -> list[dict[str, Any]]:
        """The caller's notifications of a training with `seq > after`, long-polling up to `wait` seconds."""
        return self.request(
            "GET",
            f"trainings/{training_id}/events/",
            params={"after": after, "wait": f"{wait:g}"},
            timeout=(_http.CONNECT_TIMEOUT, wait + 30.0),
            what="event poll",
        )
