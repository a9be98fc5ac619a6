"""Command line interface: `python -m fl_client <command>`.

The server is `--server` or `FL_SERVER_URL` (default http://127.0.0.1:8000); credentials are
`--token`, or `--username` and `--password`, or the environment variable `FL_TOKEN`.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from fl_client import _http
from fl_client.api import ApiClient
from fl_client.exceptions import CommunicationException

FINISHED_STATES = {"C": "COMPLETED", "E": "ERROR"}


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("server and credentials")
    group.add_argument("--server", default=argparse.SUPPRESS, help="server URL (default: $FL_SERVER_URL)")
    group.add_argument("--token", default=argparse.SUPPRESS, help="API token (default: $FL_TOKEN)")
    group.add_argument("--username", default=argparse.SUPPRESS, help="user name (with --password)")
    group.add_argument("--password", default=argparse.SUPPRESS, help="password (with --username)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    common = _common_options()
    parser = argparse.ArgumentParser(prog="python -m fl_client", description=__doc__, parents=[common])
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    register = commands.add_parser("register", parents=[common], help="register a user; prints its id and token")
    register.add_argument("new_username", metavar="USERNAME")
    register.add_argument("new_password", metavar="PASSWORD", nargs="?", help="default: $FL_PASSWORD or a prompt")
    register.add_argument("--actor", action="store_true", help="the user runs trainings")
    register.add_argument("--client", action="store_true", help="the user takes part in trainings")
    register.add_argument("--endpoint", help="message endpoint URL for pushed notifications")
    register.add_argument("--email", default=None)

    upload = commands.add_parser("upload-model", parents=[common], help="upload a TorchScript global model")
    upload.add_argument("file", metavar="FILE")
    upload.add_argument("--name", required=True)
    upload.add_argument("--description", default="")
    upload.add_argument("--input-shape", nargs="+", default=None, help='dimensions, "None" for a free one')
    upload.add_argument("--preprocessing", default=None, metavar="FILE", help="TorchScript preprocessing module")
    upload.add_argument("--no-progress", action="store_true")

    create = commands.add_parser("create-training", parents=[common], help="create a training; prints its id")
    create.add_argument("--model-id", required=True)
    create.add_argument("--clients", nargs="+", required=True, metavar="UUID")
    create.add_argument("--rounds", type=int, required=True, help="target number of update rounds")
    create.add_argument("--method", default="FedAvg", help="FedAvg, FedProx or FedDC")
    create.add_argument("--options", default="{}", type=_json_object, help="options as a JSON object")
    create.add_argument("--metric-names", nargs="*", default=[])
    create.add_argument("--uncertainty", default=None, help="NONE, ENSEMBLE, MC_DROPOUT or SWAG")

    start = commands.add_parser("start", parents=[common], help="start a training")
    start.add_argument("training", metavar="TRAINING")

    participate = commands.add_parser("participate", parents=[common], help="take part in a training")
    participate.add_argument("training", metavar="TRAINING")
    participate.add_argument("--train-script", required=True, metavar="S")
    participate.add_argument("--test-script", default=None, metavar="T")
    mode = participate.add_mutually_exclusive_group(required=True)
    mode.add_argument("--listen", metavar="HOST:PORT", help="receive pushed notifications (your message_endpoint)")
    mode.add_argument("--pull", action="store_true", help="poll the events endpoint")
    participate.add_argument("--secret", default=None, help="verify X-FL-Signature (default: $FL_NOTIFICATION_SECRET)")
    participate.add_argument("--wait", type=float, default=10.0, help="long-poll seconds (--pull)")
    participate.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    participate.add_argument("--script-timeout", type=float, default=None)

    watch = commands.add_parser("watch", parents=[common], help="follow a training's rounds until it ends")
    watch.add_argument("training", metavar="TRAINING")
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between checks")
    watch.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def authorization(args: argparse.Namespace, required: bool = True) -> str | None:
    """The `Authorization` value from `--token`, `--username`/`--password` or `FL_TOKEN`."""
    token = getattr(args, "token", None)
    username, password = getattr(args, "username", None), getattr(args, "password", None)
    if token:
        return _http.token_authorization(token)
    if username is not None:
        if password is None:
            password = getpass.getpass(f"password of {username}: ")
        return _http.basic_authorization(username, password)
    if os.environ.get("FL_TOKEN"):
        return _http.token_authorization(os.environ["FL_TOKEN"])
    if required:
        raise SystemExit("error: no credentials: use --token, --username/--password or FL_TOKEN")
    return None


def _api(args: argparse.Namespace, required: bool = True) -> ApiClient:
    return ApiClient(getattr(args, "server", None), authorization(args, required))


def cmd_register(args: argparse.Namespace) -> int:
    """Register a user."""
    password = args.new_password or os.environ.get("FL_PASSWORD") or getpass.getpass("new password: ")
    fields = {"email": args.email} if args.email else {}
    user = _api(args, required=False).register(
        args.new_username, password, actor=args.actor, client=args.client, message_endpoint=args.endpoint, **fields
    )
    print(f"id: {user['id']}")
    print(f"token: {user.get('token')}")
    return 0


def cmd_upload_model(args: argparse.Namespace) -> int:
    """Upload a global model."""
    shape = [None if d in ("None", "none", "") else int(d) for d in args.input_shape or []]
    model_id = _api(args).upload_global_model(
        args.file,
        args.name,
        args.description,
        input_shape=shape or None,
        preprocessing_file=args.preprocessing,
        progress=not args.no_progress,
    )
    print(model_id)
    return 0


def cmd_create_training(args: argparse.Namespace) -> int:
    """Create a training."""
    training_id = _api(args).create_training(
        args.model_id,
        args.clients,
        args.rounds,
        args.method,
        metric_names=args.metric_names,
        uncertainty_method=args.uncertainty,
        options=args.options,
    )
    print(training_id)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    """Start a training."""
    print(_api(args).start_training(args.training))
    return 0


def cmd_participate(args: argparse.Namespace) -> int:
    """Take part in a training with external scripts until it finishes."""
    from fl_client.participant import Participant  # loads torch: only for this command

    participant = Participant(
        getattr(args, "server", None),
        http_authorization=authorization(args),
        train_script=args.train_script,
        test_script=args.test_script,
        script_timeout=args.script_timeout,
        progress=True,
    )
    if args.pull:
        participant.pull(args.training, wait=args.wait, timeout=args.timeout)
    else:
        host, _, port = args.listen.rpartition(":")
        secret = args.secret or os.environ.get("FL_NOTIFICATION_SECRET") or None
        server = participant.serve(host or "0.0.0.0", int(port), secret, training_id=args.training)
        print(f"listening on {server.url} (this must be your message_endpoint)", flush=True)
        try:
            if not server.wait(args.timeout):
                print("error: the training did not finish in time", file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            return 130
        finally:
            server.shutdown()
    print(f"training {args.training} finished")
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Show a progress bar over the rounds of a training until it completes or fails."""
    api = _api(args)
    deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    training = api.training(args.training)
    with tqdm(total=training.get("target_num_updates"), unit="round", desc=f"training {args.training[:8]}") as bar:
        while True:
            bar.n = (
                min(int(training.get("round") or 0), bar.total or 0) if bar.total else int(training.get("round") or 0)
            )
            bar.set_postfix(state=training["state"], refresh=False)
            bar.refresh()
            if training["state"] in FINISHED_STATES:
                break
            if deadline is not None and time.monotonic() >= deadline:
                bar.close()
                print(f"state: {training['state']} round: {training.get('round')} (timed out)")
                return 2
            time.sleep(args.interval)
            training = api.training(args.training)
    print(f"state: {training['state']} ({FINISHED_STATES[training['state']]}) round: {training.get('round')}")
    if training["state"] == "E" and training.get("error_reason"):
        print(f"error: {training['error_reason']}")
    return 0 if training["state"] == "C" else 1


COMMANDS = {
    "register": cmd_register,
    "upload-model": cmd_upload_model,
    "create-training": cmd_create_training,
    "start": cmd_start,
    "participate": cmd_participate,
    "watch": cmd_watch,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CommunicationException as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
