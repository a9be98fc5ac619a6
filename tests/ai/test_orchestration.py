"""Orchestration in process: outbox and push delivery, pull events, abort, deadlines and quorum, client sampling,
strategy specifics (FedProx, FedDC), test rounds, late uploads, round history and metrics, weight versions,
participant removal and aggregation failure.

Tasks run inline right after commit (see the autouse `inline_tasks` fixture); the periodic check is
`fl_server_ai.tasks.tick()` called directly. Push deliveries go over real HTTP to a server on 127.0.0.1.
"""

import hashlib
import hmac
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from django.db import OperationalError
from django.utils import timezone
from rest_framework.test import APIClient
from safetensors.torch import load as load_safetensors

from fl_server_ai import tasks, trainer
from fl_server_ai.aggregation import sample_clients, weighted_mean
from fl_server_ai.tasks import tick
from fl_server_ai.trainer import uploads
from fl_server_core import signals
from fl_server_core.models import (
    DeliveryState,
    LocalModel,
    Model,
    Notification,
    RoundKind,
    RoundState,
    Training,
    TrainingRound,
    User,
    WeightsVersion,
)
from fl_server_core.services.models import read_weights
from fl_server_core.storage import get_model_storage
from tests.conftest import post_update, upload_round
from tests.helpers import shifted_weights

pytestmark = pytest.mark.django_db(transaction=True)

SKIP_TESTS = {"skip_model_tests": True}


# ---------------------------------------------------------------------------------------------------------------------
# helpers


def global_weights(training: Training) -> dict[str, torch.Tensor]:
    """The training's global model's current weights, read from the store."""
    return read_weights(Model.objects.select_related("weights").get(pk=training.model_id))


def assert_weights_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=1e-6, atol=1e-6)


def current_round(training: Training) -> TrainingRound:
    training.refresh_from_db()
    assert training.current_round_id is not None
    return TrainingRound.objects.get(pk=training.current_round_id)


