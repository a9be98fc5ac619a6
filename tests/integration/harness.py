"""Support code of the integration suite: the server stack as real processes, and simulated FL clients.

The server, the Celery worker and Celery beat (and their private Redis broker) are separate processes
and everything goes over HTTP (plus read-only SQL for the few facts the API does not expose, such as
how many weight versions a round left). The only server code used in the test process is the pure
reference `weighted_mean`. For fault injection a test can stop the broker, put a proxy between a
server and PostgreSQL (`PostgresProxy`), and give clients endpoints that hang or refuse connections.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fl_server_ai.aggregation import weighted_mean

REPO = Path(__file__).resolve().parents[2]
HTTP_TIMEOUT = 30.0
# Upper bound for anything a test waits for; a healthy stack needs a few seconds at most.
WAIT_SECONDS = 60.0

# Runs in the child before exec: the child gets SIGTERM when the test process dies (no orphaned servers).
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(os.environ['FL_IT_PARENT_PID']):\n"
    "    sys.exit(1)  # the test process died before prctl took effect\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """The first truthy value of `predicate()`; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


_local = threading.local()


def http() -> requests.Session:
    """This thread's HTTP session; proxies from the environment are ignored (everything is on 127.0.0.1)."""
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.trust_env = False
    return session


def brief(response: requests.Response) -> str:
    """Status and a short reason of a response (the JSON detail, or the title of an HTML error page)."""
    text = response.text
    if "<title>" in text:
        text = " ".join(text.split("<title>", 1)[1].split("</title>", 1)[0].split())
    return f"{response.status_code} {text[:300]}"


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# Processes


