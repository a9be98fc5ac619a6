"""Fixtures of the integration suite: the real server over HTTP, and with PostgreSQL a real Celery worker.

Two modes, picked from the environment:

- **worker** (``DATABASE_URL`` names PostgreSQL): ``manage.py runserver`` with the production
  profile, a ``celery worker --pool=solo`` and a ``celery beat`` (the periodic check), all on the
  test database pytest-django created, a broker of their own and one filesystem model store in a
  temporary directory. The broker is a private ``redis-server`` per xdist worker when the binary is
  on the PATH (a test can stop and restart it without disturbing the others); otherwise, or when
  ``FL_IT_REDIS_URL`` names a Redis, a database of that shared Redis (claimed per xdist worker and
  flushed).
- **embedded** (SQLite, the default ``make test``): ``manage.py runserver`` with the embedded
  profile on a SQLite file: tasks run on the server's background threads and the periodic check in
  process, exactly as ``make run`` runs.

Every test is marked ``integration`` (deselect with ``-m "not integration"``). The worker-mode-only
tests skip in embedded mode with the reason.

Why a ``runserver`` subprocess rather than pytest-django's ``live_server``: on in-memory SQLite,
``live_server`` hands one sqlite3 connection object to every request thread
(``LiveServerThread.connections_override``), so concurrent requests run inside each other's
transactions (Django's ``in_atomic_block`` state is per connection object) while the background
task threads open separate shared-cache connections with table-level locking. Checked: four
concurrent uploads through ``live_server`` got three 500s ("database table is locked"), so the
concurrency tests would exercise Django's test harness instead of the server. A subprocess is the server
as deployed (own connections per thread, a SQLite file or PostgreSQL), its configuration comes from
environment variables only (the test process's settings and Celery app stay untouched for the other
tests of the same xdist worker), and it can be killed and restarted like a real one. The price is a
few seconds of start-up per xdist worker.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.integration.harness import HTTP_TIMEOUT, Account, Api, Database, RedisBroker, SimClient, Stack

REDIS_URL = os.environ.get("FL_IT_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_SERVER = None if os.environ.get("FL_IT_REDIS_URL") else shutil.which("redis-server")
REDIS_CLAIM_KEY = "fl-integration-suite-owner"


def is_worker_mode() -> bool:
    """Whether the suite runs against PostgreSQL with a Celery worker."""
    return os.environ.get("DATABASE_URL", "").startswith(("postgres://", "postgresql://", "pgsql://"))


def _claim_redis_db() -> tuple[Any, int]:
    """A Redis database of this xdist worker alone: preferred by worker id, claimed with an expiring key."""
    import redis

    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw-1")
    preferred = 9 + int(worker[2:]) if worker[2:].lstrip("-").isdigit() else 8
    owner = f"{os.getpid()}-{secrets.token_hex(4)}"
    for db in [preferred, *range(15, 7, -1)]:
        if not 0 <= db <= 15:
            continue
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}", socket_timeout=5)
        if client.set(REDIS_CLAIM_KEY, owner, nx=True, ex=1800) or _claimed_by_dead_process(
            client.get(REDIS_CLAIM_KEY)
        ):
            client.flushdb()
            client.set(REDIS_CLAIM_KEY, owner, ex=1800)
            return client, db
        client.close()
    raise RuntimeError("no free Redis database among 8..15 for the integration suite")


def _claimed_by_dead_process(owner: bytes | None) -> bool:
    """Whether a claim was left by a test process of this machine that no longer runs (killed)."""
    try:
        pid = int((owner or b"").split(b"-")[0])
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (ValueError, PermissionError):
        return False
    return False


def _postgres_url(settings_dict: dict[str, Any]) -> str:
    quote = urllib.parse.quote
    auth = quote(settings_dict.get("USER") or "")
    if settings_dict.get("PASSWORD"):
        auth += ":" + quote(settings_dict["PASSWORD"])
    host = settings_dict.get("HOST") or "127.0.0.1"
    port = settings_dict.get("PORT") or "5432"
    return f"postgres://{auth}@{host}:{port}/{quote(settings_dict['NAME'])}"


def _base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "FL_", "CELERY_", "DJANGO_"))}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "SECRET_KEY": "integration-" + secrets.token_hex(16),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "FL_DATA_DIR": str(tmp / "data"),
            "FL_MODEL_STORE": "filesystem",
            "FL_MODEL_STORE_PATH": str(tmp / "store"),
            "FL_NOTIFICATION_SECRET": "it-" + secrets.token_hex(16),
            "FL_NOTIFICATION_TIMEOUT_SECONDS": "5",
            "FL_NOTIFICATION_BACKOFF_SECONDS": "0.2",
            "FL_TICK_SECONDS": "0.5",
            "FL_OPEN_REGISTRATION": "true",
            "LOG_LEVEL": "INFO",
            # The server pushes notifications to 127.0.0.1: never through a proxy from the environment.
            "NO_PROXY": ",".join(filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost"])),
            "no_proxy": ",".join(filter(None, [os.environ.get("no_proxy", ""), "127.0.0.1,localhost"])),
        }
    )
    return env


@pytest.fixture(scope="session")
def fl_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The running server stack of this xdist worker (started on first use, stopped at the end)."""
    tmp = tmp_path_factory.mktemp("fl-integration")
    (tmp / "data").mkdir()
    env = _base_env(tmp)
    redis_client = None
    broker = None
    if is_worker_mode():
        request.getfixturevalue("django_db_setup")  # the test database exists and is migrated
        from django.conf import settings

        settings_dict = settings.DATABASES["default"]
        if REDIS_SERVER:
            broker = RedisBroker(REDIS_SERVER, tmp, env).start()
            broker_url = broker.url
        else:
            try:
                redis_client, db_number = _claim_redis_db()
            except Exception as error:
                pytest.skip(f"worker mode needs Redis at {REDIS_URL}: {type(error).__name__}: {error}")
            broker_url = f"{REDIS_URL}/{db_number}"
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "fl_server.settings.production",
                "DATABASE_URL": _postgres_url(settings_dict),
                "CELERY_BROKER_URL": broker_url,
                "CELERY_RESULT_BACKEND": broker_url,
                "CELERY_TASK_ALWAYS_EAGER": "false",
                # inference inputs of more than 100 values run on the worker
                "FL_INFERENCE_WORKER_THRESHOLD": "100",
                "FL_INPROCESS_TASKS_ASYNC": "false",
                "FL_INPROCESS_SCHEDULER": "false",
                # A round left CLOSING this long (its worker was killed) is aggregated again.
                "FL_CLOSING_RETRY_SECONDS": "2",
            }
        )
        pg = {
            "dbname": settings_dict["NAME"],
            "user": settings_dict.get("USER") or None,
            "password": settings_dict.get("PASSWORD") or None,
            "host": settings_dict.get("HOST") or "127.0.0.1",
            "port": settings_dict.get("PORT") or "5432",
        }
        stack = Stack("worker", tmp, env, Database("postgresql", pg=pg), broker)
    else:
        sqlite_path = tmp / "data" / "db.sqlite3"
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "fl_server.settings.embedded",
                "DATABASE_URL": f"sqlite:///{sqlite_path}",
                "CELERY_TASK_ALWAYS_EAGER": "true",
                "FL_INPROCESS_TASKS_ASYNC": "true",
                "FL_INPROCESS_SCHEDULER": "true",
            }
        )
        stack = Stack("embedded", tmp, env, Database("sqlite", sqlite_path=str(sqlite_path)))
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        if redis_client is not None:
            redis_client.flushdb()
            redis_client.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can tell whether the test failed."""
    report = yield
    setattr(item, f"fl_report_{report.when}", report)
    return report


class Session:
    """One test's view of the stack: API access, an actor, and the simulated clients it made."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.api = Api(stack.url)
        # Registration hashes a password (about 0.6 s of server CPU each): accounts are made in parallel.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fl-it-register")
        self._actor = self._pool.submit(self.api.register, f"actor-{secrets.token_hex(5)}", actor=True)
        self.clients: list[SimClient] = []
        self.trainings: list[str] = []

    @property
    def actor(self) -> Account:
        """The user who runs the test's trainings."""
        return self._actor.result(timeout=HTTP_TIMEOUT)

    @property
    def db(self) -> Database:
        """Read-only SQL on the server's database."""
        return self.stack.db

    def client(self, **kwargs: Any) -> SimClient:
        """A new simulated client (see SimClient)."""
        return self.make_clients(kwargs)[0]

    def make_clients(self, *specs: dict[str, Any]) -> list[SimClient]:
        """New simulated clients, one per keyword dict (see SimClient), registered in parallel."""
        first = len(self.clients)
        futures = [
            self._pool.submit(SimClient, self.api, self.stack.secret, first + n, **spec) for n, spec in enumerate(specs)
        ]
        made = [future.result(timeout=HTTP_TIMEOUT) for future in futures]
        self.clients.extend(made)
        return made

    def training(self, model_id: str, clients: list[SimClient], **fields: Any) -> str:
        """Create a training of `model_id` with `clients` (not started)."""
        training_id = self.api.create_training(self.actor, model_id, [c.account for c in clients], **fields)
        self.trainings.append(training_id)
        return training_id

    def close(self) -> None:
        """Stop the clients; abort trainings a failed test left running (keeps the server quiet)."""
        self._pool.shutdown(wait=True)
        for client in self.clients:
            client.stop()
        for training_id in self.trainings:
            with contextlib.suppress(Exception):  # best effort: the test's outcome is already decided
                self.api.call("POST", f"/trainings/{training_id}/abort/", self.actor)


if is_worker_mode():

    @pytest.fixture
    def fl_database(transactional_db: None) -> None:
        """The server's database is the test database: flushed after each test (so other tests see it empty).

        Requested statically, so that pytest-django creates the test database even when only this
        suite runs.
        """

else:

    @pytest.fixture
    def fl_database() -> None:
        """The server has a SQLite file of its own; tests share it (every test makes its own users)."""


@pytest.fixture
def fl(fl_database: None, fl_stack: Stack, request: pytest.FixtureRequest) -> Iterator[Session]:
    """A fresh session on the running stack."""
    fl_stack.ensure_running()
    session = Session(fl_stack)
    yield session
    session.close()
    report = getattr(request.node, "fl_report_call", None)
    if report is not None and report.failed:
        print(f"\nintegration stack ({fl_stack.mode} mode) logs:\n{fl_stack.logs()}")
