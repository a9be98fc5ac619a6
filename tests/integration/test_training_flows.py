"""Whole trainings over HTTP: FedAvg, FedProx, FedDC and a client that only pulls events."""

import pytest
from safetensors.torch import load as load_safetensors

from tests.integration.conftest import Session
from tests.integration.harness import (
    assert_weights_equal,
    check_clients,
    expected_chain,
    mean_of,
    tiny_net,
    weights_equal,
)

pytestmark = pytest.mark.integration


def test_fedavg_three_clients_three_rounds_gives_the_exact_chained_means(fl: Session):
    initial = dict(tiny_net(1).state_dict())
    model_id = fl.api.upload_model(fl.actor, tiny_net(1))
    clients = fl.make_clients({}, {}, {})
    training_id = fl.training(model_id, clients, target_num_updates=3, options={"skip_model_tests": True})
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "C", done["error_reason"]
    assert done["round"] == 3

    # Each round's result is the exact weighted mean of what the clients sent, and is what they got next.
    for round_ in range(3):
        expected = mean_of([c.sent[round_] for c in clients])
        assert_weights_equal(fl.api.weights(fl.actor, model_id, round_ + 1), expected, f"version {round_ + 1}")
        if round_ < 2:
            for client in clients:
                assert_weights_equal(client.downloaded[round_ + 1][1], expected, f"download of round {round_ + 1}")
    chain = expected_chain(initial, [0, 1, 2], 3)
    _, final = fl.api.torchscript_weights(fl.actor, model_id)
    assert_weights_equal(final, chain[-1], "final TorchScript download")
    assert_weights_equal(fl.api.weights(fl.actor, model_id, 0), chain[0], "version 0")

    for client in clients:
        assert client.finished.wait(10), f"client {client.index} was not told the training finished"
        deliveries = client.deliveries
        assert client.types() == ["TRAINING_START", *["UPDATE_ROUND_START"] * 3, "TRAINING_FINISHED"]
        assert all(d.signature_ok for d in deliveries), "a notification had an invalid X-FL-Signature"
        event_ids = [int(d.event_id) for d in deliveries]
        assert event_ids == sorted(set(event_ids)), f"event ids not increasing: {event_ids}"
        assert [d.payload["body"].get("round") for d in deliveries[1:4]] == [0, 1, 2]
        assert all(d.payload["body"]["global_model_uuid"] == model_id for d in deliveries)
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["kind"], r["state"]) for r in rounds] == [(n, "UPDATE", "DONE") for n in range(3)]
    assert all(sorted(a["user"] for a in r["arrivals"]) == sorted(c.id for c in clients) for r in rounds)
    assert fl.db.weight_versions(model_id) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_fedprox_sends_proximal_mu_with_every_round(fl: Session):
    model_id = fl.api.upload_model(fl.actor, tiny_net(2))
    clients = fl.make_clients({}, {}, {})
    options = {"skip_model_tests": True, "proximal_mu": 0.37}
    training_id = fl.training(model_id, clients, target_num_updates=2, aggregation_method="FedProx", options=options)
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "C", done["error_reason"]
    for client in clients:
        starts = [
            d.payload["body"] for d in client.deliveries if d.payload["notification_type"] == "UPDATE_ROUND_START"
        ]
        assert [b["round"] for b in starts] == [0, 1]
        assert all(b.get("config", {}).get("proximal_mu") == 0.37 for b in starts), starts
    expected = expected_chain(dict(tiny_net(2).state_dict()), [0, 1, 2], 2)[-1]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected, "FedProx result (FedAvg on the server)")


