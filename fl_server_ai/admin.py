"""Admin of trainings: state, rounds, metric curves, the notification timeline, and steering (abort)."""

import json

from django.contrib import admin, messages
from django.db.models import Avg, Count, Q, QuerySet
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from fl_server_ai import trainer
from fl_server_core.admin import ReadOnlyInline
from fl_server_core.charts import line_chart
from fl_server_core.exceptions import ServiceError
from fl_server_core.models import Metric, ModelKind, Training, TrainingRound


class RoundInline(ReadOnlyInline):
    """Round history of a training."""

    model = TrainingRound
    fields = ("number", "kind", "state", "arrivals_count", "total_samples", "opened_at", "deadline", "finished_at",
              "aggregation_seconds", "close_reason")  # fmt: skip
    readonly_fields = fields
    show_change_link = False

    @admin.display(description="arrivals")
    def arrivals_count(self, round_: TrainingRound) -> str:
        """Arrived of expected."""
        return f"{round_.arrivals.count()} / {round_.expected.count()}"


@admin.register(Training)
class TrainingAdmin(admin.ModelAdmin):
    """Trainings with their state, round and participants."""

    list_display = (
        "id", "model_name", "actor", "state", "current_round", "target_num_updates", "participants_count",
        "aggregation_method", "uncertainty_method", "last_update",
    )  # fmt: skip
    list_filter = ("state", "aggregation_method", "uncertainty_method", "locked")
    search_fields = ("id", "model__name", "actor__username")
    readonly_fields = ("id", "model", "state", "current_round", "locked", "created_at", "last_update", "error_reason",
                       "metric_chart", "timeline")  # fmt: skip
    actions = ("abort_trainings",)
    filter_horizontal = ("participants",)
    inlines = (RoundInline,)
    list_select_related = ("model", "actor")
    date_hierarchy = "created_at"

    def get_queryset(self, request: HttpRequest) -> QuerySet[Training]:
        """Count participants in the same query."""
        return super().get_queryset(request).annotate(n_participants=Count("participants", distinct=True))

    @admin.display(description="model", ordering="model__name")
    def model_name(self, training: Training) -> str:
        """Name of the global model."""
        return training.model.name

    @admin.display(description="round", ordering="model__round")
    def current_round(self, training: Training) -> int:
        """Rounds aggregated so far."""
        return training.model.round

    @admin.display(description="participants", ordering="n_participants")
    def participants_count(self, training: Training) -> int:
        """Number of participants."""
        return training.n_participants

    @admin.display(description="metrics per round")
    def metric_chart(self, training: Training) -> str:
        """Mean of each metric per round: test metrics of the global model and training metrics of the updates."""
        rows = (
            Metric.objects.filter(Q(model=training.model_id) | Q(model__base_model=training.model_id))
            .exclude(value_float=None)
            .values("key", "step", "model__kind")
            .annotate(mean=Avg("value_float"))
        )
        series: dict[str, list[tuple[float, float]]] = {}
        for row in rows:
            prefix = "train" if row["model__kind"] == ModelKind.LOCAL else "test"
            series.setdefault(f"{prefix} {row['key']}", []).append((row["step"], row["mean"]))
        return mark_safe(line_chart(series))  # built from escaped text and numbers only

    @admin.display(description="notifications")
    def timeline(self, training: Training) -> str:
        """The latest notifications with their delivery state."""
        rows = training.notifications.select_related("recipient").order_by("-id")[:100]
        return format_html(
            "<table><tr><th>#</th><th>time</th><th>type</th><th>recipient</th><th>body</th><th>delivery</th></tr>"
            "{}</table>",
            format_html_join(
                "",
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}{}</td></tr>",
                (
                    (
                        n.id,
                        n.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                        n.notification_type,
                        n.recipient.username,
                        json.dumps(n.body),
                        n.get_delivery_state_display(),
                        f" ({n.attempts} attempts: {n.last_error})" if n.last_error else "",
                    )
                    for n in rows
                ),
            ),
        )

    @admin.action(description="Abort the selected trainings")
    def abort_trainings(self, request: HttpRequest, queryset: QuerySet[Training]) -> None:
        """Abort each selected training through the state machine (participants are told)."""
        aborted = 0
        for training in queryset:
            try:
                trainer.abort_training(training)
                aborted += 1
            except ServiceError as error:
                self.message_user(request, f"{training}: {error.detail}", messages.WARNING)
        self.message_user(request, f"Aborted {aborted} training(s).", messages.SUCCESS)
