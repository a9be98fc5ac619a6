"""HTTP plumbing shared by the SDK: server URL, authorization values, errors, multipart uploads with progress."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import requests
from tqdm import tqdm
from urllib3.filepost import encode_multipart_formdata

from fl_client.exceptions import CommunicationException

DEFAULT_SERVER_URL = "http://127.0.0.1:8000"
CONNECT_TIMEOUT = 10.0
"""Seconds to wait for a TCP connection: an unreachable server fails fast instead of hanging."""
READ_TIMEOUT = 600.0
"""Seconds to wait for the server between bytes of an answer (aggregation may take a while)."""
CHUNK_SIZE = 1 << 20

# A multipart field: ``(name, value)`` with a text value, or ``(name, (filename, data, content_type))`` for a file.
Field = tuple[str, Any]


def default_server_url() -> str:
    """The server URL from `FL_SERVER_URL`, else the development default."""
    return os.environ.get("FL_SERVER_URL") or DEFAULT_SERVER_URL


def normalize_server_url(server_url: str | None) -> str:
    """The given URL (or the default) without a trailing slash."""
    return (server_url or default_server_url()).rstrip("/")


def basic_authorization(username: str, password: str) -> str:
    """An HTTP Basic `Authorization` header value."""
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def token_authorization(token: str) -> str:
    """A DRF token `Authorization` header value."""
    return f"Token {token}"


def error_detail(response: requests.Response) -> str:
    """The server's `detail` message of an error answer (the raw text when it is not JSON)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:500] or response.reason or f"HTTP {response.status_code}"
    if isinstance(data, dict) and "detail" in data:
        return str(data["detail"])
    return str(data)[:500]


def send(
    method: str,
    url: str,
    *,
    error: type[CommunicationException],
    what: str,
    authorization: str | None = None,
    timeout: float | tuple[float, float] | None = None,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    """Send a request; raise `error` (with status code and detail) on a connection failure or a non-2xx answer."""
    all_headers = {"Accept": "application/json, application/octet-stream"}
    if authorization:
        all_headers["Authorization"] = authorization
    all_headers.update(headers or {})
    try:
        response = requests.request(
            method, url, headers=all_headers, timeout=timeout or (CONNECT_TIMEOUT, READ_TIMEOUT), **kwargs
        )
    except requests.RequestException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise error(f"{what} failed: cannot reach {url}: {reason}", None, reason) from exc
    if not 200 <= response.status_code < 300:
        detail = error_detail(response)
        response.close()
        raise error(f"{what} failed: {detail}", response.status_code, detail)
    return response


def read_body(
    response: requests.Response, *, error: type[CommunicationException], what: str, progress: bool = False
) -> bytes:
    """Read a (streamed) answer, optionally with a progress bar; a broken transfer raises `error`."""
    total = int(response.headers.get("Content-Length") or 0) or None
    buffer = io.BytesIO()
    try:
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not progress) as bar:
            for chunk in response.iter_content(CHUNK_SIZE):
                buffer.write(chunk)
                bar.update(len(chunk))
    except requests.RequestException as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise error(f"{what} failed while receiving: {reason}", None, reason) from exc
    finally:
        response.close()
    if total is not None and not response.headers.get("Content-Encoding") and buffer.tell() != total:
        raise error(f"{what} failed: got {buffer.tell()} of {total} bytes", None, "incomplete transfer")
    return buffer.getvalue()


class ProgressBody(io.BytesIO):
    """A request body that advances a progress bar as the HTTP library reads it (sent with a Content-Length)."""

    def __init__(self, data: bytes, bar: tqdm) -> None:
        super().__init__(data)
        self._size = len(data)
        self._bar = bar

    def __len__(self) -> int:
        return self._size

    def read(self, size: int | None = -1) -> bytes:
        """Read and report the bytes read."""
        chunk = super().read(size)
        self._bar.update(len(chunk))
        return chunk


def multipart(fields: Sequence[Field]) -> tuple[bytes, str]:
    """Encode multipart form data (repeated names allowed); returns the body and its content type."""
    return encode_multipart_formdata(list(fields))


def send_multipart(
    url: str,
    fields: Sequence[Field],
    *,
    error: type[CommunicationException],
    what: str,
    authorization: str | None,
    progress: bool = False,
    timeout: float | tuple[float, float] | None = None,
) -> requests.Response:
    """POST multipart form data, optionally showing an upload progress bar."""
    body, content_type = multipart(fields)
    with tqdm(total=len(body), unit="B", unit_scale=True, unit_divisor=1024, desc=what, disable=not progress) as bar:
        return send(
            "POST",
            url,
            error=error,
            what=what,
            authorization=authorization,
            timeout=timeout,
            headers={"Content-Type": content_type},
            data=ProgressBody(body, bar),
        )


def repeated(name: str, values: Sequence[Any]) -> Iterator[Field]:
    """A repeated multipart field."""
    return ((name, str(value)) for value in values)