def test_feddc_passes_local_models_between_clients_and_averages_every_period(fl: Session):
    initial = dict(tiny_net(3).state_dict())
    model_id = fl.api.upload_model(fl.actor, tiny_net(3))
    clients = fl.make_clients(*[{"record_global": True}] * 3)
    options = {"skip_model_tests": True, "daisy_chain_period": 2}
    training_id = fl.training(model_id, clients, target_num_updates=2, aggregation_method="FedDC", options=options)
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "C", done["error_reason"]
    assert done["round"] == 4, "target_num_updates 2 with daisy_chain_period 2 makes 4 rounds"

    by_id = {c.id: c for c in clients}
    for client in clients:
        for round_ in range(4):
            given, weights = client.downloaded[round_]
            if round_ in (0, 2):  # after an aggregation (or at the start): the global model
                assert given == model_id, f"round {round_}: client {client.index} got {given}"
                continue
            # After a round without aggregation: another client's local model of the previous round.
            assert given != model_id, f"round {round_}: client {client.index} got the global model"
            meta = fl.api.ok("GET", f"/models/{given}/metadata/", fl.actor)
            assert meta["type"] == "LOCAL" and meta["round"] == round_ - 1, meta
            assert meta["owner"] != client.id, f"round {round_}: client {client.index} got its own local model"
            assert meta["owner"] in by_id, meta
            assert_weights_equal(weights, by_id[meta["owner"]].sent[round_ - 1][0], f"local model {given}")
            assert not weights_equal(weights, client.sent[round_ - 1][0])

    # The global weights change only at the end of rounds 1 and 3 (every second round).
    after_1 = mean_of([c.sent[1] for c in clients])
    after_3 = mean_of([c.sent[3] for c in clients])
    for client in clients:
        assert_weights_equal(client.global_at[0], initial, "global model in round 0")
        assert_weights_equal(client.global_at[1], initial, "global model in round 1 (no aggregation after round 0)")
        assert_weights_equal(client.global_at[2], after_1, "global model in round 2")
        assert_weights_equal(client.global_at[3], after_1, "global model in round 3 (no aggregation after round 2)")
    assert_weights_equal(fl.api.weights(fl.actor, model_id, 2), after_1, "version 2")
    assert_weights_equal(fl.api.weights(fl.actor, model_id, 4), after_3, "version 4")
    assert_weights_equal(fl.api.weights(fl.actor, model_id), after_3, "final weights")
    for odd in (1, 3):
        response = fl.api.call("GET", f"/models/{model_id}/?format=safetensors&round={odd}", fl.actor)
        assert response.status_code in (200, 404), response.text
        if response.status_code == 200:  # if kept, the version equals the one before it
            assert_weights_equal(
                dict(load_safetensors(response.content)), fl.api.weights(fl.actor, model_id, odd - 1), "odd"
            )
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["kind"], r["state"]) for r in rounds] == [(n, "UPDATE", "DONE") for n in range(4)]
    assert [bool(r["assignments"]) for r in rounds] == [False, True, False, True]
    assert sorted(fl.db.weight_versions(model_id)) == [0, 2, 4]


def test_pull_only_client_finishes_a_training_through_the_events_endpoint(fl: Session):
    model_id = fl.api.upload_model(fl.actor, tiny_net(4))
    clients = fl.make_clients({"push": False}, {})
    puller, pusher = clients
    training_id = fl.training(model_id, clients, target_num_updates=2)  # with model-test rounds
    for client in clients:
        client.start(training_id)
    fl.api.start(fl.actor, training_id)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
    assert done["state"] == "C", done["error_reason"]
    assert puller.finished.wait(15), "the pull-only client never saw TRAINING_FINISHED"
    expected_types = [
        "TRAINING_START",
        "UPDATE_ROUND_START",
        "MODEL_TEST_ROUND",
        "UPDATE_ROUND_START",
        "MODEL_TEST_ROUND",
        "TRAINING_FINISHED",
    ]
    assert puller.types() == expected_types
    assert pusher.types() == expected_types
    assert sorted(puller.sent) == [0, 1]
    events = fl.api.ok("GET", f"/trainings/{training_id}/events/", puller.account)
    assert {e["recipient"] for e in events} == {puller.id}, "a client sees only its own events"
    assert {e["delivery_state"] for e in events} == {"PULL"}, "nothing is pushed to a client without endpoint"
    expected = expected_chain(dict(tiny_net(4).state_dict()), [0, 1], 2)[-1]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected, "final weights")
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["kind"], r["number"]) for r in rounds] == [("UPDATE", 0), ("TEST", 1), ("UPDATE", 1), ("TEST", 2)]
    metrics = fl.api.ok("GET", f"/trainings/{training_id}/metrics/", fl.actor)
    reported = {(m["reporter"], m["key"], m["round"]) for m in metrics}
    for client in clients:
        assert {(client.id, "accuracy", 1), (client.id, "accuracy", 2)} <= reported
