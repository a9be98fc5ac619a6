"""Permission matrix: every endpoint of `fl_server_api/urls.py` x every kind of caller.

Each row is one request by one role against a fresh world (a started training with two participants, its global
model with a preprocessing module, and a group). The expected codes follow the "REST API" table of the README and
PROTOCOL.md: 401 for anonymous callers (except the public schema and open registration), 403 for authenticated
callers without the right, 404 where an object is invisible by design, and the success code for allowed roles with
a valid body. Where an allowed role gets a documented 4xx for a state reason, the row says why in a comment.

Staff: the README names staff only for users and groups; elsewhere it is silent. The code treats staff like the
actor of every training (read, manage, delete) but never like a participant or a model owner for uploads, and
these rows follow the code there (see `READERS` and `MANAGERS`).
"""

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from django.contrib.auth.models import Group
from django.db import transaction
from rest_framework.test import APIClient

from fl_server_ai.trainer.lifecycle import lock_training
from fl_server_ai.trainer.rounds import open_round
from fl_server_core.models import RoundKind, RoundState, Training, TrainingRound, TrainingState, User
from tests.conftest import upload
from tests.helpers import Doubler, safetensors_bytes, shifted_weights, state_dict_bytes, tiny_net, torchscript_bytes

ROLES = ("anonymous", "other_user", "non_participating_client", "participant", "actor", "staff")
AUTHENTICATED = ROLES[1:]


# --------------------------------------------------------------------------------------------------------------------
# Files (built once: scripting a module is the slow part of a world)
# --------------------------------------------------------------------------------------------------------------------


@functools.cache
def model_bytes() -> bytes:
    return torchscript_bytes(tiny_net(0))


@functools.cache
def preprocessing_bytes() -> bytes:
    return torchscript_bytes(Doubler())


@functools.cache
def update_bytes() -> bytes:
    return state_dict_bytes(shifted_weights(0, 0.1))


@functools.cache
def moment_bytes() -> tuple[bytes, bytes]:
    params = torch.cat([p.detach().flatten() for p in tiny_net(0).parameters()])
    return safetensors_bytes({"m": params}), safetensors_bytes({"m": params**2 + 1e-4})


# --------------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    """Everything a row's request can refer to."""

    users: dict[str, User]
    training: Training
    model_id: str
    target_user: User  # the second participant: related to the actor and participants, unrelated to the others
    spare_client: User  # a client no role is, to register as a participant
    group: Group
    ids: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ids = {
            "model": self.model_id,
            "training": str(self.training.pk),
            "user": str(self.target_user.pk),
            "group": str(self.group.pk),
        }


def build_world(make_user: Callable[..., User], client_for: Callable[[User | None], APIClient], swag: bool) -> World:
    """A started training of a model with preprocessing, two participants, and users for every role."""
    actor = make_user("actor", actor=True)
    participants = [make_user(f"client{i}", client=True, message_endpoint=f"http://127.0.0.1:9/{i}") for i in range(2)]
    users = {
        "other_user": make_user("other"),
        "non_participating_client": make_user("bystander", client=True),
        "participant": participants[0],
        "actor": actor,
        "staff": make_user("staff", is_staff=True),
    }
    spare = make_user("spare", client=True)
    group = Group.objects.create(name="team")
    as_actor = client_for(actor)
    body = {
        "name": "tiny",
        "description": "a tiny net",
        "model_file": upload("m.pt", model_bytes()),
        "model_preprocessing_file": upload("p.pt", preprocessing_bytes()),
    }
    response = as_actor.post("/api/models/", body, format="multipart")
    assert response.status_code == 201, response.json()
    body = {
        "model_id": response.json()["model_id"],
        "target_num_updates": 2,
        "metric_names": ["loss"],
        "clients": [str(p.pk) for p in participants],
        "uncertainty_method": "SWAG" if swag else "NONE",
    }
    response = as_actor.post("/api/trainings/", body, format="json")
    assert response.status_code == 201, response.json()
    training = Training.objects.get(pk=response.json()["training_id"])
    response = as_actor.post(f"/api/trainings/{training.pk}/start/")
    assert response.status_code == 202, response.json()
    if swag:  # straight into the SWAG round, as after the last update round
        with transaction.atomic():
            locked = lock_training(training.pk)
            TrainingRound.objects.filter(pk=locked.current_round_id).update(state=RoundState.DONE)
            open_round(locked, RoundKind.SWAG, locked.model.round)
    training.refresh_from_db()
    assert training.state == (TrainingState.SWAG_ROUND if swag else TrainingState.ONGOING)
    return World(users, training, str(training.model_id), participants[1], spare, group)


# --------------------------------------------------------------------------------------------------------------------
# Request bodies (valid, so that an allowed role gets the success code)
# --------------------------------------------------------------------------------------------------------------------

Body = Callable[[World, str], tuple[Any, str | None]]


def no_body(world: World, role: str) -> tuple[Any, str | None]:
    return None, None


