"""Authentication schemes, registration, user visibility and group management over the real API."""

import json
import uuid

import pytest
from django.contrib.auth.models import Group
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from fl_server_core.models import User
from tests.conftest import basic

USER_KEYS = {"id", "username", "first_name", "last_name", "email", "actor", "client", "message_endpoint", "token"}
PASSWORD = "s3cret-pass"


def header_client(value):
    """An API client sending this Authorization header."""
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=value)
    return api


def assert_detail(response, status, *words):
    """The answer is a JSON error with this status and a non-empty detail mentioning the words."""
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert detail.strip()
    for word in words:
        assert word.lower() in detail.lower(), detail
    return detail


@pytest.fixture
def alice(make_user):
    return make_user("alice", first_name="Alice", email="alice@example.org", client=True)


@pytest.fixture
def staff(make_user):
    return make_user("admin", is_staff=True)


# --- Authentication: accepted schemes ---------------------------------------------------------------------------


def test_token_header_authenticates(alice):
    response = header_client(f"Token {alice.auth_token.key}").get("/api/users/myself/")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"
    assert response.json()["token"] == alice.auth_token.key


def test_basic_username_password_authenticates(alice):
    response = header_client(basic("alice", PASSWORD)).get("/api/users/myself/")
    assert response.status_code == 200
    assert response.json()["id"] == str(alice.pk)


def test_basic_token_with_empty_password_authenticates(alice):
    key = alice.auth_token.key
    assert len(key) == 40
    response = header_client(basic(key, "")).get("/api/users/myself/")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_session_login_authenticates(alice):
    api = APIClient()
    assert api.login(username="alice", password=PASSWORD)
    response = api.get("/api/users/myself/")
    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_session_force_login_authenticates(alice):
    api = APIClient()
    api.force_login(alice)
    response = api.get("/api/users/")
    assert response.status_code == 200
    assert [u["username"] for u in response.json()] == ["alice"]


def test_session_auth_enforces_csrf_on_writes(staff, unchanged):
    api = APIClient(enforce_csrf_checks=True)
    api.force_login(staff)
    assert api.get("/api/groups/").status_code == 200
    check = unchanged()
    assert_detail(api.post("/api/groups/", {"name": "csrf"}, format="json"), 403, "csrf")
    check()
    assert not Group.objects.filter(name="csrf").exists()


# --- Authentication: rejected variants ----------------------------------------------------------------------------


def test_no_credentials_is_401(alice):
    response = APIClient().get("/api/users/myself/")
    assert_detail(response, 401, "credentials")


def test_basic_wrong_password_is_401(alice):
    assert_detail(header_client(basic("alice", "wrong-password")).get("/api/users/myself/"), 401, "invalid")


def test_basic_unknown_user_is_401(alice):
    assert_detail(header_client(basic("nobody", PASSWORD)).get("/api/users/myself/"), 401, "invalid")


def test_unknown_token_header_is_401(alice):
    assert_detail(header_client("Token " + "0" * 40).get("/api/users/myself/"), 401, "token")


def test_basic_unknown_token_is_401(alice):
    assert_detail(header_client(basic("f" * 40, "")).get("/api/users/myself/"), 401, "token")


def test_basic_token_with_non_empty_password_is_401(alice):
    response = header_client(basic(alice.auth_token.key, "anything")).get("/api/users/myself/")
    assert_detail(response, 401, "invalid")


def test_basic_token_of_wrong_length_is_401(alice):
    response = header_client(basic(alice.auth_token.key[:-1], "")).get("/api/users/myself/")
    assert_detail(response, 401, "invalid")


def test_inactive_user_token_is_401(alice):
    key = alice.auth_token.key
    User.objects.filter(pk=alice.pk).update(is_active=False)
    assert_detail(header_client(f"Token {key}").get("/api/users/myself/"), 401, "inactive")


def test_inactive_user_basic_password_is_401(alice):
    User.objects.filter(pk=alice.pk).update(is_active=False)
    assert_detail(header_client(basic("alice", PASSWORD)).get("/api/users/myself/"), 401, "invalid")


