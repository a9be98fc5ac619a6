"""Schema-driven fuzzing of the whole API with schemathesis, as every kind of caller.

schemathesis generates requests from the server's own OpenAPI schema (drf-spectacular), both schema-conforming and
schema-violating ones, and sends each one in-process to the server's WSGI application (`fl_server.wsgi`, no
network). Every generated request is sent once per role: anonymous (with whatever credentials the generator made
up), a plain user, a client not participating, a participant, the training's actor and staff.

The requests meet a realistic world: a started training with two participants, a local update of the second
participant (another client's model, from the participant role's point of view), a mean model and a group. Each
generated request is steered before it is sent: path ids are drawn from these real ids as well as from the
generator, body fields from values that pass validation (real ids, a real TorchScript model or update, round 0) as
well as from the generator, and at most one text field is made hostile (NUL, traversal, overlong, out-of-range
numbers), so that requests reach deep code with one bad value at a time. Each request runs in a savepoint that is
rolled back, so every request sees the same world.

Invariants checked on every answer: no 5xx; every 4xx is JSON `{"detail": "<non-empty text>"}`; no answer shows a
token to anyone but its owner. Bounded and deterministic: `derandomize=True`, no example database, a modest number
of examples per operation.
"""

import json
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from django.contrib.auth.models import Group
from django.core import signals
from django.db import close_old_connections, transaction
from django.test import override_settings
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient
from schemathesis import GenerationMode
from schemathesis.transport.serialization import Binary

from fl_server.wsgi import application
from fl_server_core.models import LocalModel, User
from tests.api.test_permission_matrix import ROLES, build_world, model_bytes, moment_bytes, update_bytes
from tests.conftest import post_update, upload
from tests.helpers import shifted_weights

# generated requests per operation, each sent as every role; FL_FUZZ_EXAMPLES=500 for a deeper local run
MAX_EXAMPLES = int(os.environ.get("FL_FUZZ_EXAMPLES", "20"))

with override_settings(FL_INPROCESS_SCHEDULER=False):  # no background check from this request, at collection
    SCHEMA = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application)  # as the server serves it
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@dataclass
class FuzzWorld:
    """Users by role and the ids of real objects requests can name."""

    users: dict[str, User | None]
    tokens: dict[str, str]  # by role
    ids: dict[str, list[str]]  # "models", "trainings", "users", "groups"


@pytest.fixture
def fuzz_world(make_user: Callable[..., User], client_for: Callable[[User | None], APIClient]) -> FuzzWorld:
    """The permission matrix's world plus another client's local update and a mean model."""
    world = build_world(make_user, client_for, swag=False)
    actor = world.users["actor"]
    response = post_update(client_for(world.target_user), world.model_id, 0, shifted_weights(1, 0.2), 7)
    assert response.status_code == 201, response.json()
    local_id = str(LocalModel.objects.get(owner=world.target_user).pk)
    second = client_for(actor).post(
        "/api/models/", {"name": "second", "model_file": upload("m.pt", model_bytes())}, format="multipart"
    )
    assert second.status_code == 201, second.json()
    mean = client_for(actor).post(
        "/api/models/",
        {"name": "ensemble", "type": "MEAN", "models": [world.model_id, second.json()["model_id"]]},
        format="multipart",
    )
    assert mean.status_code == 201, mean.json()
    models = [world.model_id, local_id, second.json()["model_id"], mean.json()["model_id"]]
    users = [str(user.pk) for user in User.objects.all()]
    return FuzzWorld(
        users={"anonymous": None, **world.users},
        tokens={role: user.auth_token.key for role, user in world.users.items()},
        ids={
            "models": models,
            "trainings": [str(world.training.pk)],
            "users": users,
            "groups": [str(pk) for pk in Group.objects.values_list("pk", flat=True)],
        },
    )


@pytest.fixture
def server_errors() -> Iterator[list[str]]:
    """Tracebacks of exceptions the application turned into 500 answers; the test's connection stays open.

    Django closes "old" database connections when a request starts and finishes, which would end the test's
    transaction; its own test client switches that off the same way.
    """
    errors: list[str] = []

    def record(sender: Any, request: Any = None, **kwargs: Any) -> None:
        errors.append(traceback.format_exc())

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    signals.got_request_exception.connect(record)
    try:
        yield errors
    finally:
        signals.got_request_exception.disconnect(record)
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