def registration(world: World, role: str) -> tuple[Any, str | None]:
    return {"username": f"new-{role}", "password": "a-Fresh-pass-481"}, "json"


def group_body(world: World, role: str) -> tuple[Any, str | None]:
    return {"name": f"group-of-{role}"}, "json"


def model_upload(world: World, role: str) -> tuple[Any, str | None]:
    return {"name": "mine", "description": "", "model_file": upload("m.pt", model_bytes())}, "multipart"


def local_update(world: World, role: str) -> tuple[Any, str | None]:
    body = {
        "round": "0",
        "sample_size": "8",
        "model_file": upload("u.pt", update_bytes()),
        "metric_names": ["loss"],
        "metric_values": ["0.25"],
    }
    return body, "multipart"


def metrics_body(world: World, role: str) -> tuple[Any, str | None]:
    return {"metric_names": ["accuracy"], "metric_values": ["0.9"]}, "multipart"


def preprocessing_body(world: World, role: str) -> tuple[Any, str | None]:
    return {"model_preprocessing_file": upload("p.pt", preprocessing_bytes())}, "multipart"


def swag_body(world: World, role: str) -> tuple[Any, str | None]:
    first, second = moment_bytes()
    body = {
        "round": "0",
        "sample_size": "12",
        "first_moment_file": upload("first.st", first),
        "second_moment_file": upload("second.st", second),
    }
    return body, "multipart"


def training_body(world: World, role: str) -> tuple[Any, str | None]:
    return {"model_id": world.model_id, "target_num_updates": 1, "metric_names": ["loss"]}, "json"


def add_clients(world: World, role: str) -> tuple[Any, str | None]:
    return {"clients": [str(world.spare_client.pk)]}, "json"


def remove_clients(world: World, role: str) -> tuple[Any, str | None]:
    return {"clients": [str(world.target_user.pk)]}, "json"


def inference_body(world: World, role: str) -> tuple[Any, str | None]:
    return {"model_id": world.model_id, "model_input": [[0.1, 0.2, 0.3, 0.4]], "return_format": "json"}, "json"


# --------------------------------------------------------------------------------------------------------------------
# Expectations
# --------------------------------------------------------------------------------------------------------------------


def everyone(code: int) -> dict[str, int]:
    """Public: every caller, anonymous included."""
    return dict.fromkeys(ROLES, code)


def authenticated(code: int) -> dict[str, int]:
    """Any authenticated caller."""
    return {"anonymous": 401, **dict.fromkeys(AUTHENTICATED, code)}


def only(code: int, *allowed: str, **overrides: int) -> dict[str, int]:
    """The allowed roles get `code`; other authenticated callers 403; anonymous 401; overrides win."""
    expected = {"anonymous": 401, **{role: (code if role in allowed else 403) for role in AUTHENTICATED}}
    expected.update(overrides)
    return expected


# Roles allowed by the README table; staff where the table is silent and the code grants it (see module docstring).
READERS = ("participant", "actor", "staff")  # "as download" / "actor, participants" (+ staff: code)
MANAGERS = ("actor", "staff")  # "owner, actor" / "actor" (+ staff: code)


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # under /api/, with {model}, {training}, {user}, {group}
    expected: dict[str, int]
    body: Body = no_body
    swag: bool = False  # the world's training is in its SWAG round

    @property
    def label(self) -> str:
        shown = self.path
        for key in ("model", "training", "user", "group"):
            shown = shown.replace("{" + key + "}", "<id>")
        return f"{self.method} {shown}"


