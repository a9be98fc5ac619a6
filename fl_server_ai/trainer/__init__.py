"""The training state machine: every transition is one transaction with a row lock on the training.

The workflow signals of `fl_server_core.signals` are sent inside those transactions; what follows a
transition (notifications, aggregation) hangs off them.
"""

from fl_server_ai.trainer.lifecycle import start_training
from fl_server_ai.trainer.uploads import accept_local_update, accept_swag_update, report_metrics

__all__ = ["accept_local_update", "accept_swag_update", "report_metrics", "start_training"]
