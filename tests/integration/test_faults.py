"""Fault injection: the broker restarted mid-round, database connections dropped mid-upload, mid-aggregation and
during a commit, clients that vanish mid-upload, and notification endpoints that hang or refuse connections.

After every fault the training must end as if nothing happened (exact weights), no update may be lost or
counted twice, and the model store may hold no object that no `Blob` row references (and no row without its
object). The broker and database faults need the worker mode; the others run in both modes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tests.integration.conftest import Session
from tests.integration.harness import (
    HTTP_TIMEOUT,
    WAIT_SECONDS,
    Api,
    PostgresProxy,
    SimClient,
    Stack,
    assert_weights_equal,
    brief,
    check_clients,
    client_update,
    expected_chain,
    sample_size,
    tiny_net,
    update_bytes,
    wait_until,
)

pytestmark = pytest.mark.integration


class StoreAudit:
    """The model-store files a test wrote, checked against the `Blob` rows when it ends."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.before = stack.store_files()

    def orphans(self) -> list[str]:
        """Files written since the audit began that no `Blob` row references."""
        return sorted(self.stack.store_files() - self.before - self.stack.db.blob_keys())

    def assert_consistent(self) -> None:
        """No new file without its row (an orphan) and no row without its file (lost bytes)."""
        orphans = self.orphans()
        assert not orphans, f"orphaned model-store files: {orphans}"
        missing = sorted(self.stack.db.blob_keys() - self.stack.store_files())
        assert not missing, f"Blob rows whose file is gone: {missing}"


def assert_counted_once(fl: Session, training_id: str, model_id: str, clients: list[SimClient], rounds: int) -> None:
    """Every client's update of every round arrived once, is stored once, and each round was aggregated once."""
    ids = sorted(c.id for c in clients)
    history = fl.api.rounds(fl.actor, training_id)
    assert [(r["number"], r["kind"], r["state"]) for r in history] == [(n, "UPDATE", "DONE") for n in range(rounds)]
    for round_ in history:
        number = round_["number"]
        assert sorted(a["user"] for a in round_["arrivals"]) == ids, f"round {number}: arrivals differ"
        expected_total = sum(sample_size(c.index, number) for c in clients)
        assert round_["total_samples"] == expected_total, f"round {number}: an update was lost or counted twice"
    stored = fl.db.rows(
        "SELECT round, owner_id, COUNT(*) FROM fl_server_core_model WHERE base_model_id = %s GROUP BY round, owner_id",
        [fl.db.uuid_param(model_id)],
    )
    per_client = sorted((int(r), str(owner).replace("-", ""), int(n)) for r, owner, n in stored)
    assert per_client == sorted((r, c.replace("-", ""), 1) for r in range(rounds) for c in ids), "stored updates"
    assert fl.db.weight_versions(model_id) == dict.fromkeys(range(rounds + 1), 1), "a round was aggregated twice"


def upload(
    fl: Session,
    client: SimClient,
    model_id: str,
    round_: int,
    weights: dict[str, torch.Tensor],
    fmt: str = "safetensors",
) -> requests.Response:
    """Client `client` uploads its deterministic update of `weights` for `round_`."""
    update = client_update(weights, client.index, round_)
    return fl.api.upload_update(client.account, model_id, round_, update, sample_size(client.index, round_), fmt)


def assert_created(response: requests.Response, what: str) -> None:
    """The upload was accepted."""
    assert response.status_code == 201, f"{what}: {brief(response)}"


def finish_two_rounds(
    fl: Session,
    training_id: str,
    model_id: str,
    clients: list[SimClient],
    chain: list[dict[str, torch.Tensor]],
    waiting_for: str,
) -> None:
    """Once round 0 is aggregated, every client uploads round 1; the training must end with the exact weights."""
    wait_until(lambda: fl.api.training(fl.actor, training_id)["round"] == 1, WAIT_SECONDS, waiting_for)
    for client in clients:
        assert_created(upload(fl, client, model_id, 1, chain[1]), f"client {client.index} in round 1")
    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"})
    assert done["state"] == "C", done["error_reason"]
    assert_weights_equal(fl.api.weights(fl.actor, model_id, 1), chain[1], "round 0")
    assert_weights_equal(fl.api.weights(fl.actor, model_id), chain[2], "final weights")
    assert_counted_once(fl, training_id, model_id, clients, 2)


