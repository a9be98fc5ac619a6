"""The trainings API: create, list, detail, delete, participants, start and models."""

import uuid
from typing import Any

import pytest
from django.db import connection

from fl_server_core import signals
from fl_server_core.models import LocalModel, Model, ModelKind, Training, TrainingState
from fl_server_core.storage import get_model_storage
from tests.conftest import upload
from tests.helpers import shifted_weights, state_dict_bytes

# --------------------------------------------------------------------------------------------------------------------
# helpers


def create(api, **body: Any):
    """POST /api/trainings/ as JSON."""
    return api.post("/api/trainings/", body, format="json")


def body_for(model_id: str, **fields: Any) -> dict[str, Any]:
    """A valid creation body for `model_id`, with `fields` overriding."""
    body: dict[str, Any] = {"model_id": model_id, "target_num_updates": 3, "metric_names": ["loss", "accuracy"]}
    body.update(fields)
    return body


def upload_update(api, model_id: str, round_number: int = 0, sample_size: int = 10):
    """A participant's local update of the global model."""
    data = {
        "round": str(round_number),
        "sample_size": str(sample_size),
        "model_file": upload("update.pt", state_dict_bytes(shifted_weights(0, 0.1))),
    }
    return api.post(f"/api/models/{model_id}/", data, format="multipart")


def assert_rejected(response, status: int, *fragments: str) -> None:
    """An error answer with the status and a `detail` that mentions every fragment."""
    assert response.status_code == status, response.content
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for fragment in fragments:
        assert fragment.lower() in detail.lower(), detail


def participant_ids(training: Training) -> set[str]:
    return {str(pk) for pk in Training.objects.get(pk=training.pk).participants.values_list("pk", flat=True)}


# --------------------------------------------------------------------------------------------------------------------
# POST /api/trainings/


@pytest.mark.parametrize("aggregation", ["FedAvg", "FedProx", "FedDC"])
@pytest.mark.parametrize("uncertainty", ["NONE", "ENSEMBLE", "MC_DROPOUT", "SWAG"])
def test_create_training(actor, participants, client_for, upload_model, aggregation, uncertainty):
    model_id = upload_model(actor)
    options = {"skip_model_tests": True, "uncertainty": {"N": 5, "softmax": True}, "client_fraction": 0.5}
    body = body_for(
        model_id,
        aggregation_method=aggregation,
        uncertainty_method=uncertainty,
        options=options,
        clients=[str(p.pk) for p in participants[:2]],
    )
    response = create(client_for(actor), **body)

    assert response.status_code == 201, response.json()
    assert response.json()["detail"] == "Training created successfully!"
    training = Training.objects.get(pk=response.json()["training_id"])
    assert str(training.model_id) == model_id
    assert training.actor == actor
    assert training.state == TrainingState.INITIAL
    assert training.target_num_updates == 3
    assert training.metric_names == ["loss", "accuracy"]
    assert training.aggregation_method == aggregation
    assert training.uncertainty_method == uncertainty
    assert training.options == options
    assert participant_ids(training) == {str(p.pk) for p in participants[:2]}
    expected_kind = ModelKind.SWAG if uncertainty == "SWAG" else ModelKind.GLOBAL
    assert Model.objects.get(pk=model_id).kind == expected_kind


def test_create_training_defaults(actor, client_for, upload_model):
    response = create(client_for(actor), model_id=upload_model(actor), target_num_updates=1)
    assert response.status_code == 201, response.json()
    training = Training.objects.get(pk=response.json()["training_id"])
    assert training.aggregation_method == "FedAvg"
    assert training.uncertainty_method == "NONE"
    assert training.options == {}
    assert training.metric_names == []
    assert not training.participants.exists()


@pytest.mark.parametrize(("period", "target", "expected"), [(1, 4, 4), (2, 4, 8), (5, 3, 15)])
def test_daisy_chain_period_multiplies_target(actor, client_for, upload_model, period, target, expected):
    body = body_for(
        upload_model(actor),
        target_num_updates=target,
        aggregation_method="FedDC",
        options={"daisy_chain_period": period},
    )
    response = create(client_for(actor), **body)
    assert response.status_code == 201, response.json()
    training = Training.objects.get(pk=response.json()["training_id"])
    assert training.target_num_updates == expected
    assert training.options["daisy_chain_period"] == period
    detail = client_for(actor).get(f"/api/trainings/{training.pk}/").json()
    assert detail["target_num_updates"] == expected


