"""Invariants the database itself enforces, and the data layer's clean-up of tokens and store objects."""

import hashlib
import uuid
from typing import Any

import pytest
from django.db import IntegrityError, transaction
from rest_framework.authtoken.models import Token

from fl_server_core.models import (
    Blob,
    GlobalModel,
    LocalModel,
    Metric,
    Model,
    ModelKind,
    SWAGUpdate,
    Training,
    User,
)
from fl_server_core.storage import get_model_storage
from tests.conftest import upload
from tests.helpers import shifted_weights, state_dict_bytes


def blob(data: bytes = b"weights") -> Blob:
    """A stored object with its Blob row."""
    stored = get_model_storage().put(f"test/{uuid.uuid4().hex}", data)
    return Blob.objects.create(key=stored.key, size=stored.size, sha256=stored.sha256)


@pytest.fixture
def owner(make_user) -> User:
    return make_user("owner", actor=True)


@pytest.fixture
def client_user(make_user) -> User:
    return make_user("client", client=True)


@pytest.fixture
def global_model(owner) -> Model:
    return GlobalModel.objects.create(name="g", owner=owner, archive=blob(b"archive"), weights=blob())


def local_update(base: Model | None, owner: User, round_number: int = 0, sample_size: int | None = 5) -> Model:
    return LocalModel.objects.create(
        name="u", owner=owner, base_model=base, round=round_number, sample_size=sample_size, weights=blob()
    )


def swag_update(base: Model, owner: User, round_number: int = 0, sample_size: int = 5) -> SWAGUpdate:
    return SWAGUpdate.objects.create(
        base_model=base,
        owner=owner,
        round=round_number,
        sample_size=sample_size,
        first_moment=blob(b"m1"),
        second_moment=blob(b"m2"),
    )


def assert_integrity_error(create: Any) -> None:
    """`create()` is refused by the database and leaves the transaction usable."""
    with pytest.raises(IntegrityError), transaction.atomic():
        create()


# --------------------------------------------------------------------------------------------------------------------
# local updates


def test_one_local_update_per_base_model_owner_and_round(global_model, owner, client_user):
    local_update(global_model, client_user, round_number=0)
    assert_integrity_error(lambda: local_update(global_model, client_user, round_number=0))
    # other rounds, owners and base models are fine
    local_update(global_model, client_user, round_number=1)
    local_update(global_model, owner, round_number=0)
    other = GlobalModel.objects.create(name="h", owner=owner, archive=blob(), weights=blob())
    local_update(other, client_user, round_number=0)
    assert LocalModel.objects.filter(owner=client_user).count() == 3


def test_duplicate_update_is_refused_even_through_a_bulk_insert(global_model, client_user):
    local_update(global_model, client_user)
    duplicate = Model(
        kind=ModelKind.LOCAL, name="u", owner=client_user, base_model=global_model, round=0, sample_size=1
    )
    assert_integrity_error(lambda: Model.objects.bulk_create([duplicate]))
    assert LocalModel.objects.count() == 1


def test_local_update_needs_a_base_model(client_user):
    assert_integrity_error(lambda: local_update(None, client_user))
    assert not LocalModel.objects.exists()


@pytest.mark.parametrize("sample_size", [0, None])
def test_local_update_needs_a_positive_sample_size(global_model, client_user, sample_size):
    assert_integrity_error(lambda: local_update(global_model, client_user, sample_size=sample_size))
    assert not LocalModel.objects.exists()


def test_only_local_updates_have_a_base_model(global_model, owner):
    assert_integrity_error(
        lambda: GlobalModel.objects.create(
            name="x", owner=owner, base_model=global_model, archive=blob(), weights=blob()
        )
    )


@pytest.mark.parametrize("missing", ["archive", "weights"])
def test_global_model_needs_archive_and_weights(owner, missing):
    fields = {"archive": blob(), "weights": blob()}
    fields[missing] = None
    assert_integrity_error(lambda: GlobalModel.objects.create(name="x", owner=owner, **fields))


# --------------------------------------------------------------------------------------------------------------------
# metrics, trainings, SWAG updates


@pytest.mark.parametrize(
    ("value_float", "value_binary", "allowed"),
    [(0.5, None, True), (None, b"\x89PNG", True), (None, None, False), (0.5, b"\x89PNG", False)],
)
def test_metric_has_exactly_one_value(global_model, value_float, value_binary, allowed):
    def create() -> Metric:
        return Metric.objects.create(model=global_model, key="loss", value_float=value_float, value_binary=value_binary)

    if allowed:
        assert create().value == (value_float if value_float is not None else value_binary)
    else:
        assert_integrity_error(create)
        assert not Metric.objects.exists()