@contextlib.contextmanager
def promptly(what: str, seconds: float = 15.0) -> Iterator[None]:
    """The block (a request) must not hang on the fault: it ends within `seconds` (normally well under one)."""
    started = time.monotonic()
    yield
    took = time.monotonic() - started
    assert took < seconds, f"{what} took {took:.1f}s: it waited on the fault instead of answering"


# --------------------------------------------------------------------------------------------------
# 1. The broker restarts mid-round


def test_broker_restart_mid_round_loses_no_task_no_notification_and_no_update(fl: Session):
    if fl.stack.mode != "worker":
        pytest.skip("embedded mode has no broker: tasks run on the server's own threads")
    broker = fl.stack.broker
    if broker is None:
        pytest.skip("needs a private broker it can stop: redis-server on the PATH and FL_IT_REDIS_URL unset")
    audit = StoreAudit(fl.stack)
    initial = dict(tiny_net(40).state_dict())
    chain = expected_chain(initial, [0, 1, 2], 2)
    model_id = fl.api.upload_model(fl.actor, tiny_net(40))
    # The clients record what is pushed to them; the test uploads for them, so it controls the timing.
    clients = fl.make_clients(*[{"behaviour": "silent"}] * 3)
    training_id = fl.training(model_id, clients, target_num_updates=2, options={"skip_model_tests": True})
    for client in clients:
        client.start(training_id)

    broker.stop()
    with promptly("start while the broker is down"):
        fl.api.start(fl.actor, training_id)  # its notifications are written; their delivery cannot be queued
    with promptly("upload while the broker is down"):
        assert_created(upload(fl, clients[0], model_id, 0, chain[0]), "upload while the broker is down")
    broker.start()
    for client in clients:  # the periodic check re-queues the deliveries the outage left pending
        wait_until(
            lambda c=client: c.types() == ["TRAINING_START", "UPDATE_ROUND_START"],
            WAIT_SECONDS,
            f"client {client.index} to be notified after the broker came back",
        )
    assert_created(upload(fl, clients[1], model_id, 0, chain[0]), "upload after the restart")
    broker.stop()
    with promptly("last upload while the broker is down"):
        assert_created(upload(fl, clients[2], model_id, 0, chain[0]), "last upload while the broker is down")
    assert fl.api.rounds(fl.actor, training_id)[0]["state"] == "CLOSING"
    broker.start()
    finish_two_rounds(
        fl, training_id, model_id, clients, chain, "the round closed during the outage to be aggregated afterwards"
    )
    for client in clients:
        assert client.finished.wait(15), f"client {client.index} was not told the training finished"
        ids = [int(d.event_id) for d in client.deliveries]
        assert client.types() == ["TRAINING_START", "UPDATE_ROUND_START", "UPDATE_ROUND_START", "TRAINING_FINISHED"]
        assert ids == sorted(set(ids)), f"client {client.index}: a notification was pushed twice or out of order"
    audit.assert_consistent()


# --------------------------------------------------------------------------------------------------
# 2. The database connection drops during an upload

WAITING_ON_A_LOCK = """
    SELECT pid, query FROM pg_stat_activity
    WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()
"""


@contextlib.contextmanager
def holding(fl: Session, statement: str, params: tuple[object, ...] = ()) -> Iterator[None]:
    """Hold the lock `statement` takes (in a transaction of our own) for the duration of the block."""
    conn = fl.db.connect()
    try:
        conn.cursor().execute(statement, params)
        yield
    finally:
        conn.rollback()
        conn.close()


def drop_connection_waiting_on(fl: Session, statement_start: str) -> None:
    """Wait until a server backend blocks on our lock in a statement starting with `statement_start`, then drop it.

    `pg_terminate_backend` closes the connection exactly as a database restart or failover would.
    """

    def blocked() -> int | None:
        found = [(pid, query) for pid, query in fl.db.rows(WAITING_ON_A_LOCK) if query.startswith(statement_start)]
        return found[0][0] if found else None

    pid = wait_until(blocked, 30, f"a server connection to block in {statement_start!r}")
    assert fl.db.rows("SELECT pg_terminate_backend(%s)", [pid]) == [(True,)]


def assert_retryable(response: requests.Response) -> None:
    """503 with a JSON detail and Retry-After: nothing was stored, the client may send it again."""
    assert response.status_code == 503, brief(response)
    assert response.json()["detail"], response.text
    assert response.headers.get("Retry-After"), response.headers


