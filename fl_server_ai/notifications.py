"""Notifications to clients through an outbox.

`notify` writes one `Notification` row per recipient inside the caller's transaction; after
commit a task pushes each recipient's pending rows in order (signed, with retries and back-off).
The same rows feed the pull endpoint and the admin timeline.
"""

import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any

import requests
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from fl_server_core.models import DeliveryState, Notification, Training, User

log = logging.getLogger(__name__)

TRAINING_START = "TRAINING_START"
UPDATE_ROUND_START = "UPDATE_ROUND_START"
SWAG_ROUND_START = "SWAG_ROUND_START"
MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
TRAINING_FINISHED = "TRAINING_FINISHED"
CLIENT_REMOVED = "CLIENT_REMOVED"


def notification_secret() -> bytes:
    """The HMAC key: `FL_NOTIFICATION_SECRET`, or one derived from `SECRET_KEY`."""
    secret = settings.FL_NOTIFICATION_SECRET
    if secret:
        return secret.encode()
    return hmac.new(settings.SECRET_KEY.encode(), b"fl-notifications", hashlib.sha256).digest()


def sign(raw_body: bytes, secret: bytes | None = None) -> str:
    """`X-FL-Signature` value: `sha256=<hex HMAC of the raw body>`."""
    digest = hmac.new(secret if secret is not None else notification_secret(), raw_body, hashlib.sha256)
    return f"sha256={digest.hexdigest()}"


def notify(
    training: Training,
    recipients: Iterable[User],
    notification_type: str,
    body: dict[str, Any] | Callable[[User], dict[str, Any]],
    push: bool = True,
) -> list[Notification]:
    """Write notifications (inside the current transaction) and push them after commit."""
    from fl_server_ai import tasks  # tasks import this module

    rows = []
    for user in recipients:
        pushable = push and bool(user.message_endpoint)
        rows.append(
            Notification(
                training=training,
                recipient=user,
                notification_type=notification_type,
                body=body(user) if callable(body) else body,
                delivery_state=DeliveryState.PENDING if pushable else DeliveryState.PULL,
            )
        )
    created = Notification.objects.bulk_create(rows)
    for recipient_id in {row.recipient_id for row in rows if row.delivery_state == DeliveryState.PENDING}:
        tasks.dispatch(tasks.deliver_notifications, str(recipient_id))
    return created


def backoff(attempts: int) -> timedelta:
    """Delay before the next attempt: exponential, capped at five minutes."""
    return timedelta(seconds=min(300.0, settings.FL_NOTIFICATION_BACKOFF_SECONDS * 2 ** max(0, attempts - 1)))


def post(notification: Notification) -> tuple[str, str]:
    """Push one notification; returns the new delivery state and an error text."""
    raw = json.dumps(notification.payload(), separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "X-FL-Event-Id": str(notification.id),
        "X-FL-Signature": sign(raw),
    }
    try:
        response = requests.post(
            notification.recipient.message_endpoint,
            data=raw,
            headers=headers,
            timeout=settings.FL_NOTIFICATION_TIMEOUT_SECONDS,
        )
    except requests.RequestException as error:
        return DeliveryState.PENDING, f"{type(error).__name__}: {error}"
    if 200 <= response.status_code < 300:
        return DeliveryState.DELIVERED, ""
    return DeliveryState.DECLINED, f"HTTP {response.status_code}: {response.text[:200]}"


def _claim(recipient_id: str) -> Notification | None:
    """The recipient's first pending notification if it is due, leased so that no other worker sends it meanwhile."""
    with transaction.atomic():
        now = timezone.now()
        notification = (
            Notification.objects.select_for_update()
            .select_related("recipient")
            .filter(recipient_id=recipient_id, delivery_state=DeliveryState.PENDING)
            .order_by("id")
            .first()
        )
        if notification is None or (notification.next_attempt_at and notification.next_attempt_at > now):
            return None  # nothing due, or an earlier one waits for its retry or is being sent (order is kept)
        notification.attempts += 1
        lease = settings.FL_NOTIFICATION_TIMEOUT_SECONDS + 5
        notification.next_attempt_at = now + timedelta(seconds=lease)
        notification.save(update_fields=["attempts", "next_attempt_at"])
        return notification


def _record(notification: Notification, state: str, error: str) -> Notification:
    """Store the outcome of one attempt (unless the notification was cancelled meanwhile)."""
    with transaction.atomic():
        current = Notification.objects.select_for_update().get(pk=notification.pk)
        if current.delivery_state != DeliveryState.PENDING:
            return current
        current.last_error = error
        current.delivery_state = state
        now = timezone.now()
        if state == DeliveryState.DELIVERED:
            current.delivered_at = now
        elif state == DeliveryState.PENDING:
            if current.attempts >= settings.FL_NOTIFICATION_MAX_ATTEMPTS:
                current.delivery_state = DeliveryState.FAILED
            else:
                current.next_attempt_at = now + backoff(current.attempts)
        current.save()
        return current


def deliver_pending(recipient_id: str) -> int:
    """Push the recipient's due notifications in order; stop at the first failure. Returns how many went out.

    No database transaction is open while a client is contacted: a slow endpoint delays only its own
    notifications.
    """
    delivered = 0
    while True:
        claimed = _claim(recipient_id)
        if claimed is None:
            return delivered
        state, error = post(claimed)
        notification = _record(claimed, state, error)
        if notification.delivery_state == DeliveryState.DECLINED:
            from fl_server_ai.trainer import remove_declining_client

            remove_declining_client(notification.training_id, notification.recipient_id, error)
            continue  # the client's other pending rows are cancelled by the removal
        if notification.delivery_state != DeliveryState.DELIVERED:
            log.info("notification %s to %s: %s", notification.id, recipient_id, error)
            return delivered
        delivered += 1


def recipients_due() -> list[str]:
    """Recipients with pending notifications whose next attempt is due."""
    now = timezone.now()
    due = Notification.objects.filter(delivery_state=DeliveryState.PENDING).exclude(next_attempt_at__gt=now)
    return [str(pk) for pk in due.values_list("recipient_id", flat=True).distinct()]
