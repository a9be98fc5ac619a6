"""`Participant`: the worker side of a client, turning server notifications into training and testing.

Plug in your code in one of three ways:

* Python callables: ``train(model, round, config) -> (model, metrics, sample_size)``,
  ``test(model, round) -> metrics`` and optionally ``swag(model, round, config) -> (first_moment,
  second_moment, sample_size)``. `model` is the downloaded TorchScript module; the returned model may be a
  TorchScript module, an `nn.Module` (its `state_dict` is sent) or a dict of tensors; `metrics` maps names
  to floats; `config` is the round configuration from the server (e.g. ``{"proximal_mu": 0.01}`` for FedProx).
* External scripts (`train_script`, `test_script`), see :func:`run_script` for the contract.
* A subclass overriding the handlers `init_training`, `start_training`, `start_testing`, `start_swag`,
  `end_training` and `unknown_message`.

Work arrives in one of two ways, both ending in :meth:`Participant.handle`:

* push: :meth:`Participant.serve` runs a small HTTP server on the user's `message_endpoint`;
* pull: :meth:`Participant.pull` long-polls ``GET /api/trainings/<id>/events/``.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import hmac
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fl_client import _http
from fl_client.api import ApiClient
from fl_client.communication import ENV_AUTH, ENV_CLIENT_ID, ENV_ROUND_CONFIG, Communication
from fl_client.exceptions import ServerRequestException

log = logging.getLogger(__name__)

TRAINING_START = "TRAINING_START"
UPDATE_ROUND_START = "UPDATE_ROUND_START"
SWAG_ROUND_START = "SWAG_ROUND_START"
MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
TRAINING_FINISHED = "TRAINING_FINISHED"
CLIENT_REMOVED = "CLIENT_REMOVED"
WORK_TYPES = frozenset({UPDATE_ROUND_START, SWAG_ROUND_START, MODEL_TEST_ROUND})
"""Notifications that ask the client to do something for the current round."""

MAX_NOTIFICATION_BYTES = 1 << 20
SEEN_EVENT_IDS = 10_000
IDLE_POLL_SECONDS = 0.5

TrainFn = Callable[[Any, int, dict[str, Any]], tuple[Any, Mapping[str, float], int]]
TestFn = Callable[[Any, int], Mapping[str, float]]
SwagFn = Callable[[Any, int, dict[str, Any]], tuple[Any, Any, int]]
Job = Callable[[], None]


class ScriptFailedError(RuntimeError):
    """An external training or test script exited with a non-zero status."""


def sign(raw_body: bytes, secret: str | bytes) -> str:
    """The `X-FL-Signature` value of a body: ``sha256=<hex HMAC-SHA256>``."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, raw_body, hashlib.sha256).hexdigest()


def verify_signature(raw_body: bytes, signature: str | None, secret: str | bytes) -> bool:
    """Whether `signature` is the valid `X-FL-Signature` of the raw body (constant-time comparison)."""
    return bool(signature) and hmac.compare_digest(sign(raw_body, secret), str(signature).strip())


