"""`Communication`: one client's model transfers with the server for one training round.

Compatible with the established client API: the same attributes, constructors and methods
(`download_model`, `upload_model`, `upload_metrics`, `upload_swag`, `pack_model`, `unpack_model`,
`get_headers`). The notification handlers (`init_training`, `start_training`, ...) live on
:class:`fl_client.participant.Participant`, where users plug in their training code.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar
from uuid import UUID

import torch

from fl_client import _http, packing
from fl_client.exceptions import (
    MetricsUploadException,
    ModelDownloadException,
    ModelFormatException,
    ModelUploadException,
)

T = TypeVar("T", bound="Communication")

ENV_AUTH = "FL_CLIENT_AUTH"
ENV_CLIENT_ID = "FL_CLIENT_ID"
ENV_ROUND_CONFIG = "FL_ROUND_CONFIG"


def is_torchscript_instance(obj: Any) -> bool:
    """Whether `obj` is a TorchScript module."""
    return isinstance(obj, torch.jit.ScriptModule)


def _metric_fields(metrics: Mapping[str, float] | None) -> list[_http.Field]:
    fields: list[_http.Field] = []
    for name, value in (metrics or {}).items():
        fields.append(("metric_names", str(name)))
        fields.append(("metric_values", repr(float(value))))
    return fields


class Communication:
    """Model download and upload of one client for one round of one training."""

    def __init__(
        self,
        client_id: UUID | str,
        training_id: UUID | str,
        round: int,
        model_id: UUID | str,
        http_authorization: str,
        server_url: str | None = None,
    ) -> None:
        """Create a communication module.

        Args:
            client_id: UUID of the client (the authenticated user).
            training_id: UUID of the training.
            round: number of the training round (sent with uploads).
            model_id: UUID of the model to download and upload to (the global model, or for FedDC the
                local model the client continues from).
            http_authorization: `Authorization` header value (`Token <key>` or `Basic ...`).
            server_url: server base URL; default `FL_SERVER_URL`, else `http://127.0.0.1:8000`.
        """
        self.client_id = client_id
        self.training_id = training_id
        self.round = round
        self.model_id = model_id
        self.http_authorization = http_authorization
        self.server_url = _http.normalize_server_url(server_url)
        self.config: dict[str, Any] = {}
        """Round configuration sent by the server (e.g. `proximal_mu`); filled for scripts by `from_script_args`."""

    @classmethod
    def from_user_password(
        cls: type[T],
        client_id: UUID | str,
        training_id: UUID | str,
        round: int,
        model_id: UUID | str,
        username: str,
        password: str,
        server_url: str | None = None,
    ) -> T:
        """Create a communication module authenticating with a user name and password (HTTP Basic)."""
        return cls(client_id, training_id, round, model_id, _http.basic_authorization(username, password), server_url)

    @classmethod
    def from_http_authorization(
        cls: type[T],
        client_id: UUID | str,
        training_id: UUID | str,
        round: int,
        model_id: UUID | str,
        http_authorization: str,
        server_url: str | None = None,
    ) -> T:
        """Create a communication module from an `Authorization` header value."""
        return cls(client_id, training_id, round, model_id, http_authorization, server_url)

    @classmethod
    def from_script_args(cls: type[T], argv: Sequence[str] | None = None) -> T:
        """Create the communication module inside a training or test script started by a `Participant`.

        Reads `--training-id`, `--round`, `--model-id`, `--server-url` and `--client-id` from `argv`
        (default `sys.argv[1:]`; unknown arguments are ignored) and the authorization from the
        environment variable `FL_CLIENT_AUTH`; `config` is filled from `FL_ROUND_CONFIG` (JSON).
        """
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--training-id", required=True)
        parser.add_argument("--round", type=int, required=True)
        parser.add_argument("--model-id", required=True)
        parser.add_argument("--server-url", default=None)
        parser.add_argument("--client-id", default=os.environ.get(ENV_CLIENT_ID, ""))
        args, _ = parser.parse_known_args(argv)
        authorization = os.environ.get(ENV_AUTH)
        if not authorization:
            raise RuntimeError(f"{ENV_AUTH} is not set: the script must be started by a Participant")
        comm = cls(args.client_id, args.training_id, args.round, args.model_id, authorization, args.server_url)
        comm.config = json.loads(os.environ.get(ENV_ROUND_CONFIG) or "{}")
        return comm

    def get_headers(self) -> dict[str, str]:
        """Default HTTP headers of every request to the server."""
        return {"Authorization": self.http_authorization, "Accept": "application/json, application/octet-stream"}

    def _model_url(self, suffix: str = "") -> str:
        return f"{self.server_url}/api/models/{self.model_id}/{suffix}"

    def download_model_bytes(self, *, progress: bool = False, fmt: str | None = None) -> bytes:
        """Download the model's raw bytes (TorchScript, or `fmt="safetensors"` for the weights only)."""
        response = _http.send(
            "GET",
            self._model_url(),
            error=ModelDownloadException,
            what="model download",
            authorization=self.http_authorization,
            params={"format": fmt} if fmt else None,
            stream=True,
        )
        return _http.read_body(response, error=ModelDownloadException, what="model download", progress=progress)

    def download_model(self, *, progress: bool = False) -> Any:
        """Download the model as a TorchScript module with its current weights.

        Raises:
            ModelDownloadException: the download failed (HTTP error, connection failure, unreadable model).
        """
        blob = self.download_model_bytes(progress=progress)
        try:
            return self.unpack_model(blob)
        except ModelFormatException as exc:
            raise ModelDownloadException(f"model download failed: {exc}", None, str(exc)) from exc

    def upload_model(
        self, model: Any, metrics: Mapping[str, float] | None, sample_size: int, *, progress: bool = False
    ) -> bool:
        """Upload the local model for this round with its metrics and the number of training samples.

        Raises:
            ModelUploadException: the server refused the update (status code and detail attached) or was unreachable.
        """
        fields: list[_http.Field] = [
            ("round", str(int(self.round))),
            ("sample_size", str(int(sample_size))),
            ("model_file", ("model.pt", self.pack_model(model), "application/octet-stream")),
            *_metric_fields(metrics),
        ]
        _http.send_multipart(
            self._model_url(),
            fields,
            error=ModelUploadException,
            what="model upload",
            authorization=self.http_authorization,
            progress=progress,
        )
        return True

    def upload_metrics(self, metrics: Mapping[str, float], *, step: int | None = None) -> bool:
        """Upload metrics of the model (e.g. the test results of the global model).

        Raises:
            MetricsUploadException: the server refused the metrics or was unreachable.
        """
        fields = _metric_fields(metrics)
        if step is not None:
            fields.append(("step", str(int(step))))
        _http.send_multipart(
            self._model_url("metrics/"),
            fields,
            error=MetricsUploadException,
            what="metrics upload",
            authorization=self.http_authorization,
        )
        return True

    def upload_swag(self, first_moment: torch.Tensor, second_moment: torch.Tensor, sample_size: int) -> bool:
        """Upload SWAG statistics (flat tensors over `model.parameters()`) for this round.

        Raises:
            ModelUploadException: the server refused the statistics or was unreachable.
        """
        fields: list[_http.Field] = [
            ("round", str(int(self.round))),
            ("sample_size", str(int(sample_size))),
            ("first_moment_file", ("first.pt", self.pack_model(first_moment.flatten()), "application/octet-stream")),
            ("second_moment_file", ("second.pt", self.pack_model(second_moment.flatten()), "application/octet-stream")),
        ]
        _http.send_multipart(
            self._model_url("swag/"),
            fields,
            error=ModelUploadException,
            what="SWAG upload",
            authorization=self.http_authorization,
        )
        return True

    def pack_model(self, model: Any) -> bytes:
        """Pack a model into bytes (see :func:`fl_client.packing.pack_model`)."""
        return packing.pack_model(model)

    def unpack_model(self, blob: bytes) -> Any:
        """Unpack bytes into a model without ever unpickling (see :func:`fl_client.packing.unpack_model`)."""
        return packing.unpack_model(blob)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(client_id={self.client_id!s}, training_id={self.training_id!s}, "
            f"round={self.round}, model_id={self.model_id!s}, server_url={self.server_url!r})"
        )