def test_model_of_another_training_is_copied(actor, participants, client_for, upload_model):
    api = client_for(actor)
    model_id = upload_model(actor)
    first = create(api, **body_for(model_id, clients=[str(participants[0].pk)]))
    assert first.status_code == 201
    original = Model.objects.get(pk=model_id)
    original_state = (original.kind, original.round, original.weights_id, original.archive_id, original.name)
    original_keys = get_model_storage().keys(f"models/{model_id}")

    second = create(api, **body_for(model_id, target_num_updates=7))

    assert second.status_code == 201, second.json()
    first_training = Training.objects.get(pk=first.json()["training_id"])
    second_training = Training.objects.get(pk=second.json()["training_id"])
    assert str(first_training.model_id) == model_id
    copy = second_training.model
    assert str(copy.pk) != model_id
    assert copy.kind == ModelKind.GLOBAL
    assert copy.round == 0
    assert copy.owner == actor
    assert copy.name == original.name
    assert copy.weights_id != original.weights_id and copy.archive_id != original.archive_id
    storage = get_model_storage()
    assert storage.get(copy.weights.key) == storage.get(original.weights.key)
    assert copy.weights.sha256 == original.weights.sha256
    assert copy.tensor_spec == original.tensor_spec
    # the original and its training are untouched
    original.refresh_from_db()
    assert (original.kind, original.round, original.weights_id, original.archive_id, original.name) == original_state
    assert get_model_storage().keys(f"models/{model_id}") == original_keys
    assert participant_ids(first_training) == {str(participants[0].pk)}
    assert second_training.target_num_updates == 7
    # the copy is downloadable like any global model
    download = api.get(f"/api/models/{copy.pk}/")
    assert download.status_code == 200
    assert download.content == api.get(f"/api/models/{model_id}/").content


def test_copy_for_swag_training_is_swag_and_original_stays_global(actor, client_for, upload_model):
    api = client_for(actor)
    model_id = upload_model(actor)
    assert create(api, **body_for(model_id)).status_code == 201
    response = create(api, **body_for(model_id, uncertainty_method="SWAG"))
    assert response.status_code == 201
    copy = Training.objects.get(pk=response.json()["training_id"]).model
    assert copy.kind == ModelKind.SWAG
    assert Model.objects.get(pk=model_id).kind == ModelKind.GLOBAL


def test_copy_of_swag_model_for_plain_training_is_global(actor, client_for, upload_model):
    """The model kind follows the new training's uncertainty method, not the copied model's kind."""
    api = client_for(actor)
    model_id = upload_model(actor)
    assert create(api, **body_for(model_id, uncertainty_method="SWAG")).status_code == 201
    assert Model.objects.get(pk=model_id).kind == ModelKind.SWAG
    response = create(api, **body_for(model_id, uncertainty_method="NONE"))
    assert response.status_code == 201
    assert Training.objects.get(pk=response.json()["training_id"]).model.kind == ModelKind.GLOBAL
    assert Model.objects.get(pk=model_id).kind == ModelKind.SWAG


def test_create_rejects_unknown_model(actor, client_for, unchanged):
    check = unchanged()
    response = create(client_for(actor), **body_for(str(uuid.uuid4())))
    assert_rejected(response, 404, "model")
    check()


def test_create_rejects_someone_elses_model(actor, outsider, client_for, upload_model, unchanged):
    model_id = upload_model(outsider)
    check = unchanged()
    response = create(client_for(actor), **body_for(model_id))
    assert_rejected(response, 403, "own")
    check()


def test_create_rejects_local_update_as_model(actor, participants, client_for, make_training, unchanged):
    training = make_training(actor, participants, start=True)
    assert upload_update(client_for(participants[0]), str(training.model_id)).status_code == 201
    local = LocalModel.objects.get()
    check = unchanged()
    for user in (actor, participants[0]):
        response = create(client_for(user), **body_for(str(local.pk)))
        assert_rejected(response, 400, "global model")
    check()


