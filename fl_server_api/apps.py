"""App configuration of the REST API."""

from django.apps import AppConfig


class FlServerApiConfig(AppConfig):
    """The REST API."""

    name = "fl_server_api"
    verbose_name = "Federated learning API"

    def ready(self) -> None:
        """Register the OpenAPI extension of the authentication scheme."""
        from fl_server_api import schema  # noqa: F401