def test_inactive_user_basic_token_is_401(alice):
    key = alice.auth_token.key
    User.objects.filter(pk=alice.pk).update(is_active=False)
    assert_detail(header_client(basic(key, "")).get("/api/users/myself/"), 401, "token")


def test_inactive_user_session_is_401(alice):
    api = APIClient()
    api.force_login(alice)
    User.objects.filter(pk=alice.pk).update(is_active=False)
    assert_detail(api.get("/api/users/myself/"), 401)


@pytest.mark.parametrize(
    "header",
    [
        "Token",
        "Token two parts",
        "Basic",
        "Basic !!!not-base64!!!",
        "Basic " + "bm9jb2xvbg==",  # "nocolon"
        "Basic a b",
    ],
)
def test_malformed_header_is_401(alice, header):
    assert_detail(header_client(header).get("/api/users/myself/"), 401, "invalid")


def test_rejected_credentials_do_not_create_users(alice, unchanged):
    check = unchanged()
    body = {"username": "mallory", "password": "long-enough-pass"}
    response = header_client(basic("alice", "wrong-password")).post("/api/users/", body, format="json")
    assert_detail(response, 401)
    check()
    assert not User.objects.filter(username="mallory").exists()


# --- Registration --------------------------------------------------------------------------------------------------


def test_register_json_returns_user_with_token(db):
    body = {
        "username": "newbie",
        "password": "long-enough-pass",
        "first_name": "New",
        "last_name": "Bie",
        "email": "newbie@example.org",
        "actor": True,
        "client": True,
        "message_endpoint": "http://client.example.org:8101/notify",
    }
    response = APIClient().post("/api/users/", body, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert set(data) == USER_KEYS
    user = User.objects.get(username="newbie")
    assert data["id"] == str(user.pk)
    uuid.UUID(data["id"])
    assert (data["first_name"], data["last_name"], data["email"]) == ("New", "Bie", "newbie@example.org")
    assert data["actor"] is True and data["client"] is True
    assert data["message_endpoint"] == "http://client.example.org:8101/notify"
    assert data["token"] == Token.objects.get(user=user).key
    assert user.check_password("long-enough-pass")
    assert user.password != "long-enough-pass"
    assert not user.is_staff and not user.is_superuser


def test_register_form_body(db):
    body = {"username": "formuser", "password": "long-enough-pass", "client": "true"}
    response = APIClient().post("/api/users/", body)  # multipart form
    assert response.status_code == 201, response.json()
    data = response.json()
    assert set(data) == USER_KEYS
    assert data["client"] is True and data["actor"] is False
    assert data["message_endpoint"] == ""
    assert User.objects.get(username="formuser").client


def test_register_urlencoded_body(db):
    api = APIClient()
    response = api.post(
        "/api/users/", "username=urlenc&password=long-enough-pass", content_type="application/x-www-form-urlencoded"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["username"] == "urlenc"
    assert User.objects.filter(username="urlenc").exists()


def test_registered_token_works_for_next_request(db):
    response = APIClient().post("/api/users/", {"username": "fresh", "password": "long-enough-pass"}, format="json")
    assert response.status_code == 201
    token = response.json()["token"]
    myself = header_client(f"Token {token}").get("/api/users/myself/")
    assert myself.status_code == 200
    assert myself.json()["username"] == "fresh"
    assert header_client(basic(token, "")).get("/api/users/myself/").status_code == 200
    assert header_client(basic("fresh", "long-enough-pass")).get("/api/users/myself/").status_code == 200


def test_register_cannot_set_staff_or_superuser(db):
    body = {"username": "sneaky", "password": "long-enough-pass", "is_staff": True, "is_superuser": True}
    response = APIClient().post("/api/users/", body, format="json")
    assert response.status_code == 201
    assert "is_staff" not in response.json() and "is_superuser" not in response.json()
    user = User.objects.get(username="sneaky")
    assert not user.is_staff
    assert not user.is_superuser
    assert header_client(f"Token {response.json()['token']}").get("/api/groups/").status_code == 403


def test_register_cannot_set_staff_with_form_body(db):
    body = {"username": "sneaky2", "password": "long-enough-pass", "is_staff": "true", "is_superuser": "true"}
    assert APIClient().post("/api/users/", body).status_code == 201
    user = User.objects.get(username="sneaky2")
    assert not user.is_staff and not user.is_superuser


def test_register_duplicate_username_is_400(alice, unchanged):
    check = unchanged()
    response = APIClient().post("/api/users/", {"username": "alice", "password": "long-enough-pass"}, format="json")
    assert_detail(response, 400, "username")
    check()
    alice.refresh_from_db()
    assert alice.check_password(PASSWORD)


def test_register_short_password_is_400(db, unchanged):
    check = unchanged()
    response = APIClient().post("/api/users/", {"username": "shorty", "password": "abc"}, format="json")
    assert_detail(response, 400, "password")
    check()
    assert not User.objects.filter(username="shorty").exists()


def test_register_missing_password_is_400(db, unchanged):
    check = unchanged()
    response = APIClient().post("/api/users/", {"username": "nopass"}, format="json")
    assert_detail(response, 400, "password")
    check()


def test_register_missing_username_is_400(db, unchanged):
    check = unchanged()
    response = APIClient().post("/api/users/", {"password": "long-enough-pass"}, format="json")
    assert_detail(response, 400, "username")
    check()


def test_register_bad_message_endpoint_is_400(db, unchanged):
    check = unchanged()
    body = {"username": "badurl", "password": "long-enough-pass", "message_endpoint": "not a url"}
    response = APIClient().post("/api/users/", body, format="json")
    assert_detail(response, 400, "message_endpoint")
    check()
    assert not User.objects.filter(username="badurl").exists()


def test_register_bad_email_is_400(db, unchanged):
    check = unchanged()
    body = {"username": "bademail", "password": "long-enough-pass", "email": "not-an-email"}
    assert_detail(APIClient().post("/api/users/", body, format="json"), 400, "email")
    check()


def test_register_malformed_json_is_400(db, unchanged):
    check = unchanged()
    response = APIClient().post("/api/users/", '{"username": "broken", ', content_type="application/json")
    assert_detail(response, 400, "json")
    check()


def test_register_unsupported_content_type_is_415(db, unchanged):
    check = unchanged()
    response = APIClient().post("/api/users/", "username=plain&password=long-enough-pass", content_type="text/plain")
    assert_detail(response, 415, "text/plain")
    check()
    assert not User.objects.filter(username="plain").exists()


def test_register_closed_rejects_anonymous(db, settings, unchanged):
    settings.FL_OPEN_REGISTRATION = False
    check = unchanged()
    response = APIClient().post("/api/users/", {"username": "late", "password": "long-enough-pass"}, format="json")
    assert response.status_code in (401, 403)
    assert_detail(response, response.status_code)
    check()
    assert not User.objects.filter(username="late").exists()


def test_register_closed_rejects_non_staff(alice, settings, client_for, unchanged):
    settings.FL_OPEN_REGISTRATION = False
    check = unchanged()
    body = {"username": "friend", "password": "long-enough-pass"}
    response = client_for(alice).post("/api/users/", body, format="json")
    assert_detail(response, 403, "registration")
    check()


def test_register_closed_staff_can_create(staff, settings, client_for):
    settings.FL_OPEN_REGISTRATION = False
    body = {"username": "hired", "password": "long-enough-pass", "client": True, "is_staff": True}
    response = client_for(staff).post("/api/users/", body, format="json")
    assert response.status_code == 201, response.json()
    data = response.json()
    assert set(data) == USER_KEYS
    user = User.objects.get(username="hired")
    assert data["id"] == str(user.pk)
    assert data["token"] == user.auth_token.key
    assert user.client and not user.is_staff
    assert header_client(f"Token {data['token']}").get("/api/users/myself/").json()["username"] == "hired"


# --- Users: listing and visibility ---------------------------------------------------------------------------------


def usernames(response):
    assert response.status_code == 200, response.content
    return sorted(u["username"] for u in response.json())


def test_user_list_requires_authentication(alice):
    assert_detail(APIClient().get("/api/users/"), 401)


def test_user_list_without_trainings_is_self_only(alice, outsider, client_for):
    response = client_for(alice).get("/api/users/")
    assert usernames(response) == ["alice"]
    assert set(response.json()[0]) == USER_KEYS
    assert response.json()[0]["token"] == alice.auth_token.key


def test_user_list_shows_training_partners(actor, participants, outsider, make_training, client_for):
    make_training(actor, participants[:2])
    everyone_in_training = ["actor", "client0", "client1"]
    assert usernames(client_for(actor).get("/api/users/")) == everyone_in_training
    assert usernames(client_for(participants[0]).get("/api/users/")) == everyone_in_training
    assert usernames(client_for(participants[2]).get("/api/users/")) == ["client2"]
    assert usernames(client_for(outsider).get("/api/users/")) == ["outsider"]


def test_user_visibility_is_not_transitive(actor, participants, make_training, client_for):
    make_training(actor, participants[:1])
    make_training(actor, participants[1:2])
    assert usernames(client_for(actor).get("/api/users/")) == ["actor", "client0", "client1"]
    assert usernames(client_for(participants[0]).get("/api/users/")) == ["actor", "client0"]
    assert usernames(client_for(participants[1]).get("/api/users/")) == ["actor", "client1"]
    assert client_for(participants[0]).get(f"/api/users/{participants[1].pk}/").status_code == 404


def test_user_list_token_only_in_own_entry(actor, participants, make_training, client_for):
    make_training(actor, participants[:2])
    response = client_for(participants[0]).get("/api/users/")
    tokens = {u["username"]: u["token"] for u in response.json()}
    assert tokens == {"actor": None, "client0": participants[0].auth_token.key, "client1": None}


def test_user_list_staff_sees_everyone(staff, actor, participants, outsider, client_for):
    response = client_for(staff).get("/api/users/")
    assert usernames(response) == sorted(["admin", "actor", "client0", "client1", "client2", "outsider"])
    for entry in response.json():
        assert entry["token"] == (staff.auth_token.key if entry["username"] == "admin" else None)


def test_myself(alice, client_for):
    response = client_for(alice).get("/api/users/myself/")
    assert response.status_code == 200
    data = response.json()
    assert set(data) == USER_KEYS
    assert data["id"] == str(alice.pk)
    assert (data["username"], data["first_name"], data["email"]) == ("alice", "Alice", "alice@example.org")
    assert data["client"] is True and data["actor"] is False
    assert data["token"] == alice.auth_token.key


def test_myself_requires_authentication(db):
    assert_detail(APIClient().get("/api/users/myself/"), 401)


def test_user_detail_self(alice, client_for):
    response = client_for(alice).get(f"/api/users/{alice.pk}/")
    assert response.status_code == 200
    assert response.json()["token"] == alice.auth_token.key


def test_user_detail_visible_partner(actor, participants, make_training, client_for):
    make_training(actor, participants[:1])
    response = client_for(participants[0]).get(f"/api/users/{actor.pk}/")
    assert response.status_code == 200
    data = response.json()
    assert set(data) == USER_KEYS
    assert data["username"] == "actor"
    assert data["token"] is None
    back = client_for(actor).get(f"/api/users/{participants[0].pk}/")
    assert back.status_code == 200
    assert back.json()["message_endpoint"] == "http://127.0.0.1:9/0"
    assert back.json()["token"] is None


def test_user_detail_invisible_is_404(actor, participants, outsider, make_training, client_for):
    make_training(actor, participants[:1])
    assert_detail(client_for(outsider).get(f"/api/users/{actor.pk}/"), 404)
    assert_detail(client_for(participants[1]).get(f"/api/users/{participants[0].pk}/"), 404)
    assert_detail(client_for(actor).get(f"/api/users/{outsider.pk}/"), 404)


def test_user_detail_unknown_uuid_is_404(alice, client_for):
    assert_detail(client_for(alice).get(f"/api/users/{uuid.uuid4()}/"), 404)


def test_user_detail_staff_sees_anyone(staff, outsider, client_for):
    response = client_for(staff).get(f"/api/users/{outsider.pk}/")
    assert response.status_code == 200
    assert response.json()["username"] == "outsider"
    assert response.json()["token"] is None


@pytest.mark.parametrize("bad", ["not-a-uuid", "123", "0000-zzzz"])
def test_user_detail_malformed_uuid_is_json_404(alice, client_for, bad):
    assert_detail(client_for(alice).get(f"/api/users/{bad}/"), 404, "not found")


def test_user_detail_requires_authentication(alice):
    assert_detail(APIClient().get(f"/api/users/{alice.pk}/"), 401)


def test_my_groups(alice, outsider, client_for):
    mine = Group.objects.create(name="hospital-a")
    Group.objects.create(name="hospital-b").user_set.add(outsider)
    alice.groups.add(mine)
    response = client_for(alice).get("/api/users/groups/")
    assert response.status_code == 200
    assert response.json() == [{"id": mine.pk, "name": "hospital-a"}]
    assert client_for(outsider).get("/api/users/groups/").json()[0]["name"] == "hospital-b"


def test_my_groups_empty(alice, client_for):
    response = client_for(alice).get("/api/users/groups/")
    assert response.status_code == 200
    assert response.json() == []


def test_my_groups_requires_authentication(db):
    assert_detail(APIClient().get("/api/users/groups/"), 401)


def test_my_trainings(actor, participants, outsider, make_user, make_training, client_for):
    other_actor = make_user("other-actor", actor=True)
    mine = make_training(actor, participants[:2])
    joined = make_training(other_actor, [actor, participants[0]])
    foreign = make_training(other_actor, [participants[2]])

    def ids(user):
        response = client_for(user).get("/api/users/trainings/")
        assert response.status_code == 200
        return sorted(t["id"] for t in response.json())

    assert ids(actor) == sorted([str(mine.pk), str(joined.pk)])
    assert ids(participants[0]) == sorted([str(mine.pk), str(joined.pk)])
    assert ids(participants[1]) == [str(mine.pk)]
    assert ids(participants[2]) == [str(foreign.pk)]
    assert ids(outsider) == []
    assert ids(other_actor) == sorted([str(joined.pk), str(foreign.pk)])


def test_my_trainings_shape(actor, participants, make_training, client_for):
    training = make_training(actor, participants[:2])
    [entry] = client_for(participants[1]).get("/api/users/trainings/").json()
    assert entry["id"] == str(training.pk)
    assert entry["actor"] == str(actor.pk)
    assert sorted(entry["participants"]) == sorted(str(p.pk) for p in participants[:2])
    assert entry["state"] == "I"


def test_my_trainings_requires_authentication(db):
    assert_detail(APIClient().get("/api/users/trainings/"), 401)


# --- Groups (staff only) -------------------------------------------------------------------------------------------


def test_staff_lists_groups(staff, client_for):
    first = Group.objects.create(name="g1")
    second = Group.objects.create(name="g2")
    response = client_for(staff).get("/api/groups/")
    assert response.status_code == 200
    assert response.json() == [{"id": first.pk, "name": "g1"}, {"id": second.pk, "name": "g2"}]


def test_staff_creates_group(staff, client_for):
    response = client_for(staff).post("/api/groups/", {"name": "clinic"}, format="json")
    assert response.status_code == 201, response.json()
    group = Group.objects.get(name="clinic")
    assert response.json() == {"id": group.pk, "name": "clinic"}


def test_staff_creates_group_with_form_body(staff, client_for):
    response = client_for(staff).post("/api/groups/", {"name": "form-clinic"})
    assert response.status_code == 201
    assert Group.objects.filter(name="form-clinic").exists()


def test_staff_create_duplicate_group_is_400(staff, client_for):
    Group.objects.create(name="clinic")
    response = client_for(staff).post("/api/groups/", {"name": "clinic"}, format="json")
    assert_detail(response, 400, "name")
    assert Group.objects.count() == 1


def test_staff_create_group_without_name_is_400(staff, client_for):
    assert_detail(client_for(staff).post("/api/groups/", {}, format="json"), 400, "name")
    assert Group.objects.count() == 0


def test_staff_retrieves_group(staff, client_for):
    group = Group.objects.create(name="g1")
    response = client_for(staff).get(f"/api/groups/{group.pk}/")
    assert response.status_code == 200
    assert response.json() == {"id": group.pk, "name": "g1"}


def test_staff_retrieve_unknown_group_is_404(staff, client_for):
    assert_detail(client_for(staff).get("/api/groups/987654/"), 404)


def test_staff_retrieve_non_numeric_group_is_404(staff, client_for):
    assert_detail(client_for(staff).get("/api/groups/abc/"), 404)


def test_staff_puts_group(staff, client_for):
    group = Group.objects.create(name="old")
    response = client_for(staff).put(f"/api/groups/{group.pk}/", {"name": "new"}, format="json")
    assert response.status_code == 200
    assert response.json() == {"id": group.pk, "name": "new"}
    group.refresh_from_db()
    assert group.name == "new"


def test_staff_put_group_without_name_is_400(staff, client_for):
    group = Group.objects.create(name="old")
    assert_detail(client_for(staff).put(f"/api/groups/{group.pk}/", {}, format="json"), 400, "name")
    group.refresh_from_db()
    assert group.name == "old"


def test_staff_patches_group(staff, client_for):
    group = Group.objects.create(name="old")
    response = client_for(staff).patch(f"/api/groups/{group.pk}/", {"name": "patched"}, format="json")
    assert response.status_code == 200
    assert response.json()["name"] == "patched"
    group.refresh_from_db()
    assert group.name == "patched"


def test_staff_deletes_group(staff, client_for):
    group = Group.objects.create(name="doomed")
    staff.groups.add(group)
    response = client_for(staff).delete(f"/api/groups/{group.pk}/")
    assert response.status_code == 204
    assert not Group.objects.filter(pk=group.pk).exists()
    assert staff.groups.count() == 0


def group_state():
    return sorted(Group.objects.values_list("id", "name"))


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/groups/", None),
        ("post", "/api/groups/", {"name": "mine"}),
        ("get", "/api/groups/{pk}/", None),
        ("put", "/api/groups/{pk}/", {"name": "renamed"}),
        ("patch", "/api/groups/{pk}/", {"name": "renamed"}),
        ("delete", "/api/groups/{pk}/", None),
    ],
)
def test_non_staff_cannot_manage_groups(alice, client_for, unchanged, method, path, body):
    group = Group.objects.create(name="existing")
    alice.groups.add(group)  # even a member may not manage the group
    before = group_state()
    check = unchanged()
    response = getattr(client_for(alice), method)(path.format(pk=group.pk), body, format="json")
    assert_detail(response, 403, "permission")
    check()
    assert group_state() == before


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("get", "/api/groups/", None),
        ("post", "/api/groups/", {"name": "mine"}),
        ("get", "/api/groups/{pk}/", None),
        ("put", "/api/groups/{pk}/", {"name": "renamed"}),
        ("patch", "/api/groups/{pk}/", {"name": "renamed"}),
        ("delete", "/api/groups/{pk}/", None),
    ],
)
def test_anonymous_cannot_manage_groups(db, unchanged, method, path, body):
    group = Group.objects.create(name="existing")
    before = group_state()
    check = unchanged()
    response = getattr(APIClient(), method)(path.format(pk=group.pk), body, format="json")
    assert_detail(response, 401, "credentials")
    check()
    assert group_state() == before


# --- Unknown URLs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/nothing-here/", "/api/users/myself/extra/", "/api/x", "/api/users/1/2/"])
def test_unknown_api_url_is_json_404(alice, client_for, path):
    assert_detail(client_for(alice).get(path), 404, "not found")


def test_unknown_api_url_anonymous_is_json_404(db):
    response = APIClient().post("/api/does-not-exist/", json.dumps({}), content_type="application/json")
    assert_detail(response, 404, "not found")


def test_revoked_token_does_not_break_myself(alice):
    """An admin may delete a user's token (authtoken admin); the user can still log in otherwise."""
    Token.objects.filter(user=alice).delete()
    response = header_client(basic("alice", PASSWORD)).get("/api/users/myself/")
    assert response.status_code == 200, response.content[:300]
    assert set(response.json()) == USER_KEYS
