"""POST /api/inference/: predictions with the uncertainty of the training's method."""

import io
import math
from collections.abc import Callable

import pytest
import torch

from fl_server_ai.trainer.lifecycle import lock_training
from fl_server_ai.trainer.rounds import open_round
from fl_server_core.models import RoundKind, RoundState, TrainingRound
from fl_server_core.serialization import parameter_spec
from tests.conftest import upload
from tests.helpers import Doubler, pickled_module_bytes, safetensors_bytes, tiny_net, torchscript_bytes

pytestmark = pytest.mark.django_db

ROWS = [[0.1, 0.2, 0.3, 0.4], [1.0, -1.0, 0.5, 2.0]]
PROBABILITY_KEYS = {"variance", "std", "predictive_entropy", "expected_entropy", "mutual_info"}


def infer(api, model_id, model_input=ROWS, **extra):
    return api.post("/api/inference/", {"model_id": str(model_id), "model_input": model_input, **extra}, format="json")


def test_plain_model_predicts_like_the_uploaded_module(actor, client_for, upload_model):
    model_id = upload_model(actor)
    response = infer(client_for(actor), model_id)
    assert response.status_code == 200, response.json()
    expected = tiny_net().eval()(torch.tensor(ROWS))
    torch.testing.assert_close(torch.tensor(response.json()["inference"]), expected, rtol=1e-5, atol=1e-5)
    assert response.json()["uncertainty"] == {}
    assert response.json()["method"] == "NONE"


def test_mc_dropout_training_returns_probabilities_and_every_measure(actor, participants, client_for, make_training):
    options = {"uncertainty": {"N": 20, "softmax": True}}
    training = make_training(actor, participants, uncertainty_method="MC_DROPOUT", options=options)
    body = infer(client_for(participants[0]), training.model_id, seed=3).json()
    assert body["method"] == "MC_DROPOUT" and body["samples"] == 20
    probabilities = torch.tensor(body["inference"])
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    assert set(body["uncertainty"]) == PROBABILITY_KEYS
    assert all(value >= 0 for value in body["uncertainty"]["mutual_info"])
    again = infer(client_for(participants[0]), training.model_id, seed=3).json()
    assert again == body  # a seed makes the sampling reproducible


