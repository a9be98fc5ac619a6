"""Writing objects to the model store together with their `Blob` rows."""

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from fl_server_core.models import Blob
from fl_server_core.storage import get_model_storage


class BlobWriter:
    """Stores objects under fresh keys and remembers them so a failure can remove them."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def put(self, prefix: str, data: bytes | BinaryIO) -> Blob:
        """Store `data` under a new key below `prefix` and record it."""
        key = f"{prefix}/{uuid.uuid4().hex}"
        self.written.append(key)
        stored = get_model_storage().put(key, data)
        return Blob.objects.create(key=stored.key, size=stored.size, sha256=stored.sha256)

    def discard(self) -> None:
        """Remove everything written so far (the transaction that referenced it failed)."""
        storage = get_model_storage()
        for key in self.written:
            storage.delete(key)
        self.written.clear()


@contextmanager
def staged_blobs() -> Iterator[BlobWriter]:
    """Yield a writer whose objects are removed again if the block raises."""
    writer = BlobWriter()
    try:
        yield writer
    except BaseException:
        writer.discard()
        raise


def read_blob(blob: Blob) -> bytes:
    """The bytes of a stored object."""
    return get_model_storage().get(blob.key)


def model_prefix(model_id: uuid.UUID) -> str:
    """Store prefix of everything that belongs to one model."""
    return f"models/{model_id}"
