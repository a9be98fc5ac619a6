"""Racing uploads, and a worker killed in the middle of an aggregation."""

import itertools
import threading
import time

import pytest
import requests

from tests.integration.conftest import Session
from tests.integration.harness import (
    FORMATS,
    WAIT_SECONDS,
    assert_weights_equal,
    check_clients,
    client_update,
    mean_of,
    sample_size,
    tiny_net,
    wait_until,
)

pytestmark = pytest.mark.integration

RACERS = 4


def race_round(fl: Session, clients: list, model_id: str, round_: int, weights: dict) -> list:
    """Every client uploads its update twice at the same moment; returns the (update, samples) pairs."""
    updates = [(client_update(weights, i, round_), sample_size(i, round_)) for i in range(len(clients))]
    barrier = threading.Barrier(2 * len(clients), timeout=30)
    statuses: dict[tuple[int, int], int | str] = {}

    def upload(index: int, copy: int) -> None:
        try:
            barrier.wait()
            update, samples = updates[index]
            fmt = FORMATS[index % 3]
            response = fl.api.upload_update(clients[index].account, model_id, round_, update, samples, fmt)
            statuses[index, copy] = response.status_code
        except (threading.BrokenBarrierError, requests.RequestException) as error:
            statuses[index, copy] = f"{type(error).__name__}: {error}"

    threads = [threading.Thread(target=upload, args=(i, c)) for i in range(len(clients)) for c in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_SECONDS)
    for index in range(len(clients)):
        got = sorted(str(statuses.get((index, c))) for c in range(2))
        assert got == ["201", "409"], f"round {round_}, client {index}: the two copies got {got}, expected 201 and 409"
    return updates


def test_concurrent_last_uploads_are_aggregated_exactly_once(fl: Session):
    clients = fl.make_clients(*[{"push": False}] * RACERS)  # driven by the test: no endpoints, no pushes
    for training_number in range(3):
        model_id = fl.api.upload_model(fl.actor, tiny_net(10 + training_number))
        training_id = fl.training(model_id, clients, target_num_updates=2, options={"skip_model_tests": True})
        fl.api.start(fl.actor, training_id)
        weights = dict(tiny_net(10 + training_number).state_dict())
        for round_ in range(2):
            updates = race_round(fl, clients, model_id, round_, weights)
            wait_until(
                lambda r=round_, t=training_id: fl.api.training(fl.actor, t)["round"] == r + 1,
                WAIT_SECONDS,
                f"round {round_} of training {training_number} to be aggregated",
            )
            weights = mean_of(updates)
            assert_weights_equal(fl.api.weights(fl.actor, model_id, round_ + 1), weights, f"round {round_}")
        done = fl.api.wait_training(fl.actor, training_id, {"C", "E"})
        assert done["state"] == "C", done["error_reason"]
        rounds = fl.api.rounds(fl.actor, training_id)
        assert [(r["number"], r["state"]) for r in rounds] == [(0, "DONE"), (1, "DONE")], "a round ran twice"
        for round_ in rounds:
            assert sorted(a["user"] for a in round_["arrivals"]) == sorted(c.id for c in clients)
            expected_total = sum(sample_size(i, round_["number"]) for i in range(RACERS))
            assert round_["total_samples"] == expected_total, "an update was lost or counted twice"
        assert fl.db.weight_versions(model_id) == {0: 1, 1: 1, 2: 1}


