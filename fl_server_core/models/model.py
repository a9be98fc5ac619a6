"""Models: global models, clients' local updates, SWAG models and ensembles (mean models).

All kinds share one table so that invariants (one update per client, model and round) are
database constraints; `GlobalModel`, `LocalModel`, `SWAGModel` and `MeanModel` are proxies.
"""

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q

from fl_server_core.models.blob import Blob


class ModelKind(models.TextChoices):
    """What a model row is."""

    GLOBAL = "GLOBAL", "Global model"
    SWAG = "SWAG", "SWAG global model"
    LOCAL = "LOCAL", "Local update"
    MEAN = "MEAN", "Mean (ensemble) model"


GLOBAL_KINDS = (ModelKind.GLOBAL, ModelKind.SWAG)


class Model(models.Model):
    """A model: weights in the model store, metadata here."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=8, choices=ModelKind.choices)
    name = models.CharField(max_length=256)
    description = models.TextField(blank=True, default="")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="models")
    round = models.PositiveIntegerField(default=0, help_text="Global: rounds aggregated so far. Local: its round.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    weights = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    weights_format = models.CharField(max_length=16, blank=True, default="", help_text="Format of the upload.")
    tensor_spec = models.JSONField(default=list, blank=True, help_text="Names, shapes and dtypes of the weights.")
    parameter_count = models.BigIntegerField(default=0)

    archive = models.ForeignKey(
        Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+", help_text="TorchScript archive."
    )
    preprocessing = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    input_shape = models.JSONField(null=True, blank=True, help_text="Input shape; null entries are free dimensions.")

    base_model = models.ForeignKey("self", null=True, blank=True, on_delete=models.CASCADE, related_name="local_models")
    sample_size = models.PositiveBigIntegerField(null=True, blank=True)

    swag_first_moment = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    swag_second_moment = models.ForeignKey(Blob, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    members = models.ManyToManyField("self", symmetrical=False, blank=True, related_name="ensembles")

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["kind", "owner"]), models.Index(fields=["base_model", "round"])]
        constraints = [
            models.UniqueConstraint(
                fields=["base_model", "owner", "round"],
                condition=Q(kind=ModelKind.LOCAL),
                name="one_update_per_client_model_round",
            ),
            models.CheckConstraint(
                condition=~Q(kind=ModelKind.LOCAL)
                | (Q(base_model__isnull=False) & Q(sample_size__isnull=False) & Q(sample_size__gt=0)),
                name="local_update_has_base_model_and_samples",
            ),
            models.CheckConstraint(
                condition=Q(kind=ModelKind.LOCAL) | Q(base_model__isnull=True),
                name="only_local_updates_have_base_model",
            ),
            models.CheckConstraint(
                condition=~Q(kind__in=GLOBAL_KINDS) | (Q(archive__isnull=False) & Q(weights__isnull=False)),
                name="global_model_has_archive_and_weights",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}, round {self.round})"

    @property
    def is_global(self) -> bool:
        """Whether this is a global model (plain or SWAG)."""
        return self.kind in GLOBAL_KINDS

    def blob_ids(self) -> list[int]:
        """Ids of every store object this model owns."""
        fields = ("weights_id", "archive_id", "preprocessing_id", "swag_first_moment_id", "swag_second_moment_id")
        return [blob_id for blob_id in (getattr(self, f) for f in fields) if blob_id is not None]


class _KindManager(models.Manager):
    """Manager of a proxy that sees only its kinds."""

    def __init__(self, *kinds: str) -> None:
        super().__init__()
        self.kinds = kinds

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(kind__in=self.kinds)


class _DefaultKind:
    """Mixin of the proxies: new instances get the proxy's kind."""

    default_kind: str = ""
    kind: str

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.kind:
            self.kind = self.default_kind


class GlobalModel(_DefaultKind, Model):
    """A model a training improves: TorchScript architecture plus current weights."""

    default_kind = ModelKind.GLOBAL
    objects = _KindManager(*GLOBAL_KINDS)

    class Meta:
        proxy = True


class SWAGModel(GlobalModel):
    """A global model that also carries SWAG first and second moments."""

    default_kind = ModelKind.SWAG
    objects = _KindManager(ModelKind.SWAG)

    class Meta:
        proxy = True
        verbose_name = "SWAG model"


class LocalModel(_DefaultKind, Model):
    """A client's update of a global model for one round."""

    default_kind = ModelKind.LOCAL
    objects = _KindManager(ModelKind.LOCAL)

    class Meta:
        proxy = True


class MeanModel(_DefaultKind, Model):
    """An ensemble whose prediction is the mean of its member global models."""

    default_kind = ModelKind.MEAN
    objects = _KindManager(ModelKind.MEAN)

    class Meta:
        proxy = True


class SWAGUpdate(models.Model):
    """A client's SWAG statistics (first and second moments) for one round."""

    base_model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="swag_updates")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="swag_updates")
    round = models.PositiveIntegerField()
    sample_size = models.PositiveBigIntegerField()
    first_moment = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    second_moment = models.ForeignKey(Blob, on_delete=models.PROTECT, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["round", "created_at"]
        verbose_name = "SWAG update"
        constraints = [
            models.UniqueConstraint(fields=["base_model", "owner", "round"], name="one_swag_update_per_client_round"),
            models.CheckConstraint(condition=Q(sample_size__gt=0), name="swag_update_has_samples"),
        ]

    def __str__(self) -> str:
        return f"SWAG statistics of {self.owner_id} for round {self.round}"

    def blob_ids(self) -> list[int]:
        """Ids of the store objects this update owns."""
        return [self.first_moment_id, self.second_moment_id]