def test_mean_model_averages_its_members(actor, client_for, upload_model):
    first, second = (
        upload_model(actor, torchscript_bytes(tiny_net(1))),
        upload_model(actor, torchscript_bytes(tiny_net(2))),
    )
    response = client_for(actor).post(
        "/api/models/", {"type": "MEAN", "name": "ensemble", "models": [first, second]}, format="multipart"
    )
    mean_id = response.json()["model_id"]
    body = infer(client_for(actor), mean_id).json()
    outputs = torch.stack([tiny_net(seed).eval()(torch.tensor(ROWS)) for seed in (1, 2)])
    torch.testing.assert_close(torch.tensor(body["inference"]), outputs.mean(dim=0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(body["uncertainty"]["variance"]), outputs.var(dim=0, unbiased=False))
    assert body["method"] == "ENSEMBLE" and body["samples"] == 2


def test_swag_needs_statistics_then_samples_around_the_mean(actor, participants, client_for, make_training):
    options = {"uncertainty": {"N": 30}}
    training = make_training(actor, participants, start=True, uncertainty_method="SWAG", options=options)
    early = infer(client_for(actor), training.model_id)
    assert early.status_code == 409 and "SWAG statistics" in early.json()["detail"]
    # a SWAG round closes with every participant's moments: a mean and a small positive variance
    from django.db import transaction

    with transaction.atomic():
        locked = lock_training(training.pk)
        TrainingRound.objects.filter(pk=locked.current_round_id).update(state=RoundState.DONE)
        open_round(locked, RoundKind.SWAG, locked.model.round)
    params = torch.cat([p.detach().flatten() for p in tiny_net().parameters()])
    assert params.numel() == sum(math.prod(s.shape) for s in parameter_spec(tiny_net()) if s.is_parameter)
    for client in participants:
        body = {
            "round": 0,
            "sample_size": 10,
            "first_moment_file": upload("f.st", safetensors_bytes({"m": params})),
            "second_moment_file": upload("s.st", safetensors_bytes({"m": params**2 + 1e-4})),
        }
        assert (
            client_for(client).post(f"/api/models/{training.model_id}/swag/", body, format="multipart").status_code
            == 201
        )
    from fl_server_ai.trainer import close_round

    round_ = TrainingRound.objects.get(training=training, kind=RoundKind.SWAG)
    assert round_.state == RoundState.CLOSING
    assert close_round(round_.id)
    body = infer(client_for(actor), training.model_id, seed=1).json()
    assert body["method"] == "SWAG" and body["samples"] == 30
    assert set(body["uncertainty"]) == {"variance", "std"}
    assert min(min(row) for row in body["uncertainty"]["variance"]) > 0


@pytest.mark.parametrize(
    ("model_input", "status", "fragment"),
    [
        ([[0.1, 0.2, 0.3]], 400, "expects (*, 4)"),
        ([[0.1, 0.2], [0.3]], 400, "rectangular"),
        ([], 400, "non-empty"),
        ("abc", 400, "non-empty"),
    ],
)
def test_bad_inputs_are_refused(actor, client_for, upload_model, model_input, status, fragment):
    model_id = upload_model(actor, input_shape=["None", "4"])
    response = infer(client_for(actor), model_id, model_input)
    assert response.status_code == status
    assert fragment in response.json()["detail"]


def test_non_finite_json_is_refused(actor, client_for, upload_model):
    model_id = upload_model(actor)
    raw = '{"model_id": "' + model_id + '", "model_input": [[NaN, 1, 2, 3]]}'
    response = client_for(actor).post("/api/inference/", raw, content_type="application/json")
    assert response.status_code == 400 and "NaN" in response.json()["detail"]


def test_tensor_file_input_and_pickle_refusal(actor, client_for, upload_model, tmp_path):
    model_id = upload_model(actor)
    api = client_for(actor)
    good = upload("x.st", safetensors_bytes({"x": torch.tensor(ROWS)}))
    response = api.post("/api/inference/", {"model_id": model_id, "model_input": good}, format="multipart")
    assert response.status_code == 200 and len(response.json()["inference"]) == 2
    buffer = io.BytesIO()
    torch.save(torch.tensor(ROWS), buffer)
    response = api.post(
        "/api/inference/", {"model_id": model_id, "model_input": upload("x.pt", buffer.getvalue())}, format="multipart"
    )
    assert response.status_code == 200
    evil = upload("x.pt", pickled_module_bytes())
    response = api.post("/api/inference/", {"model_id": model_id, "model_input": evil}, format="multipart")
    assert response.status_code == 400 and "pickle" in response.json()["detail"].lower()


def test_limits_and_permissions(actor, outsider, client_for, upload_model, settings):
    model_id = upload_model(actor)
    assert infer(client_for(outsider), model_id).status_code == 403
    assert infer(client_for(None), model_id).status_code == 401
    assert infer(client_for(actor), "not-a-uuid").status_code == 400
    settings.FL_INFERENCE_MAX_ELEMENTS = 4
    response = infer(client_for(actor), model_id)
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_preprocessing_is_applied(actor, client_for, upload_model: Callable[..., str]):
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Doubler()), buffer)
    plain = upload_model(actor)
    with_pre = upload_model(actor, model_preprocessing_file=upload("pre.pt", buffer.getvalue()))
    doubled = [[2 * v for v in row] for row in ROWS]
    expected = infer(client_for(actor), plain, doubled).json()["inference"]
    assert infer(client_for(actor), with_pre).json()["inference"] == expected
    assert infer(client_for(actor), plain).json()["inference"] != expected


def test_mean_model_of_softmax_trainings_gives_probabilities(actor, participants, client_for, make_training):
    options = {"uncertainty": {"N": 5, "softmax": True}}
    members = [str(make_training(actor, participants, options=options).model_id) for _ in range(2)]
    body = {"type": "MEAN", "name": "ensemble", "models": members}
    mean_id = client_for(actor).post("/api/models/", body, format="multipart").json()["model_id"]
    result = infer(client_for(actor), mean_id).json()
    torch.testing.assert_close(torch.tensor(result["inference"]).sum(dim=1), torch.ones(2))
    assert set(result["uncertainty"]) == PROBABILITY_KEYS
