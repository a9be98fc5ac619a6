"""Every error answer is JSON `{"detail": "..."}` with a fitting status code."""

from typing import Any

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse, UnreadablePostError
from django.views.decorators.csrf import csrf_exempt
from django.views.defaults import bad_request, page_not_found
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from fl_server_core import exceptions as domain

STATUS_OF = {
    domain.InvalidInputError: status.HTTP_400_BAD_REQUEST,
    domain.PermissionDeniedError: status.HTTP_403_FORBIDDEN,
    domain.NotFoundError: status.HTTP_404_NOT_FOUND,
    domain.ConflictError: status.HTTP_409_CONFLICT,
    domain.TooLargeError: status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
}


def flatten(errors: Any, prefix: str = "") -> list[str]:
    """Validation errors as 'field: message' lines."""
    if isinstance(errors, dict):
        lines: list[str] = []
        for key, value in errors.items():
            name = key if key != "non_field_errors" else ""
            lines += flatten(value, f"{prefix}.{name}" if prefix and name else (name or prefix))
        return lines
    if isinstance(errors, list):
        return [line for item in errors for line in flatten(item, prefix)]
    return [f"{prefix}: {errors}" if prefix else str(errors)]


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Map domain and framework errors to `{"detail": ...}` answers."""
    for kind, code in STATUS_OF.items():
        if isinstance(exc, kind):
            return Response({"detail": exc.detail}, status=code)
    if isinstance(exc, OperationalError):  # e.g. the database is busy: nothing was written, the client may retry
        response = Response({"detail": f"The server is busy, retry shortly ({exc})."}, status=503)
        response["Retry-After"] = "1"
        return response
    if isinstance(exc, UnreadablePostError):  # the client went away mid-request: nothing was processed
        detail = f"The request body could not be read completely ({exc}). Nothing was stored; send it again."
        return Response({"detail": detail}, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(exc.messages)
    if isinstance(exc, exceptions.ValidationError):
        return Response({"detail": " ".join(flatten(exc.detail)), "errors": exc.detail}, status=exc.status_code)
    return drf_exception_handler(exc, context)


def json_not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """404 for unknown URLs: JSON under /api/, the usual page elsewhere."""
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return page_not_found(request, exception)


def json_bad_request(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """400 for requests Django refuses itself (too many fields or files, a bad Host): JSON under /api/."""
    if request.path.startswith("/api/"):
        explained = isinstance(exception, TooManyFieldsSent | TooManyFilesSent | RequestDataTooBig)
        return JsonResponse({"detail": str(exception) if explained else "Bad request."}, status=400)
    return bad_request(request, exception)


def json_server_error(request: HttpRequest) -> JsonResponse:
    """500 as JSON."""
    return JsonResponse({"detail": "Internal server error."}, status=500)


@csrf_exempt
def api_not_found(request: HttpRequest) -> JsonResponse:
    """Catch-all of the API's URLs: unknown paths are a JSON 404, with DEBUG on too."""
    return json_not_found(request)
