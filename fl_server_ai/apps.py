"""App configuration of the training behaviour."""

from django.apps import AppConfig


class FlServerAiConfig(AppConfig):
    """Training state machine, aggregation, notifications and tasks."""

    name = "fl_server_ai"
    verbose_name = "Federated learning behaviour"

    def ready(self) -> None:
        """Let the state machine follow participant removals."""
        from fl_server_ai.trainer.lifecycle import on_participants_removed
        from fl_server_core import signals

        signals.participants_removed.connect(on_participants_removed, dispatch_uid="trainer-participants-removed")
