"""App configuration of the data layer."""

from django.apps import AppConfig


class FlServerCoreConfig(AppConfig):
    """Registers the data layer and its signal receivers."""

    name = "fl_server_core"
    verbose_name = "Federated learning"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Connect the signal receivers (tokens for new users)."""
        from fl_server_core import receivers  # noqa: F401