@pytest.mark.parametrize(
    ("fields", "fragment"),
    [
        ({"target_num_updates": 0}, "target_num_updates"),
        ({"target_num_updates": -3}, "target_num_updates"),
        ({"target_num_updates": "many"}, "target_num_updates"),
        ({"model_id": "not-a-uuid"}, "model_id"),
        ({"aggregation_method": "FedMagic"}, "aggregation_method"),
        ({"aggregation_method": "fedavg"}, "aggregation_method"),
        ({"uncertainty_method": "BAYES"}, "uncertainty_method"),
        ({"options": {"daisy_chain_period": 0}}, "daisy_chain_period"),
        ({"options": {"daisy_chain_period": "2"}}, "daisy_chain_period"),
        ({"options": {"client_fraction": 1.5}}, "client_fraction"),
        ({"options": {"client_fraction": 0}}, "client_fraction"),
        ({"options": {"min_participants": "x"}}, "min_participants"),
        ({"options": {"min_participants": 0}}, "min_participants"),
        ({"options": {"round_timeout_seconds": -1}}, "round_timeout_seconds"),
        ({"options": {"skip_model_tests": "yes"}}, "skip_model_tests"),
        ({"options": {"model_test_after_each_round": 1}}, "model_test_after_each_round"),
        ({"options": {"proximal_mu": -0.1}}, "proximal_mu"),
        ({"options": {"seed": "abc"}}, "seed"),
        ({"options": {"uncertainty": {"N": 0}}}, "uncertainty"),
        ({"options": {"uncertainty": {"N": 0}}}, "N"),
        ({"options": {"uncertainty": {"softmax": "true"}}}, "softmax"),
        ({"options": {"uncertainty": [1, 2]}}, "uncertainty"),
        ({"options": [1, 2, 3]}, "options"),
        ({"options": "daisy_chain_period=2"}, "options"),
        ({"options": 5}, "options"),
        ({"clients": [str(uuid.UUID(int=1))]}, str(uuid.UUID(int=1))),
        ({"clients": ["not-a-uuid"]}, "clients"),
        ({"clients": "not-a-list"}, "clients"),
        ({"metric_names": "loss"}, "metric_names"),
    ],
)
def test_create_rejects_invalid_input(actor, participants, client_for, upload_model, unchanged, fields, fragment):
    model_id = upload_model(actor)
    body = body_for(model_id, clients=[str(participants[0].pk)])
    body.update(fields)
    check = unchanged()
    response = create(client_for(actor), **body)
    assert_rejected(response, 400, fragment)
    check()
    assert Model.objects.get(pk=model_id).kind == ModelKind.GLOBAL


def test_create_rejects_unknown_client_among_known(actor, participants, client_for, upload_model, unchanged):
    model_id = upload_model(actor)
    stranger = str(uuid.uuid4())
    check = unchanged()
    body = body_for(model_id, uncertainty_method="SWAG", clients=[str(participants[0].pk), stranger])
    response = create(client_for(actor), **body)
    assert_rejected(response, 400, stranger)
    check()
    assert Model.objects.get(pk=model_id).kind == ModelKind.GLOBAL


@pytest.mark.parametrize("field", ["model_id", "target_num_updates"])
def test_create_requires_field(actor, client_for, upload_model, unchanged, field):
    body = body_for(upload_model(actor))
    del body[field]
    check = unchanged()
    assert_rejected(create(client_for(actor), **body), 400, field)
    check()


def test_create_rejects_malformed_json(actor, client_for, upload_model, unchanged):
    model_id = upload_model(actor)
    check = unchanged()
    response = client_for(actor).post(
        "/api/trainings/", data=f'{{"model_id": "{model_id}", "target_num_updates": 2,', content_type="application/json"
    )
    assert_rejected(response, 400, "JSON")
    check()


def test_create_requires_authentication(actor, client_for, upload_model, unchanged):
    model_id = upload_model(actor)
    check = unchanged()
    response = create(client_for(None), **body_for(model_id))
    assert_rejected(response, 401, "credentials")
    check()


# --------------------------------------------------------------------------------------------------------------------
# GET /api/trainings/, GET|DELETE /api/trainings/<id>/


def test_list_shows_only_the_callers_trainings(make_user, participants, client_for, make_training):
    alice, bob = make_user("alice", actor=True), make_user("bob", actor=True)
    mine = {str(make_training(alice, participants).pk) for _ in range(2)}
    theirs = make_training(bob, [alice])

    response = client_for(alice).get("/api/trainings/")
    assert response.status_code == 200
    assert {t["id"] for t in response.json()} == mine
    assert all(t["actor"] == str(alice.pk) for t in response.json())
    assert [t["id"] for t in client_for(bob).get("/api/trainings/").json()] == [str(theirs.pk)]
    # participants see nothing here: the list is of the caller's trainings as actor
    assert client_for(participants[0]).get("/api/trainings/").json() == []


def test_list_requires_authentication(client_for):
    assert_rejected(client_for(None).get("/api/trainings/"), 401)