def arrivals(fl: Session, training_id: str, number: int) -> tuple[list[str], int]:
    """Who arrived in update round `number`, and its running total of samples."""
    round_ = next(r for r in fl.api.rounds(fl.actor, training_id) if r["number"] == number and r["kind"] == "UPDATE")
    return sorted(a["user"] for a in round_["arrivals"]), round_["total_samples"]


def test_database_connection_dropped_mid_upload_and_mid_aggregation_is_retried_and_counted_once(fl: Session):
    if fl.stack.mode != "worker":
        pytest.skip("embedded mode uses a SQLite file: there is no database connection to drop")
    audit = StoreAudit(fl.stack)
    initial = dict(tiny_net(41).state_dict())
    chain = expected_chain(initial, [0, 1, 2], 2)
    model_id = fl.api.upload_model(fl.actor, tiny_net(41))
    clients = fl.make_clients(*[{"push": False}] * 3)  # driven by the test
    training_id = fl.training(model_id, clients, target_num_updates=2, options={"skip_model_tests": True})
    fl.api.start(fl.actor, training_id)
    round_id = fl.db.rows(
        "SELECT current_round_id FROM fl_server_core_training WHERE id = %s", [fl.db.uuid_param(training_id)]
    )[0][0]
    assert_created(upload(fl, clients[0], model_id, 0, chain[0]), "first upload")
    before = arrivals(fl, training_id, 0)

    # Dropped while folding the update into the round's running sum (update and new sum already in the store).
    with ThreadPoolExecutor(max_workers=1) as pool:
        with holding(fl, "SELECT 1 FROM fl_server_core_traininground WHERE id = %s FOR UPDATE", (round_id,)):
            pending = pool.submit(upload, fl, clients[1], model_id, 0, chain[0])
            drop_connection_waiting_on(fl, 'UPDATE "fl_server_core_traininground"')
        assert_retryable(pending.result(WAIT_SECONDS))
    assert arrivals(fl, training_id, 0) == before, "a failed upload was counted"
    assert fl.api.training(fl.actor, training_id)["state"] == "O"
    audit.assert_consistent()
    assert_created(upload(fl, clients[1], model_id, 0, chain[0]), "retry after the dropped connection")
    before = arrivals(fl, training_id, 0)

    # Dropped at the last statement before the commit, then the worker's connection dropped mid-aggregation.
    with (
        ThreadPoolExecutor(max_workers=1) as pool,
        holding(fl, "LOCK TABLE fl_server_core_weightsversion IN SHARE MODE"),
    ):
        with holding(fl, "LOCK TABLE fl_server_core_roundarrival IN SHARE MODE"):
            pending = pool.submit(upload, fl, clients[2], model_id, 0, chain[0])
            drop_connection_waiting_on(fl, 'INSERT INTO "fl_server_core_roundarrival"')
        assert_retryable(pending.result(WAIT_SECONDS))
        assert arrivals(fl, training_id, 0) == before, "a failed upload was counted"
        audit.assert_consistent()
        assert_created(upload(fl, clients[2], model_id, 0, chain[0]), "retry of the last upload")
        drop_connection_waiting_on(fl, 'INSERT INTO "fl_server_core_weightsversion"')
    finish_two_rounds(
        fl, training_id, model_id, clients, chain, "the aggregation whose connection dropped to be retried"
    )
    audit.assert_consistent()


def through(proxy: PostgresProxy, database_url: str) -> str:
    """`database_url` with its host and port replaced by the proxy's (unencrypted, so the proxy can read it)."""
    parts = urllib.parse.urlsplit(database_url)
    auth = parts.netloc.rpartition("@")[0]
    netloc = f"{auth}@127.0.0.1:{proxy.port}" if auth else f"127.0.0.1:{proxy.port}"
    return parts._replace(netloc=netloc, query="sslmode=disable&gssencmode=disable").geturl()


