"""Accepting what participants upload: local updates, SWAG statistics and test metrics."""

from collections.abc import Sequence
from typing import NoReturn

import torch
from django.db import DatabaseError, IntegrityError, transaction

from fl_server_ai.aggregation import get_strategy
from fl_server_ai.trainer import rounds
from fl_server_ai.trainer.accumulator import fold_into_round
from fl_server_ai.trainer.lifecycle import lock_training
from fl_server_core import serialization, signals
from fl_server_core.exceptions import ConflictError, InvalidInputError, PermissionDeniedError
from fl_server_core.models import (
    AggregationMethod,
    LocalModel,
    Metric,
    Model,
    ModelKind,
    RoundArrival,
    RoundKind,
    RoundState,
    SWAGUpdate,
    Training,
    TrainingState,
    User,
)
from fl_server_core.selectors import is_participant, training_of_model
from fl_server_core.services.blobs import BlobWriter, model_prefix, staged_blobs
from fl_server_core.services.models import record_metrics, tensor_spec

STATE_NAMES = {value: label.upper().replace(" ", "_") for value, label in TrainingState.choices}
MAX_SAMPLE_SIZE = 2**63 - 1  # PositiveBigIntegerField
MAX_STEP = 2**31 - 1  # PositiveIntegerField (Metric.step)
UPLOAD_KIND = {RoundKind.UPDATE: "model updates", RoundKind.SWAG: "SWAG statistics", RoundKind.TEST: "test metrics"}


def _training_for_upload(model: Model, user: User) -> Training:
    """The training the upload belongs to (FedDC clients may upload to the local model they continued)."""
    base = model.base_model if model.kind == ModelKind.LOCAL else model
    training = training_of_model(base) if base is not None and base.is_global else None
    if (
        training is not None
        and model.kind == ModelKind.LOCAL
        and training.aggregation_method != AggregationMethod.FED_DC
    ):
        training = None  # only FedDC hands local models to other clients to continue from
    if training is None:
        raise ConflictError("This model is not the global model of a training; updates cannot be uploaded to it.")
    if not is_participant(user, training):
        raise PermissionDeniedError("You are not a participant of this model's training.")
    return training


def _check_round(training: Training, user: User, round_number: int, kind: str) -> None:
    """Reject uploads in the wrong state or round, from clients not expected, or duplicates (409/403)."""
    what = UPLOAD_KIND[kind]
    arrivals = RoundArrival.objects.filter(round__training=training, round__number=round_number, round__kind=kind)
    if arrivals.filter(user=user).exists():
        raise ConflictError(f"You already uploaded {what} for round {round_number}.")
    expected_state = TrainingState.SWAG_ROUND if kind == RoundKind.SWAG else TrainingState.ONGOING
    round_ = training.current_round
    if training.state != expected_state or round_ is None or round_.kind != kind:
        raise ConflictError(
            f"The training is in state {STATE_NAMES[training.state]}"
            + (f" ({round_.get_kind_display().lower()} round {round_.number})" if round_ is not None else "")
            + f"; {what} are accepted only in state {STATE_NAMES[expected_state]} during a "
            + f"{RoundKind(kind).label.lower()} round."
        )
    if round_number != round_.number:
        raise ConflictError(f"Round {round_number} is not the current round ({round_.number}).")
    if round_.state != RoundState.OPEN:
        raise ConflictError(f"Round {round_number} is closed.")
    if not is_participant(user, training):
        raise PermissionDeniedError("You are not a participant of this model's training.")
    if not round_.expected.filter(pk=user.pk).exists():
        raise PermissionDeniedError(f"You were not selected for round {round_number}.")


class _RoundSumBrokenError(Exception):
    """The round's running sum could not be read or extended; the round cannot be aggregated."""


def _fold(training: Training, weights: dict[str, torch.Tensor], sample_size: int, blobs: BlobWriter) -> None:
    """Fold the update into the round's running sum; a failure of the sum itself is a _RoundSumBrokenError.

    Database errors (a dropped connection, a failover) say nothing about the sum: they propagate, the
    upload's transaction rolls back and the client may retry (503).
    """
    try:
        fold_into_round(training.current_round, weights, float(sample_size), blobs)
    except DatabaseError:
        raise
    except Exception as error:
        raise _RoundSumBrokenError(f"{type(error).__name__}: {error}") from error


def _fail_round(training: Training, round_number: int, error: Exception) -> NoReturn:
    """Put the training in ERROR (its round cannot be aggregated) and answer the upload with 409."""
    reason = f"Aggregation of round {round_number} failed: {error}"
    with transaction.atomic():
        rounds.fail(lock_training(training.pk), reason)
    raise ConflictError(f"The upload was not accepted: {reason} The training is in ERROR.") from error


def _check_sample_size(value: int) -> None:
    if not 1 <= value <= MAX_SAMPLE_SIZE:
        raise InvalidInputError(f"sample_size must be an integer between 1 and {MAX_SAMPLE_SIZE}.")


