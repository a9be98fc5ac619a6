"""Request parsing helpers shared by the views."""

from collections.abc import Mapping
from typing import Any

from django.conf import settings
from django.shortcuts import get_object_or_404
from rest_framework.request import Request

from fl_server_core.exceptions import InvalidInputError, TooLargeError
from fl_server_core.models import Model, Training


def fields_of(request: Request) -> Mapping[str, Any]:
    """The request's fields: a form or a JSON object (other JSON bodies, e.g. a list, are a 400)."""
    data = request.data
    if not isinstance(data, Mapping):
        raise InvalidInputError("The request body must be a JSON object or a form.")
    return data


def get_list(data: Any, key: str) -> list[Any]:
    """A repeated multipart field, or a JSON list (a single JSON value counts as a one-item list)."""
    if hasattr(data, "getlist"):
        return data.getlist(key)
    value = data.get(key, [])
    return value if isinstance(value, list) else [value]


def get_text(data: Any, key: str, required: bool = True, max_length: int = 256) -> str:
    """A text field."""
    value = data.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidInputError(f"{key}: this field is required.")
        return ""
    if not isinstance(value, str) or len(value) > max_length:
        raise InvalidInputError(f"{key}: must be text of at most {max_length} characters.")
    if "\x00" in value:
        raise InvalidInputError(f"{key}: must not contain NUL characters.")
    return value.strip()


MAX_INT32 = 2**31 - 1
MAX_INT64 = 2**63 - 1
# Samples per client and round: the server sums them (in floating point too), and sums of millions of clients
# must still fit a database bigint.
MAX_SAMPLE_SIZE = 10**12


def get_int(data: Any, key: str, minimum: int = 0, maximum: int = MAX_INT32) -> int:
    """An integer field between `minimum` and `maximum` (defaults fit a database integer column)."""
    value = data.get(key)
    if value is None or value == "":
        raise InvalidInputError(f"{key}: this field is required.")
    try:
        number = int(str(value).strip())
    except ValueError:
        raise InvalidInputError(f"{key}: {value!r} is not an integer.") from None
    if number < minimum:
        raise InvalidInputError(f"{key}: must be at least {minimum}.")
    if number > maximum:
        raise InvalidInputError(f"{key}: must be at most {maximum}.")
    return number


def read_upload(request: Request, field: str, required: bool = True) -> bytes | None:
    """The bytes of an uploaded file, within the size limit."""
    upload = request.FILES.get(field)
    if upload is None:
        if required:
            raise InvalidInputError(f"{field}: a file upload is required (multipart/form-data).")
        return None
    limit = settings.FL_MAX_UPLOAD_BYTES
    if upload.size > limit:
        raise TooLargeError(f"{field}: {upload.size} bytes exceed the upload limit of {limit} bytes.")
    return upload.read()


def get_model(pk: Any) -> Model:
    """The model with this id, or 404."""
    return get_object_or_404(Model.objects.select_related("weights", "archive"), pk=pk)


def get_training(pk: Any) -> Training:
    """The training with this id, or 404."""
    return get_object_or_404(Training.objects.select_related("model"), pk=pk)
