"""Creating trainings and managing their participants."""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from uuid import UUID

from django.db import transaction

from fl_server_core import signals
from fl_server_core.exceptions import ConflictError, InvalidInputError, PermissionDeniedError
from fl_server_core.models import (
    AggregationMethod,
    Model,
    ModelKind,
    Training,
    TrainingState,
    UncertaintyMethod,
    User,
)
from fl_server_core.selectors import can_manage_model
from fl_server_core.services.models import copy_global_model

FINISHED_STATES = (TrainingState.COMPLETED, TrainingState.ERROR)
MAX_ROUNDS = 1_000_000  # target_num_updates, times daisy_chain_period
MAX_ROUND_TIMEOUT_SECONDS = 10**9  # about 31 years: a deadline must stay a date
MAX_UNCERTAINTY_SAMPLES = 1000  # forward passes per inference request
MAX_OPTIONS_DEPTH = 32


def _positive_int(options: Mapping[str, Any], key: str, path: str = "options") -> None:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(f"{path}.{key} must be a positive integer, got {value!r}.")


def _number(options: Mapping[str, Any], key: str, low: float, high: float | None, low_open: bool) -> None:
    value = options[key]
    ok = isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    ok = ok and not isinstance(value, bool)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise InvalidInputError(f"options.{key} must be a number {bound}, got {value!r}.")


def _check_storable(options: dict[str, Any]) -> None:
    """Plain JSON that every database stores: no NUL character (PostgreSQL), no NaN or infinity, bounded depth."""
    pending: list[tuple[Any, str, int]] = [(options, "options", 0)]
    while pending:
        value, path, depth = pending.pop()
        if depth > MAX_OPTIONS_DEPTH:
            raise InvalidInputError(f"options are nested more than {MAX_OPTIONS_DEPTH} levels deep.")
        if isinstance(value, str) and "\x00" in value:
            raise InvalidInputError(f"{path} must not contain NUL characters.")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInputError(f"{path} must not be NaN or infinite.")
        if isinstance(value, dict):
            for key, item in value.items():
                pending += [(key, f"{path} (a key)", depth), (item, f"{path}.{key}", depth + 1)]
        elif isinstance(value, list):
            pending += [(item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value)]


def _boolean(options: Mapping[str, Any], key: str, path: str = "options") -> None:
    if not isinstance(options[key], bool):
        raise InvalidInputError(f"{path}.{key} must be true or false, got {options[key]!r}.")


def validate_options(options: Any) -> dict[str, Any]:
    """Check the known training options; unknown keys are kept for extensions."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise InvalidInputError("options must be a JSON object.")
    _check_storable(options)
    checks = {
        "daisy_chain_period": lambda: _positive_int(options, "daisy_chain_period"),
        "min_participants": lambda: _positive_int(options, "min_participants"),
        "round_timeout_seconds": lambda: _number(options, "round_timeout_seconds", 0, MAX_ROUND_TIMEOUT_SECONDS, True),
        "client_fraction": lambda: _number(options, "client_fraction", 0, 1, True),
        "proximal_mu": lambda: _number(options, "proximal_mu", 0, None, False),
        "skip_model_tests": lambda: _boolean(options, "skip_model_tests"),
        "model_test_after_each_round": lambda: _boolean(options, "model_test_after_each_round"),
    }
    for key, check in checks.items():
        if key in options:
            check()
    if "seed" in options and (isinstance(options["seed"], bool) or not isinstance(options["seed"], int)):
        raise InvalidInputError(f"options.seed must be an integer, got {options['seed']!r}.")
    uncertainty = options.get("uncertainty", {})
    if not isinstance(uncertainty, dict):
        raise InvalidInputError("options.uncertainty must be a JSON object.")
    if "N" in uncertainty:
        _positive_int(uncertainty, "N", "options.uncertainty")
        if uncertainty["N"] > MAX_UNCERTAINTY_SAMPLES:
            raise InvalidInputError(f"options.uncertainty.N must be at most {MAX_UNCERTAINTY_SAMPLES}.")
    if "softmax" in uncertainty:
        _boolean(uncertainty, "softmax", "options.uncertainty")
    return dict(options)


def users_by_id(ids: Iterable[UUID | str]) -> list[User]:
    """Users for the given ids; unknown ids are an input error naming them."""
    wanted = {str(i) for i in ids}
    users = list(User.objects.filter(pk__in=wanted))
    missing = wanted - {str(u.pk) for u in users}
    if missing:
        raise InvalidInputError(f"clients: unknown users: {', '.join(sorted(missing))}.")
    return users


def create_training(
    actor: User,
    model: Model,
    target_num_updates: int,
    metric_names: Sequence[str],
    aggregation_method: str = AggregationMethod.FED_AVG,
    uncertainty_method: str = UncertaintyMethod.NONE,
    options: Any = None,
    clients: Sequence[UUID | str] = (),
) -> Training:
    """Create a training of a global model; a model that already has a training is copied."""
    if not model.is_global:
        raise InvalidInputError("model_id must name a global model (not a local update or a mean model).")
    if not can_manage_model(actor, model):
        raise PermissionDeniedError("You may only create trainings for models you own.")
    if target_num_updates < 1:
        raise InvalidInputError("target_num_updates must be at least 1.")
    options = validate_options(options)
    participants = users_by_id(clients)
    period = options.get("daisy_chain_period", 1)
    if target_num_updates * period > MAX_ROUNDS:
        raise InvalidInputError(f"target_num_updates times options.daisy_chain_period must be at most {MAX_ROUNDS}.")
    # the kind follows this training (a model left SWAG by an earlier training is plain again)
    kind = ModelKind.SWAG if uncertainty_method == UncertaintyMethod.SWAG else ModelKind.GLOBAL
    with transaction.atomic():
        if Training.objects.filter(model=model).exists():
            model = copy_global_model(model, actor, kind)
        elif model.kind != kind:
            Model.objects.filter(pk=model.pk).update(kind=kind)
            model.refresh_from_db()
        training = Training.objects.create(
            model=model,
            actor=actor,
            target_num_updates=target_num_updates * period,
            metric_names=list(metric_names),
            aggregation_method=aggregation_method,
            uncertainty_method=uncertainty_method,
            options=options,
        )
        training.participants.set(participants)
    return training


def add_participants(training: Training, user_ids: Sequence[UUID | str]) -> list[User]:
    """Register users as participants of a training that has not finished."""
    users = users_by_id(user_ids)
    with transaction.atomic():
        training = Training.objects.select_for_update().get(pk=training.pk)
        if training.state in FINISHED_STATES:
            raise ConflictError(f"The training is {training.get_state_display().lower()}; participants are fixed.")
        training.participants.add(*users)
        signals.participants_added.send(sender=Training, training=training, users=users)
    return users


def remove_participants(training: Training, user_ids: Sequence[UUID | str]) -> list[User]:
    """Remove users from the participants of a training."""
    users = users_by_id(user_ids)
    with transaction.atomic():
        training = Training.objects.select_for_update().get(pk=training.pk)
        training.participants.remove(*users)
        signals.participants_removed.send(sender=Training, training=training, users=users)
    return users
