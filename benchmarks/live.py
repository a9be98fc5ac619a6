"""What the live-server benchmarks share: the server stack, simulated clients over real HTTP, memory sampling.

* `Stack` starts the server on the embedded profile (one `runserver` process: SQLite, in-process tasks), or on
  the production profile when a database URL and a broker URL are given (gunicorn with several worker
  processes, Celery workers and a Celery beat, a filesystem model store in a temporary directory).
* `Inbox` is one HTTP server that receives the pushed notifications of every simulated client (each client's
  `message_endpoint` is its own path), checks their signatures and timestamps their arrival.
* `Fleet` registers the clients, reacts to their notifications on a thread pool like real clients (download the
  global model, upload an update; post metrics in test rounds) and records every request and error.
* `MemorySampler` samples the proportional set size (PSS, so pages shared by forked processes count once) of
  the server's whole process tree and keeps the peak.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import io
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from benchmarks.aggregation import max_abs_diff
from fl_client.demo.run import free_port

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
PASSWORD = "benchmark-password"
WIDTH = 100  # inputs of the benchmark model's layers
COMPLETED = "C"  # the training state's wire value
TOLERANCE = 1e-5  # of the final weights against the expected mean
CONNECT_RETRIES = 3  # a request whose connection is refused or reset is sent again (and counted)


class WideNet(torch.nn.Module):
    """A model of exactly `params` float32 parameters (4 bias-free linear layers of `WIDTH` inputs)."""

    def __init__(self, params: int) -> None:
        super().__init__()
        if params < 4 * WIDTH or params % (4 * WIDTH):
            raise ValueError(f"params must be a positive multiple of {4 * WIDTH}, got {params}")
        rows = params // (4 * WIDTH)
        self.layer0 = torch.nn.Linear(WIDTH, rows, bias=False)
        self.layer1 = torch.nn.Linear(WIDTH, rows, bias=False)
        self.layer2 = torch.nn.Linear(WIDTH, rows, bias=False)
        self.layer3 = torch.nn.Linear(WIDTH, rows, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer0(x) + self.layer1(x) + self.layer2(x) + self.layer3(x)


def model_bytes(params: int, seed: int) -> tuple[bytes, dict[str, torch.Tensor]]:
    """The TorchScript archive of a `WideNet` and its weights."""
    torch.manual_seed(seed)
    module = WideNet(params)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(module), buffer)
    return buffer.getvalue(), {k: v.detach().clone() for k, v in module.state_dict().items()}


def update_of(weights: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """Client `index`'s deterministic update of `weights`."""
    generator = torch.Generator().manual_seed(1000 + index)
    return {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in weights.items()}


def sample_size(index: int) -> int:
    """Client `index`'s sample size (between 50 and 249)."""
    return 50 + (index * 37) % 200


