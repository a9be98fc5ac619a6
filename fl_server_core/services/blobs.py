"""Writing objects to the model store together with their `Blob` rows."""

import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from django.db import DatabaseError

from fl_server_core.models import Blob
from fl_server_core.storage import get_model_storage

log = logging.getLogger(__name__)


class BlobWriter:
    """Stores objects under fresh keys and remembers them so a failure can remove them."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def put(self, prefix: str, data: bytes | BinaryIO) -> Blob:
        """Store `data` under a new key below `prefix` (`<unix time>-<random>`) and record it."""
        key = f"{prefix}/{int(time.time())}-{uuid.uuid4().hex}"
        self.written.append(key)
        stored = get_model_storage().put(key, data)
        return Blob.objects.create(key=stored.key, size=stored.size, sha256=stored.sha256)

    def discard(self) -> None:
        """Remove what was written so far, unless its row was committed after all.

        The transaction that referenced the objects failed, but a failure of the COMMIT itself (the
        connection dropped while committing) leaves its outcome unknown: objects whose rows exist stay, and
        if the database cannot be asked, all stay (`sweep_orphans` removes real orphans later).
        """
        if not self.written:
            return
        try:
            committed = set(Blob.objects.filter(key__in=self.written).values_list("key", flat=True))
        except DatabaseError:
            log.warning(
                "kept %d model-store objects of a failed transaction: the database is unreachable", len(self.written)
            )
            self.written.clear()
            return
        storage = get_model_storage()
        for key in self.written:
            if key not in committed:
                storage.delete(key)
        self.written.clear()


@contextmanager
def staged_blobs() -> Iterator[BlobWriter]:
    """Yield a writer whose objects are removed again if the block raises (see `BlobWriter.discard`)."""
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


def written_at(key: str) -> int | None:
    """The write time encoded in a key made by `BlobWriter.put` (None for other keys)."""
    stamp = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(stamp) if stamp.isdigit() else None


def sweep_orphans(grace_seconds: float) -> list[str]:
    """Delete store objects that no `Blob` row references and that are older than the grace period.

    They are left behind when a process dies between writing an object and committing its row (a killed
    worker, a lost connection). The grace period must exceed the longest transaction, so that objects of
    uploads still in flight are never touched.
    """
    storage = get_model_storage()
    referenced = set(Blob.objects.values_list("key", flat=True))
    cutoff = time.time() - grace_seconds
    removed = []
    for key in storage.keys(prefix=""):
        stamp = written_at(key)
        if key not in referenced and stamp is not None and stamp < cutoff:
            storage.delete(key)
            removed.append(key)
    return removed
