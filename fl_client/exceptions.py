"""Exceptions of the client SDK.

Every exception raised for a failed server request carries the HTTP `status_code` (None when the
server could not be reached at all) and the server's `detail` message (or the connection error).
"""

from __future__ import annotations


class CommunicationException(Exception):  # noqa: N818 (the established client API's naming)
    """A request to the FL server failed."""

    def __init__(self, message: str, status_code: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.detail = detail if detail is not None else message

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (HTTP {self.status_code})" if self.status_code is not None else text


class ModelDownloadException(CommunicationException):
    """Downloading a model failed."""


class ModelUploadException(CommunicationException):
    """Uploading a local model update (or SWAG statistics) failed."""


class MetricsUploadException(CommunicationException):
    """Uploading metrics failed."""


class ServerRequestException(CommunicationException):
    """Any other API request failed (registration, trainings, events)."""


class ModelFormatException(ValueError):  # noqa: N818 (named like the other exceptions)
    """A blob is not a model format that can be loaded safely (it is never unpickled)."""