def test_database_connection_dropped_during_the_commit_of_an_upload_keeps_what_was_committed(fl: Session):
    if fl.stack.mode != "worker":
        pytest.skip("embedded mode uses a SQLite file: there is no database connection to drop")
    audit = StoreAudit(fl.stack)
    initial = dict(tiny_net(45).state_dict())
    model_id = fl.api.upload_model(fl.actor, tiny_net(45))
    clients = fl.make_clients(*[{"push": False}] * 3)  # driven by the test
    training_id = fl.training(model_id, clients, target_num_updates=1, options={"skip_model_tests": True})
    fl.api.start(fl.actor, training_id)
    for client in clients[:2]:
        assert_created(upload(fl, client, model_id, 0, initial), f"client {client.index}")

    # A second web process reaches the database through a proxy that drops the connection once the
    # upload's COMMIT went through: the server cannot tell whether the update was stored.
    proxy = PostgresProxy(fl.db.pg["host"], int(fl.db.pg["port"]))
    server, url = fl.stack.extra_server(DATABASE_URL=through(proxy, fl.stack.env["DATABASE_URL"]))
    try:
        proxy.cut_next_commit()
        last = clients[2]
        update = client_update(initial, last.index, 0)
        response = Api(url).upload_update(last.account, model_id, 0, update, sample_size(last.index, 0), "state_dict")
        assert proxy.cut.is_set(), f"the connection was not dropped at the COMMIT: {brief(response)}"
        assert_retryable(response)
    finally:
        server.stop()
        proxy.close()
    retry = upload(fl, last, model_id, 0, initial)
    assert retry.status_code == 409 and "already uploaded" in retry.json()["detail"], brief(retry)

    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"})  # the committed round is closed by the check
    assert done["state"] == "C", done["error_reason"]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected_chain(initial, [0, 1, 2], 1)[-1], "weights")
    assert_counted_once(fl, training_id, model_id, clients, 1)
    # The running sum the upload replaced was to be deleted after its commit, which the server never saw
    # succeed: an orphan, which the sweep removes (with no grace here: nothing is in flight).
    (round_,) = fl.db.rows(
        "SELECT id FROM fl_server_core_traininground WHERE training_id = %s", [fl.db.uuid_param(training_id)]
    )
    orphans = audit.orphans()
    assert len(orphans) == 1 and orphans[0].startswith(f"rounds/{round_[0]}/sum/"), orphans
    assert set(orphans) <= set(fl.stack.sweep_model_store(grace_seconds=0))
    audit.assert_consistent()


# --------------------------------------------------------------------------------------------------
# 3. A client disconnects mid-upload


def multipart_upload(
    fl: Session, client: SimClient, model_id: str, round_: int, weights: dict[str, torch.Tensor]
) -> tuple[bytes, bytes]:
    """The raw request head and body of the client's upload, fields in the SDK's order (file before metrics)."""
    update = client_update(weights, client.index, round_)
    fields = [
        ("round", (None, str(round_))),
        ("sample_size", (None, str(sample_size(client.index, round_)))),
        ("model_file", ("model.pt", update_bytes(update, "safetensors"), "application/octet-stream")),
        ("metric_names", (None, "loss")),
        ("metric_values", (None, "0.5")),
    ]
    url = f"{fl.api.base}/models/{model_id}/"
    prepared = requests.Request("POST", url, files=fields, headers=client.account.headers).prepare()
    head = f"POST /api/models/{model_id}/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in prepared.headers.items()) + "\r\n"
    assert isinstance(prepared.body, bytes)
    return head.encode(), prepared.body


