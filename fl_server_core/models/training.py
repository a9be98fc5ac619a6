"""Trainings: a global model improved by participants under an aggregation method."""

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from fl_server_core.models.model import Model


class TrainingState(models.TextChoices):
    """Life cycle of a training (the wire values are single letters)."""

    INITIAL = "I", "Initial"
    ONGOING = "O", "Ongoing"
    SWAG_ROUND = "S", "SWAG round"
    COMPLETED = "C", "Completed"
    ERROR = "E", "Error"


class AggregationMethod(models.TextChoices):
    """How local updates become the next global model."""

    FED_AVG = "FedAvg", "FedAvg"
    FED_PROX = "FedProx", "FedProx"
    FED_DC = "FedDC", "FedDC"


class UncertaintyMethod(models.TextChoices):
    """How predictions of the final model carry uncertainty."""

    NONE = "NONE", "None"
    ENSEMBLE = "ENSEMBLE", "Ensemble"
    MC_DROPOUT = "MC_DROPOUT", "MC dropout"
    SWAG = "SWAG", "SWAG"


class Training(models.Model):
    """One federated training of a global model."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.OneToOneField(Model, on_delete=models.CASCADE, related_name="training")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="actor_trainings")
    participants = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="participant_trainings")
    state = models.CharField(max_length=1, choices=TrainingState.choices, default=TrainingState.INITIAL)
    target_num_updates = models.PositiveIntegerField(help_text="Rounds to run (times daisy_chain_period for FedDC).")
    aggregation_method = models.CharField(
        max_length=32, choices=AggregationMethod.choices, default=AggregationMethod.FED_AVG
    )
    uncertainty_method = models.CharField(
        max_length=32, choices=UncertaintyMethod.choices, default=UncertaintyMethod.NONE
    )
    options = models.JSONField(default=dict, blank=True)
    metric_names = models.JSONField(default=list, blank=True)
    current_round = models.ForeignKey(
        "fl_server_core.TrainingRound", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    locked = models.BooleanField(default=False, help_text="Set while a transition is in progress.")
    error_reason = models.TextField(blank=True, default="", help_text="Why the training is in ERROR.")
    created_at = models.DateTimeField(auto_now_add=True)
    last_update = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["state"])]
        constraints = [
            models.CheckConstraint(condition=Q(target_num_updates__gte=1), name="training_target_at_least_one"),
            models.CheckConstraint(condition=Q(state__in=TrainingState.values), name="training_state_valid"),
        ]

    def __str__(self) -> str:
        return f"Training {self.id} ({self.get_state_display()})"
