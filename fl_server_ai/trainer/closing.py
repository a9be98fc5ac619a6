"""Closing rounds: the aggregation task body and the deadline check, both idempotent."""

import logging

from django.db import OperationalError, transaction

from fl_server_ai.trainer import rounds
from fl_server_ai.trainer.lifecycle import lock_training
from fl_server_core.models import RoundState, TrainingRound
from fl_server_core.services.blobs import staged_blobs

log = logging.getLogger(__name__)


def close_round(round_id: int) -> bool:
    """Aggregate a CLOSING round exactly once and move its training on; False if there was nothing to do."""
    found = TrainingRound.objects.filter(pk=round_id).values_list("training_id", "number").first()
    if found is None:
        return False
    training_id, number = found
    try:
        with staged_blobs() as blobs, transaction.atomic():
            training = lock_training(training_id)
            round_ = TrainingRound.objects.select_related("accumulator").get(pk=round_id)
            if round_.state != RoundState.CLOSING or training.current_round_id != round_.id:
                return False  # already aggregated (a retry or a duplicate task)
            rounds.complete_round(training, round_, blobs)
            return True
    except OperationalError:
        raise  # transient database trouble: the task is retried
    except Exception as error:
        log.exception("aggregation of round %s failed", round_id)
        with transaction.atomic():
            training = lock_training(training_id)
            rounds.fail(training, f"Aggregation of round {number} failed: {type(error).__name__}: {error}")
        return False


def close_overdue_round(training_id: object) -> None:
    """Apply the deadline rule to the training's current round."""
    with transaction.atomic():
        rounds.close_if_overdue(lock_training(training_id))
