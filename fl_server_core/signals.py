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
# sender: Training; kwargs: training, round (TrainingRound)
round_started = Signal()
# sender: Training; kwargs: training, round
before_aggregation = Signal()
# sender: Training; kwargs: training, round, weights (dict[str, Tensor], the new global weights: receivers may
# inspect them, e.g. to track the best model or validate it)
after_aggregation = Signal()
# sender: Training; kwargs: training, round
round_finished = Signal()
# sender: Training; kwargs: training, state ("C" completed or "E" error), reason
training_finished = Signal()
