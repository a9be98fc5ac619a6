"""Model storage: weights and archives live here, the database keeps only their key, size and sha256."""

from __future__ import annotations

from functools import cache
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.dispatch import receiver

from fl_server_core.storage.base import (
    InvalidKeyError,
    ModelNotFoundError,
    ModelStorage,
    StoredObject,
    validate_key,
)
from fl_server_core.storage.filesystem import FileSystemModelStorage
from fl_server_core.storage.memory import MemoryModelStorage
from fl_server_core.storage.s3 import S3ModelStorage

__all__ = [
    "FileSystemModelStorage",
    "InvalidKeyError",
    "MemoryModelStorage",
    "ModelNotFoundError",
    "ModelStorage",
    "S3ModelStorage",
    "StoredObject",
    "build_model_storage",
    "get_model_storage",
    "validate_key",
]

BACKENDS = ("memory", "filesystem", "s3")


def build_model_storage(config: dict[str, Any]) -> ModelStorage:
    """Build a backend from a FL_MODEL_STORE-shaped dict: {"BACKEND": ..., "OPTIONS": {...}}."""
    backend = str(config.get("BACKEND", "")).lower()
    options = dict(config.get("OPTIONS") or {})
    if backend == "memory":
        return MemoryModelStorage()
    if backend == "filesystem":
        if not options.get("root"):
            raise ImproperlyConfigured('FL_MODEL_STORE["OPTIONS"]["root"] is required for the filesystem backend.')
        return FileSystemModelStorage(options["root"])
    if backend == "s3":
        options.pop("root", None)
        if not options.get("bucket_name"):
            raise ImproperlyConfigured('FL_MODEL_STORE["OPTIONS"]["bucket_name"] is required for the s3 backend.')
        try:
            return S3ModelStorage(**options)
        except TypeError as error:
            raise ImproperlyConfigured(f"Invalid FL_MODEL_STORE options for the s3 backend: {error}") from error
    raise ImproperlyConfigured(
        f'Unknown FL_MODEL_STORE["BACKEND"] {config.get("BACKEND")!r}; expected one of {", ".join(BACKENDS)}.'
    )


@cache
def get_model_storage() -> ModelStorage:
    """The model store configured by settings.FL_MODEL_STORE (built once, rebuilt when the setting changes)."""
    return build_model_storage(settings.FL_MODEL_STORE)


@receiver(setting_changed)
def _reset_model_storage(*, setting: str, **kwargs: Any) -> None:
    if setting == "FL_MODEL_STORE":
        get_model_storage.cache_clear()
