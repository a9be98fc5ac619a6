"""Celery tasks: idempotent, acknowledged late, safe to retry or run twice.

Only `run_inference` has a result anyone reads. The others ignore theirs: otherwise every dispatch would
also subscribe the sending process to the task's result in the result store, and with that store
unreachable each dispatch would block for its reconnection attempts (about 20 s) inside the request.
"""

import logging
from datetime import timedelta

from celery import shared_task
from django.db import OperationalError
from django.utils import timezone

from fl_server_ai import notifications, trainer
from fl_server_ai.dispatch import dispatch, dispatch_now
from fl_server_core.models import RoundState, TrainingRound

log = logging.getLogger(__name__)

__all__ = ["close_round", "deliver_notifications", "dispatch", "tick"]


@shared_task(acks_late=True, ignore_result=True, autoretry_for=(OperationalError,), retry_backoff=True, max_retries=10)
def close_round(round_id: int) -> bool:
    """Aggregate a closing round (exactly once) and open what follows."""
    return trainer.close_round(round_id)


@shared_task(acks_late=True, ignore_result=True)
def deliver_notifications(recipient_id: str) -> int:
    """Push a recipient's pending notifications in order."""
    return notifications.deliver_pending(recipient_id)


@shared_task(ignore_result=True)
def tick() -> None:
    """Periodic check: close overdue rounds, re-drive stuck aggregations, retry due deliveries."""
    from django.conf import settings

    now = timezone.now()
    overdue = TrainingRound.objects.filter(state=RoundState.OPEN, deadline__lte=now)
    for training_id in overdue.values_list("training_id", flat=True).distinct():
        try:
            trainer.close_overdue_round(training_id)
        except Exception:
            log.exception("deadline check of training %s failed", training_id)
    stuck_since = now - timedelta(seconds=settings.FL_CLOSING_RETRY_SECONDS)
    for round_id in TrainingRound.objects.filter(state=RoundState.CLOSING, closed_at__lte=stuck_since).values_list(
        "id", flat=True
    ):
        dispatch_now(close_round, round_id)
    for recipient_id in notifications.recipients_due():
        dispatch_now(deliver_notifications, recipient_id)


@shared_task
def run_inference(model_id: str, encoded_input: str, seed: int | None = None) -> dict:
    """Inference of a large input on a worker (the web process waits for the result)."""
    from fl_server_ai import inference
    from fl_server_core.models import Model

    model = Model.objects.select_related("weights", "archive").get(pk=model_id)
    return inference.predict(model, inference.decode_tensor(encoded_input), seed)


@shared_task(ignore_result=True)
def sweep_model_store() -> int:
    """Delete model-store objects that nothing references (left by crashed processes)."""
    from django.conf import settings

    from fl_server_core.services.blobs import sweep_orphans

    removed = sweep_orphans(settings.FL_SWEEP_GRACE_SECONDS)
    if removed:
        log.info("removed %d orphaned model-store objects", len(removed))
    return len(removed)