def accept_local_update(
    model: Model,
    user: User,
    round_number: int,
    sample_size: int,
    update_bytes: bytes,
    metrics: Sequence[tuple[str, float | bytes]] = (),
) -> LocalModel:
    """Validate and store a participant's update for the current round, folding it into the round's sum."""
    training = _training_for_upload(model, user)
    _check_sample_size(sample_size)
    global_model = training.model
    try:
        weights = serialization.read_weights(update_bytes)
        serialization.validate_weights(weights, tensor_spec(global_model))
        fmt = serialization.detect_format(update_bytes)
    except serialization.ModelFormatError as error:
        raise InvalidInputError(f"model_file: {error}") from error
    try:
        with staged_blobs() as blobs, transaction.atomic():
            training = lock_training(training.pk)
            _check_round(training, user, round_number, RoundKind.UPDATE)
            local = LocalModel.objects.create(
                name=f"{global_model.name} update of {user.username}",
                owner=user,
                base_model=global_model,
                round=round_number,
                sample_size=sample_size,
                weights=blobs.put(
                    f"{model_prefix(global_model.id)}/updates", serialization.weights_to_safetensors(weights)
                ),
                weights_format=fmt,
                tensor_spec=global_model.tensor_spec,
                parameter_count=global_model.parameter_count,
            )
            record_metrics(local, metrics, round_number, user)
            strategy = get_strategy(training.aggregation_method)
            if strategy.streaming and strategy.is_aggregation_round(round_number, training.options):
                _fold(training, weights, sample_size, blobs)
            signals.update_accepted.send(sender=Training, training=training, local_model=local)
            rounds.record_arrival_and_maybe_close(training, training.current_round, user, sample_size)
    except IntegrityError as error:  # a concurrent duplicate upload won the race
        raise ConflictError(f"You already uploaded model updates for round {round_number}.") from error
    except _RoundSumBrokenError as error:
        _fail_round(training, round_number, error)
    return local


def accept_swag_update(
    model: Model, user: User, round_number: int, sample_size: int, first_moment: bytes, second_moment: bytes
) -> SWAGUpdate:
    """Validate and store a participant's SWAG first and second moments, folding them into the round's sum."""
    training = _training_for_upload(model, user)
    _check_sample_size(sample_size)
    numel = serialization.parameter_count(tensor_spec(training.model), parameters_only=True)
    moments: dict[str, torch.Tensor] = {}
    for field, data in (("first_moment_file", first_moment), ("second_moment_file", second_moment)):
        try:
            moments[field] = serialization.read_flat_tensor(data, numel)
        except serialization.ModelFormatError as error:
            raise InvalidInputError(f"{field}: {error}") from error
    try:
        with staged_blobs() as blobs, transaction.atomic():
            training = lock_training(training.pk)
            _check_round(training, user, round_number, RoundKind.SWAG)
            prefix = f"{model_prefix(training.model_id)}/swag"
            stored = {f: blobs.put(prefix, serialization.weights_to_safetensors({"m": t})) for f, t in moments.items()}
            update = SWAGUpdate.objects.create(
                base_model=training.model,
                owner=user,
                round=round_number,
                sample_size=sample_size,
                first_moment=stored["first_moment_file"],
                second_moment=stored["second_moment_file"],
            )
            sums = {"first": moments["first_moment_file"], "second": moments["second_moment_file"]}
            _fold(training, sums, sample_size, blobs)
            signals.swag_update_accepted.send(sender=Training, training=training, swag_update=update)
            rounds.record_arrival_and_maybe_close(training, training.current_round, user, sample_size)
    except IntegrityError as error:
        raise ConflictError(f"You already uploaded SWAG statistics for round {round_number}.") from error
    except _RoundSumBrokenError as error:
        _fail_round(training, round_number, error)
    return update


def report_metrics(
    model: Model, user: User, pairs: Sequence[tuple[str, float | bytes]], step: int | None = None
) -> list[Metric]:
    """Record metrics for a model; a participant's metrics for the global model in a test round are its arrival."""
    if not pairs:
        raise InvalidInputError("metric_names: at least one metric is required.")
    if step is not None and not 0 <= step <= MAX_STEP:
        raise InvalidInputError(f"step: must be between 0 and {MAX_STEP}.")
    training = training_of_model(model) if model.is_global else None
    allowed = model.owner_id == user.pk or (training is not None and is_participant(user, training))
    if not allowed:
        raise PermissionDeniedError("Only the model's owner and its training's participants may report metrics.")
    with transaction.atomic():
        if training is not None:
            training = lock_training(training.pk)
        round_ = training.current_round if training is not None else None
        testing = (
            round_ is not None
            and round_.kind == RoundKind.TEST
            and round_.state == RoundState.OPEN
            and training.state == TrainingState.ONGOING
            and (step is None or step == round_.number)
            and round_.expected.filter(pk=user.pk).exists()
            and not round_.arrivals.filter(user=user).exists()
        )
        metrics = record_metrics(
            model, pairs, round_.number if testing else (model.round if step is None else step), user
        )
        signals.metrics_reported.send(sender=Model, model=model, metrics=metrics, reporter=user)
        if testing:
            rounds.record_arrival_and_maybe_close(training, round_, user, 0)
    return metrics
