"""In-memory model store, for tests and throwaway runs."""

from __future__ import annotations

import io
import threading
from typing import Any, BinaryIO

from fl_server_core.storage.base import (
    HashingReader,
    ModelNotFoundError,
    ModelStorage,
    StoredObject,
    decode_metadata,
    encode_metadata,
    validate_key,
    validate_prefix,
)


class MemoryModelStorage(ModelStorage):
    """Keeps objects and their metadata in dicts guarded by one lock; contents are lost with the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: dict[str, bytes] = {}
        self._metadata: dict[str, bytes] = {}

    def exist(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return key in self._objects

    def get(self, key: str) -> bytes:
        validate_key(key)
        with self._lock:
            try:
                return self._objects[key]
            except KeyError:
                raise ModelNotFoundError(key) from None

    def open(self, key: str) -> BinaryIO:
        return io.BytesIO(self.get(key))

    def put(self, key: str, data: bytes | BinaryIO) -> StoredObject:
        validate_key(key)
        reader = HashingReader(data)
        content = reader.read()  # this backend holds everything in memory by design
        with self._lock:
            self._objects[key] = content
        return reader.stored_object(key)

    def delete(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            self._metadata.pop(key, None)
            return self._objects.pop(key, None) is not None

    def delete_prefix(self, prefix: str) -> int:
        validate_key(prefix)
        with self._lock:
            doomed = [key for key in self._objects if key == prefix or key.startswith(prefix + "/")]
            for key in doomed:
                del self._objects[key]
                self._metadata.pop(key, None)
            return len(doomed)

    def delete_all(self) -> bool:
        with self._lock:
            self._objects.clear()
            self._metadata.clear()
        return True

    def keys(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        with self._lock:
            return sorted(key for key in self._objects if key.startswith(prefix))

    def get_model_metadata(self, key: str) -> dict[str, Any]:
        validate_key(key)
        with self._lock:
            if key not in self._objects:
                raise ModelNotFoundError(key)
            raw = self._metadata.get(key)
        return decode_metadata(raw) if raw is not None else {}

    def set_model_metadata(self, key: str, metadata: dict[str, Any]) -> bool:
        validate_key(key)
        raw = encode_metadata(metadata)  # stored serialised, so callers never share mutable state with the store
        with self._lock:
            if key not in self._objects:
                raise ModelNotFoundError(key)
            self._metadata[key] = raw
        return True
