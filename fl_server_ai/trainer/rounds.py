"""Rounds of a training: opening, arrivals, closing, and the transition to what follows.

Every function here runs inside a transaction that holds the training's row lock.
"""

import time
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.utils import timezone

from fl_server_ai import notifications as notes
from fl_server_ai.aggregation import daisy_chain_permutation, get_strategy, sample_clients
from fl_server_ai.dispatch import dispatch
from fl_server_ai.trainer.accumulator import load_accumulator
from fl_server_core import serialization, signals
from fl_server_core.models import (
    LocalModel,
    Model,
    Notification,
    RoundKind,
    RoundState,
    Training,
    TrainingRound,
    TrainingState,
    UncertaintyMethod,
    User,
    WeightsVersion,
)
from fl_server_core.receivers import release_blobs
from fl_server_core.services.blobs import BlobWriter, model_prefix
from fl_server_core.services.models import read_weights, tensor_spec

FINISHED = (TrainingState.COMPLETED, TrainingState.ERROR)


def tests_enabled(training: Training) -> bool:
    """Whether the training has model-test rounds at all."""
    return not training.options.get("skip_model_tests", False)


def quorum(training: Training, expected: int) -> int:
    """Arrivals needed to close a round at its deadline."""
    return max(1, min(int(training.options.get("min_participants", 1)), expected))


def _expected_clients(training: Training, kind: str, number: int) -> list[User]:
    participants = list(training.participants.order_by("pk"))
    fraction = training.options.get("client_fraction")
    if kind != RoundKind.UPDATE or fraction is None:
        return participants
    minimum = min(int(training.options.get("min_participants", 1)), len(participants))
    chosen = set(
        sample_clients([str(u.pk) for u in participants], fraction, training.options.get("seed", 0), number, minimum)
    )
    return [u for u in participants if str(u.pk) in chosen]


def _daisy_assignments(training: Training, number: int) -> dict[str, str]:
    """FedDC: after a round without aggregation each client continues from another client's local model."""
    strategy = get_strategy(training.aggregation_method)
    if number == 0 or strategy.is_aggregation_round(number - 1, training.options):
        return {}
    local_of = {
        str(owner): str(pk)
        for owner, pk in LocalModel.objects.filter(base_model=training.model, round=number - 1).values_list(
            "owner_id", "id"
        )
    }
    permutation = daisy_chain_permutation(sorted(local_of), training.options.get("seed", 0), number - 1)
    return {client: local_of[source] for client, source in permutation.items()}


def open_round(training: Training, kind: str, number: int) -> TrainingRound:
    """Open a round, make it the training's current round and announce it to its expected clients."""
    expected = _expected_clients(training, kind, number)
    timeout = training.options.get("round_timeout_seconds")
    round_ = TrainingRound.objects.create(
        training=training,
        number=number,
        kind=kind,
        deadline=timezone.now() + timedelta(seconds=timeout) if timeout else None,
        assignments=_daisy_assignments(training, number) if kind == RoundKind.UPDATE else {},
    )
    round_.expected.set(expected)
    signals.round_started.send(sender=Training, training=training, round=round_)
    training.current_round = round_
    training.state = TrainingState.SWAG_ROUND if kind == RoundKind.SWAG else TrainingState.ONGOING
    training.save(update_fields=["current_round", "state", "last_update"])
    model_id = str(training.model_id)
    if kind == RoundKind.UPDATE:
        config = get_strategy(training.aggregation_method).round_config(training.options)

        def body(user: User) -> dict[str, Any]:
            data: dict[str, Any] = {
                "round": number,
                "global_model_uuid": round_.assignments.get(str(user.pk), model_id),
            }
            return {**data, "config": config} if config else data

        notes.notify(training, expected, notes.UPDATE_ROUND_START, body)
    else:
        kind_type = notes.SWAG_ROUND_START if kind == RoundKind.SWAG else notes.MODEL_TEST_ROUND
        notes.notify(training, expected, kind_type, {"round": number, "global_model_uuid": model_id})
    return round_


def record_arrival_and_maybe_close(training: Training, round_: TrainingRound, user: User, sample_size: int) -> None:
    """Count a contribution; the round closes when every expected client has arrived."""
    round_.arrivals.create(user=user, sample_size=sample_size)
    close_if_complete(training, round_)


