"""API tests of the models endpoints: upload, list, download, local updates, delete, metadata, metrics,
preprocessing and SWAG statistics (real database, real model store backend, real PyTorch files)."""

import base64
import hashlib
import io
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from django.db import transaction
from rest_framework.response import Response
from rest_framework.test import APIClient

from fl_server_ai.trainer.lifecycle import lock_training
from fl_server_ai.trainer.rounds import open_round
from fl_server_core.models import (
    Blob,
    LocalModel,
    Metric,
    Model,
    RoundKind,
    RoundState,
    SWAGUpdate,
    Training,
    TrainingRound,
    TrainingState,
    User,
)
from fl_server_core.storage import get_model_storage
from tests.conftest import upload
from tests.helpers import (
    pickled_module_bytes,
    safetensors_bytes,
    shifted_weights,
    state_dict_bytes,
    tiny_net,
    torchscript_bytes,
)

ClientFor = Callable[[User | None], APIClient]
Check = Callable[[], Callable[[], None]]

MODEL_KEYS = {
    "id", "type", "name", "description", "owner", "round", "created_at", "updated_at", "training_id",
    "base_model", "sample_size", "weights_format", "parameter_count", "size_bytes", "sha256", "input_shape",
    "has_preprocessing", "members",
}  # fmt: skip
# TinyNet: fc1 (4*8 + 8) + norm (8 + 8) + fc2 (8*3 + 3); buffers (running stats) are not parameters
TINY_PARAMETERS = 40 + 16 + 27


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


def rejected(response: Response, status: int, *fragments: str) -> str:
    """Assert an error answer with `status` whose `detail` mentions every fragment (case-insensitive)."""
    assert response.status_code == status, (response.status_code, response.content[:500])
    detail = response.json()["detail"]
    assert isinstance(detail, str), detail
    assert detail.strip(), "empty detail"
    for fragment in fragments:
        assert fragment.lower() in detail.lower(), (fragment, detail)
    return detail


def torch_save(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class WithStateHooks(torch.nn.Module):
    """A scriptable module whose TorchScript __setstate__ would run while the archive is loaded."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, bool]:
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]) -> None:
        self.w = state[0]
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class WritesMarker:
    """Unpickling this object runs `open(path, "w")`, which creates the marker file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def malicious_payloads(path: Path) -> dict[str, bytes]:
    """Crafted pickles whose unpickling would create `path`: raw pickle and a torch.save archive."""
    return {"raw pickle": pickle.dumps(WritesMarker(path)), "torch.save": torch_save({"w": WritesMarker(path)})}


def update_body(data: bytes | None = None, round_number: Any = 0, sample_size: Any = 10, **extra: Any) -> dict:
    """Multipart body of a local update (defaults: a valid safetensors update for round 0)."""
    body = {
        "round": round_number,
        "sample_size": sample_size,
        "model_file": upload("update.bin", data if data is not None else safetensors_bytes(shifted_weights(0, 0.5))),
    }
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def store_keys() -> list[str]:
    return sorted(get_model_storage().keys())


def keys_of(model_id: str) -> list[str]:
    return [key for key in store_keys() if key.startswith(f"models/{model_id}/")]


def global_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module")
def tiny_script() -> bytes:
    return torchscript_bytes()


@pytest.fixture
def training(actor: User, participants: list[User], make_training: Callable[..., Training]) -> Training:
    """A started (ONGOING) training of a fresh TinyNet with the three participants."""
    started = make_training(actor, participants, start=True)
    assert started.state == TrainingState.ONGOING
    return started


@pytest.fixture
def model_url(training: Training) -> str:
    return f"/api/models/{training.model_id}/"


# --------------------------------------------------------------------------------------------------------------------
# POST /api/models/ (global model upload)
# --------------------------------------------------------------------------------------------------------------------


def test_upload_global_model_stores_metadata(actor: User, client_for: ClientFor, tiny_script: bytes) -> None:
    response = client_for(actor).post(
        "/api/models/",
        {
            "name": "tiny",
            "description": "a tiny net",
            "model_file": upload("m.pt", tiny_script),
            "input_shape": ["None", "4"],
        },
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["detail"] == "Model Upload Accepted"
    model = Model.objects.get(pk=response.json()["model_id"])
    assert (model.kind, model.name, model.description, model.owner_id, model.round) == (
        "GLOBAL",
        "tiny",
        "a tiny net",
        actor.pk,
        0,
    )
    assert model.input_shape == [None, 4]
    assert model.parameter_count == TINY_PARAMETERS
    expected = tiny_net().state_dict()
    assert [t["name"] for t in model.tensor_spec] == list(expected)
    for entry in model.tensor_spec:
        assert entry["shape"] == list(expected[entry["name"]].shape)
    parameters = {name for name, _ in tiny_net().named_parameters()}
    assert {t["name"] for t in model.tensor_spec if t["is_parameter"]} == parameters
    stored_weights = get_model_storage().get(model.weights.key)
    assert model.weights.sha256 == hashlib.sha256(stored_weights).hexdigest()
    assert model.weights.size == len(stored_weights)
    assert get_model_storage().get(model.archive.key) == tiny_script
    for name, tensor in safetensors.torch.load(stored_weights).items():
        assert torch.equal(tensor, expected[name])
    meta = client_for(actor).get(f"/api/models/{model.pk}/metadata/").json()
    assert meta["sha256"] == hashlib.sha256(stored_weights).hexdigest()
    assert meta["input_shape"] == [None, 4]
    assert meta["has_preprocessing"] is False


def test_upload_with_preprocessing_file(actor: User, client_for: ClientFor, upload_model: Callable[..., str]) -> None:
    preprocessing = torchscript_bytes(torch.nn.Identity())
    model_id = upload_model(actor, model_preprocessing_file=upload("pre.pt", preprocessing))
    assert client_for(actor).get(f"/api/models/{model_id}/metadata/").json()["has_preprocessing"] is True
    response = client_for(actor).get(f"/api/models/{model_id}/preprocessing/")
    assert response.status_code == 200
    assert response.content == preprocessing


def multipart_model(**fields: Any) -> dict:
    body = {"name": "tiny", "description": "d", "model_file": upload("m.pt", torchscript_bytes())}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"name": None}, ["name", "required"]),
        ({"name": "   "}, ["name", "required"]),
        ({"name": "x" * 300}, ["name", "256"]),
        ({"model_file": None}, ["model_file", "required"]),
        ({"model_file": upload("m.pt", b"")}, ["model_file", "empty"]),
        (
            {"model_file": upload("m.pt", b"\x00garbage bytes that are no model\xff" * 10)},
            ["model_file", "unrecognized"],
        ),
        ({"model_file": upload("m.pt", state_dict_bytes(tiny_net().state_dict()))}, ["architecture", "state_dict"]),
        ({"model_file": upload("m.pt", safetensors_bytes(tiny_net().state_dict()))}, ["architecture", "safetensors"]),
        ({"input_shape": ["None", "abc"]}, ["input_shape", "abc"]),
        ({"input_shape": ["0", "4"]}, ["input_shape", "positive"]),
        ({"input_shape": ["-3"]}, ["input_shape", "positive"]),
        (
            {"model_preprocessing_file": upload("pre.pt", b"not torchscript")},
            ["model_preprocessing_file", "unrecognized"],
        ),
        (
            {"model_preprocessing_file": upload("pre.pt", state_dict_bytes({"a": torch.ones(2)}))},
            ["model_preprocessing_file", "torchscript"],
        ),
    ],
)
def test_upload_rejects_invalid_input(
    actor: User, client_for: ClientFor, unchanged: Check, fields: dict, fragments: list[str]
) -> None:
    body = multipart_model(**fields)
    check = unchanged()
    response = client_for(actor).post("/api/models/", body, format="multipart")
    rejected(response, 400, *fragments)
    check()


