"""Hostile input over the real API: zip bombs, gigantic declared sizes, expanded tensors, path traversal in file
names, NUL characters (which PostgreSQL refuses), malformed and non-finite JSON, credentials in the wrong place,
CSRF on session writes, and another client's model id.

Every rejection must be a JSON `{"detail": ...}` answer with a 4xx status that changes nothing, and must not cost
the server the memory the input declares. Pickles that would run code, corrupt archives, NaN/Inf weights and the
plain size limits are covered in test_models.py, test_inference.py and tests/core/test_serialization.py.
"""

import functools
import io
import json
import pickle
import re
import resource
import struct
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import safetensors.torch
import torch
from django.contrib.auth.models import Group
from rest_framework.response import Response
from rest_framework.test import APIClient

from fl_server_core.models import LocalModel, Metric, Model, Training, TrainingState, User
from fl_server_core.storage import get_model_storage
from tests.conftest import basic, post_update, upload
from tests.helpers import safetensors_bytes, shifted_weights, state_dict_bytes, tiny_net, torchscript_bytes

ClientFor = Callable[[User | None], APIClient]
Check = Callable[[], Callable[[], None]]

MiB = 1024 * 1024
MEMORY_HEADROOM = 128 * MiB  # a refused upload may cost this much peak memory; the bombs below declare far more