ENDPOINTS = [
    # --- users and groups ---------------------------------------------------------------------------------------
    # open registration (embedded profile): anyone, authenticated or not, may register a fresh username
    Endpoint("POST", "users/", everyone(201), registration),
    Endpoint("GET", "users/", authenticated(200)),
    Endpoint("GET", "users/myself/", authenticated(200)),
    Endpoint("GET", "users/groups/", authenticated(200)),
    Endpoint("GET", "users/trainings/", authenticated(200)),
    # the target is the second participant: visible to the people it trains with and staff, invisible (404) otherwise
    Endpoint("GET", "users/{user}/", only(200, *READERS, other_user=404, non_participating_client=404)),
    Endpoint("GET", "groups/", only(200, "staff")),
    Endpoint("POST", "groups/", only(201, "staff"), group_body),
    Endpoint("GET", "groups/{group}/", only(200, "staff")),
    Endpoint("PUT", "groups/{group}/", only(200, "staff"), group_body),
    Endpoint("PATCH", "groups/{group}/", only(200, "staff"), group_body),
    Endpoint("DELETE", "groups/{group}/", only(204, "staff")),
    # --- models -------------------------------------------------------------------------------------------------
    Endpoint("GET", "models/", authenticated(200)),
    Endpoint("POST", "models/", authenticated(201), model_upload),
    Endpoint("GET", "models/{model}/", only(200, *READERS)),
    # local update: participants only (the actor and staff are not participants)
    Endpoint("POST", "models/{model}/", only(201, "participant"), local_update),
    # owner/actor (+ staff: code) may delete, but the model's training is running: 409 (documented state rule)
    Endpoint("DELETE", "models/{model}/", only(409, *MANAGERS)),
    Endpoint("GET", "models/{model}/metadata/", only(200, *READERS)),
    Endpoint("GET", "models/{model}/metrics/", only(200, *READERS)),
    # post metrics: the model's owner (the actor uploaded it) and participants; staff is neither (code agrees)
    Endpoint("POST", "models/{model}/metrics/", only(201, "participant", "actor"), metrics_body),
    Endpoint("GET", "models/{model}/preprocessing/", only(200, *READERS)),
    Endpoint("POST", "models/{model}/preprocessing/", only(202, *MANAGERS), preprocessing_body),
    # SWAG statistics: participants during a SWAG round (this row's world is in its SWAG round)
    Endpoint("POST", "models/{model}/swag/", only(201, "participant"), swag_body, swag=True),
    # --- trainings ----------------------------------------------------------------------------------------------
    # "GET /api/trainings/ | actor | your trainings": any authenticated caller gets the trainings it runs (maybe none)
    Endpoint("GET", "trainings/", authenticated(200)),
    # create: owner of the model (+ staff: code); the model already has a training, so it is copied
    Endpoint("POST", "trainings/", only(201, *MANAGERS), training_body),
    Endpoint("GET", "trainings/{training}/", only(200, *READERS)),
    Endpoint("DELETE", "trainings/{training}/", only(200, *MANAGERS)),
    Endpoint("PUT", "trainings/{training}/clients/", only(202, *MANAGERS), add_clients),
    Endpoint("DELETE", "trainings/{training}/clients/", only(200, *MANAGERS), remove_clients),
    # the actor (+ staff: code) may start, but the training is already started: 400 (documented: unless INITIAL)
    Endpoint("POST", "trainings/{training}/start/", only(400, *MANAGERS)),
    Endpoint("POST", "trainings/{training}/abort/", only(200, *MANAGERS)),
    Endpoint("GET", "trainings/{training}/models/", only(200, *READERS)),
    Endpoint("GET", "trainings/{training}/models/latest/", only(200, *READERS)),
    Endpoint("GET", "trainings/{training}/events/", only(200, *READERS)),
    Endpoint("GET", "trainings/{training}/rounds/", only(200, *READERS)),
    Endpoint("GET", "trainings/{training}/metrics/", only(200, *READERS)),
    # --- inference and schema -----------------------------------------------------------------------------------
    Endpoint("POST", "inference/", only(200, *READERS), inference_body),
    Endpoint("GET", "schema/", everyone(200)),
    Endpoint("GET", "schema/swagger-ui/", everyone(200)),
]

ROWS = [
    pytest.param(endpoint, role, endpoint.expected[role], id=f"{endpoint.label} as {role}")
    for endpoint in ENDPOINTS
    for role in ROLES
]


def test_every_endpoint_and_role_has_an_expectation() -> None:
    assert all(set(endpoint.expected) == set(ROLES) for endpoint in ENDPOINTS)
    assert len({endpoint.label for endpoint in ENDPOINTS}) == len(ENDPOINTS)


@pytest.mark.parametrize(("endpoint", "role", "expected"), ROWS)
def test_permission_matrix(
    endpoint: Endpoint,
    role: str,
    expected: int,
    make_user: Callable[..., User],
    client_for: Callable[[User | None], APIClient],
    unchanged: Callable[[], Callable[[], None]],
) -> None:
    world = build_world(make_user, client_for, swag=endpoint.swag)
    api = client_for(None if role == "anonymous" else world.users[role])
    url = "/api/" + endpoint.path.format(**world.ids)
    data, fmt = endpoint.body(world, role)
    check = unchanged()
    kwargs: dict[str, Any] = {} if data is None else {"data": data, "format": fmt}
    response = getattr(api, endpoint.method.lower())(url, **kwargs)

    content = response.content[:300]
    assert response.status_code == expected, (response.status_code, content)
    if response.status_code >= 400:
        assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
        detail = response.json().get("detail")
        assert isinstance(detail, str) and detail.strip(), response.json()
        check()  # a rejected request changes nothing
    elif endpoint.path.startswith("users/"):
        assert_tokens_only_for_their_owner(response.json(), endpoint, api_user=world.users.get(role))


def assert_tokens_only_for_their_owner(body: Any, endpoint: Endpoint, api_user: User | None) -> None:
    """A token is shown only to its owner (a registration answer shows the new user its own token)."""
    users = [item for item in (body if isinstance(body, list) else [body]) if "username" in item]
    for user in users:
        owner = endpoint.method == "POST" or (api_user is not None and user["id"] == str(api_user.pk))
        assert bool(user["token"]) == owner, (endpoint.label, user["username"], user["token"])
