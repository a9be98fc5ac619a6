"""Accepting what participants upload: local updates, SWAG statistics and metrics."""

from collections.abc import Sequence

from django.db import IntegrityError, transaction

from fl_server_ai.trainer.lifecycle import lock_training
from fl_server_core import serialization, signals
from fl_server_core.exceptions import ConflictError, InvalidInputError, PermissionDeniedError
from fl_server_core.models import LocalModel, Metric, Model, SWAGUpdate, Training, TrainingState, User
from fl_server_core.selectors import is_participant, training_of_model
from fl_server_core.services.blobs import model_prefix, staged_blobs
from fl_server_core.services.models import record_metrics, tensor_spec

STATE_NAMES = {value: label.upper().replace(" ", "_") for value, label in TrainingState.choices}


def _training_for_upload(model: Model, user: User) -> Training:
    """The model's training, if the user may upload to it."""
    training = training_of_model(model) if model.is_global else None
    if training is None:
        raise ConflictError("This model is not the global model of a training; updates cannot be uploaded to it.")
    if not is_participant(user, training):
        raise PermissionDeniedError("You are not a participant of this model's training.")
    return training


def _check_round(training: Training, user: User, round_number: int, expected_state: str, kind: str) -> None:
    """Reject uploads in the wrong state or round, or duplicates (409); the training row is locked."""
    if training.state != expected_state:
        raise ConflictError(
            f"The training is in state {STATE_NAMES[training.state]}; {kind} are accepted only in state "
            f"{STATE_NAMES[expected_state]}."
        )
    if round_number != training.model.round:
        raise ConflictError(f"Round {round_number} is not the current round ({training.model.round}).")
    if not is_participant(user, training):
        raise PermissionDeniedError("You are not a participant of this model's training.")
    duplicates = SWAGUpdate.objects if kind == "SWAG statistics" else LocalModel.objects
    if duplicates.filter(base_model=training.model, owner=user, round=round_number).exists():
        raise ConflictError(f"You already uploaded {kind} for round {round_number}.")


MAX_SAMPLE_SIZE = 2**63 - 1  # PositiveBigIntegerField
MAX_STEP = 2**31 - 1  # PositiveIntegerField (Metric.step)


def _positive(name: str, value: int, maximum: int = MAX_SAMPLE_SIZE) -> None:
    if value < 1:
        raise InvalidInputError(f"{name} must be a positive integer.")
    if value > maximum:
        raise InvalidInputError(f"{name} must be at most {maximum}.")


def accept_local_update(
    model: Model,
    user: User,
    round_number: int,
    sample_size: int,
    update_bytes: bytes,
    metrics: Sequence[tuple[str, float | bytes]] = (),
) -> LocalModel:
    """Validate and store a participant's update of the global model for the current round."""
    training = _training_for_upload(model, user)
    _positive("sample_size", sample_size)
    try:
        weights = serialization.read_weights(update_bytes)
        serialization.validate_weights(weights, tensor_spec(model))
        fmt = serialization.detect_format(update_bytes)
    except serialization.ModelFormatError as error:
        raise InvalidInputError(f"model_file: {error}") from error
    try:
        with staged_blobs() as blobs, transaction.atomic():
            training = lock_training(training.pk)
            _check_round(training, user, round_number, TrainingState.ONGOING, "model updates")
            local = LocalModel.objects.create(
                name=f"{model.name} update of {user.username}",
                owner=user,
                base_model=training.model,
                round=round_number,
                sample_size=sample_size,
                weights=blobs.put(f"{model_prefix(model.id)}/updates", serialization.weights_to_safetensors(weights)),
                weights_format=fmt,
                tensor_spec=model.tensor_spec,
                parameter_count=model.parameter_count,
            )
            record_metrics(local, metrics, round_number, user)
            signals.update_accepted.send(sender=Training, training=training, local_model=local)
    except IntegrityError as error:  # a concurrent duplicate upload won the race
        raise ConflictError(f"You already uploaded model updates for round {round_number}.") from error
    return local


def accept_swag_update(
    model: Model, user: User, round_number: int, sample_size: int, first_moment: bytes, second_moment: bytes
) -> SWAGUpdate:
    """Validate and store a participant's SWAG first and second moments for the current round."""
    training = _training_for_upload(model, user)
    _positive("sample_size", sample_size)
    numel = serialization.parameter_count(tensor_spec(model), parameters_only=True)
    moments = {}
    for field, data in (("first_moment_file", first_moment), ("second_moment_file", second_moment)):
        try:
            moments[field] = serialization.read_flat_tensor(data, numel)
        except serialization.ModelFormatError as error:
            raise InvalidInputError(f"{field}: {error}") from error
    try:
        with staged_blobs() as blobs, transaction.atomic():
            training = lock_training(training.pk)
            _check_round(training, user, round_number, TrainingState.SWAG_ROUND, "SWAG statistics")
            prefix = f"{model_prefix(model.id)}/swag"
            stored = {f: blobs.put(prefix, serialization.weights_to_safetensors({"m": t})) for f, t in moments.items()}
            update = SWAGUpdate.objects.create(
                base_model=training.model,
                owner=user,
                round=round_number,
                sample_size=sample_size,
                first_moment=stored["first_moment_file"],
                second_moment=stored["second_moment_file"],
            )
            signals.swag_update_accepted.send(sender=Training, training=training, swag_update=update)
    except IntegrityError as error:
        raise ConflictError(f"You already uploaded SWAG statistics for round {round_number}.") from error
    return update


def report_metrics(
    model: Model, user: User, pairs: Sequence[tuple[str, float | bytes]], step: int | None = None
) -> list[Metric]:
    """Record metrics a participant (or the model's owner) reports for a model."""
    if not pairs:
        raise InvalidInputError("metric_names: at least one metric is required.")
    if step is not None and not 0 <= step <= MAX_STEP:
        raise InvalidInputError(f"step: must be between 0 and {MAX_STEP}.")
    training = training_of_model(model) if model.is_global else None
    allowed = model.owner_id == user.pk or (training is not None and is_participant(user, training))
    if not allowed:
        raise PermissionDeniedError("Only the model's owner and its training's participants may report metrics.")
    with transaction.atomic():
        metrics = record_metrics(model, pairs, model.round if step is None else step, user)
        signals.metrics_reported.send(sender=Model, model=model, metrics=metrics, reporter=user)
    return metrics