def run_script(
    script: str | os.PathLike[str],
    *,
    training_id: str,
    round: int,
    model_id: str,
    server_url: str,
    client_id: str,
    http_authorization: str,
    config: Mapping[str, Any] | None = None,
    timeout: float | None = None,
) -> None:
    """Run an external training or test script and wait for it.

    The contract: the script is run as ``sys.executable SCRIPT --training-id T --round R --model-id M
    --server-url URL --client-id C`` with the environment variables `FL_CLIENT_AUTH` (the `Authorization`
    header value), `FL_SERVER_URL`, `FL_CLIENT_ID` and `FL_ROUND_CONFIG` (the round's config as JSON).
    ``Communication.from_script_args()`` builds the script's `Communication` from exactly these. A training
    script downloads the model, trains and calls `upload_model`; a test script downloads, tests and calls
    `upload_metrics`. Exit status 0 means success; anything else raises :class:`ScriptFailedError`.
    """
    command = [
        sys.executable, str(script),
        "--training-id", str(training_id),
        "--round", str(round),
        "--model-id", str(model_id),
        "--server-url", server_url,
        "--client-id", str(client_id),
    ]  # fmt: skip
    env = {
        **os.environ,
        ENV_AUTH: http_authorization,
        "FL_SERVER_URL": server_url,
        ENV_CLIENT_ID: str(client_id),
        ENV_ROUND_CONFIG: json.dumps(dict(config or {})),
    }
    log.info("running %s for training %s round %s", script, training_id, round)
    try:
        completed = subprocess.run(command, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ScriptFailedError(f"{script} did not finish within {timeout:g} s") from exc
    if completed.returncode != 0:
        raise ScriptFailedError(f"{script} exited with status {completed.returncode}")


class Participant:
    """A client taking part in trainings: runs the user's code for the notifications it receives."""

    def __init__(
        self,
        server_url: str | None = None,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        http_authorization: str | None = None,
        train: TrainFn | None = None,
        test: TestFn | None = None,
        swag: SwagFn | None = None,
        train_script: str | os.PathLike[str] | None = None,
        test_script: str | os.PathLike[str] | None = None,
        script_timeout: float | None = None,
        client_id: str | None = None,
        progress: bool = False,
    ) -> None:
        """Create a participant.

        Args:
            server_url: server base URL; default `FL_SERVER_URL`, else `http://127.0.0.1:8000`.
            token: API token; or `username` and `password`; or a ready `http_authorization` header value.
            train, test, swag: the user's code as callables (see the module documentation).
            train_script, test_script: the user's code as external scripts (see :func:`run_script`).
            script_timeout: seconds a script may run (None: no limit).
            client_id: the user's id (looked up with `GET /api/users/myself/` when omitted).
            progress: show progress bars for model transfers.
        """
        if http_authorization is None:
            if token:
                http_authorization = _http.token_authorization(token)
            elif username is not None and password is not None:
                http_authorization = _http.basic_authorization(username, password)
            else:
                raise ValueError("credentials missing: pass token, username and password, or http_authorization")
        if train is not None and train_script is not None:
            raise ValueError("pass either train or train_script, not both")
        if test is not None and test_script is not None:
            raise ValueError("pass either test or test_script, not both")
        self.server_url = _http.normalize_server_url(server_url)
        self.http_authorization = http_authorization
        self.api = ApiClient(self.server_url, http_authorization)
        self.train = train
        self.test = test
        self.swag = swag
        self.train_script = Path(train_script) if train_script is not None else None
        self.test_script = Path(test_script) if test_script is not None else None
        self.script_timeout = script_timeout
        self.progress = progress
        self._client_id = client_id
        self._lock = threading.Lock()
        self.finished_trainings: set[str] = set()
        """Trainings this participant saw finish."""
        if not self.can_train():
            raise ValueError("no training code: pass train or train_script (or override start_training)")

    # identity and capabilities

    @property
    def client_id(self) -> str:
        """The user's id (looked up once from the server)."""
        with self._lock:
            if self._client_id is None:
                self._client_id = str(self.api.myself()["id"])
            return self._client_id

    def _overrides(self, name: str) -> bool:
        return getattr(type(self), name) is not getattr(Participant, name)

    def can_train(self) -> bool:
        """Whether update rounds can be served."""
        return self.train is not None or self.train_script is not None or self._overrides("start_training")

    def can_test(self) -> bool:
        """Whether model-test rounds can be served."""
        return self.test is not None or self.test_script is not None or self._overrides("start_testing")

    def can_swag(self) -> bool:
        """Whether SWAG rounds can be served."""
        return self.swag is not None or self._overrides("start_swag")

    def communication(self, training_id: str, round: int, model_id: str) -> Communication:
        """A `Communication` for one round."""
        return Communication(self.client_id, training_id, round, model_id, self.http_authorization, self.server_url)

    def _script(self, script: Path, training_id: str, round: int, model_id: str, config: Mapping[str, Any]) -> None:
        run_script(
            script,
            training_id=training_id,
            round=round,
            model_id=model_id,
            server_url=self.server_url,
            client_id=self.client_id,
            http_authorization=self.http_authorization,
            config=config,
            timeout=self.script_timeout,
        )

    # handlers (override in a subclass, or pass callables / scripts)

    def init_training(self, training_id: str, model_id: str) -> None:
        """The training started (`TRAINING_START`); prepare data, caches, etc."""
        log.info("training %s started with global model %s", training_id, model_id)

    def start_training(
        self, training_id: str, round: int, model_id: str, config: Mapping[str, Any] | None = None
    ) -> None:
        """Train one update round: download `model_id`, train, upload the update to `model_id` for `round`."""
        config = dict(config or {})
        if self.train_script is not None:
            self._script(self.train_script, training_id, round, model_id, config)
            return
        if self.train is None:
            raise RuntimeError("no training code configured")
        comm = self.communication(training_id, round, model_id)
        model = comm.download_model(progress=self.progress)
        result = self.train(model, round, config)
        if not isinstance(result, tuple) or len(result) != 3:
            raise TypeError("train must return (model, metrics, sample_size)")
        trained, metrics, sample_size = result
        comm.upload_model(trained, metrics, sample_size, progress=self.progress)

    def start_testing(self, training_id: str, round: int, model_id: str) -> None:
        """Test the global model: download `model_id`, test, upload the metrics."""
        if self.test_script is not None:
            self._script(self.test_script, training_id, round, model_id, {})
            return
        if self.test is None:
            raise RuntimeError("no test code configured")
        comm = self.communication(training_id, round, model_id)
        metrics = self.test(comm.download_model(progress=self.progress), round)
        comm.upload_metrics(metrics)

    def start_swag(self, training_id: str, round: int, model_id: str, config: Mapping[str, Any] | None = None) -> None:
        """A SWAG round: download `model_id`, compute the moments, upload them."""
        if self.swag is None:
            raise RuntimeError("no SWAG code configured")
        comm = self.communication(training_id, round, model_id)
        first, second, sample_size = self.swag(comm.download_model(progress=self.progress), round, dict(config or {}))
        comm.upload_swag(first, second, sample_size)

    def end_training(self, training_id: str, model_id: str) -> None:
        """The training finished (completed or failed); clean up."""
        log.info("training %s finished (global model %s)", training_id, model_id)

    def unknown_message(self, message_type: str, training_id: str, data: Any) -> int:
        """A notification without a handler; returns the HTTP status to answer.

        Work this participant cannot do (a SWAG round without `swag`, a test round without test code) is
        declined with 400, which makes the server remove the client from the training instead of waiting
        for it. Anything else (`CLIENT_REMOVED`, types added to the protocol later) is acknowledged with 200.
        """
        if message_type in WORK_TYPES:
            log.warning("declining %s of training %s: no code for it", message_type, training_id)
            return 400
        log.info("ignoring %s of training %s: %s", message_type, training_id, data)
        return 200

    # dispatch

    def plan(self, notification: Any) -> tuple[int, Job | None]:
        """Decide quickly how to answer a notification: the HTTP status, and the work to run (if any)."""
        if not isinstance(notification, dict):
            return 400, None
        ntype = notification.get("notification_type")
        training_id = notification.get("training_uuid")
        body = notification.get("body") or {}
        if not isinstance(ntype, str) or not training_id or not isinstance(body, dict):
            return 400, None
        training_id = str(training_id)
        model_id = body.get("global_model_uuid")
        if ntype == TRAINING_START:
            return 200, functools.partial(self.init_training, training_id, str(model_id or ""))
        if ntype == TRAINING_FINISHED:
            return 200, functools.partial(self._finished, training_id, str(model_id or ""), body)
        if ntype in WORK_TYPES:
            round_number = body.get("round")
            if not model_id or isinstance(round_number, bool) or not isinstance(round_number, int):
                log.warning("malformed %s notification: %s", ntype, body)
                return 400, None
            config = body.get("config") if isinstance(body.get("config"), dict) else {}
            if ntype == UPDATE_ROUND_START and self.can_train():
                return 200, functools.partial(self.start_training, training_id, round_number, str(model_id), config)
            if ntype == MODEL_TEST_ROUND and self.can_test():
                return 200, functools.partial(self.start_testing, training_id, round_number, str(model_id))
            if ntype == SWAG_ROUND_START and self.can_swag():
                return 200, functools.partial(self.start_swag, training_id, round_number, str(model_id), config)
        return self.unknown_message(ntype, training_id, body), None

    def handle(self, notification: Any) -> int:
        """Handle one notification synchronously; returns the HTTP status (200, 4xx declines, 500 failed)."""
        status, job = self.plan(notification)
        if job is not None:
            try:
                job()
            except Exception:
                log.exception("handling %s failed", notification.get("notification_type"))
                return 500
        return status

    def _removed_me(self, event: Mapping[str, Any]) -> bool:
        body = event.get("body") if isinstance(event.get("body"), dict) else {}
        removed = body.get("client_uuid")
        return removed is None or str(removed) == self.client_id

    def _finished(self, training_id: str, model_id: str, body: Mapping[str, Any]) -> None:
        if body.get("status") == "error":
            log.warning("training %s failed: %s", training_id, body.get("reason"))
        try:
            self.end_training(training_id, model_id)
        finally:
            self.finished_trainings.add(training_id)

    # receiving work

    def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        secret: str | bytes | None = None,
        *,
        stop_after_finished: bool = True,
        training_id: str | None = None,
    ) -> NotificationServer:
        """Receive notifications on HTTP (the user's `message_endpoint`); returns the running server.

        Requests are answered at once (200, or 4xx to decline) and the work runs on one worker thread, in
        order, so the FL server is never blocked. With `secret` (the server's `FL_NOTIFICATION_SECRET`) an
        invalid `X-FL-Signature` is answered 401. A repeated `X-FL-Event-Id` is acknowledged and ignored.
        With `stop_after_finished`, the server stops after `TRAINING_FINISHED` (of `training_id`, or of any
        training when it is None).
        """
        return NotificationServer(self, host, port, secret, stop_after_finished, training_id)

    def pull(
        self,
        training_id: str,
        wait: float = 10.0,
        stop_after_finished: bool = True,
        *,
        after: int = 0,
        timeout: float | None = None,
        max_errors: int = 10,
        max_backoff: float = 10.0,
    ) -> int:
        """Fetch and handle the training's notifications from the events endpoint; returns the last `seq`.

        Long-polls ``GET /api/trainings/<id>/events/?after=<seq>&wait=<wait>``, remembering the last `seq`.
        Connection failures, 5xx, 408 and 429 answers are retried with exponential back-off (up to `max_backoff`
        seconds); after `max_errors` consecutive failures, or at once for other 4xx answers, the last error is
        raised. A round notification followed by a newer one in the same batch is skipped (its round is
        over). Stops after `TRAINING_FINISHED` when `stop_after_finished`, and when this client was removed
        from the training (`CLIENT_REMOVED`); raises `TimeoutError` after `timeout` seconds (None: no limit).
        """
        deadline = time.monotonic() + timeout if timeout is not None else None
        last_seq = after
        errors = 0
        while True:
            remaining = deadline - time.monotonic() if deadline is not None else None
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"training {training_id}: no TRAINING_FINISHED within {timeout:g} s")
            poll_wait = max(0.0, min(wait, remaining)) if remaining is not None else wait
            try:
                events = self.api.events(training_id, after=last_seq, wait=poll_wait)
            except ServerRequestException as exc:
                if exc.status_code is not None and 400 <= exc.status_code < 500 and exc.status_code not in (408, 429):
                    raise
                errors += 1
                if errors >= max_errors:
                    raise
                delay = min(max_backoff, 0.5 * 2 ** (errors - 1))
                if remaining is not None:
                    delay = min(delay, max(0.0, remaining))
                log.warning("event poll failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                continue
            errors = 0
            if not events and poll_wait < IDLE_POLL_SECONDS:  # no long poll: do not hammer the server
                time.sleep(min(IDLE_POLL_SECONDS, remaining) if remaining is not None else IDLE_POLL_SECONDS)
            for index, event in enumerate(events):
                last_seq = max(last_seq, int(event.get("seq", last_seq)))
                ntype = event.get("notification_type")
                if ntype in WORK_TYPES and any(
                    later.get("notification_type") in WORK_TYPES | {TRAINING_FINISHED} for later in events[index + 1 :]
                ):
                    log.info("skipping %s seq %s: a newer round was announced", ntype, event.get("seq"))
                    continue
                self.handle(event)
                if ntype == TRAINING_FINISHED and stop_after_finished:
                    return last_seq
                if ntype == CLIENT_REMOVED and self._removed_me(event):
                    log.warning("removed from training %s: %s", training_id, (event.get("body") or {}).get("reason"))
                    return last_seq


class NotificationServer:
    """The HTTP server of :meth:`Participant.serve`: `url`, `wait()`, `shutdown()`; usable as a context manager."""

    def __init__(
        self,
        participant: Participant,
        host: str,
        port: int,
        secret: str | bytes | None,
        stop_after_finished: bool,
        training_id: str | None,
    ) -> None:
        self.participant = participant
        self.secret = secret
        self.stop_after_finished = stop_after_finished
        self.training_id = str(training_id) if training_id is not None else None
        self.finished = threading.Event()
        """Set once `TRAINING_FINISHED` (of `training_id`, or any) was handled."""
        self._seen: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._seen_lock = threading.Lock()
        self._jobs: queue.Queue[tuple[dict[str, Any], Job] | None] = queue.Queue()
        self._closed = False
        self._close_lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), _NotificationHandler)
        self._httpd.daemon_threads = True
        self._httpd.notification_server = self  # type: ignore[attr-defined]
        bound_host, bound_port = self._httpd.server_address[:2]
        self.host = "127.0.0.1" if bound_host in ("0.0.0.0", "") else str(bound_host)
        self.port = int(bound_port)
        self._serve_thread = threading.Thread(target=self._httpd.serve_forever, name="fl-client-http", daemon=True)
        self._worker = threading.Thread(target=self._work, name="fl-client-worker", daemon=True)
        self._serve_thread.start()
        self._worker.start()

    @property
    def url(self) -> str:
        """The endpoint URL to register as the user's `message_endpoint`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def receive(self, raw: bytes, signature: str | None, event_id: str | None) -> tuple[int, str]:
        """Check, deduplicate and queue one delivery; returns the HTTP status and a message."""
        if self.secret is not None and not verify_signature(raw, signature, self.secret):
            return 401, "Invalid or missing X-FL-Signature."
        try:
            notification = json.loads(raw)
        except ValueError:
            return 400, "The body is not JSON."
        with self._seen_lock:
            if event_id and event_id in self._seen:
                return 200, "Duplicate event ignored."
            status, job = self.participant.plan(notification)
            if 200 <= status < 300:
                if event_id:
                    self._seen[event_id] = None
                    while len(self._seen) > SEEN_EVENT_IDS:
                        self._seen.popitem(last=False)
                if job is not None:
                    self._jobs.put((notification, job))
        return status, "Accepted." if 200 <= status < 300 else "Declined."

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            notification, job = item
            try:
                job()
            except Exception:
                log.exception("handling %s failed", notification.get("notification_type"))
            if notification.get("notification_type") == TRAINING_FINISHED and self.training_id in (
                None,
                str(notification.get("training_uuid")),
            ):
                self.finished.set()
                if self.stop_after_finished:
                    self.shutdown()
                    return

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the training finished; False on timeout."""
        return self.finished.wait(timeout)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop receiving and stop the worker (idempotent; a running job gets `timeout` seconds to end)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._jobs.put(None)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)

    def __enter__(self) -> NotificationServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()


class _NotificationHandler(BaseHTTPRequestHandler):
    """POST: a notification; GET: a liveness answer."""

    server_version = "fl-client"

    def _answer(self, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        """Receive a notification."""
        owner: NotificationServer = self.server.notification_server  # type: ignore[attr-defined]
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_NOTIFICATION_BYTES:
            self.close_connection = True
            self._answer(413 if length > 0 else 400, "Missing or too large body.")
            return
        raw = self.rfile.read(length)
        status, detail = owner.receive(raw, self.headers.get("X-FL-Signature"), self.headers.get("X-FL-Event-Id"))
        self._answer(status, detail)

    def do_GET(self) -> None:
        """Answer a liveness check."""
        self._answer(200, "fl_client participant")

    def log_message(self, format: str, *args: Any) -> None:
        """Log requests at debug level instead of printing them."""
        log.debug("%s " + format, self.address_string(), *args)
