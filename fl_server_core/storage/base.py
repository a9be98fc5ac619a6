"""The model store interface: where model weights live (never in database rows)."""

from __future__ import annotations

import hashlib
import io
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

CHUNK_SIZE = 1024 * 1024
"""Streams are copied in chunks of this many bytes, so no backend holds a whole upload in memory."""

METADATA_SUFFIX = ".meta.json"
"""Metadata of ``key`` is stored beside it as ``key + METADATA_SUFFIX``; such keys are reserved."""


class ModelNotFoundError(KeyError):
    """No object is stored under the requested key."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"No model stored under key {self.key!r}"


class InvalidKeyError(ValueError):
    """The key is not a valid relative, slash-separated object key."""


@dataclass(frozen=True)
class StoredObject:
    """What was written by ``put``: the key, its size in bytes and the hex sha256 of its content."""

    key: str
    size: int
    sha256: str


def _check_characters(value: str, what: str) -> None:
    if "\\" in value or any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise InvalidKeyError(f"Invalid model {what} {value!r}: backslashes and control characters are not allowed")
    if value.startswith("/"):
        raise InvalidKeyError(f"Invalid model {what} {value!r}: must be relative (no leading '/')")


def _check_segments(segments: list[str], value: str, what: str) -> None:
    if any(segment in ("", ".", "..") for segment in segments):
        raise InvalidKeyError(f"Invalid model {what} {value!r}: empty, '.' and '..' segments are not allowed")


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise InvalidKeyError.

    A key is a non-empty relative path of '/'-separated segments; no segment may be empty, '.' or
    '..', and it may not contain backslashes or control characters or end with the metadata suffix.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"Invalid model key {key!r}: must be a non-empty string")
    _check_characters(key, "key")
    if key.endswith("/"):
        raise InvalidKeyError(f"Invalid model key {key!r}: must not end with '/'")
    _check_segments(key.split("/"), key, "key")
    if key.endswith(METADATA_SUFFIX):
        raise InvalidKeyError(f"Invalid model key {key!r}: the suffix {METADATA_SUFFIX!r} is reserved for metadata")
    return key


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if keys can start with it ('' matches every key), else raise InvalidKeyError.

    The last segment may be partial (``models/3f`` matches ``models/3f2a/archive``) or empty (``models/``).
    """
    if not isinstance(prefix, str):
        raise InvalidKeyError(f"Invalid model key prefix {prefix!r}: must be a string")
    _check_characters(prefix, "key prefix")
    _check_segments(prefix.split("/")[:-1], prefix, "key prefix")
    return prefix


def is_metadata_key(name: str) -> bool:
    """Whether a stored name is a metadata sidecar rather than an object."""
    return name.endswith(METADATA_SUFFIX)


def metadata_key(key: str) -> str:
    """The name under which the metadata of ``key`` is stored."""
    return key + METADATA_SUFFIX


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    """Serialise metadata to JSON bytes; TypeError for a non-dict or non-JSON value, ValueError for NaN/inf."""
    if not isinstance(metadata, dict):
        raise TypeError(f"Model metadata must be a dict, not {type(metadata).__name__}")
    return json.dumps(metadata, sort_keys=True, allow_nan=False).encode("utf-8")


def decode_metadata(raw: bytes) -> dict[str, Any]:
    """Parse metadata written by ``encode_metadata``."""
    return json.loads(raw.decode("utf-8"))


def iter_chunks(data: bytes | BinaryIO, chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Yield the content of ``data`` (bytes or a readable binary stream) in chunks of at most ``chunk_size``."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])
        return
    while True:
        chunk = data.read(chunk_size)
        if not chunk:
            return
        yield chunk


class HashingReader(io.RawIOBase):
    """A forward-only readable stream over ``data`` that counts and sha256-hashes the bytes read through it."""

    def __init__(self, data: bytes | BinaryIO) -> None:
        super().__init__()
        self._chunks = iter_chunks(data)
        self._pending = memoryview(b"")
        self._hash = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` completely unless the source ends (uploaders treat a short read as the end)."""
        filled = 0
        while filled < len(buffer):
            if not self._pending:
                self._pending = memoryview(next(self._chunks, b""))
                if not self._pending:
                    break
            count = min(len(buffer) - filled, len(self._pending))
            chunk, self._pending = self._pending[:count], self._pending[count:]
            buffer[filled : filled + count] = chunk
            self._hash.update(chunk)
            filled += count
        self.size += filled
        return filled

    def readall(self) -> bytes:
        """The rest of the stream, read a chunk at a time."""
        parts = []
        while chunk := self.read(CHUNK_SIZE):
            parts.append(chunk)
        return b"".join(parts)

    def stored_object(self, key: str) -> StoredObject:
        """The StoredObject describing everything read so far."""
        return StoredObject(key=key, size=self.size, sha256=self._hash.hexdigest())


class ModelStorage(ABC):
    """Stores model artifacts (archives, weights) as bytes under slash-separated keys, with JSON metadata.

    Keys look like ``models/<uuid>/archive`` or ``models/<uuid>/weights/round-3.safetensors``; see
    ``validate_key`` for the rules. Every backend raises InvalidKeyError for a bad key before touching
    anything, and ModelNotFoundError for a key that holds no object.
    """

    @abstractmethod
    def exist(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole content stored under ``key``."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable binary stream over the content under ``key`` (for streaming downloads); close it."""

    @abstractmethod
    def put(self, key: str, data: bytes | BinaryIO) -> StoredObject:
        """Store ``data`` under ``key``, replacing any previous object; metadata is left as it was."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete the object under ``key`` and its metadata; True if an object was deleted."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete ``prefix`` itself and every key under ``prefix + '/'``; return how many objects were deleted."""

    @abstractmethod
    def delete_all(self) -> bool:
        """Delete every object and all metadata; True on success."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """The sorted keys of stored objects starting with the string ``prefix`` (metadata excluded)."""

    @abstractmethod
    def get_model_metadata(self, key: str) -> dict[str, Any]:
        """The metadata stored for ``key`` ({} if none was set)."""

    @abstractmethod
    def set_model_metadata(self, key: str, metadata: dict[str, Any]) -> bool:
        """Replace the metadata of the existing object ``key`` with the JSON-serialisable ``metadata``."""
