"""`python -m fl_client` smoke tests as subprocesses against the live server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fl_client import ApiClient
from fl_client._http import token_authorization
from tests.client.conftest import comm_for, new_training, shift_parameters, token_of
from tests.helpers import torchscript_bytes

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT = 60


def cli_env() -> dict[str, str]:
    """The environment of a CLI run: the repository importable, no stray FL_* configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "DJANGO_"))}
    env["PYTHONPATH"] = str(REPO)
    return env


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fl_client", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        cwd=REPO,
        env=cli_env(),
    )


@pytest.mark.django_db(transaction=True)
def test_register_prints_id_and_token(server_url):
    endpoint = "http://127.0.0.1:9/"
    result = cli("register", "cli-user", "cli-password-1", "--client", "--endpoint", endpoint, "--server", server_url)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    me = ApiClient(server_url, token_authorization(lines["token"])).myself()
    assert (me["id"], me["username"], me["client"], me["actor"]) == (lines["id"], "cli-user", True, False)
    assert me["message_endpoint"] == endpoint

    duplicate = cli("register", "cli-user", "cli-password-1", "--server", server_url)
    assert duplicate.returncode == 1
    assert duplicate.stderr.startswith("error: registration failed") and "HTTP 400" in duplicate.stderr


@pytest.mark.django_db(transaction=True)
def test_watch_follows_a_training_until_it_completes(server_url, actor, make_user):
    client = make_user("watched", client=True)
    training_id, model_id = new_training(
        server_url, actor, [client], rounds=2, options={"skip_model_tests": True}, start=True
    )
    env = {**cli_env(), "FL_TOKEN": token_of(actor), "FL_SERVER_URL": server_url}
    watch = subprocess.Popen(
        [sys.executable, "-m", "fl_client", "watch", training_id, "--interval", "0.1", "--timeout", str(CLI_TIMEOUT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        for round_number in range(2):
            comm = comm_for(server_url, client, training_id, round_number, model_id)
            assert comm.upload_model(shift_parameters(comm.download_model(), 0.1), {"loss": 1.0}, 4)
        stdout, stderr = watch.communicate(timeout=CLI_TIMEOUT)
    finally:
        watch.kill()
    assert watch.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == "state: C (COMPLETED) round: 2"
    assert "round" in stderr  # the progress bar


@pytest.mark.django_db(transaction=True)
def test_watch_needs_credentials(server_url):
    result = cli("watch", "00000000-0000-0000-0000-000000000000", "--server", server_url)
    assert result.returncode != 0 and "no credentials" in result.stderr


CLI_TRAIN_SCRIPT = """
import torch
from fl_client import Communication

comm = Communication.from_script_args()
model = comm.download_model()
with torch.no_grad():
    for parameter in model.parameters():
        parameter.mul_(0.5)
comm.upload_model(model, {"loss": 0.125}, 3)
"""


@pytest.mark.django_db(transaction=True)
def test_upload_create_start_and_participate_by_pull(server_url, actor, make_user, tmp_path):
    client = make_user("cli-client", client=True)
    (tmp_path / "model.pt").write_bytes(torchscript_bytes())
    (tmp_path / "train.py").write_text(CLI_TRAIN_SCRIPT)
    as_actor = ["--server", server_url, "--token", token_of(actor)]

    uploaded = cli("upload-model", str(tmp_path / "model.pt"), "--name", "tiny", *as_actor)
    assert uploaded.returncode == 0, uploaded.stderr
    model_id = uploaded.stdout.strip()
    created = cli(
        "create-training", "--model-id", model_id, "--clients", str(client.pk), "--rounds", "1",
        "--method", "FedAvg", "--options", '{"skip_model_tests": true}', *as_actor,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    training_id = created.stdout.strip()

    command = [sys.executable, "-m", "fl_client", "participate", training_id, "--pull", "--wait", "1"]
    command += ["--train-script", str(tmp_path / "train.py"), "--timeout", str(CLI_TIMEOUT)]
    command += ["--server", server_url, "--token", token_of(client)]
    participate = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=cli_env(),
    )
    try:
        started = cli("start", training_id, *as_actor)
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == "Training started!"
        stdout, stderr = participate.communicate(timeout=CLI_TIMEOUT)
    finally:
        participate.kill()
    assert participate.returncode == 0, stderr
    assert f"training {training_id} finished" in stdout
    api = ApiClient(server_url, token_authorization(token_of(actor)))
    assert api.training(training_id)["state"] == "C"
    rows = api.request("GET", f"trainings/{training_id}/metrics/")
    assert ("loss", 0.125) in {(row["key"], row["value"]) for row in rows}

    bad_options = cli("create-training", "--model-id", model_id, "--clients", "x", "--rounds", "1", "--options", "[]")
    assert bad_options.returncode == 2 and "JSON object" in bad_options.stderr