def close_if_complete(training: Training, round_: TrainingRound) -> None:
    """Start closing the round if every expected client arrived."""
    expected = set(round_.expected.values_list("pk", flat=True))
    arrived = set(round_.arrivals.values_list("user_id", flat=True))
    if round_.state == RoundState.OPEN and expected and expected <= arrived:
        begin_closing(round_, "all expected clients arrived")


def begin_closing(round_: TrainingRound, reason: str) -> None:
    """OPEN -> CLOSING; the aggregation task runs after commit."""
    from fl_server_ai import tasks

    round_.state = RoundState.CLOSING
    round_.closed_at = timezone.now()
    round_.close_reason = reason
    round_.save(update_fields=["state", "closed_at", "close_reason"])
    dispatch(tasks.close_round, round_.id)


def close_if_overdue(training: Training) -> None:
    """At the deadline: close with quorum, keep waiting if asked to, or fail the training."""
    round_ = training.current_round
    if round_ is None or round_.state != RoundState.OPEN or round_.deadline is None or round_.deadline > timezone.now():
        return
    expected, arrived = round_.expected.count(), round_.arrivals.count()
    needed = quorum(training, expected)
    if arrived >= needed:
        begin_closing(round_, f"deadline reached with {arrived} of {expected} expected clients (quorum {needed})")
    elif training.options.get("wait_for_quorum", False):
        round_.deadline = timezone.now() + timedelta(seconds=training.options["round_timeout_seconds"])
        round_.save(update_fields=["deadline"])
    else:
        fail(
            training,
            f"{round_.get_kind_display()} round {round_.number} reached its deadline with {arrived} of {expected} "
            f"expected clients; the quorum is {needed}.",
        )


def _new_weights(model: Model, weights: dict[str, Any], number: int, blobs: BlobWriter) -> None:
    """Make `weights` the model's current weights, kept as the version of round `number`."""
    blob = blobs.put(f"{model_prefix(model.id)}/weights", serialization.weights_to_safetensors(weights))
    model.weights = blob
    WeightsVersion.objects.create(model=model, round=number, weights=blob)
    keep = settings.FL_WEIGHT_VERSIONS_KEEP
    if keep > 0:
        for old in WeightsVersion.objects.filter(model=model).order_by("-round")[keep:]:
            old.delete()


def _complete_update_round(training: Training, round_: TrainingRound, blobs: BlobWriter) -> None:
    model = Model.objects.select_related("weights").get(pk=training.model_id)
    strategy = get_strategy(training.aggregation_method)
    if strategy.is_aggregation_round(round_.number, training.options):
        signals.before_aggregation.send(sender=Training, training=training, round=round_)
        if strategy.streaming:  # names, shapes and dtypes suffice: the current weights are not read
            new = load_accumulator(round_).finalize({s.name: s.placeholder() for s in tensor_spec(model)})
        else:
            updates = LocalModel.objects.filter(base_model=model, round=round_.number).select_related("weights")
            like = read_weights(model)
            new = strategy.aggregate([(read_weights(u), float(u.sample_size)) for u in updates], like)
        broken = [
            name for name, tensor in new.items() if tensor.is_floating_point() and not serialization.all_finite(tensor)
        ]
        if broken:
            raise ValueError(f"the aggregated weights are not finite in {', '.join(broken[:5])}")
        _new_weights(model, new, round_.number + 1, blobs)
        signals.after_aggregation.send(sender=Training, training=training, round=round_, weights=new)
    model.round = round_.number + 1
    model.save(update_fields=["weights", "round", "updated_at"])
    training.model = model


def _complete_swag_round(training: Training, round_: TrainingRound, blobs: BlobWriter) -> None:
    model = Model.objects.get(pk=training.model_id)
    accumulator = load_accumulator(round_)
    tensors, _ = accumulator.to_state()
    moments = accumulator.finalize({name: tensor.float() for name, tensor in tensors.items()})
    old = [model.swag_first_moment_id, model.swag_second_moment_id]
    prefix = f"{model_prefix(model.id)}/swag-moments"
    model.swag_first_moment = blobs.put(prefix, serialization.weights_to_safetensors({"m": moments["first"]}))
    model.swag_second_moment = blobs.put(prefix, serialization.weights_to_safetensors({"m": moments["second"]}))
    model.save(update_fields=["swag_first_moment", "swag_second_moment", "updated_at"])
    release_blobs([pk for pk in old if pk])