LOCK_WEIGHT_VERSIONS = "LOCK TABLE fl_server_core_weightsversion IN SHARE MODE"
WAITING_ON_WEIGHT_VERSIONS = """
    SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
    WHERE c.relname = 'fl_server_core_weightsversion' AND NOT l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def test_worker_killed_mid_aggregation_is_replaced_and_the_round_is_aggregated_once(fl: Session):
    if fl.stack.mode != "worker":
        pytest.skip(
            "embedded mode has no Celery worker to kill: tasks run on the server's own threads "
            "(run with DATABASE_URL=postgres://... for the worker mode)"
        )
    initial = dict(tiny_net(20).state_dict())
    model_id = fl.api.upload_model(fl.actor, tiny_net(20))
    clients = fl.make_clients({"push": False}, {"push": False})
    training_id = fl.training(model_id, clients, target_num_updates=2, options={"skip_model_tests": True})
    fl.api.start(fl.actor, training_id)
    updates = [(client_update(initial, i, 0), sample_size(i, 0)) for i in range(2)]
    first = fl.api.upload_update(clients[0].account, model_id, 0, *updates[0], "safetensors")
    assert first.status_code == 201, first.text

    # Hold back the aggregation where it records the new weights: the worker has read the round's
    # sum, computed the mean and written the new weights to the store, and waits on our table lock.
    blocker = fl.db.connect()
    try:
        blocker.cursor().execute(LOCK_WEIGHT_VERSIONS)
        last = fl.api.upload_update(clients[1].account, model_id, 0, *updates[1], "state_dict")
        assert last.status_code == 201, last.text
        wait_until(
            lambda: fl.db.rows(WAITING_ON_WEIGHT_VERSIONS)[0][0] > 0,
            30,
            "the worker's aggregation to reach the weight-version insert",
        )
        fl.stack.worker.kill()
        assert fl.api.rounds(fl.actor, training_id)[0]["state"] == "CLOSING"
    finally:
        blocker.rollback()
        blocker.close()
    time.sleep(1)  # nothing else may aggregate it meanwhile
    assert fl.api.rounds(fl.actor, training_id)[0]["state"] == "CLOSING"

    fl.stack.start_worker()  # the periodic check hands the stuck round to the new worker
    wait_until(
        lambda: fl.api.rounds(fl.actor, training_id)[0]["state"] == "DONE",
        WAIT_SECONDS,
        "the new worker to aggregate the round the killed one left CLOSING",
    )
    after_0 = mean_of(updates)
    assert_weights_equal(fl.api.weights(fl.actor, model_id, 1), after_0, "round 0 aggregated by the new worker")
    round1 = [(client_update(after_0, i, 1), sample_size(i, 1)) for i in range(2)]
    for client, (update, samples) in zip(clients, round1, strict=True):
        response = fl.api.upload_update(client.account, model_id, 1, update, samples, "safetensors")
        assert response.status_code == 201, response.text
    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"})
    assert done["state"] == "C", done["error_reason"]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), mean_of(round1), "final weights")
    rounds = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["state"]) for r in rounds] == [(0, "DONE"), (1, "DONE")]
    assert fl.db.weight_versions(model_id) == {0: 1, 1: 1, 2: 1}, "a round was aggregated more than once"


def test_scaled_out_workers_push_a_clients_notifications_one_at_a_time_in_order(fl: Session):
    if fl.stack.mode != "worker":
        pytest.skip("embedded mode has no Celery workers to scale out")
    extra = fl.stack.extra_worker()
    try:
        model_id = fl.api.upload_model(fl.actor, tiny_net(30))
        (client,) = fl.make_clients({"endpoint_delay": 0.8})  # a slow endpoint: each push takes 0.8 s
        training_id = fl.training(model_id, [client], target_num_updates=1, options={"skip_model_tests": True})
        client.start(training_id)
        fl.api.start(fl.actor, training_id)
        done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients([client]))
        assert done["state"] == "C", done["error_reason"]
        assert client.finished.wait(15), "the client was not told the training finished"
    finally:
        extra.stop()
    deliveries = client.deliveries
    assert [d.payload["notification_type"] for d in deliveries] == [
        "TRAINING_START",
        "UPDATE_ROUND_START",
        "TRAINING_FINISHED",
    ]
    for before, after in itertools.pairwise(deliveries):
        assert after.received_at >= before.answered_at, (
            f"{after.payload['notification_type']} (event {after.event_id}) was pushed while "
            f"{before.payload['notification_type']} (event {before.event_id}) was still being delivered"
        )