def test_detail_for_actor_and_participants(actor, participants, client_for, make_training):
    training = make_training(actor, participants, target_num_updates=4, metric_names=["loss"])
    for user in (actor, *participants):
        response = client_for(user).get(f"/api/trainings/{training.pk}/")
        assert response.status_code == 200, response.json()
        data = response.json()
        assert data["id"] == str(training.pk)
        assert data["model_id"] == str(training.model_id)
        assert data["actor"] == str(actor.pk)
        assert set(data["participants"]) == {str(p.pk) for p in participants}
        assert data["state"] == "I"
        assert data["round"] == 0
        assert data["target_num_updates"] == 4
        assert data["metric_names"] == ["loss"]
        assert data["local_models_arrived"] == 0
        assert data["local_models_expected"] == 3


def test_detail_counts_arrived_updates(actor, participants, client_for, make_training):
    training = make_training(actor, participants, start=True)
    assert upload_update(client_for(participants[1]), str(training.model_id)).status_code == 201
    data = client_for(participants[0]).get(f"/api/trainings/{training.pk}/").json()
    assert data["state"] == "O"
    assert data["round"] == 0
    assert data["local_models_arrived"] == 1
    assert data["local_models_expected"] == 3


def test_detail_forbidden_for_outsider(actor, participants, outsider, client_for, make_training):
    training = make_training(actor, participants)
    assert_rejected(client_for(outsider).get(f"/api/trainings/{training.pk}/"), 403, "actor")


@pytest.mark.parametrize("method", ["get", "delete"])
def test_unknown_training_is_404(actor, client_for, unchanged, method):
    check = unchanged()
    assert_rejected(getattr(client_for(actor), method)(f"/api/trainings/{uuid.uuid4()}/"), 404)
    check()


def test_delete_training(actor, participants, client_for, make_training):
    training = make_training(actor, participants)
    api = client_for(actor)
    response = api.delete(f"/api/trainings/{training.pk}/")
    assert response.status_code == 200
    assert response.json()["detail"]
    assert not Training.objects.filter(pk=training.pk).exists()
    assert Model.objects.filter(pk=training.model_id).exists()  # the model stays
    assert_rejected(api.get(f"/api/trainings/{training.pk}/"), 404)
    assert_rejected(api.delete(f"/api/trainings/{training.pk}/"), 404)


@pytest.mark.parametrize("who", ["participant", "outsider", "anonymous"])
def test_delete_training_rejected_for_non_actor(
    actor, participants, outsider, client_for, make_training, unchanged, who
):
    training = make_training(actor, participants)
    user, status = {"participant": (participants[0], 403), "outsider": (outsider, 403), "anonymous": (None, 401)}[who]
    check = unchanged()
    assert_rejected(client_for(user).delete(f"/api/trainings/{training.pk}/"), status)
    check()


# --------------------------------------------------------------------------------------------------------------------
# PUT|DELETE /api/trainings/<id>/clients/


def test_register_and_remove_participants(actor, participants, client_for, make_training):
    training = make_training(actor, participants[:1])
    api = client_for(actor)
    url = f"/api/trainings/{training.pk}/clients/"

    response = api.put(url, {"clients": [str(participants[1].pk), str(participants[2].pk)]}, format="json")
    assert response.status_code == 202, response.json()
    assert response.json()["detail"]
    assert participant_ids(training) == {str(p.pk) for p in participants}

    response = api.delete(url, {"clients": [str(participants[0].pk), str(participants[2].pk)]}, format="json")
    assert response.status_code == 200, response.json()
    assert response.json()["detail"]
    assert participant_ids(training) == {str(participants[1].pk)}


def test_register_existing_participant_is_idempotent(actor, participants, client_for, make_training):
    training = make_training(actor, participants)
    url = f"/api/trainings/{training.pk}/clients/"
    assert client_for(actor).put(url, {"clients": [str(participants[0].pk)]}, format="json").status_code == 202
    assert participant_ids(training) == {str(p.pk) for p in participants}


@pytest.mark.parametrize("method", ["put", "delete"])
@pytest.mark.parametrize("who", ["participant", "outsider"])
def test_clients_forbidden_for_non_actor(
    actor, participants, outsider, client_for, make_training, unchanged, method, who
):
    training = make_training(actor, participants[:2])
    user = participants[0] if who == "participant" else outsider
    check = unchanged()
    response = getattr(client_for(user), method)(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(participants[2].pk)]}, format="json"
    )
    assert_rejected(response, 403, "actor")
    check()


