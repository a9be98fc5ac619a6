"""Transitions of a training's life cycle."""

from django.db import transaction

from fl_server_core import signals
from fl_server_core.exceptions import InvalidInputError
from fl_server_core.models import Training, TrainingState


def lock_training(training_id: object) -> Training:
    """The training row, locked for the rest of the transaction."""
    return Training.objects.select_for_update().select_related("model").get(pk=training_id)


def start_training(training: Training) -> Training:
    """INITIAL -> ONGOING; requires participants."""
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
        signals.training_started.send(sender=Training, training=training)
    return training
