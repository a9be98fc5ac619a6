"""Guards on request bodies: too large (refused before it is read), incomplete (the client went away)."""

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


class UploadSizeLimitMiddleware:
    """Answer 413 when `Content-Length` exceeds `FL_MAX_UPLOAD_BYTES`."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        """Check the declared body size, then pass the request on."""
        limit = settings.FL_MAX_UPLOAD_BYTES
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse({"detail": "Invalid Content-Length header."}, status=400)
        if length > limit:
            return JsonResponse(
                {"detail": f"Request body of {length} bytes exceeds the limit of {limit} bytes."}, status=413
            )
        return self.get_response(request)


class IncompleteBodyError(ConnectionError):
    """The connection ended before the whole request body (its Content-Length) arrived."""


class CompleteBodyInput:
    """`wsgi.input` that raises IncompleteBodyError where the body ends before its declared length.

    WSGI servers signal the end of a closed connection as a short or empty read, which parsers take for
    the end of the body: a multipart upload cut after a complete file part would be handled as a whole
    request although its client gave up on it. A read that returns less than asked is that end (blocking
    file-like inputs only return less at the end of the stream).
    """

    def __init__(self, stream: BinaryIO, length: int) -> None:
        self._stream, self._length, self._remaining = stream, length, length

    def _counted(self, data: bytes, complete: bool) -> bytes:
        self._remaining -= len(data)
        if not complete and self._remaining > 0:
            received = self._length - self._remaining
            raise IncompleteBodyError(f"the connection closed after {received} of {self._length} bytes")
        return data

    def _wanted(self, size: int | None) -> int:
        return self._remaining if size is None or size < 0 else min(size, self._remaining)

    def read(self, size: int | None = -1, /) -> bytes:
        """Up to `size` bytes of the body (all the rest by default)."""
        wanted = self._wanted(size)
        if wanted <= 0:
            return b""
        data = self._stream.read(wanted)
        return self._counted(data, len(data) == wanted)

    def readline(self, size: int | None = -1, /) -> bytes:
        """The next line of the body, of at most `size` bytes."""
        wanted = self._wanted(size)
        if wanted <= 0:
            return b""
        line = self._stream.readline(wanted)
        return self._counted(line, line.endswith(b"\n") or len(line) == wanted)

    def __iter__(self) -> Iterator[bytes]:
        """The body's lines."""
        while line := self.readline():
            yield line


class CompleteBodyMiddleware:
    """WSGI middleware: a request body cut short (the client disconnected mid-upload) is never handled as whole.

    Reading it raises `UnreadablePostError` in Django, answered 400; nothing is stored.
    """

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        """Wrap the body of a request that declares its length, then call the application."""
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0  # answered 400 by UploadSizeLimitMiddleware
        if length > 0:
            environ["wsgi.input"] = CompleteBodyInput(environ["wsgi.input"], length)
        return self.app(environ, start_response)