@pytest.mark.parametrize("method", ["put", "delete"])
@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"clients": []}, "clients"),
        ({}, "clients"),
        ({"clients": ["nope"]}, "clients"),
        ({"clients": [str(uuid.UUID(int=7))]}, str(uuid.UUID(int=7))),
    ],
)
def test_clients_rejects_invalid_input(
    actor, participants, client_for, make_training, unchanged, method, body, fragment
):
    training = make_training(actor, participants[:2])
    check = unchanged()
    response = getattr(client_for(actor), method)(f"/api/trainings/{training.pk}/clients/", body, format="json")
    assert_rejected(response, 400, fragment)
    check()


def test_clients_unknown_among_known_changes_nothing(actor, participants, client_for, make_training, unchanged):
    training = make_training(actor, participants[:1])
    stranger = str(uuid.uuid4())
    check = unchanged()
    response = client_for(actor).put(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(participants[2].pk), stranger]}, format="json"
    )
    assert_rejected(response, 400, stranger)
    check()


@pytest.mark.parametrize("state", ["C", "E"])
def test_register_on_finished_training_conflicts(actor, participants, client_for, make_training, unchanged, state):
    training = make_training(actor, participants[:1])
    Training.objects.filter(pk=training.pk).update(state=state)
    check = unchanged()
    response = client_for(actor).put(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(participants[1].pk)]}, format="json"
    )
    assert_rejected(response, 409, "participants")
    check()


def test_clients_of_unknown_training_is_404(actor, participants, client_for, unchanged):
    check = unchanged()
    response = client_for(actor).put(
        f"/api/trainings/{uuid.uuid4()}/clients/", {"clients": [str(participants[0].pk)]}, format="json"
    )
    assert_rejected(response, 404)
    check()


# --------------------------------------------------------------------------------------------------------------------
# POST /api/trainings/<id>/start/


@pytest.fixture
def started_signals():
    """Records every `training_started` with the state it sees and the transaction depth it runs at."""
    calls: list[dict[str, Any]] = []

    def receiver(sender: Any, training: Training, **kwargs: Any) -> None:
        calls.append(
            {
                "training": training.pk,
                "state_in_db": Training.objects.get(pk=training.pk).state,
                "atomic_depth": len(connection.atomic_blocks),
            }
        )

    signals.training_started.connect(receiver, dispatch_uid="test-trainings-started")
    yield calls
    signals.training_started.disconnect(dispatch_uid="test-trainings-started")


def test_start_training(actor, participants, client_for, make_training, started_signals):
    training = make_training(actor, participants)
    depth = len(connection.atomic_blocks)
    response = client_for(actor).post(f"/api/trainings/{training.pk}/start/")
    assert response.status_code == 202, response.json()
    assert response.json() == {"detail": "Training started!"}
    training.refresh_from_db()
    assert training.state == TrainingState.ONGOING
    assert client_for(participants[0]).get(f"/api/trainings/{training.pk}/").json()["state"] == "O"
    assert len(started_signals) == 1
    call = started_signals[0]
    assert call["training"] == training.pk
    assert call["state_in_db"] == "O"
    assert call["atomic_depth"] > depth  # sent inside the transition's transaction


def test_start_signal_failure_rolls_back_the_transition(actor, participants, client_for, make_training):
    """A receiver runs inside the start transaction: if it fails, the training stays INITIAL."""
    training = make_training(actor, participants)

    def failing(sender: Any, **kwargs: Any) -> None:
        raise RuntimeError("receiver failed")

    signals.training_started.connect(failing, dispatch_uid="test-trainings-failing")
    try:
        api = client_for(actor)
        api.raise_request_exception = False
        response = api.post(f"/api/trainings/{training.pk}/start/")
    finally:
        signals.training_started.disconnect(dispatch_uid="test-trainings-failing")
    assert response.status_code == 500
    training.refresh_from_db()
    assert training.state == TrainingState.INITIAL


def test_start_without_participants(actor, client_for, make_training, unchanged, started_signals):
    training = make_training(actor, [])
    check = unchanged()
    assert_rejected(client_for(actor).post(f"/api/trainings/{training.pk}/start/"), 400, "participants")
    check()
    assert started_signals == []


@pytest.mark.parametrize("state", ["O", "S", "C", "E"])
def test_start_rejected_unless_initial(
    actor, participants, client_for, make_training, unchanged, started_signals, state
):
    training = make_training(actor, participants)
    Training.objects.filter(pk=training.pk).update(state=state)
    check = unchanged()
    assert_rejected(client_for(actor).post(f"/api/trainings/{training.pk}/start/"), 400, "INITIAL")
    check()
    assert started_signals == []


