"""The operators' admin site and the published OpenAPI document."""

import json
import re
import uuid
from typing import Any

import pytest
import yaml
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import URLPattern, URLResolver, reverse

from fl_server_api import urls as api_urls
from fl_server_core.models import Blob, LocalModel, Metric, Model, SWAGUpdate, Training, User
from fl_server_core.storage import get_model_storage
from tests.conftest import upload
from tests.helpers import shifted_weights, state_dict_bytes


@pytest.fixture
def admin_client(db: None) -> Client:
    """A logged-in superuser (django test client, session auth)."""
    root = get_user_model().objects.create_superuser("root", "root@example.org", "s3cret-pass")
    browser = Client()
    browser.force_login(root)
    return browser


def stored_blob(data: bytes) -> Blob:
    stored = get_model_storage().put(f"test/{uuid.uuid4().hex}", data)
    return Blob.objects.create(key=stored.key, size=stored.size, sha256=stored.sha256)


@pytest.fixture
def data(actor, participants, client_for, make_training) -> dict[str, Training]:
    """An ongoing training with an update and metrics, a SWAG training with statistics, and a new training."""
    ongoing = make_training(actor, participants, start=True)
    body = {
        "round": "0",
        "sample_size": "8",
        "model_file": upload("u.pt", state_dict_bytes(shifted_weights(0, 0.1))),
        "metric_names": ["loss", "accuracy"],
        "metric_values": ["0.25", "0.9"],
    }
    response = client_for(participants[0]).post(f"/api/models/{ongoing.model_id}/", body, format="multipart")
    assert response.status_code == 201, response.json()
    Metric.objects.create(model=ongoing.model, key="plot", value_binary=b"\x89PNG\r\n", reporter=participants[1])
    swag = make_training(actor, participants[:2], start=True, uncertainty_method="SWAG", aggregation_method="FedProx")
    Training.objects.filter(pk=swag.pk).update(state="S")
    SWAGUpdate.objects.create(
        base_model=swag.model,
        owner=participants[1],
        round=0,
        sample_size=4,
        first_moment=stored_blob(b"first"),
        second_moment=stored_blob(b"second"),
    )
    initial = make_training(actor, participants[:1])
    assert LocalModel.objects.count() == 1 and Metric.objects.count() == 3
    return {"ongoing": ongoing, "swag": swag, "initial": initial}


# --------------------------------------------------------------------------------------------------------------------
# admin


ADMIN_MODELS = [Training, Model, Metric, User, SWAGUpdate, Blob]


@pytest.mark.parametrize("model", ADMIN_MODELS, ids=lambda m: m.__name__)
def test_changelist_and_change_pages(admin_client, data, model):
    opts = model._meta
    changelist = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    assert changelist.status_code == 200
    objects = list(model._default_manager.all())
    assert objects
    assert changelist.context["cl"].result_count == len(objects)
    for obj in objects:
        page = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk]))
        assert page.status_code == 200, (model.__name__, obj.pk)
        assert str(obj.pk) in page.content.decode() or str(obj) in page.content.decode()


@pytest.mark.parametrize("model", ADMIN_MODELS, ids=lambda m: m.__name__)
def test_changelist_search_does_not_fail(admin_client, data, model):
    opts = model._meta
    response = admin_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"), {"q": "actor"})
    assert response.status_code == 200


def test_training_changelist_columns(admin_client, data):
    response = admin_client.get(reverse("admin:fl_server_core_training_changelist"))
    html = response.content.decode()
    for column in ("state", "current_round", "participants_count", "aggregation_method"):
        assert f"column-{column}" in html, column
    rows = {str(t.pk): t for t in response.context["cl"].result_list}
    assert set(rows) == {str(t.pk) for t in data.values()}
    admin = response.context["cl"].model_admin
    assert admin.participants_count(rows[str(data["ongoing"].pk)]) == 3
    assert admin.participants_count(rows[str(data["swag"].pk)]) == 2
    assert admin.participants_count(rows[str(data["initial"].pk)]) == 1
    assert admin.current_round(rows[str(data["ongoing"].pk)]) == 0
    assert '<td class="field-participants_count">3</td>' in html
    assert '<td class="field-participants_count">2</td>' in html
    assert '<td class="field-aggregation_method">FedProx</td>' in html
    assert '<td class="field-state">Ongoing</td>' in html
    assert '<td class="field-state">SWAG round</td>' in html