def rejected(response: Response, status: int, *fragments: str) -> str:
    """Assert a JSON error answer with `status` whose `detail` mentions every fragment (case-insensitive)."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail.strip(), response.json()
    for fragment in fragments:
        assert fragment.lower() in detail.lower(), (fragment, detail)
    return detail


@contextmanager
def peak_memory_growth() -> Iterator[list[int]]:
    """Yields a list that receives how far the process's peak resident memory rose inside the block (bytes)."""
    growth: list[int] = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield growth
    growth.append((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)  # ru_maxrss is in KiB


@pytest.fixture
def training(actor: User, participants: list[User], make_training: Callable[..., Training]) -> Training:
    """A started training of TinyNet with two participants."""
    return make_training(actor, participants[:2], start=True)


@pytest.fixture
def model_url(training: Training) -> str:
    return f"/api/models/{training.model_id}/"


def update_body(data: bytes, **fields: Any) -> dict[str, Any]:
    """Multipart body of a local update for round 0."""
    return {"round": 0, "sample_size": 10, "model_file": upload("update.bin", data), **fields}


# --------------------------------------------------------------------------------------------------------------------
# Zip bombs and gigantic declared sizes
# --------------------------------------------------------------------------------------------------------------------


def deflated_with_zeros(archive: bytes, entry: str, size: int) -> bytes:
    """The zip archive rewritten with deflate and `entry` holding `size` zero bytes (streamed, never held whole)."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    prefix = source.namelist()[0].split("/")[0]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as bomb:
        for info in source.infolist():
            if info.filename != f"{prefix}/{entry}":
                bomb.writestr(info.filename, source.read(info))
        with bomb.open(f"{prefix}/{entry}", "w", force_zip64=True) as target:
            chunk = bytes(4 * MiB)
            for _ in range(size // len(chunk)):
                target.write(chunk)
    return out.getvalue()


@functools.cache
def state_dict_bomb() -> bytes:
    """A torch.save state dict of about 2 MiB whose first tensor record inflates to 512 MiB."""
    return deflated_with_zeros(state_dict_bytes(shifted_weights(0, 0.1)), "data/0", 512 * MiB)


@functools.cache
def torchscript_bomb() -> bytes:
    """A valid TorchScript archive plus a code entry that inflates to 255 MiB (under the per-entry scan limit)."""
    return deflated_with_zeros(torchscript_bytes(tiny_net(0)), "code/__torch__/padding.py", 255 * MiB)


def with_declared_size(archive: bytes, entry_suffix: str, size: int) -> bytes:
    """The zip archive with the uncompressed size recorded for one entry forged (local and central headers)."""
    data = bytearray(archive)
    target = next(i for i in zipfile.ZipFile(io.BytesIO(archive)).infolist() if i.filename.endswith(entry_suffix))
    struct.pack_into("<I", data, target.header_offset + 22, size)
    central = data.find(b"PK\x01\x02")
    while central != -1:
        name_length = struct.unpack_from("<H", data, central + 28)[0]
        if data[central + 46 : central + 46 + name_length] == target.filename.encode():
            struct.pack_into("<I", data, central + 24, size)
            return bytes(data)
        central = data.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"no central directory entry for {target.filename}")


def test_zip_bomb_update_is_refused_unread(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    bomb = state_dict_bomb()
    assert len(bomb) < 4 * MiB
    check = unchanged()
    with peak_memory_growth() as growth:
        response = client_for(participants[0]).post(model_url, update_body(bomb), format="multipart")
    rejected(response, 400, "model_file", "declares", "zip bomb")
    assert growth[0] < MEMORY_HEADROOM, f"refusing the bomb raised peak memory by {growth[0] // MiB} MiB"
    check()


def test_zip_bomb_global_model_is_refused_unread(actor: User, client_for: ClientFor, unchanged: Check) -> None:
    bomb = torchscript_bomb()
    check = unchanged()
    with peak_memory_growth() as growth:
        response = client_for(actor).post(
            "/api/models/", {"name": "bomb", "model_file": upload("m.pt", bomb)}, format="multipart"
        )
    rejected(response, 400, "model_file")
    assert growth[0] < MEMORY_HEADROOM, f"refusing the bomb raised peak memory by {growth[0] // MiB} MiB"
    check()


def test_zip_entry_declaring_gigabytes_is_refused(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    forged = with_declared_size(state_dict_bytes(shifted_weights(0, 0.1)), "data/0", 0xFFFF0000)
    check = unchanged()
    with peak_memory_growth() as growth:
        response = client_for(participants[0]).post(model_url, update_body(forged), format="multipart")
    rejected(response, 400, "model_file", "declares")
    assert growth[0] < MEMORY_HEADROOM
    check()


def safetensors_with_header(header: dict[str, Any], payload: bytes = b"\0" * 8) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


@pytest.mark.parametrize(
    "data",
    [
        safetensors_with_header({"fc1.weight": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 8]}}),
        safetensors_with_header({"fc1.weight": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}),
        safetensors_with_header({"fc1.weight": {"dtype": "F64", "shape": [2**61], "data_offsets": [0, 2**64 - 1]}}),
        struct.pack("<Q", 2**62) + b'{"fc1.weight": {}}',  # a header length far beyond the file
    ],
    ids=["huge-shape", "offsets-beyond-file", "offsets-overflow", "header-length"],
)
def test_safetensors_declaring_gigantic_tensors_is_refused(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check, data: bytes
) -> None:
    check = unchanged()
    with peak_memory_growth() as growth:
        response = client_for(participants[0]).post(model_url, update_body(data), format="multipart")
    rejected(response, 400, "model_file")
    assert growth[0] < MEMORY_HEADROOM
    check()


class ExpandedParameter(torch.nn.Module):
    """A module whose 10^8-element parameter is an expanded view of a single stored value (400 MB as float32)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1).expand(10**4, 10**4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w[0, 0]


def test_expanded_tensor_update_is_refused(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    """A few bytes declaring 10^10 elements: summing or copying them would take minutes or 40 GB."""
    weights = shifted_weights(0, 0.1)
    weights["fc1.weight"] = torch.zeros(1).expand(10**5, 10**5)
    data = state_dict_bytes(weights)
    assert len(data) < 64 * 1024
    check = unchanged()
    response = client_for(participants[0]).post(model_url, update_body(data), format="multipart")
    rejected(response, 400, "model_file", "fc1.weight", "expanded view")
    check()


def test_expanded_tensor_global_model_is_refused(actor: User, client_for: ClientFor, unchanged: Check) -> None:
    data = torchscript_bytes(ExpandedParameter())
    assert len(data) < 64 * 1024
    check = unchanged()
    with peak_memory_growth() as growth:
        response = client_for(actor).post(
            "/api/models/", {"name": "wide", "model_file": upload("m.pt", data)}, format="multipart"
        )
    rejected(response, 400, "model_file", "expanded view")
    assert growth[0] < MEMORY_HEADROOM
    check()


def test_inference_tensor_file_declaring_huge_shape_is_413(
    actor: User, client_for: ClientFor, upload_model: Callable[..., str]
) -> None:
    """float64 so that converting it to the model's float32 would allocate the declared size first."""
    model_id = upload_model(actor)
    buffer = io.BytesIO()
    torch.save(torch.zeros(1, dtype=torch.float64).expand(10**6, 10**6), buffer)
    body = {"model_id": model_id, "model_input": upload("x.pt", buffer.getvalue())}
    rejected(client_for(actor).post("/api/inference/", body, format="multipart"), 413, "limit")


PICKLE_LIKE = {
    "16-MiB-of-NONE-opcodes": lambda: b"N" * (16 * MiB),
    "protocol-1-pickle": lambda: pickle.dumps("x" * (16 * MiB), protocol=1),
}


@pytest.mark.parametrize("kind", list(PICKLE_LIKE))
def test_pickle_sniffing_reads_a_bounded_prefix(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check, kind: str
) -> None:
    """Raw pickles of protocol 0 and 1 carry no header, so the server parses (never runs) opcodes to spot them.
    It judges the first MiB: valid opcodes up to its end, with more data beyond, are a pickle. Parsing a whole
    upload opcode by opcode would cost seconds per MiB of crafted input."""
    check = unchanged()
    response = client_for(participants[0]).post(model_url, update_body(PICKLE_LIKE[kind]()), format="multipart")
    rejected(response, 400, "model_file", "pickle", "arbitrary code")
    check()


@pytest.mark.parametrize(
    ("length", "status", "fragment"),
    [("-1", 400, "content length"), ("12abc", 400, "content-length"), (str(10**30), 413, "exceeds")],
)
def test_content_length_declaring_nonsense(
    participants: list[User],
    client_for: ClientFor,
    model_url: str,
    unchanged: Check,
    length: str,
    status: int,
    fragment: str,
) -> None:
    body, content_type = multipart([("round", None, b"0"), ("sample_size", None, b"1")])
    check = unchanged()
    response = client_for(participants[0]).generic(
        "POST", model_url, body, content_type=content_type, CONTENT_LENGTH=length
    )
    rejected(response, status, fragment)
    check()


def test_multipart_part_declaring_a_huge_length_is_read_as_sent(
    participants: list[User], client_for: ClientFor, model_url: str
) -> None:
    """A part's own Content-Length header is not trusted: the bytes that arrive are the file."""
    update = safetensors_bytes(shifted_weights(0, 0.1))
    body, content_type = multipart(
        [("round", None, b"0"), ("sample_size", None, b"3"), ("model_file", "u.st", update)],
        part_headers={"model_file": f"Content-Length: {2**40}"},
    )
    response = client_for(participants[0]).generic("POST", model_url, body, content_type=content_type)
    assert response.status_code == 201, response.content
    local = LocalModel.objects.get(owner=participants[0])
    assert local.sample_size == 3
    stored = safetensors.torch.load(get_model_storage().get(local.weights.key))
    for name, tensor in shifted_weights(0, 0.1).items():
        assert torch.equal(stored[name], tensor)


@pytest.mark.parametrize("sample_size", [2**63 - 1, 10**12 + 1])
def test_huge_sample_size_is_refused(
    participants: list[User], client_for: ClientFor, training: Training, unchanged: Check, sample_size: int
) -> None:
    """Sample sizes are summed per round, also in floating point, where 2^63 - 1 rounds up past a bigint."""
    check = unchanged()
    response = post_update(client_for(participants[0]), training.model_id, 0, shifted_weights(0, 0.1), sample_size)
    rejected(response, 400, "sample_size", "at most")
    check()
    training.refresh_from_db()
    assert training.state == TrainingState.ONGOING


def test_largest_sample_sizes_still_aggregate(
    participants: list[User], client_for: ClientFor, training: Training, django_capture_on_commit_callbacks: Any
) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        for i, client in enumerate(participants[:2]):
            response = post_update(client_for(client), training.model_id, 0, shifted_weights(i, 0.1), 10**12)
            assert response.status_code == 201, response.content
    training.refresh_from_db()
    assert training.state == TrainingState.ONGOING
    assert Model.objects.get(pk=training.model_id).round == 1


# --------------------------------------------------------------------------------------------------------------------
# Path traversal in uploaded file names
# --------------------------------------------------------------------------------------------------------------------


def multipart(
    parts: list[tuple[str, str | None, bytes]], part_headers: dict[str, str] | None = None
) -> tuple[bytes, str]:
    """A raw multipart body (file names exactly as given, unlike the test client, which strips directories)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        headers = f"Content-Disposition: {disposition}\r\n"
        if filename is not None:
            headers += "Content-Type: application/octet-stream\r\n"
        if part_headers and name in part_headers:
            headers += part_headers[name] + "\r\n"
        chunks.append(f"--{boundary}\r\n{headers}\r\n".encode("utf-8", "surrogateescape") + content + b"\r\n")
    return b"".join(chunks) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


TRAVERSING_NAMES = [
    "../../escaped.pt",
    "../../../../../../../../tmp/escaped.pt",
    "/tmp/escaped.pt",
    "..\\..\\escaped.pt",
    "escaped.pt/../../../escaped.pt",
    "..%2F..%2Fescaped.pt",
    "nul\x00/../../escaped.pt",
    "../",
]
KEY = re.compile(r"(models/[0-9a-f-]{36}|rounds/\d+)(/[a-z_]+)+/\d+-[0-9a-f]{32}")  # as BlobWriter makes them


@pytest.fixture
def store_root(tmp_path: Path, settings: Any) -> Path:
    """A filesystem model store deep inside tmp_path, and uploads spooled to disk beside it."""
    root = tmp_path / "outer" / "inner" / "store"
    settings.FL_MODEL_STORE = {"BACKEND": "filesystem", "OPTIONS": {"root": str(root)}}
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 0  # every upload goes to a temporary file, named by Django
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "spool")
    (tmp_path / "spool").mkdir()
    return root


def assert_nothing_escaped(tmp_path: Path, root: Path) -> None:
    """Every file under tmp_path is a store object (or its metadata) under a key the server made up."""
    for path in tmp_path.rglob("*"):
        if path.is_dir():
            continue
        assert path.is_relative_to(root), f"file outside the store: {path}"
        key = path.relative_to(root).as_posix().removesuffix(".meta.json")
        assert KEY.fullmatch(key), f"store key not made by the server: {key}"
    assert all(KEY.fullmatch(key) for key in get_model_storage().keys(prefix=""))


@pytest.mark.parametrize("filename", TRAVERSING_NAMES)
def test_traversing_file_names_never_reach_the_store(
    actor: User, client_for: ClientFor, store_root: Path, tmp_path: Path, filename: str
) -> None:
    archive = torchscript_bytes(tiny_net(0))
    preprocessing = torchscript_bytes(torch.nn.Identity())
    body, content_type = multipart(
        [
            ("name", None, b"traversal"),
            ("model_file", filename, archive),
            ("model_preprocessing_file", filename, preprocessing),
        ]
    )
    response = client_for(actor).generic("POST", "/api/models/", body, content_type=content_type)
    assert_nothing_escaped(tmp_path, store_root)
    if filename == "../":  # no file name is left: Django drops the part as a file
        rejected(response, 400, "model_file", "required")
        return
    assert response.status_code == 201, response.content
    model = Model.objects.get(pk=response.json()["model_id"])
    assert get_model_storage().get(model.archive.key) == archive
    assert get_model_storage().get(model.preprocessing.key) == preprocessing
    download = client_for(actor).get(f"/api/models/{model.pk}/")
    assert download["Content-Disposition"] == f'attachment; filename="{model.pk}.pt"'
    assert "escaped" not in json.dumps(client_for(actor).get(f"/api/models/{model.pk}/metadata/").json())


@pytest.mark.parametrize("filename", TRAVERSING_NAMES[:3])
def test_traversing_update_file_names_never_reach_the_store(
    participants: list[User], client_for: ClientFor, training: Training, store_root: Path, tmp_path: Path, filename: str
) -> None:
    update = state_dict_bytes(shifted_weights(0, 0.1))
    body, content_type = multipart(
        [("round", None, b"0"), ("sample_size", None, b"4"), ("model_file", filename, update)]
    )
    url = f"/api/models/{training.model_id}/"
    response = client_for(participants[0]).generic("POST", url, body, content_type=content_type)
    assert response.status_code == 201, response.content
    assert_nothing_escaped(tmp_path, store_root)
    assert LocalModel.objects.filter(owner=participants[0]).count() == 1


# --------------------------------------------------------------------------------------------------------------------
# NUL characters: PostgreSQL refuses them in text, so they must be refused before they reach the database
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "fragment"), [({"name": "tiny\x00net"}, "name"), ({"description": "a\x00b"}, "description")]
)
def test_nul_in_model_text_is_400(
    actor: User, client_for: ClientFor, unchanged: Check, fields: dict, fragment: str
) -> None:
    body = {"name": "tiny", "model_file": upload("m.pt", torchscript_bytes()), **fields}
    check = unchanged()
    rejected(client_for(actor).post("/api/models/", body, format="multipart"), 400, fragment, "NUL")
    check()


def test_nul_in_metric_names_is_400(
    participants: list[User], client_for: ClientFor, training: Training, model_url: str, unchanged: Check
) -> None:
    check = unchanged()
    body = {"metric_names": ["lo\x00ss"], "metric_values": ["0.5"]}
    rejected(client_for(participants[0]).post(f"{model_url}metrics/", body, format="multipart"), 400, "NUL")
    update = update_body(state_dict_bytes(shifted_weights(0, 0.1)), metric_names=["\x00"], metric_values=["1"])
    rejected(client_for(participants[0]).post(model_url, update, format="multipart"), 400, "NUL")
    check()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"note": "a\x00b"}, "options.note"),
        ({"a\x00": 1}, "options (a key)"),
        ({"deep": [{"x": ["\x00"]}]}, "options.deep[0].x[0]"),
        ({"uncertainty": {"N": 3, "label": "\x00"}}, "options.uncertainty.label"),
    ],
)
def test_nul_in_training_options_is_400(
    actor: User, client_for: ClientFor, upload_model: Callable[..., str], unchanged: Check, options: dict, fragment: str
) -> None:
    body = {"model_id": upload_model(actor), "target_num_updates": 1, "options": options}
    check = unchanged()
    rejected(client_for(actor).post("/api/trainings/", body, format="json"), 400, fragment, "NUL")
    check()


@pytest.mark.parametrize(
    "header",
    [
        basic("act\x00or", "s3cret-pass"),
        basic("a" * 39 + "\x00", ""),  # token-length user name with an empty password: looked up as a token
        "Token " + "a" * 39 + "\x00",
    ],
    ids=["basic-user", "basic-token", "token"],
)
def test_nul_in_credentials_is_401(actor: User, header: str) -> None:
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=header)
    rejected(api.get("/api/users/myself/"), 401, "invalid")


def test_session_cookie_with_nul_is_no_session(actor: User) -> None:
    """`"\\000..."` unquotes to NUL: such a cookie must read as no session, not as a server error."""
    api = APIClient()
    api.cookies.load('sessionid="\\000aaaaaaaaaaaaaaaa"')
    assert api.cookies["sessionid"].value.startswith("\x00")
    rejected(api.get("/api/users/myself/"), 401, "credentials")
    api.credentials(HTTP_AUTHORIZATION=f"Token {actor.auth_token.key}")
    assert api.get("/api/users/myself/").status_code == 200


# --------------------------------------------------------------------------------------------------------------------
# Malformed, non-finite and oddly shaped JSON
# --------------------------------------------------------------------------------------------------------------------


def json_post(api: APIClient, url: str, raw: str) -> Response:
    return api.post(url, raw, content_type="application/json")


@pytest.mark.parametrize(
    "raw",
    ["[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000],
    ids=["deep-array", "deep-object"],
)
@pytest.mark.parametrize("url", ["/api/users/", "/api/trainings/", "/api/inference/", "/api/groups/"])
def test_deeply_nested_json_is_400(
    make_user: Callable[..., User], client_for: ClientFor, unchanged: Check, url: str, raw: str
) -> None:
    api = client_for(make_user("staffer", is_staff=True))
    check = unchanged()
    rejected(json_post(api, url, raw), 400, "JSON parse error", "nested")
    check()


@pytest.mark.parametrize("raw", ["[]", '"text"', "42", "null", "[1, 2]"])
@pytest.mark.parametrize("url", ["/api/models/", "/api/inference/", "models/{model}/metrics/", "/api/trainings/"])
def test_json_body_that_is_no_object_is_400(
    actor: User, client_for: ClientFor, training: Training, unchanged: Check, url: str, raw: str
) -> None:
    url = url if url.startswith("/") else "/api/" + url.format(model=training.model_id)
    check = unchanged()
    rejected(json_post(client_for(actor), url, raw), 400)
    check()


@pytest.mark.parametrize(
    ("template", "url"),
    [
        ('{{"model_id": "{model}", "target_num_updates": 1, "options": {{"proximal_mu": 1e999}}}}', "/api/trainings/"),
        ('{{"model_id": "{model}", "target_num_updates": 1, "options": {{"x": -1e400}}}}', "/api/trainings/"),
        ('{{"model_id": "{model}", "target_num_updates": 1, "options": {{"x": Infinity}}}}', "/api/trainings/"),
        ('{{"model_id": "{model}", "model_input": [[1e999, 1, 1, 1]]}}', "/api/inference/"),
        ('{{"metric_names": ["loss"], "metric_values": [1e999]}}', "/api/models/{model}/metrics/"),
    ],
    ids=["option", "unknown-option", "infinity-literal", "model-input", "metric"],
)
def test_numbers_beyond_float_range_are_400(
    actor: User, client_for: ClientFor, training: Training, unchanged: Check, template: str, url: str
) -> None:
    """1e999 is valid JSON syntax but no double holds it: accepted, it could be neither stored nor sent back."""
    model = str(training.model_id)
    check = unchanged()
    response = json_post(client_for(actor), url.format(model=model), template.format(model=model))
    rejected(response, 400, "JSON parse error", "out of range")
    check()


def test_huge_integers_are_400(actor: User, client_for: ClientFor, training: Training, unchanged: Check) -> None:
    """Integers are exact in JSON but not every consumer takes them: floats overflow, seeds are 64-bit."""
    api, model = client_for(actor), str(training.model_id)
    huge = "9" * 400
    check = unchanged()
    response = json_post(api, "/api/inference/", f'{{"model_id": "{model}", "model_input": [[{huge}, 1, 1, 1]]}}')
    rejected(response, 400, "model_input")
    response = json_post(
        api, "/api/inference/", f'{{"model_id": "{model}", "model_input": [[1, 2, 3, 4]], "seed": {huge}}}'
    )
    rejected(response, 400, "seed", "at most")
    response = json_post(api, f"/api/models/{model}/metrics/", f'{{"metric_names": ["a"], "metric_values": [{huge}]}}')
    rejected(response, 400, "metric_values", "not finite")
    check()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"round_timeout_seconds": 1e300}, "round_timeout_seconds"),
        ({"round_timeout_seconds": 10**300}, "round_timeout_seconds"),
        ({"daisy_chain_period": 10**9}, "daisy_chain_period"),
        ({"uncertainty": {"N": 10**12}}, "options.uncertainty.N"),
        ({"x": functools.reduce(lambda inner, _: [inner], range(40), [])}, "nested"),
    ],
    ids=["timeout-float", "timeout-int", "daisy-chain-overflow", "samples", "nesting"],
)
def test_training_options_with_unusable_sizes_are_400(
    actor: User,
    participants: list[User],
    client_for: ClientFor,
    upload_model: Callable[..., str],
    unchanged: Check,
    options: dict,
    fragment: str,
) -> None:
    """Each would be accepted and fail later: a deadline past year 9999 at start, a round count beyond a database
    integer, a trillion forward passes per inference request, options too deep to store."""
    body = {
        "model_id": upload_model(actor),
        "target_num_updates": 1000,
        "options": options,
        "clients": [str(participants[0].pk)],
    }
    check = unchanged()
    rejected(client_for(actor).post("/api/trainings/", body, format="json"), 400, fragment)
    check()


def test_longest_round_timeout_still_starts(
    actor: User, participants: list[User], client_for: ClientFor, make_training: Callable[..., Training]
) -> None:
    training = make_training(actor, participants[:1], start=True, options={"round_timeout_seconds": 10**9})
    assert training.state == TrainingState.ONGOING
    assert training.current_round.deadline.year > 2050


# --------------------------------------------------------------------------------------------------------------------
# Django's own refusals answer JSON too
# --------------------------------------------------------------------------------------------------------------------


def test_too_many_files_is_json_400(actor: User, client_for: ClientFor, unchanged: Check) -> None:
    body = {"name": "many", **{f"f{i}": upload(f"f{i}.pt", b"x") for i in range(101)}}
    check = unchanged()
    rejected(client_for(actor).post("/api/models/", body, format="multipart"), 400, "number of files")
    check()


def test_too_many_fields_is_json_400(db: None, settings: Any, unchanged: Check) -> None:
    settings.DATA_UPLOAD_MAX_NUMBER_FIELDS = 10
    form = "&".join(f"f{i}=1" for i in range(11))
    check = unchanged()
    response = APIClient().post("/api/users/", form, content_type="application/x-www-form-urlencoded")
    rejected(response, 400, "number of GET/POST parameters")
    check()


def test_unknown_host_is_json_400(actor: User, client_for: ClientFor) -> None:
    response = client_for(actor).get("/api/users/myself/", HTTP_HOST="attacker.example")
    assert "attacker" not in rejected(response, 400, "bad request")


# --------------------------------------------------------------------------------------------------------------------
# A token in the wrong place authenticates nothing and is never echoed
# --------------------------------------------------------------------------------------------------------------------

WRONG_PLACES: dict[str, Callable[[str], dict[str, Any]]] = {
    "query ?token=": lambda key: {"query": {"token": key}},
    "query ?auth_token=": lambda key: {"query": {"auth_token": key}},
    "query ?access_token=": lambda key: {"query": {"access_token": key}},
    "query ?Authorization=": lambda key: {"query": {"Authorization": f"Token {key}"}},
    "Authorization: Bearer": lambda key: {"headers": {"HTTP_AUTHORIZATION": f"Bearer {key}"}},
    "Authorization without scheme": lambda key: {"headers": {"HTTP_AUTHORIZATION": key}},
    "X-Auth-Token header": lambda key: {"headers": {"HTTP_X_AUTH_TOKEN": key}},
    "Token header": lambda key: {"headers": {"HTTP_TOKEN": key}},
    "Proxy-Authorization": lambda key: {"headers": {"HTTP_PROXY_AUTHORIZATION": f"Token {key}"}},
    "cookie token": lambda key: {"cookies": {"token": key}},
    "cookie Authorization": lambda key: {"cookies": {"Authorization": f"Token {key}"}},
    "cookie sessionid": lambda key: {"cookies": {"sessionid": key}},
    "JSON body": lambda key: {"json": {"token": key, "auth_token": key}},
    "form body": lambda key: {"form": {"token": key, "Authorization": f"Token {key}"}},
}


@pytest.mark.parametrize("place", list(WRONG_PLACES))
def test_token_in_the_wrong_place_is_401_and_not_echoed(actor: User, unchanged: Check, place: str) -> None:
    key = actor.auth_token.key
    where = WRONG_PLACES[place](key)
    api = APIClient()
    for name, value in where.get("cookies", {}).items():
        api.cookies[name] = value
    check = unchanged()
    headers = where.get("headers", {})
    query = "?" + urlencode(where["query"]) if "query" in where else ""
    if "json" in where or "form" in where:
        data, fmt = (where["json"], "json") if "json" in where else (where["form"], "multipart")
        responses = [api.post("/api/groups/", {"name": "g", **data}, format=fmt, **headers)]
    else:
        responses = [api.get(f"/api/users/myself/{query}", **headers)]
        responses.append(api.post(f"/api/groups/{query}", {"name": "g"}, format="json", **headers))
    for response in responses:
        rejected(response, 401)
        assert key.encode() not in response.content
        assert all(key not in str(value) for value in response.headers.values())
    check()
    assert not Group.objects.exists()


# --------------------------------------------------------------------------------------------------------------------
# CSRF: session-authenticated writes need the CSRF token, on every kind of endpoint
# --------------------------------------------------------------------------------------------------------------------


def with_csrf_token(api: APIClient) -> dict[str, str]:
    """Fetch a CSRF cookie the way a browser page would and return the header that echoes it."""
    api.get("/admin/login/")
    return {"HTTP_X_CSRFTOKEN": api.cookies["csrftoken"].value}


def csrf_write(write: str, training: Training, actor: User, participant: User) -> tuple[User, str, str, Any, int]:
    """Who sends which write (method, URL, fresh body) and its success code."""
    if write == "model upload":
        body = {"name": "csrf", "model_file": upload("m.pt", torchscript_bytes())}
        return actor, "post", "/api/models/", body, 201
    if write == "local update":
        body = update_body(state_dict_bytes(shifted_weights(0, 0.1)))
        return participant, "post", f"/api/models/{training.model_id}/", body, 201
    if write == "training delete":
        return actor, "delete", f"/api/trainings/{training.pk}/", None, 200
    return actor, "post", f"/api/trainings/{training.pk}/abort/", None, 200


@pytest.mark.parametrize("write", ["model upload", "local update", "training delete", "abort"])
def test_session_writes_need_the_csrf_token(
    actor: User, participants: list[User], training: Training, unchanged: Check, write: str
) -> None:
    user, method, url, body, success = csrf_write(write, training, actor, participants[0])
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(user)
    send = getattr(api, method)
    check = unchanged()
    rejected(send(url, body, format="multipart"), 403, "CSRF")
    check()
    body = csrf_write(write, training, actor, participants[0])[3]  # fresh files: the first request read them
    response = send(url, body, format="multipart", **with_csrf_token(api))
    assert response.status_code == success, response.content[:300]


# --------------------------------------------------------------------------------------------------------------------
# Another client's model id
# --------------------------------------------------------------------------------------------------------------------


def test_another_clients_update_is_out_of_reach(
    participants: list[User], client_for: ClientFor, training: Training, unchanged: Check
) -> None:
    """The second participant's local update, named by the first participant through every model endpoint."""
    own, other = participants[0], participants[1]
    response = post_update(client_for(other), training.model_id, 0, shifted_weights(1, 0.2), 5)
    assert response.status_code == 201, response.content
    local = LocalModel.objects.get(owner=other)
    url = f"/api/models/{local.pk}/"
    api = client_for(own)
    update = update_body(state_dict_bytes(shifted_weights(0, 0.1)))
    moments = {
        "round": 0,
        "sample_size": 1,
        "first_moment_file": upload("a", b"x"),
        "second_moment_file": upload("b", b"y"),
    }
    inference = {"model_id": str(local.pk), "model_input": [[1.0] * 4]}
    mean = {"name": "m", "type": "MEAN", "models": [str(local.pk), str(training.model_id)]}
    preprocessing = {"model_preprocessing_file": upload("p", torchscript_bytes())}
    metrics = {"metric_names": ["a"], "metric_values": ["1"]}
    requests: list[tuple[str, Callable[[], Response], int]] = [
        ("download", lambda: api.get(url), 403),
        ("download safetensors", lambda: api.get(url, {"format": "safetensors"}), 403),
        ("metadata", lambda: api.get(f"{url}metadata/"), 403),
        ("metrics", lambda: api.get(f"{url}metrics/"), 403),
        ("report metrics", lambda: api.post(f"{url}metrics/", metrics), 403),
        ("preprocessing", lambda: api.get(f"{url}preprocessing/"), 403),
        ("set preprocessing", lambda: api.post(f"{url}preprocessing/", preprocessing), 403),
        ("delete", lambda: api.delete(url), 403),
        ("inference", lambda: api.post("/api/inference/", inference, format="json"), 403),
        ("mean member", lambda: api.post("/api/models/", mean), 403),
        (
            "training of it",
            lambda: api.post("/api/trainings/", {"model_id": str(local.pk), "target_num_updates": 1}),
            400,
        ),
        # refused for everyone alike, whoever owns it (documented): an update is no training's global model
        ("update it", lambda: api.post(url, update, format="multipart"), 409),
        ("swag for it", lambda: api.post(f"{url}swag/", moments, format="multipart"), 409),
    ]
    check = unchanged()
    for label, send, status in requests:
        response = send()
        assert response.status_code == status, (label, response.status_code, response.content[:200])
        assert isinstance(response.json().get("detail"), str), label
    check()
    assert Metric.objects.filter(model=local).count() == 0