def test_start_twice(actor, participants, client_for, make_training, started_signals):
    training = make_training(actor, participants)
    api = client_for(actor)
    assert api.post(f"/api/trainings/{training.pk}/start/").status_code == 202
    assert_rejected(api.post(f"/api/trainings/{training.pk}/start/"), 400, "INITIAL")
    assert len(started_signals) == 1


@pytest.mark.parametrize("who", ["participant", "outsider"])
def test_start_forbidden_for_non_actor(
    actor, participants, outsider, client_for, make_training, unchanged, started_signals, who
):
    training = make_training(actor, participants)
    check = unchanged()
    user = participants[0] if who == "participant" else outsider
    assert_rejected(client_for(user).post(f"/api/trainings/{training.pk}/start/"), 403, "actor")
    check()
    assert started_signals == []


def test_start_unknown_training(actor, client_for, unchanged):
    check = unchanged()
    assert_rejected(client_for(actor).post(f"/api/trainings/{uuid.uuid4()}/start/"), 404)
    check()


# --------------------------------------------------------------------------------------------------------------------
# GET /api/trainings/<id>/models/ and /models/latest/


def test_training_models_after_an_update(actor, participants, client_for, make_training):
    training = make_training(actor, participants, start=True)
    global_id = str(training.model_id)
    assert upload_update(client_for(participants[0]), global_id, sample_size=42).status_code == 201
    local = LocalModel.objects.get()

    for user in (actor, participants[1]):
        response = client_for(user).get(f"/api/trainings/{training.pk}/models/")
        assert response.status_code == 200, response.json()
        models = response.json()
        assert [m["id"] for m in models] == [global_id, str(local.pk)]
        assert models[0]["type"] == "GLOBAL"
        assert models[0]["training_id"] == str(training.pk)
        assert models[1]["type"] == "LOCAL"
        assert models[1]["base_model"] == global_id
        assert models[1]["owner"] == str(participants[0].pk)
        assert models[1]["round"] == 0
        assert models[1]["sample_size"] == 42

        response = client_for(user).get(f"/api/trainings/{training.pk}/models/latest/")
        assert response.status_code == 200, response.json()
        latest = response.json()
        assert latest["global_model"]["id"] == global_id
        assert latest["round"] == 0
        assert [m["id"] for m in latest["local_models"]] == [str(local.pk)]


def test_training_models_before_any_update(actor, participants, client_for, make_training):
    training = make_training(actor, participants)
    api = client_for(actor)
    assert [m["id"] for m in api.get(f"/api/trainings/{training.pk}/models/").json()] == [str(training.model_id)]
    latest = api.get(f"/api/trainings/{training.pk}/models/latest/").json()
    assert latest["global_model"]["id"] == str(training.model_id)
    assert latest["round"] == 0
    assert latest["local_models"] == []


@pytest.mark.parametrize("suffix", ["models/", "models/latest/"])
def test_training_models_forbidden_for_outsider(actor, participants, outsider, client_for, make_training, suffix):
    training = make_training(actor, participants)
    assert_rejected(client_for(outsider).get(f"/api/trainings/{training.pk}/{suffix}"), 403)
    assert_rejected(client_for(actor).get(f"/api/trainings/{uuid.uuid4()}/{suffix}"), 404)


# --------------------------------------------------------------------------------------------------------------------
# duplicate uploads


def test_second_identical_update_conflicts(actor, participants, client_for, make_training, unchanged):
    training = make_training(actor, participants, start=True)
    api = client_for(participants[0])
    assert upload_update(api, str(training.model_id)).status_code == 201
    check = unchanged()
    assert_rejected(upload_update(api, str(training.model_id)), 409, "already")
    check()
    assert LocalModel.objects.filter(base_model=training.model, owner=participants[0], round=0).count() == 1
    assert LocalModel.objects.count() == 1


def test_create_rejects_mean_model(actor, client_for, upload_model, unchanged):
    api = client_for(actor)
    members = [upload_model(actor), upload_model(actor)]
    response = api.post("/api/models/", {"type": "MEAN", "name": "mean", "models": members}, format="multipart")
    assert response.status_code == 201, response.json()
    check = unchanged()
    assert_rejected(create(api, **body_for(response.json()["model_id"])), 400, "global model")
    check()
