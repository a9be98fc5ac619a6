"""Metrics reported for a model (by clients, per round or test step)."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from fl_server_core.models.model import Model


class Metric(models.Model):
    """One named value (a float, or binary data such as a plot) reported for a model."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="metrics")
    key = models.CharField(max_length=256)
    value_float = models.FloatField(null=True, blank=True)
    value_binary = models.BinaryField(null=True, blank=True)
    step = models.PositiveIntegerField(default=0, help_text="Round (or step) the value belongs to.")
    reporter = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="metrics"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["step", "created_at", "id"]
        indexes = [models.Index(fields=["model", "step"])]
        constraints = [
            models.CheckConstraint(
                condition=(Q(value_float__isnull=False) & Q(value_binary__isnull=True))
                | (Q(value_float__isnull=True) & Q(value_binary__isnull=False)),
                name="metric_has_exactly_one_value",
            )
        ]

    def __str__(self) -> str:
        return f"{self.key}={self.value}"

    @property
    def value(self) -> float | bytes:
        """The value, whichever kind it is."""
        return self.value_float if self.value_float is not None else bytes(self.value_binary)
