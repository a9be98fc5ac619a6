"""The training state machine end to end in process (tasks inline after commit)."""

from collections.abc import Callable
from typing import Any

import pytest
import torch

from fl_server_ai.aggregation import weighted_mean
from fl_server_core.models import Notification, RoundKind, TrainingRound
from fl_server_core.services.models import read_weights
from tests.conftest import post_update, upload_round
from tests.helpers import shifted_weights

pytestmark = pytest.mark.django_db(transaction=True)


def test_fedavg_three_rounds_gives_the_exact_weighted_means(actor, participants, client_for, make_training):
    training = make_training(actor, participants, start=True, target_num_updates=3, options={"skip_model_tests": True})
    expected = None
    for round_number in range(3):
        updates = upload_round(training, participants, client_for, round_number, seed=round_number * 10)
        training.refresh_from_db()
        like = updates[0][0]
        expected = weighted_mean(updates, like)
        current = read_weights(training.model.__class__.objects.get(pk=training.model_id))
        for name, tensor in expected.items():
            torch.testing.assert_close(current[name], tensor, rtol=1e-6, atol=1e-6)
    assert training.state == "C"
    assert training.model.round == 3
    kinds = list(TrainingRound.objects.filter(training=training).values_list("kind", "number", "state"))
    assert kinds == [(RoundKind.UPDATE, n, "DONE") for n in range(3)]
    sent = list(
        Notification.objects.filter(training=training, recipient=participants[0]).values_list(
            "notification_type", flat=True
        )
    )
    assert sent == ["TRAINING_START", *["UPDATE_ROUND_START"] * 3, "TRAINING_FINISHED"]
    round1 = client_for(participants[0]).get(f"/api/models/{training.model_id}/?round=1&format=safetensors")
    assert round1.status_code == 200


def test_model_test_rounds_close_when_every_client_reported(actor, participants, client_for, make_training):
    training = make_training(actor, participants, start=True, target_num_updates=2)
    upload_round(training, participants, client_for, 0, seed=0)
    training.refresh_from_db()
    assert (training.current_round.kind, training.current_round.number) == (RoundKind.TEST, 1)
    for client in participants:
        body = {"metric_names": ["accuracy"], "metric_values": ["0.5"]}
        response = client_for(client).post(f"/api/models/{training.model_id}/metrics/", body, format="multipart")
        assert response.status_code == 201
    training.refresh_from_db()
    assert (training.current_round.kind, training.current_round.number) == (RoundKind.UPDATE, 1)
    late = post_update(client_for(participants[0]), training.model_id, 0, shifted_weights(0, 0.1), 5)
    assert late.status_code == 409


def test_workflow_events_fire_in_order_inside_the_transitions(actor, participants, client_for, make_training):
    from django.db import connection

    from fl_server_core import signals

    seen: list[tuple[str, bool]] = []

    def recorder(name: str) -> Callable:
        def receive(sender: Any, **kwargs: Any) -> None:
            seen.append((name, connection.in_atomic_block))

        return receive

    names = [
        "training_started", "round_started", "update_accepted", "before_aggregation", "after_aggregation",
        "round_finished", "training_finished",
    ]  # fmt: skip
    receivers = {name: recorder(name) for name in names}
    for name, receiver in receivers.items():
        getattr(signals, name).connect(receiver, weak=False)
    try:
        training = make_training(
            actor, participants[:1], start=True, target_num_updates=1, options={"skip_model_tests": True}
        )
        upload_round(training, participants[:1], client_for, 0, seed=1)
    finally:
        for name, receiver in receivers.items():
            getattr(signals, name).disconnect(receiver)
    assert [name for name, _ in seen] == [
        "round_started", "training_started", "update_accepted", "before_aggregation", "after_aggregation",
        "round_finished", "training_finished",
    ]  # fmt: skip
    assert all(in_transaction for _, in_transaction in seen)
