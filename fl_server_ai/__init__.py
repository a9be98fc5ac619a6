"""Behaviour: the training state machine, aggregation, uncertainty, notifications, tasks."""