@pytest.mark.parametrize(("target", "allowed"), [(0, False), (1, True), (50, True)])
def test_training_target_at_least_one(global_model, owner, target, allowed):
    def create() -> Training:
        return Training.objects.create(model=global_model, actor=owner, target_num_updates=target)

    if allowed:
        assert create().target_num_updates == target
    else:
        assert_integrity_error(create)
        assert not Training.objects.exists()


def test_training_target_cannot_be_updated_to_zero(global_model, owner):
    training = Training.objects.create(model=global_model, actor=owner, target_num_updates=3)
    assert_integrity_error(lambda: Training.objects.filter(pk=training.pk).update(target_num_updates=0))
    training.refresh_from_db()
    assert training.target_num_updates == 3


def test_training_state_must_be_known(global_model, owner):
    assert_integrity_error(
        lambda: Training.objects.create(model=global_model, actor=owner, target_num_updates=1, state="X")
    )


def test_one_training_per_model(global_model, owner):
    Training.objects.create(model=global_model, actor=owner, target_num_updates=1)
    assert_integrity_error(lambda: Training.objects.create(model=global_model, actor=owner, target_num_updates=1))


def test_one_swag_update_per_base_model_owner_and_round(global_model, owner, client_user):
    swag_update(global_model, client_user, round_number=2)
    assert_integrity_error(lambda: swag_update(global_model, client_user, round_number=2))
    swag_update(global_model, client_user, round_number=3)
    swag_update(global_model, owner, round_number=2)
    assert SWAGUpdate.objects.count() == 3


def test_swag_update_needs_samples(global_model, client_user):
    assert_integrity_error(lambda: swag_update(global_model, client_user, sample_size=0))


def test_blob_keys_are_unique(db):
    first = blob()
    assert_integrity_error(lambda: Blob.objects.create(key=first.key, size=1, sha256="0" * 64))


# --------------------------------------------------------------------------------------------------------------------
# tokens


def test_every_new_user_gets_a_token(make_user):
    user = make_user("fresh")
    token = Token.objects.get(user=user)
    assert len(token.key) == 40
    assert user.auth_token == token


def test_tokens_are_distinct_and_kept_on_save(make_user):
    first, second = make_user("first"), make_user("second")
    assert first.auth_token.key != second.auth_token.key
    key = first.auth_token.key
    first.email = "first@example.org"
    first.save()
    assert Token.objects.filter(user=first).count() == 1
    assert Token.objects.get(user=first).key == key


def test_superuser_gets_a_token(db):
    admin = User.objects.create_superuser("root", "root@example.org", "s3cret-pass")
    assert Token.objects.filter(user=admin).exists()


# --------------------------------------------------------------------------------------------------------------------
# model deletion and the model store


def model_keys(model: Model) -> list[str]:
    return [Blob.objects.get(pk=pk).key for pk in model.blob_ids()]


def test_uploaded_model_blobs_match_the_store(owner, upload_model):
    model = Model.objects.get(pk=upload_model(owner))
    storage = get_model_storage()
    for blob_row in Blob.objects.filter(pk__in=model.blob_ids()):
        data = storage.get(blob_row.key)
        assert blob_row.size == len(data)
        assert blob_row.sha256 == hashlib.sha256(data).hexdigest()


def test_deleting_a_model_deletes_its_blobs_and_store_objects(owner, upload_model, django_capture_on_commit_callbacks):
    model = Model.objects.get(pk=upload_model(owner))
    keep = Model.objects.get(pk=upload_model(owner))
    keys = model_keys(model)
    blob_ids = model.blob_ids()
    assert len(keys) == 2  # archive and weights
    storage = get_model_storage()

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        model.delete()
        assert not Blob.objects.filter(pk__in=blob_ids).exists()
        assert all(storage.exist(key) for key in keys)  # the bytes stay until the deletion commits

    assert len(callbacks) == len(keys)
    assert not any(storage.exist(key) for key in keys)
    assert all(storage.exist(key) for key in model_keys(keep))
    assert sorted(storage.keys()) == sorted(model_keys(keep))


