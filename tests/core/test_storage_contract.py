"""One contract for every model store backend: memory, filesystem and S3 (against a real HTTP S3 server)."""

import hashlib
import io
import os
import threading
import uuid

import boto3
import pytest
from django.core.exceptions import ImproperlyConfigured
from moto.server import ThreadedMotoServer

from fl_server_core.storage import (
    FileSystemModelStorage,
    InvalidKeyError,
    MemoryModelStorage,
    ModelNotFoundError,
    S3ModelStorage,
    StoredObject,
    get_model_storage,
)
from fl_server_core.storage.base import CHUNK_SIZE, HashingReader
from fl_server_core.storage.filesystem import TEMP_PREFIX

KEY = "models/3f2a9c1e/archive"
WEIGHTS_KEY = "models/3f2a9c1e/weights/round-3.safetensors"
S3_CREDENTIALS = {"access_key": "testing", "secret_key": "testing", "region_name": "us-east-1"}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ChunkedStream(io.RawIOBase):
    """A non-seekable upload stream that insists on bounded reads and can fail after some of them."""

    def __init__(self, data: bytes, fail_after_reads: int | None = None):
        self._data = memoryview(data)
        self._position = 0
        self._fail_after_reads = fail_after_reads
        self.reads = 0

    def readable(self):
        return True

    def read(self, size=-1):
        assert 0 < size <= CHUNK_SIZE, f"the whole stream was requested at once (size={size})"
        if self._fail_after_reads is not None and self.reads >= self._fail_after_reads:
            raise OSError("client disconnected")
        self.reads += 1
        chunk = bytes(self._data[self._position : self._position + min(size, 1000 + 7 * self.reads)])
        self._position += len(chunk)
        return chunk


@pytest.fixture(scope="module")
def s3_endpoint():
    """A real S3-compatible HTTP server (moto) on a free local port, shared by the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NO_PROXY", "127.0.0.1,localhost")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture(scope="module")
def s3_client(s3_endpoint):
    """A plain boto3 client for the test server, to create buckets and look behind the store's back."""
    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture
def s3_bucket(s3_client):
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"models-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["memory", "filesystem", pytest.param("s3", marks=pytest.mark.s3)])
def storage(request, tmp_path):
    if request.param == "memory":
        return MemoryModelStorage()
    if request.param == "filesystem":
        return FileSystemModelStorage(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    endpoint_url = request.getfixturevalue("s3_endpoint")
    return S3ModelStorage(bucket, endpoint_url=endpoint_url, location="fl", **S3_CREDENTIALS)


def test_put_bytes_round_trip(storage):
    data = b"\x00weights\xff" * 100

    stored = storage.put(KEY, data)

    assert stored == StoredObject(key=KEY, size=len(data), sha256=sha256(data))
    assert storage.exist(KEY)
    assert storage.get(KEY) == data


def test_put_stream_round_trip_and_open(storage):
    data = os.urandom(200_000)

    stored = storage.put(WEIGHTS_KEY, ChunkedStream(data))

    assert stored == StoredObject(key=WEIGHTS_KEY, size=len(data), sha256=sha256(data))
    with storage.open(WEIGHTS_KEY) as stream:
        assert stream.read(10) + stream.read() == data


def test_empty_object(storage):
    assert storage.put(KEY, b"") == StoredObject(key=KEY, size=0, sha256=sha256(b""))
    assert storage.exist(KEY)
    assert storage.get(KEY) == b""


def test_put_overwrites(storage):
    storage.put(KEY, b"first version")

    stored = storage.put(KEY, io.BytesIO(b"second"))

    assert stored.sha256 == sha256(b"second")
    assert storage.get(KEY) == b"second"
    assert storage.keys() == [KEY]


def test_large_object_is_streamed(storage):
    data = os.urandom(5 * 1024 * 1024 + 123)

    stored = storage.put(WEIGHTS_KEY, ChunkedStream(data))

    assert (stored.size, stored.sha256) == (len(data), sha256(data))
    with storage.open(WEIGHTS_KEY) as stream:
        assert hashlib.sha256(b"".join(iter(lambda: stream.read(CHUNK_SIZE), b""))).hexdigest() == stored.sha256


def test_missing_key_raises_model_not_found(storage):
    for read in (storage.get, storage.open, storage.get_model_metadata):
        with pytest.raises(ModelNotFoundError, match="models/missing"):
            read("models/missing")
    with pytest.raises(KeyError):  # ModelNotFoundError is a KeyError for callers that catch that
        storage.get("models/missing")
    assert not storage.exist("models/missing")


def test_delete(storage):
    storage.put(KEY, b"x")
    storage.set_model_metadata(KEY, {"round": 1})

    assert storage.delete(KEY) is True
    assert storage.delete(KEY) is False
    assert not storage.exist(KEY)
    storage.put(KEY, b"y")
    assert storage.get_model_metadata(KEY) == {}  # the metadata went with the object


def test_delete_prefix(storage):
    doomed = ["models/a/archive", "models/a/weights/round-1.pt", "models/a/weights/round-2.pt"]
    kept = ["models/ab/archive", "models/b/archive", "other/a/archive"]
    for key in doomed + kept:
        storage.put(key, key.encode())
    storage.set_model_metadata("models/a/archive", {"x": 1})

    assert storage.delete_prefix("models/a") == 3
    assert storage.keys() == sorted(kept)
    assert storage.delete_prefix("models/b/archive") == 1  # the prefix itself
    assert storage.delete_prefix("models/none") == 0
    assert storage.keys() == ["models/ab/archive", "other/a/archive"]


def test_delete_all(storage):
    for key in (KEY, WEIGHTS_KEY, "other"):
        storage.put(key, b"data")
    storage.set_model_metadata(KEY, {"x": 1})

    assert storage.delete_all() is True
    assert storage.keys() == []
    assert not storage.exist(KEY)


def test_keys_sorted_filtered_and_without_metadata(storage):
    for key in ("models/b/archive", "models/a/weights/round-2.pt", "models/a/archive", "zeta"):
        storage.put(key, b"1")
    storage.set_model_metadata("models/a/archive", {"framework": "torch"})

    assert storage.keys() == ["models/a/archive", "models/a/weights/round-2.pt", "models/b/archive", "zeta"]
    assert storage.keys("models/a/") == ["models/a/archive", "models/a/weights/round-2.pt"]
    assert storage.keys("models/a/w") == ["models/a/weights/round-2.pt"]
    assert storage.keys("nothing/") == []


def test_metadata_round_trip(storage):
    storage.put(KEY, b"weights")
    assert storage.get_model_metadata(KEY) == {}
    metadata = {"framework": "torch", "round": 3, "shape": [2, 3], "nested": {"ok": True, "loss": 0.5}}

    assert storage.set_model_metadata(KEY, metadata) is True
    fetched = storage.get_model_metadata(KEY)
    fetched["round"] = 99

    assert storage.get_model_metadata(KEY) == metadata
    storage.set_model_metadata(KEY, {"round": 4})
    assert storage.get_model_metadata(KEY) == {"round": 4}  # replaced, not merged
    storage.put(KEY, b"new weights")
    assert storage.get_model_metadata(KEY) == {"round": 4}  # put leaves metadata alone


def test_metadata_requires_existing_key_and_json(storage):
    with pytest.raises(ModelNotFoundError, match="models/missing"):
        storage.set_model_metadata("models/missing", {"a": 1})
    storage.put(KEY, b"x")
    with pytest.raises(TypeError):
        storage.set_model_metadata(KEY, {"not json": object()})
    with pytest.raises(TypeError):
        storage.set_model_metadata(KEY, ["not", "a", "dict"])

    assert storage.get_model_metadata(KEY) == {}
    assert storage.keys() == [KEY]


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/models/a",
        "models/../a",
        "..",
        "./a",
        "models//a",
        "models/a/",
        "models\\a",
        "models/a\x00b",
        "a.meta.json",
    ],
)
def test_invalid_keys_are_rejected(storage, key):
    for call in (
        lambda: storage.put(key, b"x"),
        lambda: storage.put(key, io.BytesIO(b"x")),
        lambda: storage.get(key),
        lambda: storage.exist(key),
        lambda: storage.delete(key),
        lambda: storage.delete_prefix(key),
        lambda: storage.set_model_metadata(key, {}),
    ):
        with pytest.raises(InvalidKeyError):
            call()
    with pytest.raises(InvalidKeyError):
        storage.keys("../")
    assert storage.keys() == []