class Service:
    """One subprocess (server, Celery worker, Celery beat) with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.argv, self.env, self.log_path = name, argv, env, log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: Callable[[], None] = lambda: None  # waits until the started process serves

    def start(self) -> Service:
        """Start the process (its output goes to the log file)."""
        env = {**self.env, "FL_IT_PARENT_PID": str(os.getpid())}
        with open(self.log_path, "ab") as log:
            log.write(f"\n----- start {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, *self.argv],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        """Whether the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        """The last lines of the log, without the periodic check's routine lines."""
        kept = [line for line in self.log_text().splitlines() if "fl_server_ai.tasks.tick" not in line]
        return "\n".join(kept[-lines:])

    def wait_for_log(self, text: str, timeout: float, since: int = 0) -> None:
        """Wait until the log (after offset `since`) contains `text`; fail early if the process exits."""

        def ready() -> bool:
            if text in self.log_text()[since:]:
                return True
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc and self.proc.returncode}:\n{self.tail()}")
            return False

        wait_until(ready, timeout, f"{self.name} to log {text!r}", interval=0.1)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout` seconds; always reaps the process."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """SIGKILL (a crash), then reap."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class RedisBroker(Service):
    """A private `redis-server` without persistence, the broker of one stack: a test may stop and restart it.

    A restart loses whatever the broker held (queued tasks, results), like a crashed broker.
    """

    READY = "Ready to accept connections"

    def __init__(self, binary: str, tmp: Path, env: dict[str, str]) -> None:
        self.binary, self.dir, self.port = binary, tmp, 0
        super().__init__("redis broker", [], env, tmp / "redis.log")

    @property
    def url(self) -> str:
        """The broker's URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisBroker:
        """Start (on a free port, or again on its port after a stop) and wait until it accepts connections."""
        restart = self.port != 0  # the stack knows this port: it must not change
        for _attempt in range(1 if restart else 3):
            self.port = self.port or free_port()
            self.argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            self.argv += ["--appendonly", "no", "--dir", str(self.dir)]
            offset = len(self.log_text())
            super().start()
            try:
                self.wait_for_log(self.READY, 30, since=offset)
                return self
            except RuntimeError:  # the port was taken meanwhile: try another
                if restart:
                    raise
                self.port = 0
        raise RuntimeError(f"the Redis broker did not start:\n{self.tail()}")


def _read_exactly(stream: io.BufferedReader, size: int) -> bytes:
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return data


class PostgresProxy:
    """A TCP proxy in front of PostgreSQL that can drop a connection right after a COMMIT went through.

    Once armed (`cut_next_commit`), the next COMMIT a client sends is passed on, PostgreSQL's answer is
    awaited (the transaction is committed) and held back, and both sides are closed: the client sees its
    connection drop during COMMIT and cannot tell whether it committed. It reads the client's messages,
    so clients must connect unencrypted (`sslmode=disable`, `gssencmode=disable`).
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()  # set once a connection was dropped after its COMMIT
        threading.Thread(target=self._accept, name="fl-it-pg-proxy", daemon=True).start()

    def cut_next_commit(self) -> None:
        """Arm: drop the connection that sends the next COMMIT, after PostgreSQL executed it."""
        self.cut.clear()
        self.armed.set()

    def close(self) -> None:
        """Accept no more connections (those open end with their clients)."""
        self.listener.close()

    def _accept(self) -> None:
        """Connect each client to PostgreSQL through two forwarding threads."""
        while True:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
            except OSError:
                return
            held = threading.Event()
            threading.Thread(target=self._forward_client, args=(client, server, held), daemon=True).start()
            threading.Thread(target=self._forward_server, args=(server, client, held), daemon=True).start()

    def _forward_client(self, client: socket.socket, server: socket.socket, held: threading.Event) -> None:
        """Pass the client's messages on, one by one (type byte, length, payload; the startup message has no type)."""
        try:
            with client.makefile("rb") as stream:
                size = _read_exactly(stream, 4)
                server.sendall(size + _read_exactly(stream, int.from_bytes(size, "big") - 4))
                while True:
                    head = _read_exactly(stream, 5)
                    body = _read_exactly(stream, int.from_bytes(head[1:], "big") - 4)
                    if head[:1] == b"Q" and body.startswith(b"COMMIT") and self.armed.is_set():
                        self.armed.clear()
                        held.set()  # before sending: everything PostgreSQL answers from now on is held back
                    server.sendall(head + body)
        except (OSError, EOFError, ValueError):
            pass
        finally:
            self._close(client, server)

    def _forward_server(self, server: socket.socket, client: socket.socket, held: threading.Event) -> None:
        """Pass PostgreSQL's answers on, except the answer to an armed COMMIT: then close both sides."""
        answer = b""
        try:
            while data := server.recv(65536):
                if not held.is_set():
                    client.sendall(data)
                    continue
                answer += data
                if b"Z\x00\x00\x00\x05" in answer:  # ReadyForQuery: the COMMIT is done
                    self.cut.set()
                    return
        except OSError:
            pass
        finally:
            self._close(client, server)

    @staticmethod
    def _close(*sockets: socket.socket) -> None:
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


@dataclass
class Database:
    """Read-only SQL access to the server's database, for facts the API does not expose."""

    vendor: str  # "sqlite" or "postgresql"
    sqlite_path: str = ""
    pg: dict[str, Any] = field(default_factory=dict)

    def connect(self) -> Any:
        """A new DB-API connection (the caller closes it)."""
        if self.vendor == "sqlite":
            return sqlite3.connect(self.sqlite_path, timeout=30)
        import psycopg2

        return psycopg2.connect(**self.pg)

    def uuid_param(self, value: str) -> str:
        """A uuid as Django stores it (SQLite: 32 hex digits; PostgreSQL: the uuid type)."""
        return uuid.UUID(str(value)).hex if self.vendor == "sqlite" else str(uuid.UUID(str(value)))

    def rows(self, query: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query (`%s` placeholders) and return its rows."""
        if self.vendor == "sqlite":
            query = query.replace("%s", "?")
        conn = self.connect()
        try:
            cursor = conn.cursor()
            cursor.execute(query, tuple(params))
            return list(cursor.fetchall())
        finally:
            conn.close()

    def blob_keys(self) -> set[str]:
        """Keys of every `Blob` row (the model-store objects the database knows)."""
        return {key for (key,) in self.rows("SELECT key FROM fl_server_core_blob")}

    def weight_versions(self, model_id: str) -> dict[int, int]:
        """Round -> number of WeightsVersion rows of a global model."""
        found = self.rows(
            "SELECT round, COUNT(*) FROM fl_server_core_weightsversion WHERE model_id = %s GROUP BY round",
            [self.uuid_param(model_id)],
        )
        return {int(r): int(n) for r, n in found}


class Stack:
    """The server (and in worker mode its Celery worker and beat) as real processes."""

    def __init__(
        self, mode: str, tmp: Path, env: dict[str, str], database: Database, broker: RedisBroker | None = None
    ) -> None:
        self.mode, self.tmp, self.env, self.db = mode, tmp, env, database
        self.broker = broker  # started by the caller (its URL is in `env`); stopped with the stack
        self.secret = env["FL_NOTIFICATION_SECRET"].encode()
        self.url = ""
        self.server: Service | None = None
        self.worker: Service | None = None
        self.beat: Service | None = None
        self._workers_started = 0

    @property
    def services(self) -> list[Service]:
        """The processes started so far (the broker first)."""
        return [s for s in (self.broker, self.server, self.worker, self.beat) if s is not None]

    def start(self) -> None:
        """Start everything and wait until it serves (server answers HTTP, worker is ready)."""
        if self.mode == "embedded":
            migrate = subprocess.run(
                [sys.executable, "manage.py", "migrate", "--noinput"],
                cwd=REPO,
                env=self.env,
                capture_output=True,
                timeout=180,
            )
            assert migrate.returncode == 0, migrate.stdout.decode() + migrate.stderr.decode()
        else:
            self.start_worker(wait=False)
            celery = [sys.executable, "-m", "celery", "-A", "fl_server", "beat", "--loglevel=WARNING"]
            celery += [f"--schedule={self.tmp / 'beat-schedule'}", f"--pidfile={self.tmp / 'beat.pid'}"]
            self.beat = Service("celery beat", celery, self.env, self.tmp / "beat.log").start()
        self._start_server()
        if self.worker is not None:
            self.wait_worker_ready()

    def _start_server(self) -> None:
        self.server, self.url = self._server_service("server", self.env, "server.log")

    def _server_service(self, name: str, env: dict[str, str], log_name: str) -> tuple[Service, str]:
        """A started `runserver` that answers HTTP, and its URL."""
        for _attempt in range(3):
            port = free_port()
            argv = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
            server = Service(name, argv, env, self.tmp / log_name).start()
            url = f"http://127.0.0.1:{port}"
            try:
                wait_until(lambda s=server, u=url: self._answers(s, u), 90, f"the {name} to answer HTTP", interval=0.2)
                return server, url
            except (AssertionError, RuntimeError):
                if server.alive():
                    raise
        raise RuntimeError(f"the {name} did not start:\n{server.tail()}")

    @staticmethod
    def _answers(server: Service, url: str) -> bool:
        if not server.alive():
            raise RuntimeError(f"the {server.name} exited:\n{server.tail()}")
        try:
            return http().get(f"{url}/api/users/myself/", timeout=2).status_code in (401, 403)
        except requests.RequestException:
            return False

    def extra_server(self, **env: str) -> tuple[Service, str]:
        """A second web process of the stack with some environment overridden, and its URL; the caller stops it."""
        return self._server_service("extra server", {**self.env, **env}, "server-extra.log")

    def _worker_service(self, log_name: str) -> tuple[Service, int]:
        self._workers_started += 1
        name = f"fl-it-{os.getpid()}-{self._workers_started}@%h"
        argv = [sys.executable, "-m", "celery", "-A", "fl_server", "worker", "--pool=solo", "--loglevel=INFO"]
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat", f"--hostname={name}"]
        log = self.tmp / log_name
        offset = len(log.read_text(errors="replace")) if log.exists() else 0
        return Service("celery worker", argv, self.env, log).start(), offset

    def start_worker(self, wait: bool = True) -> None:
        """Start a (new) Celery worker with the solo pool."""
        self.worker, self._worker_log_offset = self._worker_service("worker.log")
        if wait:
            self.wait_worker_ready()

    def wait_worker_ready(self) -> None:
        """Wait until the current worker consumes tasks."""
        assert self.worker is not None
        self.worker.wait_for_log(" ready.", 90, since=self._worker_log_offset)

    def extra_worker(self, wait: bool = True) -> Service:
        """A second worker (scaled out); the caller stops it. Without `wait`, `ready()` waits until it serves."""
        service, offset = self._worker_service("worker-extra.log")
        service.name = "extra celery worker"
        service.ready = lambda: service.wait_for_log(" ready.", 90, since=offset)
        if wait:
            service.ready()
        return service

    def ensure_running(self) -> None:
        """Restart whatever died (a test may have killed the worker or stopped the broker)."""
        for service in self.services:
            if not service.alive():
                if service is self.broker:
                    self.broker.start()
                elif service is self.worker:
                    self.start_worker()
                else:
                    raise RuntimeError(f"{service.name} died:\n{service.tail()}")

    def stop(self) -> None:
        """Stop every process (bounded waits)."""
        for service in reversed(self.services):
            service.stop()

    def sweep_model_store(self, grace_seconds: float = 0) -> list[str]:
        """Run `manage.py sweep_model_store` as the server would; the keys it removed."""
        argv = [sys.executable, "manage.py", "sweep_model_store", f"--grace-seconds={grace_seconds}"]
        done = subprocess.run(argv, cwd=REPO, env=self.env, capture_output=True, timeout=120)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
        lines = done.stdout.decode().splitlines()
        return [line.removeprefix("removed ") for line in lines if line.startswith("removed ")]

    def store_files(self) -> set[str]:
        """Every file in the filesystem model store, relative to its root (unfinished temp files included)."""
        root = Path(self.env["FL_MODEL_STORE_PATH"])
        return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}

    def logs(self, lines: int = 40) -> str:
        """The tails of every log, for failure reports."""
        return "\n".join(f"===== {s.name} ({s.log_path}):\n{s.tail(lines)}" for s in self.services)


# --------------------------------------------------------------------------------------------------
# HTTP


@dataclass
class Account:
    """A registered user and its token."""

    id: str
    username: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """The authorization header."""
        return {"Authorization": f"Token {self.token}"}


class Api:
    """Plain HTTP calls against the server, as a given account."""

    def __init__(self, base_url: str) -> None:
        self.base = base_url.rstrip("/") + "/api"

    def call(self, method: str, path: str, account: Account | None = None, **kwargs: Any) -> requests.Response:
        """Send a request; `path` is relative to /api."""
        headers = {**(account.headers if account else {}), **kwargs.pop("headers", {})}
        return http().request(method, self.base + path, headers=headers, timeout=HTTP_TIMEOUT, **kwargs)

    def ok(self, method: str, path: str, account: Account | None = None, status: int = 200, **kwargs: Any) -> Any:
        """Send a request, assert the status, return the JSON (or the bytes of a download)."""
        response = self.call(method, path, account, **kwargs)
        assert response.status_code == status, f"{method} {path}: {brief(response)}"
        if response.headers.get("Content-Type", "").startswith("application/json"):
            return response.json()
        return response.content

    def register(self, username: str, **fields: Any) -> Account:
        """Create a user through the open registration and return its token."""
        body = {"username": username, "password": f"pw-{uuid.uuid4().hex}", **fields}
        data = self.ok("POST", "/users/", json=body, status=201)
        return Account(id=data["id"], username=username, token=data["token"])

    def upload_model(self, actor: Account, module: torch.nn.Module) -> str:
        """Upload a TorchScript global model; its id."""
        files = {"model_file": ("model.pt", torchscript_bytes(module), "application/octet-stream")}
        data = self.ok("POST", "/models/", actor, 201, data={"name": "integration", "description": "it"}, files=files)
        return data["model_id"]

    def create_training(self, actor: Account, model_id: str, clients: list[Account], **fields: Any) -> str:
        """Create a training; its id."""
        body = {
            "model_id": model_id,
            "target_num_updates": 1,
            "metric_names": ["loss"],
            "aggregation_method": "FedAvg",
            "clients": [c.id for c in clients],
            **fields,
        }
        return self.ok("POST", "/trainings/", actor, 201, json=body)["training_id"]

    def start(self, actor: Account, training_id: str) -> None:
        """Start a training."""
        self.ok("POST", f"/trainings/{training_id}/start/", actor, 202)

    def training(self, account: Account, training_id: str) -> dict[str, Any]:
        """GET /trainings/<id>/."""
        return self.ok("GET", f"/trainings/{training_id}/", account)

    def rounds(self, account: Account, training_id: str) -> list[dict[str, Any]]:
        """GET /trainings/<id>/rounds/."""
        return self.ok("GET", f"/trainings/{training_id}/rounds/", account)

    def weights(self, account: Account, model_id: str, round_: int | None = None) -> dict[str, torch.Tensor]:
        """The model's weights as safetensors (`?round=` for a kept version)."""
        query = "?format=safetensors" + (f"&round={round_}" if round_ is not None else "")
        return dict(load_safetensors(self.ok("GET", f"/models/{model_id}/{query}", account)))

    def torchscript_weights(self, account: Account, model_id: str) -> tuple[bytes, dict[str, torch.Tensor]]:
        """The TorchScript download (what compatible clients load) and its state dict."""
        archive = self.ok("GET", f"/models/{model_id}/", account)
        module = torch.jit.load(io.BytesIO(archive))
        return archive, {k: v.detach().clone() for k, v in module.state_dict().items()}

    def upload_update(
        self, account: Account, model_id: str, round_: int, weights: dict[str, torch.Tensor], samples: int, fmt: str
    ) -> requests.Response:
        """POST a local update (`fmt`: state_dict, safetensors or torchscript)."""
        files = {"model_file": ("update.bin", update_bytes(weights, fmt), "application/octet-stream")}
        data = {"round": str(round_), "sample_size": str(samples), "metric_names": ["loss"], "metric_values": ["0.5"]}
        return self.call("POST", f"/models/{model_id}/", account, data=data, files=files)

    def wait_training(
        self,
        account: Account,
        training_id: str,
        states: Iterable[str],
        timeout: float = WAIT_SECONDS,
        check: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Poll the training until its state is one of `states`; `check()` may raise early (client errors)."""
        wanted = set(states)

        def done() -> dict[str, Any] | None:
            if check is not None:
                check()
            data = self.training(account, training_id)
            return data if data["state"] in wanted else None

        return wait_until(done, timeout, f"training {training_id} to reach state {sorted(wanted)}", interval=0.2)


# --------------------------------------------------------------------------------------------------
# Models and updates


class TinyNet(torch.nn.Module):
    """A small network with parameters and an integer buffer (BatchNorm's num_batches_tracked)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 8)
        self.norm = torch.nn.BatchNorm1d(8)
        self.fc2 = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def tiny_net(seed: int) -> TinyNet:
    """A TinyNet with reproducible weights."""
    generator = torch.Generator().manual_seed(seed)
    net = TinyNet().eval()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return net


def torchscript_bytes(module: torch.nn.Module) -> bytes:
    """A TorchScript archive of the module."""
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue()


def update_bytes(weights: dict[str, torch.Tensor], fmt: str) -> bytes:
    """An update in one of the accepted formats."""
    if fmt == "safetensors":
        return save_safetensors({k: v.contiguous() for k, v in weights.items()})
    if fmt == "torchscript":
        module = torch.jit.script(TinyNet().eval())
        with torch.no_grad():
            for name, tensor in module.state_dict().items():
                tensor.copy_(weights[name])
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        return buffer.getvalue()
    buffer = io.BytesIO()
    torch.save(weights, buffer)
    return buffer.getvalue()


FORMATS = ("state_dict", "safetensors", "torchscript")


def client_update(weights: dict[str, torch.Tensor], index: int, round_: int) -> dict[str, torch.Tensor]:
    """What client `index` "trains" in round `round_`: deterministic, distinct per client and round."""
    scale, shift = 1.0 + 0.01 * (index + 1), 0.001 * (round_ + 1) * (index + 2)
    return {k: (v * scale + shift if v.is_floating_point() else v.clone()) for k, v in weights.items()}


def sample_size(index: int, round_: int) -> int:
    """Client `index`'s number of samples in round `round_`."""
    return 10 * (index + 1) + 3 * round_


def mean_of(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The exact sample-size-weighted mean (the reference implementation)."""
    return weighted_mean([(w, float(n)) for w, n in updates], updates[0][0])


def assert_weights_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], what: str) -> None:
    """Same names, dtypes and values (float tolerance)."""
    assert sorted(actual) == sorted(expected), f"{what}: tensor names differ"
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, f"{what}: {name} has dtype {actual[name].dtype}"
        torch.testing.assert_close(
            actual[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{what}: {n}: {m}"
        )


def weights_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same values (float tolerance)."""
    return sorted(a) == sorted(b) and all(torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in a)


# --------------------------------------------------------------------------------------------------
# Simulated clients


@dataclass
class Delivery:
    """A notification a client received (pushed or pulled)."""

    payload: dict[str, Any]
    event_id: str
    signature_ok: bool
    pushed: bool
    received_at: float = 0.0  # time.monotonic() when the request came in
    answered_at: float = 0.0  # ... and when the answer went out


class Endpoint:
    """The client's `message_endpoint`: a local HTTP server that verifies signatures and records deliveries.

    `hang`: the first this many requests are recorded but never answered (a hung client): they are held
    open until the endpoint closes, so the server gives up at its timeout.
    """

    def __init__(self, secret: bytes, status: int = 200, delay: float = 0.0, hang: int = 0) -> None:
        self.secret, self.status, self.delay, self.hang = secret, status, delay, hang
        self.deliveries: list[Delivery] = []
        self.inbox: queue.Queue[Delivery] = queue.Queue()
        self.lock = threading.Lock()
        self.closed = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received_at = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(endpoint.secret, raw, hashlib.sha256).hexdigest()
                signature = self.headers.get("X-FL-Signature", "")
                try:
                    payload = json.loads(raw)
                except ValueError:
                    payload = {"unparsable": raw.decode(errors="replace")}
                event_id = self.headers.get("X-FL-Event-Id", "")
                delivery = Delivery(payload, event_id, hmac.compare_digest(signature, expected), True, received_at)
                with endpoint.lock:
                    endpoint.deliveries.append(delivery)
                    hung = endpoint.hang > 0
                    if hung:
                        endpoint.hang -= 1
                if hung:
                    endpoint.closed.wait()
                    self.close_connection = True
                    return
                time.sleep(endpoint.delay)  # a slow client
                self.send_response(endpoint.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
                delivery.answered_at = time.monotonic()
                if 200 <= endpoint.status < 300:
                    endpoint.inbox.put(delivery)  # acted upon after answering, like a real client

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="fl-it-endpoint", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        """The URL to register as message_endpoint."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/notifications/"

    def close(self) -> None:
        """Stop serving (hung requests are dropped unanswered); later connections are refused."""
        self.closed.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class SimClient:
    """A simulated FL client that reacts to notifications, pushed to its endpoint or pulled from the events API.

    behaviour: "train" (downloads, trains, uploads, reports test metrics), "silent" (receives, never uploads).
    endpoint_status, endpoint_delay, endpoint_hang: how its endpoint answers (see Endpoint).
    """

    def __init__(
        self,
        api: Api,
        secret: bytes,
        index: int,
        *,
        push: bool = True,
        behaviour: str = "train",
        endpoint_status: int = 200,
        endpoint_delay: float = 0.0,
        endpoint_hang: int = 0,
        record_global: bool = False,
    ) -> None:
        self.api, self.index, self.behaviour, self.push = api, index, behaviour, push
        self.record_global = record_global
        self.endpoint = Endpoint(secret, endpoint_status, endpoint_delay, endpoint_hang) if push else None
        fields: dict[str, Any] = {"client": True}
        if self.endpoint is not None:
            fields["message_endpoint"] = self.endpoint.url
        self.account = api.register(f"client{index}-{uuid.uuid4().hex[:10]}", **fields)
        self.pulled: list[Delivery] = []
        self.handled: list[Delivery] = []
        self.downloaded: dict[int, tuple[str, dict[str, torch.Tensor]]] = {}
        self.global_at: dict[int, dict[str, torch.Tensor]] = {}
        self.sent: dict[int, tuple[dict[str, torch.Tensor], int]] = {}
        self.errors: list[str] = []
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.training_id = ""
        self.global_model_id = ""

    @property
    def id(self) -> str:
        """The client's user id."""
        return self.account.id

    @property
    def deliveries(self) -> list[Delivery]:
        """What the client received for its training, in arrival order (pushed or pulled)."""
        if self.endpoint is None:
            return list(self.pulled)
        with self.endpoint.lock:
            return [d for d in self.endpoint.deliveries if d.payload.get("training_uuid") == self.training_id]

    def types(self) -> list[str]:
        """notification_type of each delivery, in order."""
        return [d.payload["notification_type"] for d in self.deliveries]

    def start(self, training_id: str) -> None:
        """React to the training's notifications on a background thread."""
        self.training_id = training_id
        target = self._run_push if self.push else self._run_pull
        self._thread = threading.Thread(target=self._guarded, args=(target,), name=f"fl-it-client{self.index}")
        self._thread.daemon = True
        self._thread.start()

    def _guarded(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as error:  # surfaced by check() in the test thread
            self.errors.append(f"client {self.index}: {type(error).__name__}: {error}")

    def _run_push(self) -> None:
        assert self.endpoint is not None
        seen: set[str] = set()
        deadline = time.monotonic() + WAIT_SECONDS
        while not self._stop.is_set() and not self.finished.is_set() and time.monotonic() < deadline:
            try:
                delivery = self.endpoint.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            if delivery.payload.get("training_uuid") != self.training_id or delivery.event_id in seen:
                continue  # another training's, or a redelivery (at-least-once)
            seen.add(delivery.event_id)
            self._handle(delivery)

    def _run_pull(self) -> None:
        after = 0
        deadline = time.monotonic() + WAIT_SECONDS
        while not self._stop.is_set() and not self.finished.is_set() and time.monotonic() < deadline:
            events = self.api.ok("GET", f"/trainings/{self.training_id}/events/?after={after}&wait=5", self.account)
            for event in events:
                assert event["seq"] > after, f"events out of order: {event['seq']} after {after}"
                after = event["seq"]
                payload = {k: event[k] for k in ("notification_type", "training_uuid", "body")}
                delivery = Delivery(payload, str(event["seq"]), True, False)
                self.pulled.append(delivery)
                self._handle(delivery)

    def _handle(self, delivery: Delivery) -> None:
        self.handled.append(delivery)
        kind, body = delivery.payload["notification_type"], delivery.payload["body"]
        if kind == "TRAINING_START":
            self.global_model_id = body["global_model_uuid"]
        elif kind == "TRAINING_FINISHED":
            self.finished.set()
        elif self.behaviour == "silent":
            return
        elif kind == "UPDATE_ROUND_START":
            self._train(body["round"], body["global_model_uuid"])
        elif kind == "MODEL_TEST_ROUND":
            data = {"metric_names": ["accuracy"], "metric_values": [str(0.5 + self.index / 100)]}
            self.api.ok("POST", f"/models/{body['global_model_uuid']}/metrics/", self.account, 201, data=data)

    def _train(self, round_: int, model_id: str) -> None:
        if self.record_global and self.global_model_id:
            self.global_at[round_] = self.api.weights(self.account, self.global_model_id, round_)
        _, weights = self.api.torchscript_weights(self.account, model_id)
        self.downloaded[round_] = (model_id, weights)
        new, samples = client_update(weights, self.index, round_), sample_size(self.index, round_)
        response = self.api.upload_update(self.account, model_id, round_, new, samples, FORMATS[self.index % 3])
        assert response.status_code == 201, f"upload for round {round_}: {brief(response)}"
        self.sent[round_] = (new, samples)

    def stop(self) -> None:
        """Stop reacting and serving (bounded)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        if self.endpoint is not None:
            self.endpoint.close()


def check_clients(clients: Iterable[SimClient]) -> Callable[[], None]:
    """A check for `wait_training` that fails as soon as a client thread hit an error."""
    clients = list(clients)

    def check() -> None:
        errors = [e for c in clients for e in c.errors]
        assert not errors, "client errors:\n" + "\n".join(errors)

    return check


def expected_chain(initial: dict[str, torch.Tensor], indices: list[int], rounds: int) -> list[dict[str, torch.Tensor]]:
    """Global weights after 0..rounds FedAvg rounds of the clients `indices`, computed independently."""
    chain = [initial]
    for round_ in range(rounds):
        updates = [(client_update(chain[-1], i, round_), sample_size(i, round_)) for i in indices]
        chain.append(mean_of(updates))
    return chain