def test_deleting_a_global_model_removes_its_updates_swag_and_their_objects(
    actor, participants, client_for, make_training, django_capture_on_commit_callbacks
):
    training = make_training(actor, participants, start=True)
    update = {"round": "0", "sample_size": "3", "model_file": upload("u.pt", state_dict_bytes(shifted_weights(0, 0.1)))}
    response = client_for(participants[0]).post(f"/api/models/{training.model_id}/", update, format="multipart")
    assert response.status_code == 201, response.json()
    swag_update(training.model, participants[1])
    Metric.objects.create(model=training.model, key="loss", value_float=1.0)
    # archive, weights, update weights, the round's running sum, two moments
    assert len(get_model_storage().keys()) == 6

    with django_capture_on_commit_callbacks(execute=True):
        Model.objects.get(pk=training.model_id).delete()

    assert not Model.objects.exists()
    assert not Training.objects.exists()
    assert not SWAGUpdate.objects.exists()
    assert not Metric.objects.exists()
    assert not Blob.objects.exists()
    assert get_model_storage().keys() == []


def test_deleting_a_model_through_the_api(owner, upload_model, client_for, django_capture_on_commit_callbacks):
    model_id = upload_model(owner)
    with django_capture_on_commit_callbacks(execute=True):
        response = client_for(owner).delete(f"/api/models/{model_id}/")
    assert response.status_code == 200, response.json()
    assert not Blob.objects.exists()
    assert get_model_storage().keys() == []


def test_rolled_back_deletion_keeps_blobs_and_store_objects(owner, upload_model, django_capture_on_commit_callbacks):
    model = Model.objects.get(pk=upload_model(owner))
    keys = model_keys(model)
    blob_ids = sorted(model.blob_ids())
    storage = get_model_storage()

    with (
        django_capture_on_commit_callbacks(execute=True) as callbacks,
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        Model.objects.get(pk=model.pk).delete()
        assert not Blob.objects.filter(pk__in=blob_ids).exists()
        raise RuntimeError("roll back")

    assert callbacks == []
    assert Model.objects.filter(pk=model.pk).exists()
    assert sorted(Blob.objects.filter(pk__in=blob_ids).values_list("pk", flat=True)) == blob_ids
    assert all(storage.exist(key) for key in keys)
    assert storage.get(model_keys(model)[0])


def test_deleting_a_swag_update_deletes_its_moments(global_model, client_user, django_capture_on_commit_callbacks):
    update = swag_update(global_model, client_user)
    keys = [update.first_moment.key, update.second_moment.key]
    with django_capture_on_commit_callbacks(execute=True):
        update.delete()
    assert not Blob.objects.filter(key__in=keys).exists()
    assert not any(get_model_storage().exist(key) for key in keys)
    assert Model.objects.filter(pk=global_model.pk).exists()


@pytest.mark.django_db
def test_sweep_removes_only_old_unreferenced_objects():
    import time

    from django.core.management import call_command

    from fl_server_core.services.blobs import BlobWriter, sweep_orphans

    storage = get_model_storage()
    referenced = BlobWriter().put("models/x/weights", b"kept")  # a row references it
    old = int(time.time()) - 7200
    storage.put(f"models/x/weights/{old}-{uuid.uuid4().hex}", b"orphan from a crash")
    young = f"models/x/weights/{int(time.time())}-{uuid.uuid4().hex}"
    storage.put(young, b"an upload still in flight")
    storage.put("legacy/no-timestamp", b"not made by the server")
    assert len(sweep_orphans(grace_seconds=3600)) == 1
    assert sorted(storage.keys()) == sorted([referenced.key, young, "legacy/no-timestamp"])
    call_command("sweep_model_store", "--grace-seconds", "0")
    assert sorted(storage.keys()) == sorted([referenced.key, "legacy/no-timestamp"])


@pytest.mark.django_db
def test_a_failed_block_removes_its_objects_but_keeps_those_whose_rows_committed():
    from fl_server_core.services.blobs import staged_blobs

    storage = get_model_storage()
    with pytest.raises(RuntimeError), staged_blobs() as blobs, transaction.atomic():
        rolled_back = blobs.put("models/x/weights", b"rolled back").key
        raise RuntimeError("refused inside the transaction")
    assert not storage.exist(rolled_back)

    # The error surfaces after the commit went through (a connection dropped while committing).
    with pytest.raises(RuntimeError), staged_blobs() as blobs:
        with transaction.atomic():
            committed = blobs.put("models/x/weights", b"committed").key
        raise RuntimeError("the answer to COMMIT was lost")
    assert Blob.objects.filter(key=committed).exists()
    assert storage.get(committed) == b"committed"