def send_cut_short(fl: Session, head: bytes, body: bytes, cut: int, wait_for_answer: bool) -> bytes:
    """Send the head with a Content-Length of the whole body but only `cut` bytes of it, and close.

    With `wait_for_answer` only our sending side is shut (the server reads the same end of the body)
    and the answer is returned; otherwise the socket is closed at once, like a client that crashed.
    """
    host, port = fl.stack.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=HTTP_TIMEOUT) as sock:
        sock.sendall(head + body[:cut])
        if not wait_for_answer:
            return b""
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("wait_for_answer", [True, False], ids=["half-closed", "closed"])
def test_client_disconnecting_mid_upload_counts_nothing_and_can_upload_again(fl: Session, wait_for_answer: bool):
    audit = StoreAudit(fl.stack)
    initial = dict(tiny_net(42).state_dict())
    model_id = fl.api.upload_model(fl.actor, tiny_net(42))
    clients = fl.make_clients({"push": False}, {"push": False})
    leaving, other = clients
    training_id = fl.training(model_id, clients, target_num_updates=1, options={"skip_model_tests": True})
    fl.api.start(fl.actor, training_id)
    assert_created(upload(fl, other, model_id, 0, initial), "the other client's upload")
    before = arrivals(fl, training_id, 0)

    head, body = multipart_upload(fl, leaving, model_id, 0, initial)
    file_part = body.index(b'name="model_file"')
    cuts = {
        "nothing of the body": 0,
        "half the file": (file_part + body.index(b'name="metric_names"')) // 2,
        # The file part is complete; only the metrics are missing: once accepted without them.
        "all but the metrics": body.rindex(b"Content-Disposition", 0, body.index(b'name="metric_names"')),
        "all but the last two bytes": len(body) - 2,
    }
    server = fl.stack.server
    assert server is not None

    def rejections() -> int:
        return server.log_text().count(f"Bad Request: /api/models/{model_id}/")

    for what, cut in cuts.items():
        rejected = rejections()
        answer = send_cut_short(fl, head, body, cut, wait_for_answer)
        if wait_for_answer:
            status, _, payload = answer.partition(b"\r\n\r\n")
            assert status.startswith(b"HTTP/1.1 400 "), f"{what}: {answer[:300]!r}"
            assert "could not be read completely" in json.loads(payload)["detail"], f"{what}: {payload!r}"
        else:  # no answer to read: wait until the server has dealt with it
            wait_until(
                lambda n=rejected: rejections() > n or arrivals(fl, training_id, 0) != before,
                WAIT_SECONDS,
                f"the server to reject the upload cut after {what}",
            )
        assert arrivals(fl, training_id, 0) == before, f"an upload cut after {what} was counted"
    metrics = fl.api.ok("GET", f"/trainings/{training_id}/metrics/", fl.actor)
    assert leaving.id not in {m["reporter"] for m in metrics}, "metrics of a cut upload were recorded"
    audit.assert_consistent()

    assert_created(upload(fl, leaving, model_id, 0, initial), "the proper upload after the disconnects")
    done = fl.api.wait_training(fl.actor, training_id, {"C", "E"})
    assert done["state"] == "C", done["error_reason"]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected_chain(initial, [0, 1], 1)[-1], "final weights")
    assert_counted_once(fl, training_id, model_id, clients, 1)
    audit.assert_consistent()


# --------------------------------------------------------------------------------------------------
# 4. Notification endpoints that hang or refuse connections
#
# A delivery holds the worker slot it runs in (a Celery worker process, or in embedded mode one of the
# server's two task threads) until the client answers or the timeout ends it, but nothing else: no
# lock, no other client's queue. In worker mode these tests therefore run a second worker, as a
# deployment runs several worker processes; with the suite's single solo worker there is only one slot.


@contextlib.contextmanager
def delivery_slots(fl: Session) -> Iterator[Callable[[], None]]:
    """At least two task slots: a second Celery worker in worker mode (embedded mode has two threads).

    Yields a function that waits until the second slot serves (the worker starts meanwhile).
    """
    extra = fl.stack.extra_worker(wait=False) if fl.stack.mode == "worker" else None
    try:
        yield extra.ready if extra is not None else lambda: None
    finally:
        if extra is not None:
            extra.stop()


def notification_rows(fl: Session, training_id: str, client: SimClient) -> list[tuple[str, str, int, str]]:
    """(type, delivery state, attempts, last error) of the client's notifications, in order."""
    return [
        (kind, state, int(attempts), error)
        for kind, state, attempts, error in fl.db.rows(
            "SELECT notification_type, delivery_state, attempts, last_error FROM fl_server_core_notification"
            " WHERE training_id = %s AND recipient_id = %s ORDER BY id",
            [fl.db.uuid_param(training_id), fl.db.uuid_param(client.id)],
        )
    ]


def test_endpoint_hanging_once_is_retried_in_order_and_the_others_go_on(fl: Session):
    timeout = float(fl.stack.env["FL_NOTIFICATION_TIMEOUT_SECONDS"])
    audit = StoreAudit(fl.stack)
    initial = dict(tiny_net(43).state_dict())
    with delivery_slots(fl) as slots_ready:
        model_id = fl.api.upload_model(fl.actor, tiny_net(43))
        clients = fl.make_clients({}, {}, {"endpoint_hang": 1})  # its first delivery is never answered
        hung = clients[2]
        training_id = fl.training(model_id, clients, target_num_updates=2, options={"skip_model_tests": True})
        slots_ready()
        for client in clients:
            client.start(training_id)
        fl.api.start(fl.actor, training_id)
        done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
        assert done["state"] == "C", done["error_reason"]
        for client in clients:
            assert client.finished.wait(15), f"client {client.index} was not told the training finished"

    first, again, *rest = hung.deliveries
    assert (first.payload, first.event_id) == (again.payload, again.event_id), "the hung delivery was not retried"
    assert first.payload["notification_type"] == "TRAINING_START"
    assert again.received_at >= first.received_at + timeout * 0.9, "retried before the timeout"
    assert [d.payload["notification_type"] for d in rest] == ["UPDATE_ROUND_START"] * 2 + ["TRAINING_FINISHED"]
    assert rest[0].received_at >= again.answered_at, "a later notification overtook the retried one"
    start_row = notification_rows(fl, training_id, hung)[0]
    assert start_row == ("TRAINING_START", "DELIVERED", 2, ""), start_row
    for client in clients[:2]:  # not held up by the hung delivery
        assert client.types() == ["TRAINING_START", "UPDATE_ROUND_START", "UPDATE_ROUND_START", "TRAINING_FINISHED"]
        assert client.deliveries[1].received_at < first.received_at + timeout, (
            f"client {client.index} got round 0 only after the hung delivery timed out"
        )
        wait_until(  # the last answer may still be being recorded
            lambda c=client: {row[1:3] for row in notification_rows(fl, training_id, c)} == {("DELIVERED", 1)},
            15,
            f"client {client.index}'s notifications to be recorded as delivered at the first attempt",
        )
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected_chain(initial, [0, 1, 2], 2)[-1], "weights")
    assert_counted_once(fl, training_id, model_id, clients, 2)
    audit.assert_consistent()