def rows(training: Training, recipient: User | None = None, kind: str | None = None) -> list[Notification]:
    """The training's notification rows in id order, optionally for one recipient / of one type."""
    query = Notification.objects.filter(training=training).order_by("id")
    if recipient is not None:
        query = query.filter(recipient=recipient)
    if kind is not None:
        query = query.filter(notification_type=kind)
    return list(query)


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (a port that was just free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def move_deadline_into_past(round_: TrainingRound) -> None:
    TrainingRound.objects.filter(pk=round_.pk).update(deadline=timezone.now() - timedelta(seconds=5))


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


@pytest.fixture
def hook() -> Iterator[SimpleNamespace]:
    """A local HTTP server recording every POST; paths under /fail/ answer 500, everything else 200."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            received.append(
                {
                    "path": self.path,
                    "raw": raw,
                    "content_type": self.headers.get("Content-Type"),
                    "event_id": self.headers.get("X-FL-Event-Id"),
                    "signature": self.headers.get("X-FL-Signature"),
                }
            )
            failing = self.path.startswith("/fail")
            reply = b"no thanks" if failing else b""
            self.send_response(500 if failing else 200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", received=received)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def pull_clients(make_user: Callable[..., User]) -> list[User]:
    """Three clients without a message endpoint (pull mode): no push delivery is attempted."""
    return [make_user(f"puller{i}", client=True) for i in range(3)]


# ---------------------------------------------------------------------------------------------------------------------
# notifications / outbox


def test_start_writes_its_notifications_in_the_start_transaction(actor, pull_clients, client_for, make_training):
    training = make_training(actor, pull_clients)
    seen_inside: list[tuple[str, str]] = []

    def failing_receiver(sender: Any, training: Training, **kwargs: Any) -> None:
        seen_inside.extend(
            Notification.objects.filter(training=training).values_list("recipient__username", "notification_type")
        )
        raise RuntimeError("hook refuses the start")

    signals.training_started.connect(failing_receiver, dispatch_uid="test-failing-start-receiver")
    try:
        with pytest.raises(RuntimeError, match="hook refuses"):
            trainer.start_training(training)
    finally:
        signals.training_started.disconnect(dispatch_uid="test-failing-start-receiver")
    # the rows existed inside the transaction ...
    assert sorted(seen_inside) == sorted(
        (c.username, kind) for c in pull_clients for kind in ("TRAINING_START", "UPDATE_ROUND_START")
    )
    # ... and went away with it
    training.refresh_from_db()
    assert training.state == "I"
    assert training.current_round_id is None
    assert Notification.objects.filter(training=training).count() == 0
    assert TrainingRound.objects.filter(training=training).count() == 0
    assert WeightsVersion.objects.filter(model_id=training.model_id).count() == 0

    assert client_for(actor).post(f"/api/trainings/{training.pk}/start/").status_code == 202
    model_id = str(training.model_id)
    for client in pull_clients:
        mine = rows(training, client)
        assert [(n.notification_type, n.body) for n in mine] == [
            ("TRAINING_START", {"global_model_uuid": model_id}),
            ("UPDATE_ROUND_START", {"round": 0, "global_model_uuid": model_id}),
        ]
        # no message endpoint: pull only, never pushed
        assert {(n.delivery_state, n.attempts) for n in mine} == {(DeliveryState.PULL, 0)}


def test_push_delivery_is_signed_json_and_marks_rows_delivered(
    settings, hook, actor, make_user, client_for, make_training
):
    settings.FL_NOTIFICATION_SECRET = "orchestration-secret"
    pushed = [make_user(f"pushed{i}", client=True, message_endpoint=f"{hook.url}/ok/{i}") for i in range(2)]
    puller = make_user("puller", client=True)
    training = make_training(actor, [*pushed, puller], start=True)

    assert len(hook.received) == 4  # two notifications for each client with an endpoint
    by_path: dict[str, list[dict]] = {}
    for request in hook.received:
        by_path.setdefault(request["path"], []).append(request)
        assert request["content_type"] == "application/json"
        payload = json.loads(request["raw"])
        assert set(payload) == {"notification_type", "training_uuid", "body"}
        assert payload["training_uuid"] == str(training.pk)
        row = Notification.objects.select_related("recipient").get(pk=int(request["event_id"]))
        assert row.payload() == payload
        assert row.recipient.message_endpoint == hook.url + request["path"]
        expected_signature = hmac.new(b"orchestration-secret", request["raw"], hashlib.sha256).hexdigest()
        assert request["signature"] == f"sha256={expected_signature}"
    for i, client in enumerate(pushed):
        delivered = [json.loads(r["raw"])["notification_type"] for r in by_path[f"/ok/{i}"]]
        assert delivered == ["TRAINING_START", "UPDATE_ROUND_START"]  # in outbox order
        for row in rows(training, client):
            assert row.delivery_state == DeliveryState.DELIVERED
            assert row.delivered_at is not None
            assert (row.attempts, row.last_error) == (1, "")
    assert {n.delivery_state for n in rows(training, puller)} == {DeliveryState.PULL}


def test_unreachable_client_is_retried_with_backoff_then_given_up(settings, actor, make_user, make_training):
    settings.FL_NOTIFICATION_MAX_ATTEMPTS = 2
    settings.FL_NOTIFICATION_BACKOFF_SECONDS = 60
    client = make_user("unreachable", client=True, message_endpoint=refused_url())
    before = timezone.now()
    training = make_training(actor, [client], start=True)

    first, second = rows(training, client)
    assert first.notification_type == "TRAINING_START"
    assert first.delivery_state == DeliveryState.PENDING
    assert first.attempts == 1
    assert first.last_error
    assert first.next_attempt_at is not None and first.next_attempt_at >= before + timedelta(seconds=59)
    assert (second.delivery_state, second.attempts) == (DeliveryState.PENDING, 0)  # delivery stops at a failure

    tick()  # not due yet: nothing is attempted
    first.refresh_from_db()
    assert (first.delivery_state, first.attempts) == (DeliveryState.PENDING, 1)

    Notification.objects.filter(pk=first.pk).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    tick()
    first.refresh_from_db()
    assert (first.delivery_state, first.attempts) == (DeliveryState.FAILED, 2)
    assert first.last_error
    training.refresh_from_db()
    assert training.participants.filter(pk=client.pk).exists()  # giving up on delivery does not remove the client
    assert training.state == "O"


def test_declining_client_is_removed_and_the_round_closes_without_it(hook, actor, make_user, client_for, make_training):
    ok = [make_user(f"ok{i}", client=True, message_endpoint=f"{hook.url}/ok/{i}") for i in range(2)]
    decliner = make_user("decliner", client=True, message_endpoint=refused_url())
    training = make_training(actor, [*ok, decliner], start=True, target_num_updates=2, options=SKIP_TESTS)
    assert rows(training, decliner)[0].delivery_state == DeliveryState.PENDING  # unreachable for now
    updates = upload_round(training, ok, client_for, 0)
    assert current_round(training).state == RoundState.OPEN  # still waiting for the decliner
    initial = global_weights(training)

    User.objects.filter(pk=decliner.pk).update(message_endpoint=f"{hook.url}/fail/decliner")
    Notification.objects.filter(recipient=decliner).update(next_attempt_at=timezone.now() - timedelta(seconds=1))
    tick()

    assert [r["path"] for r in hook.received if r["path"].startswith("/fail")] == ["/fail/decliner"]
    start_row, round_row, removed_row = rows(training, decliner)
    assert start_row.delivery_state == DeliveryState.DECLINED
    assert start_row.last_error.startswith("HTTP 500")
    assert round_row.delivery_state == DeliveryState.FAILED  # cancelled by the removal
    assert removed_row.notification_type == "CLIENT_REMOVED"
    assert removed_row.delivery_state == DeliveryState.PULL
    assert removed_row.body["client_uuid"] == str(decliner.pk)
    training.refresh_from_db()
    assert not training.participants.filter(pk=decliner.pk).exists()
    assert training.state == "O"
    closed = TrainingRound.objects.get(training=training, number=0, kind=RoundKind.UPDATE)
    assert closed.state == RoundState.DONE
    following = current_round(training)
    assert (following.kind, following.number, following.state) == (RoundKind.UPDATE, 1, RoundState.OPEN)
    assert set(following.expected.all()) == set(ok)
    assert_weights_equal(global_weights(training), weighted_mean(updates, initial))


# ---------------------------------------------------------------------------------------------------------------------
# pull endpoint


def test_events_endpoint_filters_by_recipient_sequence_and_waits(
    actor, pull_clients, outsider, client_for, make_training
):
    training = make_training(actor, pull_clients, start=True)
    url = f"/api/trainings/{training.pk}/events/"
    me = pull_clients[0]

    response = client_for(me).get(url)
    assert response.status_code == 200
    events = response.json()
    assert [e["notification_type"] for e in events] == ["TRAINING_START", "UPDATE_ROUND_START"]
    assert [e["seq"] for e in events] == [n.id for n in rows(training, me)]
    assert events[0]["seq"] < events[1]["seq"]
    for event in events:
        assert event["training_uuid"] == str(training.pk)
        assert event["body"]["global_model_uuid"] == str(training.model_id)
    assert events[1]["body"]["round"] == 0

    after = client_for(me).get(url, {"after": events[0]["seq"]}).json()
    assert [e["seq"] for e in after] == [events[1]["seq"]]

    everything = client_for(actor).get(url).json()
    assert [e["seq"] for e in everything] == [n.id for n in rows(training)]
    assert len(everything) == 6

    assert client_for(outsider).get(url).status_code == 403
    for bad in ("31", "abc"):
        response = client_for(me).get(url, {"wait": bad})
        assert response.status_code == 400, bad
        assert "wait" in response.json()["detail"]

    started = time.monotonic()
    response = client_for(me).get(url, {"after": events[-1]["seq"], "wait": "1"})
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.json() == []
    assert 0.9 <= elapsed < 15

    removed = pull_clients[2]
    response = client_for(actor).delete(
        f"/api/trainings/{training.pk}/clients/", {"clients": [str(removed.pk)]}, format="json"
    )
    assert response.status_code == 200
    response = client_for(removed).get(url)
    assert response.status_code == 200
    assert [e["notification_type"] for e in response.json()] == [
        "TRAINING_START",
        "UPDATE_ROUND_START",
        "CLIENT_REMOVED",
    ]
    assert response.json()[-1]["body"]["client_uuid"] == str(removed.pk)


# ---------------------------------------------------------------------------------------------------------------------
# abort


def test_abort_fails_the_training_and_tells_the_clients(actor, pull_clients, client_for, make_training):
    training = make_training(actor, pull_clients, start=True)
    upload_round(training, pull_clients[:1], client_for, 0)
    url = f"/api/trainings/{training.pk}/abort/"

    response = client_for(pull_clients[1]).post(url)
    assert response.status_code == 403
    training.refresh_from_db()
    assert training.state == "O"

    response = client_for(actor).post(url)
    assert response.status_code == 200, response.json()
    training.refresh_from_db()
    assert training.state == "E"
    assert training.error_reason == "Aborted by the actor."
    assert current_round(training).state == RoundState.FAILED
    finished = rows(training, kind="TRAINING_FINISHED")
    assert {n.recipient_id for n in finished} == {c.pk for c in pull_clients}
    for row in finished:
        assert row.body["status"] == "error"
        assert row.body["global_model_uuid"] == str(training.model_id)

    late = post_update(client_for(pull_clients[1]), training.model_id, 0, shifted_weights(1, 0.2), 5)
    assert late.status_code == 409
    assert LocalModel.objects.filter(base_model_id=training.model_id).count() == 1

    again = client_for(actor).post(url)
    assert again.status_code == 409
    assert "detail" in again.json()
    assert len(rows(training, kind="TRAINING_FINISHED")) == 3


# ---------------------------------------------------------------------------------------------------------------------
# deadlines and quorum


def test_deadline_with_quorum_closes_the_round_and_opens_the_next(actor, pull_clients, client_for, make_training):
    options = {"round_timeout_seconds": 600, "min_participants": 2, **SKIP_TESTS}
    training = make_training(actor, pull_clients, start=True, target_num_updates=2, options=options)
    initial = global_weights(training)
    round0 = current_round(training)
    assert round0.deadline is not None and round0.deadline > timezone.now() + timedelta(seconds=500)
    updates = upload_round(training, pull_clients[:2], client_for, 0)

    tick()  # before the deadline nothing happens
    assert current_round(training).pk == round0.pk
    round0.refresh_from_db()
    assert round0.state == RoundState.OPEN

    move_deadline_into_past(round0)
    tick()
    round0.refresh_from_db()
    assert round0.state == RoundState.DONE
    assert "deadline" in round0.close_reason
    assert "2 of 3" in round0.close_reason
    following = current_round(training)
    assert (following.kind, following.number, following.state) == (RoundKind.UPDATE, 1, RoundState.OPEN)
    assert following.deadline is not None and following.deadline > timezone.now()
    training.refresh_from_db()
    assert training.state == "O"
    assert_weights_equal(global_weights(training), weighted_mean(updates, initial))
    late = post_update(client_for(pull_clients[2]), training.model_id, 0, shifted_weights(5, 0.3), 7)
    assert late.status_code == 409


def test_deadline_below_quorum_fails_the_training(actor, pull_clients, client_for, make_training):
    options = {"round_timeout_seconds": 600, "min_participants": 2}
    training = make_training(actor, pull_clients, start=True, options=options)
    upload_round(training, pull_clients[:1], client_for, 0)
    round0 = current_round(training)
    move_deadline_into_past(round0)
    tick()
    training.refresh_from_db()
    assert training.state == "E"
    assert "quorum is 2" in training.error_reason
    round0.refresh_from_db()
    assert round0.state == RoundState.FAILED
    assert {n.body["status"] for n in rows(training, kind="TRAINING_FINISHED")} == {"error"}


def test_deadline_with_wait_for_quorum_extends_the_deadline(actor, pull_clients, client_for, make_training):
    options = {"round_timeout_seconds": 600, "min_participants": 2, "wait_for_quorum": True}
    training = make_training(actor, pull_clients, start=True, options=options)
    upload_round(training, pull_clients[:1], client_for, 0)
    round0 = current_round(training)
    move_deadline_into_past(round0)
    tick()
    round0.refresh_from_db()
    assert round0.state == RoundState.OPEN
    assert round0.deadline > timezone.now() + timedelta(seconds=500)
    training.refresh_from_db()
    assert training.state == "O"
    assert training.current_round_id == round0.pk


# ---------------------------------------------------------------------------------------------------------------------
# client sampling, FedProx, FedDC


def test_client_fraction_samples_clients_reproducibly(actor, pull_clients, client_for, make_training):
    options = {"client_fraction": 0.5, "seed": 7, **SKIP_TESTS}
    training = make_training(actor, pull_clients, start=True, target_num_updates=1, options=options)
    round0 = current_round(training)
    chosen = set(round0.expected.all())
    assert len(chosen) == 2  # ceil(0.5 * 3)
    expected_ids = sample_clients([str(c.pk) for c in pull_clients], 0.5, 7, 0, 1)
    assert {str(c.pk) for c in chosen} == set(expected_ids)
    assert {n.recipient_id for n in rows(training, kind="TRAINING_START")} == {c.pk for c in pull_clients}
    assert {n.recipient_id for n in rows(training, kind="UPDATE_ROUND_START")} == {c.pk for c in chosen}

    left_out = next(c for c in pull_clients if c not in chosen)
    response = post_update(client_for(left_out), training.model_id, 0, shifted_weights(3, 0.1), 5)
    assert response.status_code == 403
    assert "not selected" in response.json()["detail"]

    sampled = sorted(chosen, key=lambda u: str(u.pk))
    upload_round(training, sampled[:1], client_for, 0)
    round0.refresh_from_db()
    assert round0.state == RoundState.OPEN
    upload_round(training, sampled[1:], client_for, 0, seed=5)
    round0.refresh_from_db()
    assert round0.state == RoundState.DONE
    training.refresh_from_db()
    assert training.state == "C"

    twin = make_training(actor, pull_clients, start=True, target_num_updates=1, options=options)
    assert set(current_round(twin).expected.all()) == chosen


def test_fedprox_rounds_tell_clients_the_proximal_mu(actor, pull_clients, client_for, make_training):
    options = {"proximal_mu": 0.25, **SKIP_TESTS}
    training = make_training(
        actor, pull_clients, start=True, target_num_updates=2, aggregation_method="FedProx", options=options
    )
    upload_round(training, pull_clients, client_for, 0)
    starts = rows(training, kind="UPDATE_ROUND_START")
    assert len(starts) == 6  # rounds 0 and 1, three clients each
    for row in starts:
        assert row.body["config"]["proximal_mu"] == 0.25
        assert row.body["global_model_uuid"] == str(training.model_id)
    assert sorted(row.body["round"] for row in starts) == [0, 0, 0, 1, 1, 1]


def start_feddc_after_round0(
    actor: User, clients: list[User], client_for: Callable, make_training: Callable
) -> tuple[Training, dict, dict[Any, str]]:
    """A FedDC training (period 2) after round 0: the training, its initial weights, client -> model to continue."""
    options = {"daisy_chain_period": 2, "seed": 3, **SKIP_TESTS}
    training = make_training(
        actor, clients, start=True, target_num_updates=1, aggregation_method="FedDC", options=options
    )
    initial = global_weights(training)
    upload_round(training, clients, client_for, 0, seed=10)
    training.refresh_from_db()
    assert training.model.round == 1
    assert_weights_equal(global_weights(training), initial)  # round 0 of the period is not aggregated
    bodies = {n.recipient_id: n.body for n in rows(training, kind="UPDATE_ROUND_START") if n.body["round"] == 1}
    assert set(bodies) == {c.pk for c in clients}
    return training, initial, {pk: body["global_model_uuid"] for pk, body in bodies.items()}


def test_feddc_daisy_chains_local_models_between_aggregations(actor, pull_clients, client_for, make_training):
    training, initial, targets = start_feddc_after_round0(actor, pull_clients, client_for, make_training)
    local_owner = {
        str(pk): owner
        for pk, owner in LocalModel.objects.filter(base_model_id=training.model_id, round=0).values_list(
            "id", "owner_id"
        )
    }
    round1 = current_round(training)
    assert (round1.kind, round1.number, round1.state) == (RoundKind.UPDATE, 1, RoundState.OPEN)
    for client in pull_clients:
        assert local_owner[targets[client.pk]] != client.pk  # another client's local model
        assert round1.assignments[str(client.pk)] == targets[client.pk]
    assert {local_owner[t] for t in targets.values()} == {c.pk for c in pull_clients}  # a permutation

    updates = []
    for i, client in enumerate(pull_clients):
        weights = shifted_weights(20 + i, 0.05 * (i + 1))
        response = post_update(client_for(client), targets[client.pk], 1, weights, 4 + i)
        assert response.status_code == 201, response.json()
        updates.append((weights, float(4 + i)))
    training.refresh_from_db()
    assert training.state == "C"
    assert training.model.round == 2
    assert_weights_equal(global_weights(training), weighted_mean(updates, initial))


def test_feddc_client_may_download_the_local_model_it_continues(actor, pull_clients, client_for, make_training):
    _, _, targets = start_feddc_after_round0(actor, pull_clients, client_for, make_training)
    for client in pull_clients:
        download = client_for(client).get(f"/api/models/{targets[client.pk]}/")
        assert download.status_code == 200, download.json()
        continued = dict(torch.jit.load(io.BytesIO(download.content)).state_dict())
        assert_weights_equal(continued, read_weights(LocalModel.objects.get(pk=targets[client.pk])))


# ---------------------------------------------------------------------------------------------------------------------
# test rounds, late and wrong-kind uploads


def test_model_test_rounds_only_at_the_end_or_never(actor, pull_clients, client_for, make_training):
    at_end = make_training(
        actor, pull_clients, start=True, target_num_updates=2, options={"model_test_after_each_round": False}
    )
    upload_round(at_end, pull_clients, client_for, 0)
    assert (current_round(at_end).kind, current_round(at_end).number) == (RoundKind.UPDATE, 1)
    upload_round(at_end, pull_clients, client_for, 1)
    final = current_round(at_end)
    assert (final.kind, final.number, final.state) == (RoundKind.TEST, 2, RoundState.OPEN)
    assert {n.recipient_id for n in rows(at_end, kind="MODEL_TEST_ROUND")} == {c.pk for c in pull_clients}
    for client in pull_clients:
        body = {"metric_names": ["accuracy"], "metric_values": ["0.9"]}
        response = client_for(client).post(f"/api/models/{at_end.model_id}/metrics/", body, format="multipart")
        assert response.status_code == 201
    at_end.refresh_from_db()
    assert at_end.state == "C"
    kinds = list(TrainingRound.objects.filter(training=at_end).order_by("id").values_list("kind", "number"))
    assert kinds == [(RoundKind.UPDATE, 0), (RoundKind.UPDATE, 1), (RoundKind.TEST, 2)]

    never = make_training(actor, pull_clients, start=True, target_num_updates=2, options=SKIP_TESTS)
    upload_round(never, pull_clients, client_for, 0)
    upload_round(never, pull_clients, client_for, 1)
    never.refresh_from_db()
    assert never.state == "C"
    assert not TrainingRound.objects.filter(training=never, kind=RoundKind.TEST).exists()
    assert not rows(never, kind="MODEL_TEST_ROUND")


def test_late_and_wrong_kind_uploads_are_conflicts(actor, pull_clients, client_for, make_training):
    options = {"round_timeout_seconds": 600, "min_participants": 2, **SKIP_TESTS}
    skip = make_training(actor, pull_clients, start=True, target_num_updates=3, options=options)
    upload_round(skip, pull_clients[:2], client_for, 0)
    move_deadline_into_past(current_round(skip))
    tick()  # round 0 closes with the quorum; the straggler comes too late
    straggler = pull_clients[2]
    late = post_update(client_for(straggler), skip.model_id, 0, shifted_weights(9, 0.1), 5)
    assert late.status_code == 409
    assert "not the current round" in late.json()["detail"]
    duplicate = post_update(client_for(pull_clients[0]), skip.model_id, 0, shifted_weights(9, 0.1), 5)
    assert duplicate.status_code == 409

    round1 = current_round(skip)
    assert (round1.kind, round1.number) == (RoundKind.UPDATE, 1)
    TrainingRound.objects.filter(pk=round1.pk).update(state=RoundState.CLOSING)  # aggregation pending
    closing = post_update(client_for(straggler), skip.model_id, 1, shifted_weights(9, 0.1), 5)
    assert closing.status_code == 409
    assert "closed" in closing.json()["detail"]
    assert LocalModel.objects.filter(base_model_id=skip.model_id).count() == 2
    assert not round1.arrivals.exists()

    tested = make_training(actor, pull_clients, start=True, target_num_updates=2)
    upload_round(tested, pull_clients, client_for, 0)
    test_round = current_round(tested)
    assert (test_round.kind, test_round.number) == (RoundKind.TEST, 1)
    wrong_kind = post_update(client_for(pull_clients[0]), tested.model_id, 1, shifted_weights(9, 0.1), 5)
    assert wrong_kind.status_code == 409
    assert "test metrics round 1" in wrong_kind.json()["detail"]
    assert LocalModel.objects.filter(base_model_id=tested.model_id, round=1).count() == 0
    assert not test_round.arrivals.exists()


# ---------------------------------------------------------------------------------------------------------------------
# round history and metrics


def test_round_history_and_training_metrics(actor, pull_clients, outsider, client_for, make_training):
    training = make_training(actor, pull_clients, start=True, target_num_updates=1)
    for i, client in enumerate(pull_clients):
        metrics = {"loss": 0.5 + i, "accuracy": 0.1 * (i + 1)}
        response = post_update(client_for(client), training.model_id, 0, shifted_weights(i, 0.1), 10 * (i + 1), metrics)
        assert response.status_code == 201, response.json()
    for i, client in enumerate(pull_clients):
        body = {"metric_names": ["test_accuracy"], "metric_values": [str(0.7 + 0.1 * i)]}
        response = client_for(client).post(f"/api/models/{training.model_id}/metrics/", body, format="multipart")
        assert response.status_code == 201
    training.refresh_from_db()
    assert training.state == "C"

    response = client_for(pull_clients[0]).get(f"/api/trainings/{training.pk}/rounds/")
    assert response.status_code == 200
    history = response.json()
    assert [(r["kind"], r["number"], r["state"]) for r in history] == [
        (RoundKind.UPDATE, 0, RoundState.DONE),
        (RoundKind.TEST, 1, RoundState.DONE),
    ]
    update_round, test_round = history
    ids = {str(c.pk) for c in pull_clients}
    assert set(update_round["expected"]) == ids
    assert {a["user"]: a["sample_size"] for a in update_round["arrivals"]} == {
        str(c.pk): 10 * (i + 1) for i, c in enumerate(pull_clients)
    }
    assert update_round["total_samples"] == 60
    assert {a["user"] for a in test_round["arrivals"]} == ids
    for entry in history:
        opened, closed, finished = (parse_time(entry[k]) for k in ("opened_at", "closed_at", "finished_at"))
        assert opened <= closed <= finished
        assert isinstance(entry["aggregation_seconds"], float) and entry["aggregation_seconds"] >= 0
        assert entry["close_reason"]

    response = client_for(actor).get(f"/api/trainings/{training.pk}/metrics/")
    assert response.status_code == 200
    got = {(m["round"], m["reporter"], m["key"], round(m["value"], 6)) for m in response.json()}
    expected = set()
    for i, client in enumerate(pull_clients):
        expected.add((0, str(client.pk), "loss", round(0.5 + i, 6)))
        expected.add((0, str(client.pk), "accuracy", round(0.1 * (i + 1), 6)))
        expected.add((1, str(client.pk), "test_accuracy", round(0.7 + 0.1 * i, 6)))
    assert got == expected

    assert client_for(outsider).get(f"/api/trainings/{training.pk}/rounds/").status_code == 403
    assert client_for(outsider).get(f"/api/trainings/{training.pk}/metrics/").status_code == 403


# ---------------------------------------------------------------------------------------------------------------------
# weight versions


def run_rounds(training: Training, clients: list[User], client_for: Callable, count: int) -> list[dict]:
    """Run `count` update rounds; returns the global weights after 0..count rounds."""
    history = [global_weights(training)]
    for number in range(count):
        upload_round(training, clients, client_for, number, seed=10 * number)
        history.append(global_weights(training))
    return history


def download_round(api: APIClient, model_id: Any, number: int, fmt: str | None = None) -> Any:
    query = {"round": number, **({"format": fmt} if fmt else {})}
    return api.get(f"/api/models/{model_id}/", query)


def test_weights_of_each_round_can_be_downloaded(actor, pull_clients, client_for, make_training):
    training = make_training(actor, pull_clients, start=True, target_num_updates=3, options=SKIP_TESTS)
    history = run_rounds(training, pull_clients, client_for, 3)
    api = client_for(pull_clients[0])
    for number, expected in enumerate(history):
        response = download_round(api, training.model_id, number, "safetensors")
        assert response.status_code == 200
        assert_weights_equal(load_safetensors(response.content), expected)
        response = download_round(api, training.model_id, number)
        assert response.status_code == 200
        assert_weights_equal(dict(torch.jit.load(io.BytesIO(response.content)).state_dict()), expected)
    assert not torch.equal(history[1]["fc1.weight"], history[2]["fc1.weight"])
    missing = download_round(api, training.model_id, 9)
    assert missing.status_code == 404
    assert "[0, 1, 2, 3]" in missing.json()["detail"]


def test_weight_versions_are_pruned_with_their_store_objects(settings, actor, pull_clients, client_for, make_training):
    settings.FL_WEIGHT_VERSIONS_KEEP = 2
    training = make_training(actor, pull_clients, start=True, target_num_updates=3, options=SKIP_TESTS)
    initial_key = Model.objects.get(pk=training.model_id).weights.key
    history = run_rounds(training, pull_clients, client_for, 3)

    model = Model.objects.select_related("weights").get(pk=training.model_id)
    versions = list(WeightsVersion.objects.filter(model=model).order_by("round").select_related("weights"))
    assert [v.round for v in versions] == [2, 3]
    assert versions[-1].weights_id == model.weights_id  # the current weights are the newest version
    store = get_model_storage()
    assert store.keys(f"models/{model.pk}/weights") == sorted(v.weights.key for v in versions)
    assert not store.exist(initial_key)
    assert store.exist(model.weights.key)

    api = client_for(pull_clients[0])
    missing = download_round(api, model.pk, 1, "safetensors")
    assert missing.status_code == 404
    assert "[2, 3]" in missing.json()["detail"]
    kept = download_round(api, model.pk, 2, "safetensors")
    assert kept.status_code == 200
    assert_weights_equal(load_safetensors(kept.content), history[2])
    current = download_round(api, model.pk, 3)
    assert current.status_code == 200
    assert_weights_equal(dict(torch.jit.load(io.BytesIO(current.content)).state_dict()), history[3])


# ---------------------------------------------------------------------------------------------------------------------
# participant removal and aggregation failure


def test_removing_participants_during_a_round(actor, pull_clients, client_for, make_training):
    training = make_training(actor, pull_clients, start=True, target_num_updates=2, options=SKIP_TESTS)
    initial = global_weights(training)
    updates = upload_round(training, pull_clients[:2], client_for, 0)
    url = f"/api/trainings/{training.pk}/clients/"
    gone = pull_clients[2]

    response = client_for(actor).delete(url, {"clients": [str(gone.pk)]}, format="json")
    assert response.status_code == 200
    training.refresh_from_db()
    assert not training.participants.filter(pk=gone.pk).exists()
    assert TrainingRound.objects.get(training=training, number=0).state == RoundState.DONE
    following = current_round(training)
    assert (following.kind, following.number, following.state) == (RoundKind.UPDATE, 1, RoundState.OPEN)
    assert set(following.expected.all()) == set(pull_clients[:2])
    assert_weights_equal(global_weights(training), weighted_mean(updates, initial))
    assert [n.notification_type for n in rows(training, gone)][-1] == "CLIENT_REMOVED"
    assert [n.body["round"] for n in rows(training, gone, kind="UPDATE_ROUND_START")] == [0]  # not in round 1

    response = client_for(actor).delete(url, {"clients": [str(c.pk) for c in pull_clients[:2]]}, format="json")
    assert response.status_code == 200
    training.refresh_from_db()
    assert training.state == "E"
    assert "No participants left" in training.error_reason
    assert current_round(training).state == RoundState.FAILED


def corrupt_accumulator(training: Training) -> None:
    round_ = current_round(training)
    assert round_.accumulator_id is not None
    get_model_storage().put(round_.accumulator.key, b"this is not a safetensors file")


def test_corrupt_accumulator_fails_the_training_at_the_last_upload(actor, pull_clients, client_for, make_training):
    training = make_training(actor, pull_clients, start=True, options=SKIP_TESTS)
    upload_round(training, pull_clients[:2], client_for, 0)
    corrupt_accumulator(training)
    api = client_for(pull_clients[2])
    api.raise_request_exception = False
    post_update(api, training.model_id, 0, shifted_weights(7, 0.3), 30)
    training.refresh_from_db()
    assert training.state == "E"
    assert training.error_reason.startswith("Aggregation of round")


def test_database_error_while_folding_an_update_is_retryable_and_keeps_the_training_running(
    monkeypatch, actor, pull_clients, client_for, make_training
):
    training = make_training(actor, pull_clients, start=True, options=SKIP_TESTS)
    upload_round(training, pull_clients[:1], client_for, 0)
    store = get_model_storage().keys()

    def connection_lost(*args: Any, **kwargs: Any) -> None:
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(uploads, "fold_into_round", connection_lost)
    response = post_update(client_for(pull_clients[1]), training.model_id, 0, shifted_weights(8, 0.2), 20)
    assert response.status_code == 503, response.json()  # the database failed, not the round's sum
    assert response["Retry-After"]
    training.refresh_from_db()
    assert training.state == "O"
    assert current_round(training).arrivals.count() == 1
    assert get_model_storage().keys() == store

    monkeypatch.undo()
    upload_round(training, pull_clients[1:], client_for, 0, seed=1)
    assert TrainingRound.objects.get(training=training, number=0).state == RoundState.DONE


def test_fire_and_forget_tasks_keep_no_result():
    """Dispatching them must not depend on the result store (an outage would block every dispatch)."""
    assert all(task.ignore_result for task in (tasks.close_round, tasks.deliver_notifications, tasks.tick))
    assert not tasks.run_inference.ignore_result  # the web process waits for it


def test_corrupt_accumulator_fails_the_training_when_the_deadline_closes_the_round(
    actor, pull_clients, client_for, make_training
):
    options = {"round_timeout_seconds": 600, "min_participants": 2, **SKIP_TESTS}
    training = make_training(actor, pull_clients, start=True, options=options)
    upload_round(training, pull_clients[:2], client_for, 0)
    corrupt_accumulator(training)
    round0 = current_round(training)
    move_deadline_into_past(round0)
    tick()
    training.refresh_from_db()
    assert training.state == "E"
    assert training.error_reason.startswith("Aggregation of round 0 failed")
    round0.refresh_from_db()
    assert round0.state == RoundState.FAILED
    assert {n.body["status"] for n in rows(training, kind="TRAINING_FINISHED")} == {"error"}