def weighted_mean(updates: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The FedAvg of `(weights, samples)` pairs, in float64."""
    total = sum(n for _, n in updates)
    return {k: sum(w[k].double() * (n / total) for w, n in updates) for k in updates[0][0]}


# --------------------------------------------------------------------------------------------------
# The server


def _descendants(roots: list[int]) -> list[int]:
    """`roots` and every process below them."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _pss_kib(pid: int) -> int:
    """The process's proportional set size (its RSS where smaps_rollup is not readable), 0 if it is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        key = "Pss:"
    except OSError:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0
        key = "VmRSS:"
    for line in text.splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


class MemorySampler:
    """Samples the summed PSS of process trees on a thread and keeps the peak."""

    def __init__(self, roots: Callable[[], list[int]], interval: float = 0.2) -> None:
        self.roots, self.interval = roots, interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        """Take one sample now."""
        total = sum(_pss_kib(pid) for pid in _descendants(self.roots()))
        self.peak_kib = max(self.peak_kib, total)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sample()

    @property
    def peak_mib(self) -> float:
        """The peak seen, in MiB."""
        return round(self.peak_kib / 1024, 1)


@dataclass
class Process:
    """A started server process and its log."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class Stack:
    """The server as deployed: embedded (`runserver`), or production (gunicorn + Celery workers + beat)."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None = None,
        broker_url: str | None = None,
        web_workers: int = 4,
        celery_workers: int = 2,
    ) -> None:
        if bool(database_url) != bool(broker_url):
            raise ValueError("--database-url and --broker-url go together (the production profile needs both)")
        self.data_dir, self.database_url, self.broker_url = data_dir, database_url, broker_url
        self.web_workers, self.celery_workers = web_workers, celery_workers
        self.secret = secrets.token_hex(16)
        self.processes: list[Process] = []
        self.url = ""

    @property
    def profile(self) -> str:
        """ "embedded" or "production"."""
        return "production" if self.database_url else "embedded"

    def describe(self) -> str:
        """One line on what runs."""
        if self.profile == "embedded":
            return "embedded profile: manage.py runserver, SQLite, filesystem store, in-process tasks"
        return (
            f"production profile: gunicorn x{self.web_workers} (gthread, 4 threads), "
            f"{self.celery_workers} Celery workers + beat, PostgreSQL, broker {self.broker_url}, filesystem store"
        )

    def env(self) -> dict[str, str]:
        """The server's environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "CELERY_", "DJANGO_", "DATABASE_"))}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "FL_DATA_DIR": str(self.data_dir),
                "FL_MODEL_STORE": "filesystem",
                "FL_MODEL_STORE_PATH": str(self.data_dir / "model-store"),
                "FL_OPEN_REGISTRATION": "true",
                "FL_NOTIFICATION_SECRET": self.secret,
                "FL_TICK_SECONDS": "1",
                "LOG_LEVEL": "WARNING",
                "NO_PROXY": "127.0.0.1,localhost",
                "no_proxy": "127.0.0.1,localhost",
            }
        )
        if self.profile == "embedded":
            env["DJANGO_SETTINGS_MODULE"] = "fl_server.settings.embedded"
        else:
            env.update(
                {
                    "DJANGO_SETTINGS_MODULE": "fl_server.settings.production",
                    "SECRET_KEY": "benchmark-" + secrets.token_hex(16),
                    "ALLOWED_HOSTS": "127.0.0.1,localhost",
                    "DATABASE_URL": str(self.database_url),
                    "DATABASE_CONN_MAX_AGE": "60",
                    "CELERY_BROKER_URL": str(self.broker_url),
                }
            )
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Process:
        log = self.data_dir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start(self) -> None:
        """Migrate, start every process and wait until the server answers and the workers are ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = self.env()
        migrate = subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if migrate.returncode != 0:
            raise RuntimeError(f"migrate failed:\n{migrate.stdout}{migrate.stderr}")
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        if self.profile == "embedded":
            argv = [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"]
            self._spawn("server", argv, env)
        else:
            argv = [sys.executable, "-m", "gunicorn", "fl_server.wsgi:application", "--bind", f"127.0.0.1:{port}"]
            argv += ["--workers", str(self.web_workers), "--worker-class", "gthread", "--threads", "4"]
            argv += ["--timeout", "600", "--log-level", "warning"]
            self._spawn("server", argv, env)
            for index in range(self.celery_workers):
                argv = [sys.executable, "-m", "celery", "-A", "fl_server", "worker", "--pool=solo"]
                argv += ["--loglevel=INFO", f"--hostname=bench-{index}-{os.getpid()}@%h", "--without-gossip"]
                argv += ["--without-mingle"]
                self._spawn(f"worker-{index}", argv, env)
            argv = [sys.executable, "-m", "celery", "-A", "fl_server", "beat", "--loglevel=WARNING"]
            argv += [f"--schedule={self.data_dir / 'beat-schedule'}", f"--pidfile={self.data_dir / 'beat.pid'}"]
            self._spawn("beat", argv, env)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        pending = [p for p in self.processes if p.name.startswith("worker")]
        answered = False
        while time.monotonic() < deadline:
            for process in self.processes:
                if process.popen.poll() is not None:
                    raise RuntimeError(f"{process.name} exited:\n{self.tail(process)}")
            if not answered:
                with contextlib.suppress(requests.RequestException):
                    answered = requests.get(f"{self.url}/api/users/myself/", timeout=2).status_code == 401
            pending = [p for p in pending if " ready." not in p.log.read_text(errors="replace")]
            if answered and not pending:
                return
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready:\n" + "\n".join(self.tail(p) for p in self.processes))

    def pids(self) -> list[int]:
        """The root process ids of the server (their children belong to it too)."""
        return [p.popen.pid for p in self.processes if p.popen.poll() is None]

    @staticmethod
    def tail(process: Process, lines: int = 30) -> str:
        """The end of a process's log."""
        text = process.log.read_text(errors="replace") if process.log.exists() else ""
        return f"----- {process.name}:\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL)."""
        for process in reversed(self.processes):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.popen.wait(15)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait(5)

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Arrival:
    """A notification as it reached a client."""

    client: int
    kind: str
    body: dict[str, Any]
    at: float