def test_upload_rejects_pickled_module(actor: User, client_for: ClientFor, unchanged: Check) -> None:
    check = unchanged()
    response = client_for(actor).post(
        "/api/models/", multipart_model(model_file=upload("m.pt", pickled_module_bytes())), format="multipart"
    )
    rejected(response, 400, "model_file", "unpickling", "arbitrary code", "torch.jit.save")
    check()


@pytest.mark.parametrize("kind", ["raw pickle", "torch.save"])
def test_upload_never_unpickles_crafted_payload(
    actor: User, client_for: ClientFor, unchanged: Check, tmp_path: Path, kind: str
) -> None:
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(WritesMarker(control)))  # the payload really does write its marker when unpickled
    assert control.exists()
    marker = tmp_path / "pwned"
    check = unchanged()
    response = client_for(actor).post(
        "/api/models/",
        multipart_model(model_file=upload("m.pt", malicious_payloads(marker)[kind])),
        format="multipart",
    )
    rejected(response, 400, "model_file", "unpickl")
    assert not marker.exists()
    check()


def test_upload_refuses_torchscript_with_setstate(actor: User, client_for: ClientFor, unchanged: Check) -> None:
    archive = torchscript_bytes(WithStateHooks())
    check = unchanged()
    response = client_for(actor).post(
        "/api/models/", multipart_model(model_file=upload("m.pt", archive)), format="multipart"
    )
    rejected(response, 400, "model_file", "__setstate__")
    check()


def test_upload_anonymous_is_401(client_for: ClientFor, unchanged: Check, db: None) -> None:
    check = unchanged()
    response = client_for(None).post("/api/models/", multipart_model(), format="multipart")
    rejected(response, 401, "credentials")
    check()


def test_upload_too_large_by_content_length(
    actor: User, client_for: ClientFor, unchanged: Check, settings: Any
) -> None:
    settings.FL_MAX_UPLOAD_BYTES = 2048
    check = unchanged()
    response = client_for(actor).post("/api/models/", multipart_model(), format="multipart")
    rejected(response, 413, "exceeds", "2048")
    check()


def test_upload_too_large_per_file(actor: User, client_for: ClientFor, unchanged: Check, settings: Any) -> None:
    """Without the Content-Length middleware the view still enforces the limit per uploaded file."""
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if not m.endswith("UploadSizeLimitMiddleware")]
    settings.FL_MAX_UPLOAD_BYTES = 2048
    check = unchanged()
    response = client_for(actor).post("/api/models/", multipart_model(), format="multipart")
    rejected(response, 413, "model_file", "2048")
    check()


# --------------------------------------------------------------------------------------------------------------------
# POST /api/models/ type=MEAN
# --------------------------------------------------------------------------------------------------------------------