def id_kind(path: str) -> str:
    """Which kind of object the `{id}` of a path names."""
    return path.split("/")[2]  # /api/<kind>/{id}/...


# Text the generator rarely produces but attackers do: NUL (PostgreSQL refuses it in text), traversal, overlong,
# numbers out of range.
HOSTILE_TEXT = ["a\x00b", "../../etc/passwd", "x" * 5000, "1e999", "-1", "9" * 40, "NaN"]
ABSENT = object()


def valid_values(world: FuzzWorld) -> dict[str, list[Any]]:
    """Per body field, values that get a request past validation (files only for multipart bodies)."""
    models, users = world.ids["models"], world.ids["users"]
    first, second = moment_bytes()
    return {
        "model_id": models,
        "models": [[models[0], models[2]], models],
        "clients": [users[-2:], users],
        "name": ["tiny"],
        "type": ["GLOBAL", "MEAN"],
        "model_file": [Binary(model_bytes()), Binary(update_bytes())],
        "model_preprocessing_file": [Binary(model_bytes())],
        "first_moment_file": [Binary(first)],
        "second_moment_file": [Binary(second)],
        "round": [0],
        "sample_size": [5],
        "metric_names": [["loss"]],
        "metric_values": [["0.5"]],
        "model_input": [[[0.1, 0.2, 0.3, 0.4]]],
        "target_num_updates": [1],
        "username": ["fuzzed-user"],
        "password": ["a-Fresh-pass-481"],
    }


def realistic(data: st.DataObject, case: Any, world: FuzzWorld) -> None:
    """Steer the generated request (in place): real ids in the path, fields that pass validation, and at most one
    hostile text field, so that requests reach deep code with one bad value at a time."""
    for name, value in list((case.path_parameters or {}).items()):
        real = world.ids[id_kind(case.operation.path)]
        case.path_parameters[name] = data.draw(st.sampled_from([value, *real]), label=f"path {name}")
    for name, value in list((case.query or {}).items()):
        case.query[name] = data.draw(st.sampled_from([value, *HOSTILE_TEXT]), label=f"query {name}")
    if not isinstance(case.body, dict):
        return
    multipart = "multipart" in (case.media_type or "")
    for name, options in valid_values(world).items():
        if isinstance(options[0], Binary) and not multipart:
            continue
        chosen = data.draw(st.sampled_from([case.body.get(name, ABSENT), *options]), label=f"body {name}")
        if chosen is ABSENT:
            case.body.pop(name, None)
        else:
            case.body[name] = chosen
    texts = [name for name, value in case.body.items() if isinstance(value, str) and not isinstance(value, Binary)]
    hostile = data.draw(st.sampled_from([None, *texts]), label="hostile field")
    if hostile is not None:
        case.body[hostile] = data.draw(st.sampled_from(HOSTILE_TEXT), label=f"hostile {hostile}")


def check(response: Any, case: Any, role: str, world: FuzzWorld, errors: list[str]) -> None:
    """The invariants every answer must keep."""
    where = f"{case.method} {case.formatted_path} as {role} -> {response.status_code}: {response.content[:400]!r}"
    assert response.status_code < 500, where + "\n" + "\n".join(errors[-1:]) + "\n" + case.as_curl_command()
    if response.status_code >= 400:
        content_type = response.headers.get("content-type", [""])[0]
        assert content_type.startswith("application/json"), where
        body = json.loads(response.content)
        assert isinstance(body, dict), where
        assert isinstance(body.get("detail"), str) and body["detail"].strip(), where
    text = response.content.decode("utf-8", "replace")
    leaked = [owner for owner, token in world.tokens.items() if owner != role and token in text]
    assert not leaked, f"{where}: shows the token of {leaked}"


@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda operation: operation.label)
def test_fuzz_every_operation_as_every_role(operation: Any, fuzz_world: FuzzWorld, server_errors: list[str]) -> None:
    strategy = st.one_of(operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE))

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(strategy, label="case")
        realistic(data, case, fuzz_world)
        for role in ROLES:
            user = fuzz_world.users[role]
            headers = {"Authorization": f"Token {user.auth_token.key}"} if user is not None else None
            with transaction.atomic():
                response = case.call(app=application, headers=headers)
                transaction.set_rollback(True)
            check(response, case, role, fuzz_world, server_errors)

    fuzz()