class Inbox:
    """One HTTP server for every simulated client's pushed notifications (`/c/<index>/`)."""

    def __init__(self, secret: str) -> None:
        self.arrivals: queue.Queue[Arrival] = queue.Queue()
        self.errors: list[str] = []
        self.count = 0
        self._lock = threading.Lock()
        self._seen: set[tuple[int, str]] = set()
        key = secret.encode()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                at = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                inbox.receive(self.path, raw, self.headers.get("X-FL-Signature", ""), self.headers, key, at)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.request_queue_size = 512
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="bench-inbox", daemon=True)
        self._thread.start()

    def receive(self, path: str, raw: bytes, signature: str, headers: Any, key: bytes, at: float) -> None:
        """Check and queue one delivery (a redelivery of an event already seen is dropped)."""
        expected = "sha256=" + hmac.new(key, raw, hashlib.sha256).hexdigest()
        try:
            client = int(path.strip("/").split("/")[1])
            payload = json.loads(raw)
        except (ValueError, IndexError):
            self.errors.append(f"unreadable notification to {path}")
            return
        with self._lock:
            self.count += 1
            if not hmac.compare_digest(signature, expected):
                self.errors.append(f"client {client}: bad notification signature")
                return
            event = headers.get("X-FL-Event-Id", "") or raw.hex()
            if (client, event) in self._seen:
                return
            self._seen.add((client, event))
        self.arrivals.put(Arrival(client, payload["notification_type"], payload.get("body", {}), at))

    def url(self, client: int) -> str:
        """Client `client`'s message endpoint."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/c/{client}/"

    def close(self) -> None:
        """Stop serving."""
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class Request:
    """One HTTP request a client made."""

    client: int
    what: str
    status: int
    started: float
    ended: float
    sent_bytes: int


@dataclass
class Fleet:
    """Simulated clients that react to their notifications like real ones, on a thread pool."""

    server: str
    inbox: Inbox
    updates: list[bytes]  # each client's update, as uploaded (safetensors bytes)
    threads: int = 32
    tokens: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    arrivals: list[Arrival] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    finished: set[int] = field(default_factory=set)
    connection_retries: int = 0  # requests sent again after a refused or reset connection

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="bench-client")

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.trust_env = False
        return session

    def call(
        self, client: int, what: str, method: str, path: str, expect: int, sent: int = 0, **kwargs: Any
    ) -> requests.Response:
        """One request as client `client` (or anonymous for -1), recorded; an unexpected status is an error."""
        headers = {"Authorization": f"Token {self.tokens[client]}"} if client >= 0 else {}
        started = time.monotonic()
        for attempt in range(CONNECT_RETRIES + 1):
            try:
                response = self._session().request(method, self.server + path, headers=headers, timeout=600, **kwargs)
                break
            except requests.ConnectionError as error:  # refused or reset: what real clients retry
                with self._lock:
                    if attempt == CONNECT_RETRIES:
                        self.errors.append(f"client {client} {what}: {type(error).__name__}: {error}")
                        raise
                    self.connection_retries += 1
                time.sleep(0.2 * (attempt + 1))
            except requests.RequestException as error:
                with self._lock:
                    self.errors.append(f"client {client} {what}: {type(error).__name__}: {error}")
                raise
        ended = time.monotonic()
        with self._lock:
            self.requests.append(Request(client, what, response.status_code, started, ended, sent))
            if response.status_code != expect:
                self.errors.append(f"client {client} {what}: {response.status_code} {response.text[:300]}")
        return response

    def register(self, count: int, actor_name: str) -> str:
        """Register the actor and `count` clients (concurrently); the actor's token."""
        suffix = uuid.uuid4().hex[:8]

        def one(index: int) -> dict[str, Any]:
            body: dict[str, Any] = {"username": f"bench-{suffix}-{index}", "password": PASSWORD, "client": True}
            body["message_endpoint"] = self.inbox.url(index)
            return self.call(-1, "register", "POST", "/api/users/", 201, json=body).json()

        users = list(self._pool.map(one, range(count)))
        self.tokens = [u["token"] for u in users]
        self.ids = [u["id"] for u in users]
        actor = {"username": f"{actor_name}-{suffix}", "password": PASSWORD, "actor": True}
        return self.call(-1, "register", "POST", "/api/users/", 201, json=actor).json()["token"]

    def react(self, arrival: Arrival) -> None:
        """What a client does on a notification."""
        body, client = arrival.body, arrival.client
        if arrival.kind == "UPDATE_ROUND_START":
            model, round_ = body["global_model_uuid"], body["round"]
            self.call(client, "download", "GET", f"/api/models/{model}/?format=safetensors", 200)
            data = {"round": str(round_), "sample_size": str(sample_size(client))}
            data |= {"metric_names": "loss", "metric_values": "0.5"}
            files = {"model_file": ("update.safetensors", self.updates[client], "application/octet-stream")}
            size = len(self.updates[client])
            self.call(client, f"upload:{round_}", "POST", f"/api/models/{model}/", 201, size, data=data, files=files)
        elif arrival.kind == "MODEL_TEST_ROUND":
            data = {"metric_names": "accuracy", "metric_values": str(0.5 + client / 1000)}
            self.call(client, "metrics", "POST", f"/api/models/{body['global_model_uuid']}/metrics/", 201, data=data)
        elif arrival.kind == "TRAINING_FINISHED":
            with self._lock:
                self.finished.add(client)

    def _guarded(self, arrival: Arrival) -> None:
        try:
            self.react(arrival)
        except Exception as error:
            with self._lock:
                self.errors.append(f"client {arrival.client} on {arrival.kind}: {type(error).__name__}: {error}")

    def run(self, clients: int, timeout: float) -> None:
        """Dispatch notifications to the pool until every client heard TRAINING_FINISHED (or the time is up)."""
        deadline = time.monotonic() + timeout
        while len(self.finished) < clients:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.finished)} of {clients} clients heard TRAINING_FINISHED in time")
            try:
                arrival = self.inbox.arrivals.get(timeout=0.2)
            except queue.Empty:
                continue
            self.arrivals.append(arrival)
            if arrival.kind == "TRAINING_FINISHED":
                self.react(arrival)
            else:
                self._pool.submit(self._guarded, arrival)

    def close(self) -> None:
        """Stop the pool."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def create_training(fleet: Fleet, actor: str, model: bytes, rounds: int, options: dict[str, Any]) -> tuple[str, str]:
    """Upload the model and create a FedAvg training of every fleet client; (training id, model id)."""
    session = requests.Session()
    session.trust_env = False
    headers = {"Authorization": f"Token {actor}"}
    files = {"model_file": ("model.pt", model, "application/octet-stream")}
    response = session.post(f"{fleet.server}/api/models/", headers=headers, data={"name": "benchmark"}, files=files)
    response.raise_for_status()
    model_id = response.json()["model_id"]
    body = {
        "model_id": model_id,
        "target_num_updates": rounds,
        "metric_names": ["loss"],
        "aggregation_method": "FedAvg",
        "clients": fleet.ids,
        "options": options,
    }
    response = session.post(f"{fleet.server}/api/trainings/", headers=headers, json=body)
    if response.status_code != 201:
        raise RuntimeError(f"creating the training: {response.status_code} {response.text[:300]}")
    return response.json()["training_id"], model_id


def fetch(server: str, token: str, path: str) -> requests.Response:
    """An authenticated GET that must succeed."""
    response = requests.get(server + path, headers={"Authorization": f"Token {token}"}, timeout=600)
    response.raise_for_status()
    return response


def final_weights(server: str, token: str, model_id: str) -> dict[str, torch.Tensor]:
    """The global model's weights."""
    return dict(load_safetensors(fetch(server, token, f"/api/models/{model_id}/?format=safetensors").content))


