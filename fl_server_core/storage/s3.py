"""S3-compatible model store for production, built on django-storages' S3Storage."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, BinaryIO, cast

from botocore.exceptions import ClientError
from django.core.files import File
from django.core.files.base import ContentFile
from storages.backends.s3 import S3Storage

from fl_server_core.storage.base import (
    HashingReader,
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

_DELETE_BATCH_SIZE = 1000  # the most keys one DeleteObjects request accepts


def _is_missing_object(error: ClientError) -> bool:
    """Whether an S3 error means the object does not exist (a missing bucket is a real error)."""
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


class S3ModelStorage(ModelStorage):
    """Stores each object under ``<location>/<key>`` in a bucket, metadata as a JSON object ``<key>.meta.json``.

    Uploads are streamed (multipart above the transfer threshold) and hashed on the way; S3 replaces an
    object atomically, so readers see the old or the new content, never a mix.
    """

    def __init__(
        self,
        bucket_name: str,
        endpoint_url: str | None = None,
        region_name: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        location: str = "",
    ) -> None:
        self.storage = S3Storage(
            bucket_name=bucket_name,
            endpoint_url=endpoint_url,
            region_name=region_name,
            access_key=access_key,
            secret_key=secret_key,
            location=location,
            file_overwrite=True,
            default_acl=None,
            # Model bytes are opaque: no content type guessed from the key, no Content-Encoding for ".gz".
            object_parameters={"ContentType": "application/octet-stream"},
        )

    def _name(self, key: str) -> str:
        """The bucket key of a store key (the location prepended)."""
        return self.storage._normalize_name(key)

    def _list(self, prefix: str) -> Iterator[str]:
        """Every stored name (objects and sidecars) starting with the string ``prefix``, location stripped."""
        root = self.storage._normalize_name("")
        paginator = self.storage.connection.meta.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.storage.bucket_name, Prefix=root + prefix):
            for entry in page.get("Contents", []):
                yield entry["Key"][len(root) :]

    def _delete_names(self, names: list[str]) -> None:
        client = self.storage.connection.meta.client
        for start in range(0, len(names), _DELETE_BATCH_SIZE):
            batch = names[start : start + _DELETE_BATCH_SIZE]
            response = client.delete_objects(
                Bucket=self.storage.bucket_name,
                Delete={"Objects": [{"Key": self._name(name)} for name in batch], "Quiet": True},
            )
            if errors := response.get("Errors"):
                raise OSError(f"S3 refused to delete {len(errors)} object(s), first: {errors[0]}")

    def exist(self, key: str) -> bool:
        return self.storage.exists(validate_key(key))

    def get(self, key: str) -> bytes:
        with self.open(key) as stream:
            return stream.read()

    def open(self, key: str) -> BinaryIO:
        validate_key(key)
        try:
            response = self.storage.bucket.Object(self._name(key)).get()
        except ClientError as error:
            if _is_missing_object(error):
                raise ModelNotFoundError(key) from None
            raise
        return cast(BinaryIO, response["Body"])  # botocore's StreamingBody: a readable io stream

    def put(self, key: str, data: bytes | BinaryIO) -> StoredObject:
        validate_key(key)
        # Forward-only on purpose: the uploader then reads each byte exactly once, so the hash is right.
        reader = HashingReader(data)
        self.storage.save(key, File(reader, name=key))
        return reader.stored_object(key)

    def delete(self, key: str) -> bool:
        if not self.exist(key):
            return False
        self._delete_names([key, metadata_key(key)])
        return True

    def delete_prefix(self, prefix: str) -> int:
        validate_key(prefix)
        doomed = [
            name
            for name in self._list(prefix)
            if name in (prefix, metadata_key(prefix)) or name.startswith(prefix + "/")
        ]
        self._delete_names(doomed)
        return sum(1 for name in doomed if not is_metadata_key(name))

    def delete_all(self) -> bool:
        self._delete_names(list(self._list("")))
        return True

    def keys(self, prefix: str = "") -> list[str]:
        validate_prefix(prefix)
        return sorted(name for name in self._list(prefix) if not is_metadata_key(name))

    def get_model_metadata(self, key: str) -> dict[str, Any]:
        if not self.exist(key):
            raise ModelNotFoundError(key)
        try:
            response = self.storage.bucket.Object(self._name(metadata_key(key))).get()
        except ClientError as error:
            if _is_missing_object(error):
                return {}
            raise
        return decode_metadata(response["Body"].read())

    def set_model_metadata(self, key: str, metadata: dict[str, Any]) -> bool:
        raw = encode_metadata(metadata)
        if not self.exist(key):
            raise ModelNotFoundError(key)
        self.storage.save(metadata_key(key), ContentFile(raw))
        return True
