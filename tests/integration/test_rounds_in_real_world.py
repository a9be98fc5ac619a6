"""Rounds that finish in the real world: stragglers, a missed quorum, and a client that declines."""

from datetime import datetime

import pytest

from tests.integration.conftest import Session
from tests.integration.harness import assert_weights_equal, check_clients, client_update, expected_chain, tiny_net

pytestmark = pytest.mark.integration


def test_straggler_round_closes_at_the_deadline_with_quorum_and_the_training_completes(fl: Session):
    model_id = fl.api.upload_model(fl.actor, tiny_net(5))
    clients = fl.make_clients({}, {}, {"behaviour": "silent"})
    options = {"skip_model_tests": True, "round_timeout_seconds": 2, "min_participants": 2}
    training_id = fl.training(model_id, clients, target_num_updates=2, options=options)
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "C", done["error_reason"]
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["kind"], r["state"]) for r in rounds] == [(0, "UPDATE", "DONE"), (1, "UPDATE", "DONE")]
    for round_ in rounds:
        assert "deadline" in round_["close_reason"], round_["close_reason"]
        assert sorted(a["user"] for a in round_["arrivals"]) == sorted(c.id for c in clients[:2])
        assert len(round_["expected"]) == 3
        closed, deadline = datetime.fromisoformat(round_["closed_at"]), datetime.fromisoformat(round_["deadline"])
        assert closed >= deadline, f"round {round_['number']} closed at {closed}, before its deadline {deadline}"
    expected = expected_chain(dict(tiny_net(5).state_dict()), [0, 1], 2)[-1]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected, "mean of the two punctual clients")
    silent = clients[2]
    assert silent.finished.wait(10), "the straggler was not told the training finished"
    assert silent.types() == ["TRAINING_START", "UPDATE_ROUND_START", "UPDATE_ROUND_START", "TRAINING_FINISHED"]
    late = fl.api.upload_update(silent.account, model_id, 0, client_update(expected, 2, 0), 5, "safetensors")
    assert late.status_code == 409, late.text


def test_round_below_quorum_at_the_deadline_puts_the_training_in_error(fl: Session):
    model_id = fl.api.upload_model(fl.actor, tiny_net(6))
    clients = fl.make_clients({}, {}, {"behaviour": "silent"})
    options = {"skip_model_tests": True, "round_timeout_seconds": 2, "min_participants": 3}
    training_id = fl.training(model_id, clients, target_num_updates=2, options=options)
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "E"
    assert "quorum" in done["error_reason"], done["error_reason"]
    seen_by_client = fl.api.training(clients[0].account, training_id)
    assert seen_by_client["state"] == "E" and seen_by_client["error_reason"] == done["error_reason"]
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["state"]) for r in rounds] == [(0, "FAILED")]
    assert len(rounds[0]["arrivals"]) == 2
    assert fl.db.weight_versions(model_id) == {0: 1}, "nothing may be aggregated below the quorum"
    assert_weights_equal(fl.api.weights(fl.actor, model_id), dict(tiny_net(6).state_dict()), "untouched weights")
    for client in clients:
        assert client.finished.wait(10), f"client {client.index} was not told"
        last = client.deliveries[-1].payload
        assert last["notification_type"] == "TRAINING_FINISHED"
        assert last["body"].get("status") == "error" and "quorum" in last["body"].get("reason", ""), last


def test_client_answering_500_is_removed_and_the_training_completes_without_it(fl: Session):
    model_id = fl.api.upload_model(fl.actor, tiny_net(7))
    clients = fl.make_clients({}, {}, {"endpoint_status": 500})
    declining = clients[2]
    training_id = fl.training(model_id, clients, target_num_updates=2, options={"skip_model_tests": True})
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "C", done["error_reason"]
    assert sorted(done["participants"]) == sorted(c.id for c in clients[:2]), "the declining client is still listed"
    assert declining.types() == ["TRAINING_START"], "nothing more is pushed to a client that declined"
    assert declining.deliveries[0].signature_ok
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["state"]) for r in rounds] == [(0, "DONE"), (1, "DONE")]
    assert all(declining.id not in r["expected"] for r in rounds)
    expected = expected_chain(dict(tiny_net(7).state_dict()), [0, 1], 2)[-1]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected, "mean of the remaining clients")
    removed = fl.api.ok("GET", f"/trainings/{training_id}/events/", declining.account)
    assert "CLIENT_REMOVED" in [e["notification_type"] for e in removed], "the removal is not in the client's events"
    for client in clients[:2]:
        assert client.types() == ["TRAINING_START", "UPDATE_ROUND_START", "UPDATE_ROUND_START", "TRAINING_FINISHED"]
