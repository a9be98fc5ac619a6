"""Django admin for operators: trainings, models, metrics, users."""

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin
from django.db import models
from django.http import HttpRequest

from fl_server_core.models import (
    Blob,
    Metric,
    Model,
    Notification,
    SWAGUpdate,
    User,
    WeightsVersion,
)


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    """Users with their actor and client roles."""

    list_display = ("username", "email", "actor", "client", "message_endpoint", "is_staff", "is_active")
    list_filter = ("actor", "client", "is_staff", "is_superuser", "is_active", "groups")
    search_fields = ("username", "email", "first_name", "last_name", "id")
    readonly_fields = ("id",)
    formfield_overrides = {models.URLField: {"assume_scheme": "https"}}
    fieldsets = (
        *BaseUserAdmin.fieldsets,
        ("Federated learning", {"fields": ("id", "actor", "client", "message_endpoint")}),
    )
    add_fieldsets = (
        *BaseUserAdmin.add_fieldsets,
        ("Federated learning", {"fields": ("actor", "client", "message_endpoint")}),
    )


class ReadOnlyInline(admin.TabularInline):
    """An inline that shows rows without editing them."""

    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        """Rows are created by the API only."""
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        """Rows are immutable here."""
        return False


class MetricInline(ReadOnlyInline):
    """Metrics of a model."""

    model = Metric
    fields = ("key", "value_float", "step", "reporter", "created_at")
    readonly_fields = fields


@admin.register(Model)
class ModelAdmin(admin.ModelAdmin):
    """Models of every kind; weight metadata is read-only (weights live in the model store)."""

    list_display = ("name", "kind", "owner", "round", "parameter_count", "size_bytes", "sample_size", "created_at")
    list_filter = ("kind", "weights_format", "created_at")
    search_fields = ("id", "name", "owner__username")
    list_select_related = ("owner", "weights")
    readonly_fields = (
        "id", "kind", "round", "base_model", "sample_size", "weights", "weights_format", "tensor_spec",
        "parameter_count", "archive", "preprocessing", "swag_first_moment", "swag_second_moment", "input_shape",
        "created_at", "updated_at",
    )  # fmt: skip
    fields = ("name", "description", "owner", "members", *readonly_fields)
    filter_horizontal = ("members",)
    inlines = (MetricInline,)

    @admin.display(description="size (bytes)")
    def size_bytes(self, model: Model) -> int | None:
        """Size of the stored weights."""
        return model.weights.size if model.weights_id else None


@admin.register(Metric)
class MetricAdmin(admin.ModelAdmin):
    """Metric values."""

    list_display = ("key", "value_float", "step", "model", "reporter", "created_at")
    list_filter = ("key",)
    search_fields = ("key", "model__name", "reporter__username")
    list_select_related = ("model", "reporter")
    readonly_fields = ("model", "key", "value_float", "value_binary", "step", "reporter", "created_at")


@admin.register(SWAGUpdate)
class SWAGUpdateAdmin(admin.ModelAdmin):
    """SWAG statistics uploaded by clients."""

    list_display = ("base_model", "owner", "round", "sample_size", "created_at")
    list_filter = ("round",)
    readonly_fields = ("base_model", "owner", "round", "sample_size", "first_moment", "second_moment", "created_at")


@admin.register(Blob)
class BlobAdmin(admin.ModelAdmin):
    """Objects in the model store (read-only)."""

    list_display = ("key", "size", "sha256", "created_at")
    search_fields = ("key", "sha256")
    readonly_fields = ("key", "size", "sha256", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Objects are written by the server only."""
        return False


@admin.register(Notification)
class NotificationAdmin(admin.ModelAdmin):
    """The outbox: every notification with its delivery state."""

    list_display = ("id", "training", "notification_type", "recipient", "delivery_state", "attempts", "created_at")
    list_filter = ("delivery_state", "notification_type")
    search_fields = ("training__id", "recipient__username")
    list_select_related = ("recipient", "training")
    readonly_fields = ("training", "recipient", "notification_type", "body", "created_at", "delivery_state",
                       "attempts", "next_attempt_at", "delivered_at", "last_error")  # fmt: skip

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Notifications are written by the state machine only."""
        return False


@admin.register(WeightsVersion)
class WeightsVersionAdmin(admin.ModelAdmin):
    """Kept versions of global weights."""

    list_display = ("model", "round", "weights", "created_at")
    list_select_related = ("model", "weights")
    readonly_fields = ("model", "round", "weights", "created_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        """Versions are written by aggregation only."""
        return False
