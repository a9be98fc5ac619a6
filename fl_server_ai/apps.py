"""App configuration of the training behaviour."""

from django.apps import AppConfig


class FlServerAiConfig(AppConfig):
    """Training state machine, aggregation and uncertainty."""

    name = "fl_server_ai"
    verbose_name = "Federated learning behaviour"