def safetensors_bytes(weights: dict[str, torch.Tensor]) -> bytes:
    """The bytes of a safetensors file of `weights` (float32)."""
    return save_safetensors({k: v.float().contiguous() for k, v in weights.items()})


@dataclass
class Outcome:
    """What one benchmark training did."""

    profile: str
    description: str
    state: str
    reason: str
    fleet: Fleet
    inbox_errors: list[str]
    notifications: int
    started: float  # time.monotonic() of the start request
    seconds: float  # from the start request to the last client hearing TRAINING_FINISHED
    server_peak_mib: float
    max_abs_diff_vs_expected: float
    rounds: list[dict[str, Any]]  # GET /api/trainings/<id>/rounds/

    @property
    def errors(self) -> list[str]:
        """Every failed request, bad notification, a training not ending COMPLETED, wrong final weights."""
        found = [*self.fleet.errors, *self.inbox_errors]
        if self.state != COMPLETED:
            found.append(f"the training ended in state {self.state}: {self.reason}")
        if not self.max_abs_diff_vs_expected <= TOLERANCE:
            found.append(f"the final weights differ from the expected mean by {self.max_abs_diff_vs_expected}")
        return found


def run_training(
    *,
    clients: int,
    params: int,
    rounds: int,
    options: dict[str, Any],
    threads: int,
    timeout: float,
    database_url: str | None = None,
    broker_url: str | None = None,
    web_workers: int = 4,
    celery_workers: int = 2,
) -> Outcome:
    """Start a stack, run one FedAvg training of `clients` simulated clients through it, stop the stack.

    Every client uploads the same update in every round, so the final global weights must equal the
    sample-size-weighted mean of the updates; the largest difference is reported.
    """
    model, weights = model_bytes(params, seed=0)
    updates = [update_of(weights, index) for index in range(clients)]
    expected = weighted_mean([(update, sample_size(index)) for index, update in enumerate(updates)])
    payloads = [safetensors_bytes(update) for update in updates]
    del updates
    data_dir = Path(tempfile.mkdtemp(prefix="fl-bench-live-"))
    stack = Stack(data_dir, database_url, broker_url, web_workers, celery_workers)
    try:
        with stack, MemorySampler(stack.pids) as memory:
            inbox = Inbox(stack.secret)
            fleet = Fleet(stack.url, inbox, payloads, threads)
            try:
                actor = fleet.register(clients, "bench-actor")
                training_id, _ = create_training(fleet, actor, model, rounds, options)
                started = time.monotonic()
                response = requests.post(
                    f"{stack.url}/api/trainings/{training_id}/start/",
                    headers={"Authorization": f"Token {actor}"},
                    timeout=60,
                )
                if response.status_code != 202:
                    raise RuntimeError(f"starting the training: {response.status_code} {response.text[:300]}")
                fleet.run(clients, timeout)
                finished = [a for a in fleet.arrivals if a.kind == "TRAINING_FINISHED"]
                training = fetch(stack.url, actor, f"/api/trainings/{training_id}/").json()
                rounds_done = fetch(stack.url, actor, f"/api/trainings/{training_id}/rounds/").json()
                final = final_weights(stack.url, actor, finished[0].body["global_model_uuid"])
            finally:
                fleet.close()
                inbox.close()
    except BaseException:
        print("\n".join(stack.tail(p) for p in stack.processes), file=sys.stderr)
        raise
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return Outcome(
        profile=stack.profile,
        description=stack.describe(),
        state=training["state"],
        reason=training.get("error_reason") or "",
        fleet=fleet,
        inbox_errors=inbox.errors,
        notifications=inbox.count,
        started=started,
        seconds=max(a.at for a in finished) - started,
        server_peak_mib=memory.peak_mib,
        max_abs_diff_vs_expected=max_abs_diff(final, expected),
        rounds=rounds_done,
    )


