"""Transitions of a training's life cycle that callers start: start, abort, removal of clients."""

from typing import Any

from django.db import transaction

from fl_server_ai import notifications as notes
from fl_server_ai.trainer import rounds
from fl_server_core import signals
from fl_server_core.exceptions import ConflictError, InvalidInputError
from fl_server_core.models import RoundKind, Training, TrainingState, User, WeightsVersion


def lock_training(training_id: object) -> Training:
    """The training row, locked for the rest of the transaction, read fresh with its model and current round.

    The lock is taken without joins (PostgreSQL refuses FOR UPDATE on the nullable side of an outer join),
    and everything is read after it is granted, so nothing read can predate the previous holder's commit.
    """
    Training.objects.select_for_update().filter(pk=training_id).values_list("pk").get()
    return Training.objects.select_related("model", "current_round").get(pk=training_id)


def start_training(training: Training) -> Training:
    """INITIAL -> ONGOING: announce the training and open round 0."""
    with transaction.atomic():
        training = lock_training(training.pk)
        if training.state != TrainingState.INITIAL:
            raise InvalidInputError(
                f"Training is not in state INITIAL (it is {training.get_state_display().upper()}); "
                "only a new training can be started."
            )
        if not training.participants.exists():
            raise InvalidInputError("Training has no participants; register clients before starting it.")
        training.state = TrainingState.ONGOING
        training.save(update_fields=["state", "last_update"])
        model = training.model
        WeightsVersion.objects.get_or_create(model=model, round=model.round, defaults={"weights": model.weights})
        body = {"global_model_uuid": str(model.id)}
        notes.notify(training, training.participants.order_by("pk"), notes.TRAINING_START, body)
        rounds.open_round(training, RoundKind.UPDATE, model.round)
        signals.training_started.send(sender=Training, training=training)
    return training


def abort_training(training: Training) -> Training:
    """Any unfinished state -> ERROR (aborted); clients are told."""
    with transaction.atomic():
        training = lock_training(training.pk)
        if training.state in rounds.FINISHED:
            raise ConflictError(f"The training is already {training.get_state_display().lower()}.")
        rounds.fail(training, "Aborted by the actor.")
    return training


def on_participants_removed(sender: Any, training: Training, users: list[User], **kwargs: Any) -> None:
    """Removed participants are told and the current round is re-evaluated (same transaction)."""
    rounds.drop_clients(training, users, "removed by the actor")


def remove_declining_client(training_id: object, user_id: object, error: str) -> None:
    """A client answered a notification with 4xx/5xx: it declines and leaves the training."""
    with transaction.atomic():
        training = lock_training(training_id)
        user = training.participants.filter(pk=user_id).first()
        if user is None:
            return
        training.participants.remove(user)
        rounds.drop_clients(training, [user], f"the client declined a notification ({error})")
