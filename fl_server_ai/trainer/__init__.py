"""The training state machine: every transition is one transaction with a row lock on the training.

The workflow signals of `fl_server_core.signals` are sent inside those transactions, so what
their receivers write commits or rolls back with the transition.
"""

from fl_server_ai.trainer.closing import close_overdue_round, close_round
from fl_server_ai.trainer.lifecycle import abort_training, remove_declining_client, start_training
from fl_server_ai.trainer.uploads import accept_local_update, accept_swag_update, report_metrics

__all__ = [
    "abort_training",
    "accept_local_update",
    "accept_swag_update",
    "close_overdue_round",
    "close_round",
    "remove_declining_client",
    "report_metrics",
    "start_training",
]