def round_starts(arrivals: list[Arrival]) -> list[tuple[str, int, float, float]]:
    """(kind, round, first arrival, last arrival) of every round-start notification, in order."""
    groups: dict[tuple[str, int], list[float]] = {}
    for arrival in arrivals:
        if arrival.kind in ("UPDATE_ROUND_START", "MODEL_TEST_ROUND", "SWAG_ROUND_START"):
            groups.setdefault((arrival.kind, arrival.body["round"]), []).append(arrival.at)
    found = [(kind, number, min(times), max(times)) for (kind, number), times in groups.items()]
    return sorted(found, key=lambda item: item[2])


def parser_for(name: str, doc: str, clients: int, params: int) -> argparse.ArgumentParser:
    """The command-line options of a live benchmark (`python -m benchmarks.<name>`)."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc.splitlines()[0])
    parser.add_argument("--clients", type=int, default=clients, help="simulated clients")
    parser.add_argument("--rounds", type=int, default=3, help="update rounds")
    parser.add_argument("--params", type=int, default=params, help="float32 parameters (a multiple of 400)")
    parser.add_argument("--database-url", help="PostgreSQL URL: run the production profile on it (with --broker-url)")
    parser.add_argument("--broker-url", help="Celery broker URL (Redis or RabbitMQ) of the production profile")
    parser.add_argument("--compare-embedded", action="store_true", help="also run the embedded profile")
    parser.add_argument("--web-workers", type=int, default=4, help="gunicorn worker processes (production)")
    parser.add_argument("--celery-workers", type=int, default=2, help="Celery worker processes (production)")
    parser.add_argument("--threads", type=int, default=32, help="client-side threads reacting to notifications")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the training may take")
    parser.add_argument("--json", type=Path, help="write the JSON report to this file")
    return parser


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse and check the options (usage errors exit with status 2)."""
    args = parser.parse_args(argv)
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be at least 1")
    if bool(args.database_url) != bool(args.broker_url):
        parser.error("--database-url and --broker-url go together (the production profile needs both)")
    if args.compare_embedded and not args.database_url:
        parser.error("--compare-embedded needs the production options --database-url and --broker-url")
    return args