def test_mean_model_lists_its_members(actor: User, client_for: ClientFor, upload_model: Callable[..., str]) -> None:
    first, second = upload_model(actor), upload_model(actor)
    response = client_for(actor).post(
        "/api/models/", {"name": "ensemble", "type": "MEAN", "models": [first, second]}, format="multipart"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["detail"] == "Model Upload Accepted"
    mean_id = response.json()["model_id"]
    meta = client_for(actor).get(f"/api/models/{mean_id}/metadata/")
    assert meta.status_code == 200
    assert meta.json()["type"] == "MEAN"
    assert sorted(meta.json()["members"]) == sorted([first, second])
    listed = {m["id"]: m for m in client_for(actor).get("/api/models/").json()}
    assert sorted(listed[mean_id]["members"]) == sorted([first, second])


def test_mean_model_download_is_400(
    actor: User, client_for: ClientFor, upload_model: Callable[..., str], unchanged: Check
) -> None:
    members = [upload_model(actor), upload_model(actor)]
    mean_id = (
        client_for(actor)
        .post("/api/models/", {"name": "ensemble", "type": "MEAN", "models": members}, format="multipart")
        .json()["model_id"]
    )
    check = unchanged()
    rejected(client_for(actor).get(f"/api/models/{mean_id}/"), 400, "mean model")
    check()


def test_mean_model_rejections(
    actor: User,
    outsider: User,
    participants: list[User],
    client_for: ClientFor,
    upload_model: Callable[..., str],
    training: Training,
    unchanged: Check,
) -> None:
    own = upload_model(actor)
    foreign = upload_model(outsider)
    client_for(participants[0]).post(f"/api/models/{training.model_id}/", update_body(), format="multipart")
    local = str(LocalModel.objects.get(base_model=training.model).pk)
    cases = [
        ([own], 400, ["two distinct"]),
        ([own, own], 400, ["two distinct"]),
        ([own, local], 400, ["not global", local]),
        ([own, "5b1f8c7e-0000-4000-8000-000000000000"], 400, ["not a known model"]),
        ([own, "not-a-uuid"], 400, ["not a known model"]),
        ([own, foreign], 403, ["not allowed", foreign]),
    ]
    for members, status, fragments in cases:
        check = unchanged()
        response = client_for(actor).post(
            "/api/models/", {"name": "ensemble", "type": "MEAN", "models": members}, format="multipart"
        )
        rejected(response, status, *fragments)
        check()


# --------------------------------------------------------------------------------------------------------------------
# GET /api/models/ and /api/models/<id>/metadata/
# --------------------------------------------------------------------------------------------------------------------


def test_list_shows_only_visible_models(
    actor: User,
    outsider: User,
    participants: list[User],
    client_for: ClientFor,
    upload_model: Callable[..., str],
    training: Training,
) -> None:
    private = upload_model(actor)
    own_of_outsider = upload_model(outsider)
    actor_ids = {m["id"] for m in client_for(actor).get("/api/models/").json()}
    assert actor_ids == {private, str(training.model_id)}
    participant_models = client_for(participants[0]).get("/api/models/").json()
    assert {m["id"] for m in participant_models} == {str(training.model_id)}
    assert {m["id"] for m in client_for(outsider).get("/api/models/").json()} == {own_of_outsider}
    for entry in participant_models:
        assert set(entry) == MODEL_KEYS  # metadata only: no weights, no tensors
        assert entry["training_id"] == str(training.pk)
        assert entry["parameter_count"] == TINY_PARAMETERS
    rejected(client_for(None).get("/api/models/"), 401)


def test_metadata_of_visible_model(
    actor: User, participants: list[User], client_for: ClientFor, training: Training
) -> None:
    for user in (actor, participants[1]):
        response = client_for(user).get(f"/api/models/{training.model_id}/metadata/")
        assert response.status_code == 200
        meta = response.json()
        assert set(meta) == MODEL_KEYS | {"tensors", "archive_size_bytes"}
        model = Model.objects.get(pk=training.model_id)
        assert meta["parameter_count"] == TINY_PARAMETERS
        assert meta["size_bytes"] == model.weights.size == len(get_model_storage().get(model.weights.key))
        assert meta["archive_size_bytes"] == len(get_model_storage().get(model.archive.key))
        shapes = {t["name"]: (t["shape"], t["dtype"]) for t in meta["tensors"]}
        assert shapes["fc1.weight"] == ([8, 4], "float32")
        assert shapes["norm.num_batches_tracked"] == ([], "int64")
        assert len(shapes) == len(tiny_net().state_dict())


def test_metadata_rejections(outsider: User, client_for: ClientFor, training: Training, unchanged: Check) -> None:
    check = unchanged()
    rejected(client_for(outsider).get(f"/api/models/{training.model_id}/metadata/"), 403, "not allowed")
    rejected(client_for(outsider).get("/api/models/5b1f8c7e-0000-4000-8000-000000000000/metadata/"), 404)
    check()


# --------------------------------------------------------------------------------------------------------------------
# GET /api/models/<id>/ (download)
# --------------------------------------------------------------------------------------------------------------------


def test_download_torchscript_gives_same_outputs(
    actor: User, participants: list[User], client_for: ClientFor, training: Training
) -> None:
    x = torch.randn(5, 4)
    expected = global_output(tiny_net(), x)
    for user in (actor, participants[2]):
        response = client_for(user).get(f"/api/models/{training.model_id}/")
        assert response.status_code == 200
        assert response["Content-Type"] == "application/octet-stream"
        loaded = torch.jit.load(io.BytesIO(response.content))
        assert torch.allclose(global_output(loaded, x), expected)


def test_download_safetensors_gives_the_weights(
    participants: list[User], client_for: ClientFor, training: Training
) -> None:
    response = client_for(participants[0]).get(f"/api/models/{training.model_id}/", {"format": "safetensors"})
    assert response.status_code == 200
    weights = safetensors.torch.load(response.content)
    expected = tiny_net().state_dict()
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    meta = client_for(participants[0]).get(f"/api/models/{training.model_id}/metadata/").json()
    assert meta["sha256"] == hashlib.sha256(response.content).hexdigest()


def test_download_rejections(
    outsider: User, actor: User, client_for: ClientFor, training: Training, unchanged: Check
) -> None:
    check = unchanged()
    rejected(client_for(outsider).get(f"/api/models/{training.model_id}/"), 403, "not allowed")
    rejected(client_for(actor).get("/api/models/5b1f8c7e-0000-4000-8000-000000000000/"), 404)
    rejected(client_for(actor).get(f"/api/models/{training.model_id}/", {"format": "onnx"}), 400, "format")
    rejected(client_for(None).get(f"/api/models/{training.model_id}/"), 401)
    check()


def test_actor_downloads_local_update_as_torchscript(
    actor: User, participants: list[User], client_for: ClientFor, training: Training, model_url: str
) -> None:
    update = shifted_weights(0, 0.25)
    response = client_for(participants[0]).post(model_url, update_body(state_dict_bytes(update)), format="multipart")
    assert response.status_code == 201, response.json()
    local = LocalModel.objects.get(base_model=training.model, owner=participants[0])
    download = client_for(actor).get(f"/api/models/{local.pk}/")
    assert download.status_code == 200
    loaded = torch.jit.load(io.BytesIO(download.content))
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, update[name]), name
    x = torch.randn(3, 4)
    reference = tiny_net()
    reference.load_state_dict(update)
    assert torch.allclose(global_output(loaded, x), global_output(reference, x))
    weights = safetensors.torch.load(client_for(actor).get(f"/api/models/{local.pk}/?format=safetensors").content)
    assert all(torch.equal(weights[k], v) for k, v in update.items())
    assert client_for(participants[0]).get(f"/api/models/{local.pk}/").status_code == 200  # its owner
    rejected(client_for(participants[1]).get(f"/api/models/{local.pk}/"), 403, "not allowed")  # another client


