"""Rounds of a training and who arrived in them; versions of global weights."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from fl_server_core.models.blob import Blob
from fl_server_core.models.model import Model
from fl_server_core.models.training import Training


class RoundKind(models.TextChoices):
    """What a round collects."""

    UPDATE = "UPDATE", "Model updates"
    SWAG = "SWAG", "SWAG statistics"
    TEST = "TEST", "Model test metrics"


class RoundState(models.TextChoices):
    """Life cycle of a round: open for uploads, closing (aggregation pending), done, failed."""

    OPEN = "OPEN", "Open"
    CLOSING = "CLOSING", "Closing"
    DONE = "DONE", "Done"
    FAILED = "FAILED", "Failed"


class TrainingRound(models.Model):
    """One round of a training: who is expected, who arrived, when it opened and closed."""

    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="rounds")
    number = models.PositiveIntegerField()
    kind = models.CharField(max_length=8, choices=RoundKind.choices)
    state = models.CharField(max_length=8, choices=RoundState.choices, default=RoundState.OPEN)
    expected = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="expected_rounds")
    assignments = models.JSONField(
        default=dict, blank=True, help_text="FedDC: client id -> id of the model it continues from."
    )
    accumulator = models.ForeignKey(
        Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="Running weighted sum."
    )
    total_samples = models.PositiveBigIntegerField(default=0)
    opened_at = models.DateTimeField(auto_now_add=True)
    deadline = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    aggregation_seconds = models.FloatField(null=True, blank=True)
    close_reason = models.CharField(max_length=256, blank=True, default="")

    class Meta:
        ordering = ["training", "number", "opened_at"]
        constraints = [
            models.UniqueConstraint(fields=["training", "number", "kind"], name="one_round_per_number_and_kind"),
        ]
        indexes = [models.Index(fields=["state", "deadline"])]

    def __str__(self) -> str:
        return f"{self.get_kind_display()} round {self.number} ({self.get_state_display()})"

    def blob_ids(self) -> list[int]:
        """Ids of the store objects this round owns."""
        return [self.accumulator_id] if self.accumulator_id else []


class RoundArrival(models.Model):
    """A participant's contribution to a round (an update, SWAG statistics or test metrics)."""

    round = models.ForeignKey(TrainingRound, on_delete=models.CASCADE, related_name="arrivals")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="arrivals")
    sample_size = models.PositiveBigIntegerField(default=0)
    arrived_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["arrived_at", "id"]
        constraints = [models.UniqueConstraint(fields=["round", "user"], name="one_arrival_per_round_and_user")]

    def __str__(self) -> str:
        return f"{self.user_id} in {self.round_id}"


class WeightsVersion(models.Model):
    """The global weights after a round, kept so a training can be inspected, rolled back or resumed."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="weight_versions")
    round = models.PositiveIntegerField(help_text="Rounds aggregated into these weights.")
    weights = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "round"]
        constraints = [models.UniqueConstraint(fields=["model", "round"], name="one_weights_version_per_round")]

    def __str__(self) -> str:
        return f"{self.model_id} round {self.round}"

    def blob_ids(self) -> list[int]:
        """Ids of the store objects this version owns."""
        return [self.weights_id]


class DeliveryState(models.TextChoices):
    """Push delivery of a notification."""

    PENDING = "PENDING", "Pending"
    DELIVERED = "DELIVERED", "Delivered"
    DECLINED = "DECLINED", "Declined (client answered 4xx/5xx)"
    FAILED = "FAILED", "Failed (gave up after retries)"
    PULL = "PULL", "Pull only (no message endpoint)"


class Notification(models.Model):
    """Outbox: one notification for one recipient, written in the transaction of the change it announces.

    The id is the sequence number of the pull endpoint and the `X-FL-Event-Id` of a push delivery.
    """

    training = models.ForeignKey(Training, on_delete=models.CASCADE, related_name="notifications")
    recipient = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications")
    notification_type = models.CharField(max_length=32)
    body = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)
    delivery_state = models.CharField(max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["training", "recipient", "id"]),
            models.Index(fields=["delivery_state", "next_attempt_at"]),
        ]
        constraints = [
            models.CheckConstraint(
                condition=~Q(delivery_state="DELIVERED") | Q(delivered_at__isnull=False),
                name="delivered_notification_has_time",
            )
        ]

    def __str__(self) -> str:
        return f"#{self.id} {self.notification_type} -> {self.recipient_id}"

    def payload(self) -> dict[str, object]:
        """The JSON object that is pushed and pulled (PROTOCOL.md)."""
        return {
            "notification_type": self.notification_type,
            "training_uuid": str(self.training_id),
            "body": self.body,
        }