def complete_round(training: Training, round_: TrainingRound, blobs: BlobWriter) -> None:
    """CLOSING -> DONE: aggregate what the round collected, then move the training on."""
    started = time.perf_counter()
    if round_.kind == RoundKind.UPDATE:
        _complete_update_round(training, round_, blobs)
    elif round_.kind == RoundKind.SWAG:
        _complete_swag_round(training, round_, blobs)
    accumulator = round_.accumulator_id
    round_.accumulator = None
    round_.state = RoundState.DONE
    round_.finished_at = timezone.now()
    round_.aggregation_seconds = time.perf_counter() - started
    round_.save(update_fields=["accumulator", "state", "finished_at", "aggregation_seconds"])
    if accumulator:
        release_blobs([accumulator])
    signals.round_finished.send(sender=Training, training=training, round=round_)
    advance(training, round_)


def advance(training: Training, done: TrainingRound) -> None:
    """Open the round that follows `done`, or finish the training."""
    rounds_done = training.model.round
    final = rounds_done >= training.target_num_updates
    strategy = get_strategy(training.aggregation_method)
    if done.kind == RoundKind.UPDATE and not final:
        aggregated = strategy.is_aggregation_round(done.number, training.options)
        test_now = aggregated and tests_enabled(training) and training.options.get("model_test_after_each_round", True)
        open_round(training, RoundKind.TEST if test_now else RoundKind.UPDATE, rounds_done)
    elif done.kind == RoundKind.TEST and not final:
        open_round(training, RoundKind.UPDATE, rounds_done)
    elif done.kind == RoundKind.UPDATE and training.uncertainty_method == UncertaintyMethod.SWAG:
        open_round(training, RoundKind.SWAG, rounds_done)
    elif done.kind != RoundKind.TEST and tests_enabled(training):
        open_round(training, RoundKind.TEST, rounds_done)
    else:
        finish(training)


def finish(training: Training) -> None:
    """The training is COMPLETED; everyone is told."""
    training.state = TrainingState.COMPLETED
    training.save(update_fields=["state", "last_update"])
    body = {"global_model_uuid": str(training.model_id)}
    notes.notify(training, training.participants.all(), notes.TRAINING_FINISHED, body)
    signals.training_finished.send(sender=Training, training=training, state=training.state, reason="")


def fail(training: Training, reason: str) -> None:
    """The training is in ERROR with the reason recorded; everyone is told."""
    if training.state in FINISHED:
        return
    round_ = training.current_round
    if round_ is not None and round_.state in (RoundState.OPEN, RoundState.CLOSING):
        round_.state = RoundState.FAILED
        round_.close_reason = reason[:256]
        round_.save(update_fields=["state", "close_reason"])
    training.state = TrainingState.ERROR
    training.error_reason = reason
    training.save(update_fields=["state", "error_reason", "last_update"])
    body = {"global_model_uuid": str(training.model_id), "status": "error", "reason": reason}
    notes.notify(training, training.participants.all(), notes.TRAINING_FINISHED, body)
    signals.training_finished.send(sender=Training, training=training, state=training.state, reason=reason)


def drop_clients(training: Training, users: list[User], reason: str) -> None:
    """Participants left (removed, or declined a notification): tell them and re-evaluate the round."""
    ids = [u.pk for u in users]
    Notification.objects.filter(training=training, recipient_id__in=ids, delivery_state="PENDING").update(
        delivery_state="FAILED", last_error=f"client removed: {reason}"[:1000]
    )
    body = {"reason": reason}
    notes.notify(training, users, notes.CLIENT_REMOVED, lambda u: {**body, "client_uuid": str(u.pk)}, push=False)
    round_ = training.current_round
    if training.state in FINISHED or training.state == TrainingState.INITIAL or round_ is None:
        return
    round_.expected.remove(*users)
    if not training.participants.exists() or (round_.state == RoundState.OPEN and not round_.expected.exists()):
        fail(training, f"No participants left in {round_.get_kind_display().lower()} round {round_.number}: {reason}")
    else:
        close_if_complete(training, round_)