# --------------------------------------------------------------------------------------------------------------------
# POST /api/models/<id>/ (local update)
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "encode"),
    [
        ("torchscript", lambda w: torchscript_bytes(module_with(w))),
        ("state_dict", state_dict_bytes),
        ("safetensors", safetensors_bytes),
    ],
)
def test_local_update_accepted_formats(
    participants: list[User],
    client_for: ClientFor,
    training: Training,
    model_url: str,
    fmt: str,
    encode: Callable[[dict], bytes],
) -> None:
    weights = shifted_weights(0, 0.5)
    client = participants[1]
    response = client_for(client).post(
        model_url,
        update_body(encode(weights), sample_size=42, metric_names=["loss", "accuracy"], metric_values=["0.5", "0.75"]),
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    assert response.json() == {"detail": "Model Update Accepted"}
    local = LocalModel.objects.get(base_model=training.model)
    assert (local.owner_id, local.round, local.sample_size, local.weights_format) == (client.pk, 0, 42, fmt)
    stored = safetensors.torch.load(get_model_storage().get(local.weights.key))
    assert set(stored) == set(weights)
    assert all(torch.equal(stored[k], v) for k, v in weights.items())
    metrics = {(m.key, m.value_float, m.step, m.reporter_id) for m in Metric.objects.filter(model=local)}
    assert metrics == {("loss", 0.5, 0, client.pk), ("accuracy", 0.75, 0, client.pk)}


def module_with(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    module = tiny_net()
    module.load_state_dict(weights)
    return module


def test_local_update_with_own_owner_and_later_round(
    participants: list[User], actor: User, client_for: ClientFor, training: Training, model_url: str
) -> None:
    Model.objects.filter(pk=training.model_id).update(round=3)
    TrainingRound.objects.filter(pk=training.current_round_id).update(number=3)
    client = participants[2]
    response = client_for(client).post(
        model_url,
        update_body(round_number=3, owner=str(client.pk), metric_names=["loss"], metric_values=["1e-3"]),
        format="multipart",
    )
    assert response.status_code == 201, response.json()
    local = LocalModel.objects.get(base_model=training.model)
    assert (local.owner_id, local.round) == (client.pk, 3)
    metrics = client_for(actor).get(f"/api/models/{local.pk}/metrics/").json()
    assert [(m["key"], m["value"], m["step"], m["reporter"]) for m in metrics] == [("loss", 1e-3, 3, str(client.pk))]


def bad_weights(change: str) -> dict[str, torch.Tensor]:
    weights = shifted_weights(0, 0.1)
    if change == "shape":
        weights["fc1.weight"] = torch.zeros(8, 5)
    elif change == "dtype":
        weights["fc1.weight"] = weights["fc1.weight"].double()
    elif change == "nan":
        weights["fc2.bias"][1] = math.nan
    elif change == "inf":
        weights["fc1.weight"][0, 0] = math.inf
    elif change == "missing":
        del weights["fc2.bias"]
    elif change == "extra":
        weights["fc3.weight"] = torch.zeros(2, 2)
    return weights


@pytest.mark.parametrize(
    ("change", "fragments"),
    [
        ("shape", ["shape mismatch", "fc1.weight"]),
        ("dtype", ["dtype mismatch", "fc1.weight", "float64"]),
        ("nan", ["non-finite", "fc2.bias"]),
        ("inf", ["non-finite", "fc1.weight"]),
        ("missing", ["missing tensors", "fc2.bias"]),
        ("extra", ["unexpected tensors", "fc3.weight"]),
    ],
)
@pytest.mark.parametrize("encode", [state_dict_bytes, safetensors_bytes], ids=["state_dict", "safetensors"])
def test_local_update_rejects_mismatching_weights(
    participants: list[User],
    client_for: ClientFor,
    training: Training,
    model_url: str,
    unchanged: Check,
    change: str,
    fragments: list[str],
    encode: Callable[[dict], bytes],
) -> None:
    body = update_body(encode(bad_weights(change)))
    check = unchanged()
    response = client_for(participants[0]).post(model_url, body, format="multipart")
    rejected(response, 400, "model_file", *fragments)
    check()


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        (pickled_module_bytes(), ["unpickling", "arbitrary code", "state_dict"]),
        (b"", ["empty"]),
        (b"\x00\x01 certainly not a model" * 20, ["unrecognized"]),
        (torch_save(torch.zeros(3)), ["single tensor"]),
        (torchscript_bytes(WithStateHooks()), ["__setstate__"]),
    ],
    ids=["pickled-module", "empty", "garbage", "bare-tensor", "torchscript-setstate"],
)
def test_local_update_rejects_unreadable_files(
    participants: list[User],
    client_for: ClientFor,
    model_url: str,
    unchanged: Check,
    data: bytes,
    fragments: list[str],
) -> None:
    body = update_body(data)
    check = unchanged()
    response = client_for(participants[0]).post(model_url, body, format="multipart")
    rejected(response, 400, "model_file", *fragments)
    check()


@pytest.mark.parametrize("kind", ["raw pickle", "torch.save"])
def test_local_update_never_unpickles_crafted_payload(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check, tmp_path: Path, kind: str
) -> None:
    marker = tmp_path / "pwned"
    body = update_body(malicious_payloads(marker)[kind])
    check = unchanged()
    response = client_for(participants[0]).post(model_url, body, format="multipart")
    rejected(response, 400, "model_file", "unpickl")
    assert not marker.exists()
    check()


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"sample_size": 0}, ["sample_size", "at least 1"]),
        ({"sample_size": -4}, ["sample_size", "at least 1"]),
        ({"sample_size": None}, ["sample_size", "required"]),
        ({"sample_size": "many"}, ["sample_size", "not an integer"]),
        ({"sample_size": "2.5"}, ["sample_size", "not an integer"]),
        ({"round_number": None}, ["round", "required"]),
        ({"round_number": "first"}, ["round", "not an integer"]),
        ({"metric_names": ["loss", "acc"], "metric_values": ["0.1"]}, ["same length", "2", "1"]),
        ({"metric_names": ["loss"]}, ["same length"]),
        ({"metric_values": ["0.3"]}, ["same length"]),
        ({"metric_names": ["loss"], "metric_values": ["low"]}, ["metric_values", "not a number"]),
        ({"metric_names": ["loss"], "metric_values": ["nan"]}, ["metric_values", "not finite"]),
        ({"model_file": None}, ["model_file", "required"]),
    ],
)
def test_local_update_rejects_invalid_fields(
    participants: list[User],
    client_for: ClientFor,
    model_url: str,
    unchanged: Check,
    fields: dict,
    fragments: list[str],
) -> None:
    body = update_body(**fields)
    check = unchanged()
    response = client_for(participants[0]).post(model_url, body, format="multipart")
    rejected(response, 400, *fragments)
    check()