@pytest.mark.parametrize(("state", "expected"), [("O", "ongoing"), ("S", "swag"), ("I", "initial"), ("C", None)])
def test_training_changelist_filters_by_state(admin_client, data, state, expected):
    response = admin_client.get(reverse("admin:fl_server_core_training_changelist"), {"state__exact": state})
    assert response.status_code == 200
    found = [str(t.pk) for t in response.context["cl"].result_list]
    assert found == ([str(data[expected].pk)] if expected else [])


def test_training_changelist_orders_by_participants(admin_client, data):
    url = reverse("admin:fl_server_core_training_changelist")
    index = list(admin_client.get(url).context["cl"].list_display).index("participants_count")
    response = admin_client.get(url, {"o": str(index)})
    assert response.status_code == 200
    found = [str(t.pk) for t in response.context["cl"].result_list]
    assert found == [str(data[k].pk) for k in ("initial", "swag", "ongoing")]


def test_blobs_cannot_be_added_in_the_admin(admin_client):
    assert admin_client.get(reverse("admin:fl_server_core_blob_add")).status_code == 403


def test_admin_requires_staff(make_user):
    browser = Client()
    browser.force_login(make_user("plain"))
    response = browser.get(reverse("admin:fl_server_core_training_changelist"))
    assert response.status_code == 302
    assert reverse("admin:login") in response["Location"]


# --------------------------------------------------------------------------------------------------------------------
# OpenAPI schema


def api_paths() -> set[str]:
    """Every path of fl_server_api/urls.py (except the schema views) in OpenAPI form, parameters as `{}`."""

    def walk(patterns: list[Any], prefix: str) -> list[tuple[str, Any]]:
        found: list[tuple[str, Any]] = []
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                found += walk(pattern.url_patterns, prefix + str(pattern.pattern))
            elif isinstance(pattern, URLPattern):
                found.append((prefix + str(pattern.pattern), pattern.callback))
        return found

    paths = set()
    for route, callback in walk(api_urls.urlpatterns, ""):
        view = getattr(callback, "view_class", None) or getattr(callback, "cls", None)
        if view is not None and view.__module__.startswith("drf_spectacular"):
            continue
        route = re.sub(r"\(\?P<\w+>[^)]*\)", "{}", route)  # router regexes
        route = re.sub(r"<(?:\w+:)?\w+>", "{}", route)  # path converters
        paths.add("/api/" + route.lstrip("^").rstrip("$"))
    return paths


def normalized(paths: Any) -> set[str]:
    return {re.sub(r"\{[^}]*\}", "{}", p) for p in paths}


def test_api_paths_are_found():
    expected = api_paths()
    assert "/api/trainings/{}/start/" in expected
    assert "/api/groups/{}/" in expected
    assert len(expected) >= 19


def test_schema_yaml_lists_every_api_path(client_for, db):
    response = client_for(None).get("/api/schema/")
    assert response.status_code == 200
    assert "openapi" in response["Content-Type"] or "yaml" in response["Content-Type"]
    document = yaml.safe_load(response.content)
    assert document["openapi"].startswith("3.")
    assert document["info"]["title"]
    missing = api_paths() - normalized(document["paths"])
    assert not missing, f"undocumented paths: {sorted(missing)}"


def test_schema_json_lists_every_api_path_and_training_fields(client_for, db):
    response = client_for(None).get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    document = json.loads(response.content)
    assert not api_paths() - normalized(document["paths"])
    operations = document["paths"]["/api/trainings/"]
    assert {"get", "post"} <= set(operations)
    body = operations["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
    properties = document["components"]["schemas"][body]["properties"]
    for field in ("model_id", "target_num_updates", "metric_names", "aggregation_method", "options", "clients"):
        assert field in properties, field
    assert {"201"} <= set(operations["post"]["responses"])
    start = document["paths"]["/api/trainings/{id}/start/"]["post"]
    assert "202" in start["responses"]


def test_swagger_ui(client_for, db):
    response = client_for(None).get("/api/schema/swagger-ui/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "swagger" in html.lower()
    assert reverse("schema") in html