def run_profiles(
    args: argparse.Namespace, options: dict[str, Any], measure: Callable[[Outcome], dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Run the training on the profile asked for (and the embedded one after it with --compare-embedded)."""
    stack = {
        "database_url": args.database_url,
        "broker_url": args.broker_url,
        "web_workers": args.web_workers,
        "celery_workers": args.celery_workers,
    }
    profiles = [stack, {**stack, "database_url": None, "broker_url": None}] if args.compare_embedded else [stack]
    results: dict[str, dict[str, Any]] = {}
    for profile in profiles:
        outcome = run_training(
            clients=args.clients,
            params=args.params,
            rounds=args.rounds,
            options=options,
            threads=args.threads,
            timeout=args.timeout,
            **profile,
        )
        results[outcome.profile] = measure(outcome)
        print(f"{outcome.profile}: {outcome.seconds:.1f} s, {len(outcome.errors)} errors", flush=True)
    return results


def main(
    argv: Sequence[str] | None,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    print_table: Callable[[dict[str, Any]], None],
) -> int:
    """Run a live benchmark, print its table and JSON report; exit status 1 if it failed or saw errors."""
    args = parse(parser, argv)
    try:
        report = run(args)
    except Exception as error:
        print(f"benchmark failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return 0 if report["errors"] == 0 else 1