def test_endpoints_hanging_or_refusing_do_not_hold_up_the_training_or_the_other_clients(fl: Session):
    timeout = float(fl.stack.env["FL_NOTIFICATION_TIMEOUT_SECONDS"])
    audit = StoreAudit(fl.stack)
    initial = dict(tiny_net(44).state_dict())
    # Rounds close at the deadline once the two reachable clients arrived (extended until they did).
    options = {"skip_model_tests": True, "round_timeout_seconds": 1, "min_participants": 2, "wait_for_quorum": True}
    with delivery_slots(fl) as slots_ready:
        model_id = fl.api.upload_model(fl.actor, tiny_net(44))
        clients = fl.make_clients({}, {}, {"endpoint_hang": 1_000_000}, {})
        hanging, refusing = clients[2], clients[3]
        assert hanging.endpoint is not None and refusing.endpoint is not None
        refusing.endpoint.close()  # nothing listens there any more: connections are refused
        training_id = fl.training(model_id, clients, target_num_updates=1, options=options)
        slots_ready()
        for client in clients:
            client.start(training_id)
        fl.api.start(fl.actor, training_id)
        done = fl.api.wait_training(fl.actor, training_id, {"C", "E"}, check=check_clients(clients))
        assert done["state"] == "C", done["error_reason"]
        for client in clients[:2]:
            assert client.finished.wait(15), f"client {client.index} was not told the training finished"
        wait_until(
            lambda: "Timeout" in notification_rows(fl, training_id, hanging)[0][3],
            timeout * 3,
            "the hung delivery to time out",
        )
        hanging_rows = notification_rows(fl, training_id, hanging)
        hanging.endpoint.close()  # ends the retry now in flight, so that the extra worker stops at once

    hung_at = hanging.deliveries[0].received_at
    for client in clients[:2]:
        assert client.types() == ["TRAINING_START", "UPDATE_ROUND_START", "TRAINING_FINISHED"]
        assert client.deliveries[-1].received_at < hung_at + timeout, (
            f"client {client.index} was told the training finished only after the hung delivery timed out"
        )
    # Both stay participants (only an answer of 4xx/5xx declines); each waits at its first notification.
    assert sorted(done["participants"]) == sorted(c.id for c in clients)
    for rows, error in ((hanging_rows, "Timeout"), (notification_rows(fl, training_id, refusing), "ConnectionError")):
        first, *later = rows
        assert first[:2] == ("TRAINING_START", "PENDING") and error in first[3], first
        assert {row[1:3] for row in later} == {("PENDING", 0)}, f"sent out of order: {later}"
    assert notification_rows(fl, training_id, refusing)[0][2] >= 2, "a refused connection was not retried"
    assert {d.payload["notification_type"] for d in hanging.deliveries} == {"TRAINING_START"}
    (round_,) = fl.api.rounds(fl.actor, training_id)
    assert sorted(a["user"] for a in round_["arrivals"]) == sorted(c.id for c in clients[:2])
    assert "deadline" in round_["close_reason"], round_["close_reason"]
    assert_weights_equal(fl.api.weights(fl.actor, model_id), expected_chain(initial, [0, 1], 1)[-1], "weights")
    assert fl.db.weight_versions(model_id) == {0: 1, 1: 1}
    audit.assert_consistent()