def test_local_update_not_a_participant(
    outsider: User, actor: User, client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    check = unchanged()
    for user in (outsider, actor):
        response = client_for(user).post(model_url, update_body(), format="multipart")
        rejected(response, 403, "not a participant")
    check()


def test_local_update_owner_must_be_caller(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    check = unchanged()
    body = update_body(owner=str(participants[1].pk))
    rejected(client_for(participants[0]).post(model_url, body, format="multipart"), 403, "owner")
    check()


def test_local_update_training_not_started(
    actor: User,
    participants: list[User],
    client_for: ClientFor,
    make_training: Callable[..., Training],
    unchanged: Check,
) -> None:
    initial = make_training(actor, participants, start=False)
    assert initial.state == TrainingState.INITIAL
    check = unchanged()
    response = client_for(participants[0]).post(f"/api/models/{initial.model_id}/", update_body(), format="multipart")
    rejected(response, 409, "INITIAL", "ONGOING")
    check()


@pytest.mark.parametrize(
    ("state", "name"),
    [(TrainingState.SWAG_ROUND, "SWAG_ROUND"), (TrainingState.COMPLETED, "COMPLETED"), (TrainingState.ERROR, "ERROR")],
)
def test_local_update_training_not_ongoing(
    participants: list[User],
    client_for: ClientFor,
    training: Training,
    model_url: str,
    unchanged: Check,
    state: str,
    name: str,
) -> None:
    Training.objects.filter(pk=training.pk).update(state=state)
    check = unchanged()
    rejected(client_for(participants[0]).post(model_url, update_body(), format="multipart"), 409, name, "ONGOING")
    check()


@pytest.mark.parametrize("round_number", [1, 7])
def test_local_update_wrong_round(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check, round_number: int
) -> None:
    check = unchanged()
    response = client_for(participants[0]).post(model_url, update_body(round_number=round_number), format="multipart")
    rejected(response, 409, f"round {round_number}", "current round (0)")
    check()


def test_local_update_duplicate(
    participants: list[User], client_for: ClientFor, training: Training, model_url: str, unchanged: Check
) -> None:
    client = client_for(participants[0])
    assert client.post(model_url, update_body(), format="multipart").status_code == 201
    check = unchanged()
    second = update_body(state_dict_bytes(shifted_weights(0, 0.9)), metric_names=["loss"], metric_values=["1"])
    rejected(client.post(model_url, second, format="multipart"), 409, "already uploaded", "round 0")
    check()
    assert LocalModel.objects.filter(base_model=training.model).count() == 1


def test_local_update_for_model_without_training(
    actor: User, client_for: ClientFor, upload_model: Callable[..., str], unchanged: Check
) -> None:
    model_id = upload_model(actor)
    check = unchanged()
    response = client_for(actor).post(f"/api/models/{model_id}/", update_body(), format="multipart")
    rejected(response, 409, "not the global model of a training")
    check()


def test_local_update_unknown_model(participants: list[User], client_for: ClientFor, unchanged: Check) -> None:
    check = unchanged()
    url = "/api/models/5b1f8c7e-0000-4000-8000-000000000000/"
    rejected(client_for(participants[0]).post(url, update_body(), format="multipart"), 404)
    check()


def test_local_update_too_large(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check, settings: Any
) -> None:
    settings.FL_MAX_UPLOAD_BYTES = 1024
    check = unchanged()
    rejected(client_for(participants[0]).post(model_url, update_body(), format="multipart"), 413, "1024")
    check()


def test_local_update_too_large_per_file(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check, settings: Any
) -> None:
    settings.MIDDLEWARE = [m for m in settings.MIDDLEWARE if not m.endswith("UploadSizeLimitMiddleware")]
    settings.FL_MAX_UPLOAD_BYTES = 1024
    check = unchanged()
    response = client_for(participants[0]).post(model_url, update_body(), format="multipart")
    rejected(response, 413, "model_file", "1024")
    check()


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"),
    [
        # Django's parser skips unreadable parts, so nothing of the update arrives
        (
            "multipart/form-data; boundary=xyz",
            b"--xyz\r\nContent-Disposition: form-data; name=\r\n\r\ngarbage",
            "round",
        ),
        ("multipart/form-data; boundary=xyz", b"\x00\xff garbage without any boundary", "round"),
        ("multipart/form-data", b"round=0&sample_size=1", "multipart"),
        ("multipart/form-data; boundary=", b"garbage", "multipart"),
    ],
    ids=["truncated-part", "garbage-body", "no-boundary", "empty-boundary"],
)
def test_local_update_malformed_multipart(
    participants: list[User],
    client_for: ClientFor,
    model_url: str,
    unchanged: Check,
    content_type: str,
    body: bytes,
    fragment: str,
) -> None:
    check = unchanged()
    response = client_for(participants[0]).generic("POST", model_url, body, content_type=content_type)
    rejected(response, 400, fragment)
    check()


def test_local_update_json_body_is_415(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    check = unchanged()
    response = client_for(participants[0]).post(model_url, {"round": 0, "sample_size": 3}, format="json")
    rejected(response, 415, "application/json")
    check()


def test_local_update_owner_given_as_uppercase_uuid(
    participants: list[User], client_for: ClientFor, training: Training, model_url: str
) -> None:
    body = update_body(owner=str(participants[0].pk).upper())
    response = client_for(participants[0]).post(model_url, body, format="multipart")
    assert response.status_code == 201, response.json()
    assert LocalModel.objects.get(base_model=training.model).owner_id == participants[0].pk


def test_local_update_owner_not_a_uuid(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    check = unchanged()
    body = update_body(owner="client0")
    rejected(client_for(participants[0]).post(model_url, body, format="multipart"), 400, "owner", "client0")
    check()


def test_local_update_sample_size_beyond_database_range(
    participants: list[User], client_for: ClientFor, model_url: str, unchanged: Check
) -> None:
    check = unchanged()
    body = update_body(sample_size=str(10**25))
    rejected(client_for(participants[0]).post(model_url, body, format="multipart"), 400, "sample_size", "at most")
    check()


def test_local_update_anonymous_is_401(client_for: ClientFor, model_url: str, unchanged: Check) -> None:
    check = unchanged()
    rejected(client_for(None).post(model_url, update_body(), format="multipart"), 401, "credentials")
    check()


def test_local_update_to_a_local_model_is_409(
    participants: list[User], client_for: ClientFor, training: Training, model_url: str, unchanged: Check
) -> None:
    assert client_for(participants[0]).post(model_url, update_body(), format="multipart").status_code == 201
    local = LocalModel.objects.get(base_model=training.model)
    check = unchanged()
    response = client_for(participants[0]).post(f"/api/models/{local.pk}/", update_body(), format="multipart")
    rejected(response, 409, "not the global model of a training")
    check()


# --------------------------------------------------------------------------------------------------------------------
# DELETE /api/models/<id>/
# --------------------------------------------------------------------------------------------------------------------


def test_delete_model_removes_store_objects_after_commit(
    actor: User,
    client_for: ClientFor,
    upload_model: Callable[..., str],
    django_capture_on_commit_callbacks: Any,
) -> None:
    model_id = upload_model(actor, model_preprocessing_file=upload("pre.pt", torchscript_bytes(torch.nn.Identity())))
    other = upload_model(actor)
    keys = keys_of(model_id)
    assert len(keys) == 3  # archive, weights, preprocessing
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(actor).delete(f"/api/models/{model_id}/")
        assert response.status_code == 200, response.json()
        assert response.json()["detail"]
        assert keys_of(model_id) == keys  # still there until the transaction commits
    assert keys_of(model_id) == []
    assert not Model.objects.filter(pk=model_id).exists()
    assert not Blob.objects.filter(key__in=keys).exists()
    assert len(keys_of(other)) == 2  # other models keep their objects
    rejected(client_for(actor).get(f"/api/models/{model_id}/"), 404)


def test_delete_finished_training_model_removes_updates(
    actor: User,
    participants: list[User],
    client_for: ClientFor,
    training: Training,
    model_url: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    for client in participants[:2]:
        assert client_for(client).post(model_url, update_body(), format="multipart").status_code == 201
    Training.objects.filter(pk=training.pk).update(state=TrainingState.COMPLETED)
    model_id = str(training.model_id)
    assert len(keys_of(model_id)) == 4  # archive, weights and two updates
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(actor).delete(model_url)
    assert response.status_code == 200, response.json()
    assert keys_of(model_id) == []
    assert not Model.objects.filter(pk=model_id).exists()
    assert not LocalModel.objects.exists()
    assert not Training.objects.filter(pk=training.pk).exists()


def test_delete_by_non_owner_is_403(
    outsider: User, participants: list[User], client_for: ClientFor, training: Training, unchanged: Check
) -> None:
    Training.objects.filter(pk=training.pk).update(state=TrainingState.COMPLETED)
    check = unchanged()
    for user in (outsider, participants[0]):
        rejected(client_for(user).delete(f"/api/models/{training.model_id}/"), 403, "owner")
    check()


@pytest.mark.parametrize("state", [TrainingState.ONGOING, TrainingState.SWAG_ROUND])
def test_delete_model_of_running_training_is_409(
    actor: User, client_for: ClientFor, training: Training, unchanged: Check, state: str
) -> None:
    Training.objects.filter(pk=training.pk).update(state=state)
    check = unchanged()
    rejected(client_for(actor).delete(f"/api/models/{training.model_id}/"), 409, "running training")
    check()


def test_delete_local_update_of_running_training_is_409(
    participants: list[User], client_for: ClientFor, training: Training, model_url: str, unchanged: Check
) -> None:
    """A participant cannot withdraw an accepted update while its round is running."""
    assert client_for(participants[0]).post(model_url, update_body(), format="multipart").status_code == 201
    local = LocalModel.objects.get(base_model=training.model)
    check = unchanged()
    rejected(client_for(participants[0]).delete(f"/api/models/{local.pk}/"), 409, "running training")
    check()


def test_delete_local_update_after_training_finished(
    participants: list[User],
    client_for: ClientFor,
    training: Training,
    model_url: str,
    django_capture_on_commit_callbacks: Any,
) -> None:
    assert client_for(participants[0]).post(model_url, update_body(), format="multipart").status_code == 201
    local = LocalModel.objects.get(base_model=training.model)
    key = local.weights.key
    Training.objects.filter(pk=training.pk).update(state=TrainingState.COMPLETED)
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(participants[0]).delete(f"/api/models/{local.pk}/")
    assert response.status_code == 200, response.json()
    assert key not in store_keys()
    assert Model.objects.filter(pk=training.model_id).exists()


def test_delete_unknown_or_anonymous(actor: User, client_for: ClientFor, training: Training, unchanged: Check) -> None:
    check = unchanged()
    rejected(client_for(actor).delete("/api/models/5b1f8c7e-0000-4000-8000-000000000000/"), 404)
    rejected(client_for(None).delete(f"/api/models/{training.model_id}/"), 401)
    check()


# --------------------------------------------------------------------------------------------------------------------
# GET|POST /api/models/<id>/metrics/
# --------------------------------------------------------------------------------------------------------------------


def test_metrics_posted_and_listed(
    actor: User, participants: list[User], client_for: ClientFor, training: Training
) -> None:
    url = f"/api/models/{training.model_id}/metrics/"
    response = client_for(participants[0]).post(
        url, {"metric_names": ["loss", "accuracy"], "metric_values": ["0.25", "0.9"]}, format="multipart"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["detail"]
    response = client_for(actor).post(url, {"metric_names": ["f1"], "metric_values": ["0.5"], "step": "4"})
    assert response.status_code == 201, response.json()
    listed = client_for(participants[1]).get(url)
    assert listed.status_code == 200
    rows = {(m["key"], m["value"], m["step"], m["reporter"], m["model"]) for m in listed.json()}
    model = str(training.model_id)
    assert rows == {
        ("loss", 0.25, 0, str(participants[0].pk), model),
        ("accuracy", 0.9, 0, str(participants[0].pk), model),
        ("f1", 0.5, 4, str(actor.pk), model),
    }


def test_owner_posts_metrics_for_model_without_training(
    outsider: User, client_for: ClientFor, upload_model: Callable[..., str]
) -> None:
    model_id = upload_model(outsider)
    url = f"/api/models/{model_id}/metrics/"
    response = client_for(outsider).post(url, {"metric_names": ["auc"], "metric_values": ["0.7"]}, format="multipart")
    assert response.status_code == 201, response.json()
    assert [(m["key"], m["value"]) for m in client_for(outsider).get(url).json()] == [("auc", 0.7)]


def test_binary_metric_keeps_its_name(participants: list[User], client_for: ClientFor, training: Training) -> None:
    """A metric uploaded as a file (named like the metric) is paired with its own name, wherever it is listed."""
    url = f"/api/models/{training.model_id}/metrics/"
    png = b"\x89PNG fake plot"
    body = {"metric_names": ["plot", "loss"], "metric_values": ["0.5"], "plot": upload("plot.png", png)}
    response = client_for(participants[0]).post(url, body, format="multipart")
    assert response.status_code == 201, response.json()
    rows = {m["key"]: (m["value"], m["is_binary"]) for m in client_for(participants[0]).get(url).json()}
    assert rows == {"plot": (base64.b64encode(png).decode(), True), "loss": (0.5, False)}


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"metric_names": ["loss", "acc"], "metric_values": ["0.1"]}, ["same length"]),
        ({"metric_names": ["loss"], "metric_values": ["high"]}, ["not a number"]),
        ({"metric_names": ["loss"], "metric_values": ["inf"]}, ["not finite"]),
        ({}, ["at least one metric"]),
        ({"metric_names": [""], "metric_values": ["1"]}, ["metric_names"]),
        ({"metric_names": ["loss"], "metric_values": ["1"], "step": "-1"}, ["step"]),
        ({"metric_names": ["loss"], "metric_values": ["1"], "step": str(10**25)}, ["step"]),
        ({"metric_names": ["plot", "loss"], "plot": upload("plot.png", b"png")}, ["same length"]),
    ],
)
def test_metrics_invalid_input(
    participants: list[User], client_for: ClientFor, training: Training, unchanged: Check, body: dict, fragments: list
) -> None:
    check = unchanged()
    url = f"/api/models/{training.model_id}/metrics/"
    rejected(client_for(participants[0]).post(url, body, format="multipart"), 400, *fragments)
    check()


def test_metrics_outsider(outsider: User, client_for: ClientFor, training: Training, unchanged: Check) -> None:
    check = unchanged()
    url = f"/api/models/{training.model_id}/metrics/"
    body = {"metric_names": ["loss"], "metric_values": ["0.1"]}
    rejected(client_for(outsider).post(url, body, format="multipart"), 403, "participants")
    rejected(client_for(outsider).get(url), 403, "not allowed")
    check()


# --------------------------------------------------------------------------------------------------------------------
# GET|POST /api/models/<id>/preprocessing/
# --------------------------------------------------------------------------------------------------------------------


def test_preprocessing_upload_and_download(
    actor: User,
    participants: list[User],
    client_for: ClientFor,
    training: Training,
    django_capture_on_commit_callbacks: Any,
) -> None:
    url = f"/api/models/{training.model_id}/preprocessing/"
    first = torchscript_bytes(torch.nn.Identity())
    response = client_for(actor).post(url, {"model_preprocessing_file": upload("pre.pt", first)}, format="multipart")
    assert response.status_code == 202, response.json()
    assert response.json()["detail"]
    download = client_for(participants[0]).get(url)
    assert download.status_code == 200
    assert download.content == first
    old_keys = keys_of(str(training.model_id))
    second = torchscript_bytes(torch.nn.ReLU())
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(actor).post(url, {"model_preprocessing_file": upload("p.pt", second)}, format="multipart")
    assert response.status_code == 202, response.json()
    assert client_for(actor).get(url).content == second
    new_keys = keys_of(str(training.model_id))
    assert len(new_keys) == len(old_keys) == 3  # the replaced module's object is gone
    assert new_keys != old_keys
    assert Blob.objects.filter(key__in=new_keys).count() == 3


def test_preprocessing_missing_is_404(actor: User, client_for: ClientFor, training: Training, unchanged: Check) -> None:
    check = unchanged()
    rejected(client_for(actor).get(f"/api/models/{training.model_id}/preprocessing/"), 404, "no preprocessing")
    check()


def test_preprocessing_rejections(
    participants: list[User], outsider: User, actor: User, client_for: ClientFor, training: Training, unchanged: Check
) -> None:
    url = f"/api/models/{training.model_id}/preprocessing/"
    check = unchanged()
    for user in (participants[0], outsider):
        body = {"model_preprocessing_file": upload("pre.pt", torchscript_bytes(torch.nn.Identity()))}
        rejected(client_for(user).post(url, body, format="multipart"), 403, "owner")
    rejected(client_for(outsider).get(url), 403, "not allowed")
    body = {"model_preprocessing_file": upload("pre.pt", state_dict_bytes({"w": torch.ones(2)}))}
    rejected(client_for(actor).post(url, body, format="multipart"), 400, "model_preprocessing_file", "torchscript")
    body = {"model_preprocessing_file": upload("pre.pt", b"plain text, not a module")}
    rejected(client_for(actor).post(url, body, format="multipart"), 400, "model_preprocessing_file")
    rejected(client_for(actor).post(url, {}, format="multipart"), 400, "model_preprocessing_file", "required")
    check()


def test_preprocessing_of_local_update_is_400(
    participants: list[User], client_for: ClientFor, training: Training, model_url: str, unchanged: Check
) -> None:
    assert client_for(participants[0]).post(model_url, update_body(), format="multipart").status_code == 201
    local = LocalModel.objects.get(base_model=training.model)
    check = unchanged()
    body = {"model_preprocessing_file": upload("pre.pt", torchscript_bytes(torch.nn.Identity()))}
    response = client_for(participants[0]).post(f"/api/models/{local.pk}/preprocessing/", body, format="multipart")
    rejected(response, 400, "only global models")
    check()


# --------------------------------------------------------------------------------------------------------------------
# POST /api/models/<id>/swag/
# --------------------------------------------------------------------------------------------------------------------


def swag_body(first: torch.Tensor | None = None, second: torch.Tensor | None = None, **fields: Any) -> dict:
    first = torch.linspace(-1, 1, TINY_PARAMETERS) if first is None else first
    second = first**2 + 0.1 if second is None else second
    body = {
        "round": 0,
        "sample_size": 12,
        "first_moment_file": upload("first.pt", torch_save(first)),
        "second_moment_file": upload("second.pt", torch_save(second)),
    }
    body.update(fields)
    return body


@pytest.fixture
def swag_training(actor: User, participants: list[User], make_training: Callable[..., Training]) -> Training:
    """A SWAG training put directly into its SWAG round."""
    training = make_training(actor, participants, start=True, uncertainty_method="SWAG")
    with transaction.atomic():
        training = lock_training(training.pk)
        TrainingRound.objects.filter(pk=training.current_round_id).update(state=RoundState.DONE)
        open_round(training, RoundKind.SWAG, training.model.round)
    assert Model.objects.get(pk=training.model_id).kind == "SWAG"
    assert training.state == TrainingState.SWAG_ROUND
    return training


@pytest.fixture
def swag_url(swag_training: Training) -> str:
    return f"/api/models/{swag_training.model_id}/swag/"


def test_swag_update_accepted(
    participants: list[User], client_for: ClientFor, swag_training: Training, swag_url: str
) -> None:
    training = swag_training
    first = torch.linspace(-1, 1, TINY_PARAMETERS)
    response = client_for(participants[0]).post(swag_url, swag_body(first), format="multipart")
    assert response.status_code == 201, response.json()
    assert response.json()["detail"]
    update = SWAGUpdate.objects.get()
    assert (update.base_model_id, update.owner_id, update.round, update.sample_size) == (
        training.model_id,
        participants[0].pk,
        0,
        12,
    )
    stored = safetensors.torch.load(get_model_storage().get(update.first_moment.key))
    assert torch.equal(next(iter(stored.values())), first)
    assert len(keys_of(str(training.model_id))) == 4  # archive, weights, two moments


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({"first": torch.zeros(TINY_PARAMETERS + 17)}, ["first_moment_file", str(TINY_PARAMETERS)]),  # with buffers
        ({"second": torch.zeros(TINY_PARAMETERS - 1)}, ["second_moment_file", str(TINY_PARAMETERS)]),
        ({"first": torch.full((TINY_PARAMETERS,), math.nan)}, ["first_moment_file", "non-finite"]),
        ({"second": torch.full((TINY_PARAMETERS,), math.inf)}, ["second_moment_file", "non-finite"]),
        ({"first": torch.zeros(TINY_PARAMETERS, 1)}, ["first_moment_file", "1-d"]),
        ({"first": torch.zeros(TINY_PARAMETERS, dtype=torch.int64)}, ["first_moment_file", "floating"]),
        ({"sample_size": 0}, ["sample_size"]),
        ({"sample_size": str(10**25)}, ["sample_size", "at most"]),
        ({"round": "x"}, ["round", "not an integer"]),
        ({"first_moment_file": None}, ["first_moment_file", "required"]),
    ],
)
def test_swag_update_invalid(
    participants: list[User], client_for: ClientFor, swag_url: str, unchanged: Check, body: dict, fragments: list
) -> None:
    fields = {k: v for k, v in body.items() if k not in ("first", "second")}
    payload = {k: v for k, v in swag_body(body.get("first"), body.get("second"), **fields).items() if v is not None}
    check = unchanged()
    rejected(client_for(participants[0]).post(swag_url, payload, format="multipart"), 400, *fragments)
    check()