def test_concurrent_puts(storage):
    keys = [f"models/{index % 2}/weights/round-{index}.pt" for index in range(6)]
    threads = [threading.Thread(target=storage.put, args=(key, key.encode())) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert storage.keys() == sorted(keys)
    assert all(storage.get(key) == key.encode() for key in keys)


# Filesystem only ---------------------------------------------------------------------------------


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_filesystem_put_is_atomic(tmp_path):
    storage = FileSystemModelStorage(tmp_path)
    previous = b"previous weights"
    storage.put(KEY, previous)
    stream = ChunkedStream(os.urandom(3 * CHUNK_SIZE), fail_after_reads=4)

    with pytest.raises(OSError, match="client disconnected"):
        storage.put(KEY, stream)
    with pytest.raises(OSError, match="client disconnected"):
        storage.put(WEIGHTS_KEY, ChunkedStream(b"y" * 10_000, fail_after_reads=2))

    assert stream.reads == 4  # the failure really happened mid-write
    assert storage.get(KEY) == previous
    assert not storage.exist(WEIGHTS_KEY)
    assert files_under(tmp_path) == [os.path.join("models", "3f2a9c1e", "archive")]
    assert not any(name.startswith(TEMP_PREFIX) for name in files_under(tmp_path))


def test_filesystem_layout_and_sidecar(tmp_path):
    storage = FileSystemModelStorage(str(tmp_path))
    storage.put(KEY, b"abc")
    storage.set_model_metadata(KEY, {"a": 1})

    assert (tmp_path / KEY).read_bytes() == b"abc"
    assert (tmp_path / f"{KEY}.meta.json").is_file()
    storage.delete_prefix("models/3f2a9c1e")
    assert list(tmp_path.iterdir()) == []  # empty directories are pruned


def test_filesystem_never_escapes_root(tmp_path):
    root, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    root.mkdir()
    (root / "models").symlink_to(outside, target_is_directory=True)
    storage = FileSystemModelStorage(root)

    with pytest.raises(InvalidKeyError):
        storage.put("models/x/archive", b"escape")
    with pytest.raises(InvalidKeyError):
        storage.get("models/x/archive")
    assert list(outside.iterdir()) == []


def test_filesystem_key_cannot_also_be_a_directory(tmp_path):
    storage = FileSystemModelStorage(tmp_path)
    storage.put("models/x", b"1")
    storage.put("models/y/archive", b"2")

    with pytest.raises(InvalidKeyError):
        storage.put("models/x/archive", b"3")
    with pytest.raises(InvalidKeyError):
        storage.put("models/y", b"4")
    assert storage.keys() == ["models/x", "models/y/archive"]
    with pytest.raises(InvalidKeyError):
        storage.put(f"models/{TEMP_PREFIX}abc", b"reserved")


# S3 only -----------------------------------------------------------------------------------------


@pytest.mark.s3
def test_s3_location_isolates_the_store(s3_endpoint, s3_client, s3_bucket):
    bucket = s3_bucket
    store = S3ModelStorage(bucket, endpoint_url=s3_endpoint, location="fl/store", **S3_CREDENTIALS)
    neighbour = S3ModelStorage(bucket, endpoint_url=s3_endpoint, location="fl/other", **S3_CREDENTIALS)
    neighbour.put(KEY, b"neighbour")

    store.put(KEY, b"mine")

    assert s3_client.get_object(Bucket=bucket, Key=f"fl/store/{KEY}")["Body"].read() == b"mine"
    assert store.delete_all() is True
    assert neighbour.get(KEY) == b"neighbour"


@pytest.mark.s3
def test_s3_large_upload_is_multipart(s3_endpoint, s3_client, s3_bucket):
    store = S3ModelStorage(s3_bucket, endpoint_url=s3_endpoint, **S3_CREDENTIALS)
    data = os.urandom(9 * 1024 * 1024)  # above the 8 MiB multipart threshold

    stored = store.put(KEY, ChunkedStream(data))

    assert stored.sha256 == sha256(data)
    assert s3_client.head_object(Bucket=s3_bucket, Key=KEY)["ETag"].endswith('-2"')  # uploaded in parts
    assert store.get(KEY) == data


def test_hashing_reader_fills_reads_across_short_source_reads():
    data = os.urandom(3 * CHUNK_SIZE + 5)
    reader = HashingReader(ChunkedStream(data))

    first = reader.read(2 * CHUNK_SIZE)

    assert len(first) == 2 * CHUNK_SIZE  # uploaders treat a short read as the end of the stream
    assert first + reader.read() == data
    assert reader.stored_object("k") == StoredObject(key="k", size=len(data), sha256=sha256(data))


# Settings ----------------------------------------------------------------------------------------


def test_get_model_storage_follows_settings(settings, tmp_path):
    settings.FL_MODEL_STORE = {"BACKEND": "memory", "OPTIONS": {}}
    memory = get_model_storage()
    assert isinstance(memory, MemoryModelStorage)
    assert get_model_storage() is memory  # cached

    settings.FL_MODEL_STORE = {"BACKEND": "filesystem", "OPTIONS": {"root": str(tmp_path / "store")}}
    filesystem = get_model_storage()
    assert isinstance(filesystem, FileSystemModelStorage)
    assert filesystem.root == (tmp_path / "store").resolve()
    filesystem.put(KEY, b"on disk")
    assert (tmp_path / "store" / KEY).read_bytes() == b"on disk"


@pytest.mark.s3
def test_get_model_storage_builds_s3(settings, s3_endpoint, s3_bucket):
    bucket = s3_bucket
    settings.FL_MODEL_STORE = {
        "BACKEND": "s3",
        "OPTIONS": {"root": "/ignored", "bucket_name": bucket, "endpoint_url": s3_endpoint, **S3_CREDENTIALS},
    }

    storage = get_model_storage()

    assert isinstance(storage, S3ModelStorage)
    assert storage.put(KEY, b"s3").size == 2
    assert storage.get(KEY) == b"s3"


@pytest.mark.parametrize(
    "config",
    [
        {"BACKEND": "floppy", "OPTIONS": {}},
        {"BACKEND": "filesystem", "OPTIONS": {}},
        {"BACKEND": "s3", "OPTIONS": {"bucket_name": ""}},
    ],
)
def test_get_model_storage_rejects_bad_config(settings, config):
    settings.FL_MODEL_STORE = config

    with pytest.raises(ImproperlyConfigured, match="FL_MODEL_STORE"):
        get_model_storage()
