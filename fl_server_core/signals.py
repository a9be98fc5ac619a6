"""Workflow events, sent inside the transaction of the change they describe.

They are the extension points of the training workflow: receivers (the trainer, outbox
writers, hooks) run in the same transaction, so what they write commits or rolls back with it.
"""

from django.dispatch import Signal

# sender: Training; kwargs: training
training_started = Signal()
# sender: Training; kwargs: training, local_model
update_accepted = Signal()
# sender: Training; kwargs: training, swag_update
swag_update_accepted = Signal()
# sender: Model; kwargs: model, metrics (list[Metric]), reporter
metrics_reported = Signal()
# sender: Training; kwargs: training, users (list[User])
participants_added = Signal()
participants_removed = Signal()