def test_swag_update_pickle_refused(
    participants: list[User], client_for: ClientFor, swag_url: str, unchanged: Check, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    body = swag_body()
    body["first_moment_file"] = upload("first.pt", malicious_payloads(marker)["torch.save"])
    check = unchanged()
    rejected(client_for(participants[0]).post(swag_url, body, format="multipart"), 400, "first_moment_file")
    assert not marker.exists()
    check()


@pytest.mark.parametrize(
    ("state", "name"),
    [(TrainingState.ONGOING, "ONGOING"), (TrainingState.COMPLETED, "COMPLETED"), (TrainingState.ERROR, "ERROR")],
)
def test_swag_update_wrong_state(
    participants: list[User],
    client_for: ClientFor,
    swag_training: Training,
    swag_url: str,
    unchanged: Check,
    state: str,
    name: str,
) -> None:
    Training.objects.filter(pk=swag_training.pk).update(state=state)
    check = unchanged()
    rejected(client_for(participants[0]).post(swag_url, swag_body(), format="multipart"), 409, name, "SWAG_ROUND")
    check()


def test_swag_update_for_model_without_training(
    actor: User, client_for: ClientFor, upload_model: Callable[..., str], unchanged: Check
) -> None:
    model_id = upload_model(actor)
    check = unchanged()
    response = client_for(actor).post(f"/api/models/{model_id}/swag/", swag_body(), format="multipart")
    rejected(response, 409, "not the global model of a training")
    check()


def test_swag_update_wrong_round(participants: list[User], client_for: ClientFor, swag_url: str, unchanged: Check):
    check = unchanged()
    rejected(client_for(participants[0]).post(swag_url, swag_body(round=2), format="multipart"), 409, "round 2")
    check()


def test_swag_update_duplicate(participants: list[User], client_for: ClientFor, swag_url: str, unchanged: Check):
    assert client_for(participants[0]).post(swag_url, swag_body(), format="multipart").status_code == 201
    check = unchanged()
    response = client_for(participants[0]).post(swag_url, swag_body(), format="multipart")
    rejected(response, 409, "already uploaded")
    check()
    assert SWAGUpdate.objects.count() == 1


def test_swag_update_outsider(outsider: User, actor: User, client_for: ClientFor, swag_url: str, unchanged: Check):
    check = unchanged()
    for user in (outsider, actor):
        rejected(client_for(user).post(swag_url, swag_body(), format="multipart"), 403, "not a participant")
    check()


def test_swag_update_json_body_is_415(
    participants: list[User], client_for: ClientFor, swag_url: str, unchanged: Check
) -> None:
    check = unchanged()
    response = client_for(participants[0]).post(swag_url, {"round": 0, "sample_size": 3}, format="json")
    rejected(response, 415, "unsupported media type")
    check()
