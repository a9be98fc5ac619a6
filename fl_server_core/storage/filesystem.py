"""Filesystem model store: the embedded default. Writes are atomic, so a crash never leaves half an object."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from fl_server_core.storage.base import (
    CHUNK_SIZE,
    HashingReader,
    InvalidKeyError,
    ModelNotFoundError,
    ModelStorage,
    StoredObject,
    decode_metadata,
    encode_metadata,
    is_metadata_key,
    metadata_key,
    validate_key,
    validate_prefix,
)

TEMP_PREFIX = ".fl-tmp-"
"""Names of in-progress writes; keys with a segment starting with it are rejected so they never collide."""


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class FileSystemModelStorage(ModelStorage):
    """Stores each object as the file ``root/<key>`` and its metadata as the JSON sidecar ``root/<key>.meta.json``.

    Because keys map to paths, one key cannot also be a "directory" of others on this backend: with
    ``models/x`` stored, putting ``models/x/archive`` raises InvalidKeyError (and vice versa).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        """The absolute path of a stored name, refusing anything that resolves outside the root."""
        path = (self.root / name).resolve()
        if path == self.root or not path.is_relative_to(self.root):
            raise InvalidKeyError(f"Invalid model key {name!r}: resolves outside the model store")
        return path

    def _object_path(self, key: str) -> Path:
        validate_key(key)
        if any(segment.startswith(TEMP_PREFIX) for segment in key.split("/")):
            raise InvalidKeyError(f"Invalid model key {key!r}: segments starting with {TEMP_PREFIX!r} are reserved")
        return self._path(key)

    def _write_atomically(self, path: Path, source: BinaryIO) -> None:
        """Copy ``source`` into a temp file beside ``path``, fsync it and rename it over ``path``."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise InvalidKeyError(f"Cannot store {path.relative_to(self.root)}: a parent is an existing key") from None
        if path.is_dir():
            raise InvalidKeyError(f"Cannot store {path.relative_to(self.root)}: other keys are stored under it")
        try:
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".part")
        except FileNotFoundError:  # a concurrent delete pruned the freshly created directory
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as temp_file:
                shutil.copyfileobj(source, temp_file, CHUNK_SIZE)
                temp_file.flush()
                os.fsync(temp_file.fileno())
            os.replace(temp_name, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)
            raise
        _fsync_directory(path.parent)

    def _prune_empty_parents(self, path: Path) -> None:
        """Remove the now-empty directories between ``path`` and the root."""
        for directory in path.parents:
            if directory == self.root:
                return
            try:
                directory.rmdir()
            except OSError:  # not empty (or already gone): stop here
                return

    def exist(self, key: str) -> bool:
        return self._object_path(key).is_file()

    def get(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def open(self, key: str) -> BinaryIO:
        path = self._object_path(key)
        try:
            return path.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ModelNotFoundError(key) from None

    def put(self, key: str, data: bytes | BinaryIO) -> StoredObject:
        path = self._object_path(key)
        reader = HashingReader(data)
        self._write_atomically(path, reader)
        return reader.stored_object(key)

    def delete(self, key: str) -> bool:
        path = self._object_path(key)
        if not path.is_file():
            return False
        try:
            path.unlink()
        except FileNotFoundError:  # deleted concurrently
            return False
        with contextlib.suppress(FileNotFoundError):
            self._path(metadata_key(key)).unlink()
        self._prune_empty_parents(path)
        return True

    def delete_prefix(self, prefix: str) -> int:
        path = self._object_path(prefix)
        count = len(self.keys(prefix + "/"))
        if self.delete(prefix):
            count += 1
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self._path(metadata_key(prefix)).unlink()
        self._prune_empty_parents(path)
        return count

    def delete_all(self) -> bool:
        for child in self.root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        return True

    def keys(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        directory = prefix.rpartition("/")[0]
        start = self._path(directory) if directory else self.root
        found = []
        for dirpath, _dirnames, filenames in os.walk(start):
            relative_dir = Path(dirpath).relative_to(self.root).as_posix()
            for filename in filenames:
                if filename.startswith(TEMP_PREFIX) or is_metadata_key(filename):
                    continue
                key = filename if relative_dir == "." else f"{relative_dir}/{filename}"
                if key.startswith(prefix):
                    found.append(key)
        return sorted(found)

    def get_model_metadata(self, key: str) -> dict[str, Any]:
        if not self._object_path(key).is_file():
            raise ModelNotFoundError(key)
        try:
            return decode_metadata(self._path(metadata_key(key)).read_bytes())
        except FileNotFoundError:
            return {}

    def set_model_metadata(self, key: str, metadata: dict[str, Any]) -> bool:
        raw = encode_metadata(metadata)
        path = self._object_path(key)
        if not path.is_file():
            raise ModelNotFoundError(key)
        self._write_atomically(self._path(metadata_key(key)), io.BytesIO(raw))
        return True
