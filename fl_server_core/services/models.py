"""Creating, copying, exporting and deleting models."""

import io
import uuid
from collections.abc import Sequence
from typing import Any

import torch
from django.conf import settings
from django.db import transaction

from fl_server_core import serialization
from fl_server_core.exceptions import ConflictError, InvalidInputError, NotFoundError
from fl_server_core.models import (
    Blob,
    GlobalModel,
    MeanModel,
    Metric,
    Model,
    ModelKind,
    TrainingState,
    User,
    WeightsVersion,
)
from fl_server_core.services.blobs import model_prefix, read_blob, staged_blobs
from fl_server_core.storage import get_model_storage


def _invalid(error: serialization.ModelFormatError, field: str) -> InvalidInputError:
    return InvalidInputError(f"{field}: {error}")


def _torchscript_archive(data: bytes) -> tuple[bytes, torch.nn.Module]:
    """The TorchScript archive of an uploaded global model and the loaded module."""
    module = serialization.load_global_model(data, allow_pickle=settings.FL_ALLOW_PICKLED_MODELS)
    if isinstance(module, torch.jit.ScriptModule):
        return data, module
    try:  # a trusted pickled module: store it as TorchScript so clients can load it safely
        scripted = torch.jit.script(module)
    except Exception as error:
        message = f"the pickled module cannot be converted to TorchScript: {error}"
        raise serialization.ModelFormatError(message) from error
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    return buffer.getvalue(), scripted


def parse_input_shape(values: Sequence[Any] | None) -> list[int | None] | None:
    """Parse `input_shape` values: positive integers, "None" (or null) for a free dimension."""
    if not values:
        return None
    shape: list[int | None] = []
    for value in values:
        if value is None or str(value).strip().lower() in {"none", "null", ""}:
            shape.append(None)
            continue
        try:
            dim = int(str(value).strip())
        except ValueError:
            raise InvalidInputError(f"input_shape: {value!r} is neither a positive integer nor None.") from None
        if dim <= 0:
            raise InvalidInputError(f"input_shape: dimensions must be positive, got {dim}.")
        shape.append(dim)
    return shape


def create_global_model(
    owner: User,
    name: str,
    description: str,
    model_bytes: bytes,
    preprocessing_bytes: bytes | None = None,
    input_shape: list[int | None] | None = None,
) -> GlobalModel:
    """Store an uploaded TorchScript model as a new global model (round 0)."""
    try:
        archive, module = _torchscript_archive(model_bytes)
    except serialization.ModelFormatError as error:
        raise _invalid(error, "model_file") from error
    if preprocessing_bytes is not None:
        _check_preprocessing(preprocessing_bytes)
    state = module.state_dict()
    spec = serialization.parameter_spec(module)
    model_id = uuid.uuid4()
    with staged_blobs() as blobs, transaction.atomic():
        prefix = model_prefix(model_id)
        model = GlobalModel.objects.create(
            id=model_id,
            name=name,
            description=description,
            owner=owner,
            archive=blobs.put(f"{prefix}/archive", archive),
            weights=blobs.put(f"{prefix}/weights", serialization.weights_to_safetensors(state)),
            weights_format=serialization.FORMAT_TORCHSCRIPT,
            tensor_spec=[entry.to_json() for entry in spec],
            parameter_count=serialization.parameter_count(spec, parameters_only=True),
            preprocessing=blobs.put(f"{prefix}/preprocessing", preprocessing_bytes) if preprocessing_bytes else None,
            input_shape=input_shape,
        )
    return model


def _check_preprocessing(data: bytes) -> None:
    try:
        serialization.load_torchscript(data)
    except serialization.ModelFormatError as error:
        raise _invalid(error, "model_preprocessing_file") from error


def set_preprocessing(model: Model, data: bytes) -> None:
    """Attach (or replace) the TorchScript preprocessing module of a global model."""
    if not model.is_global:
        raise InvalidInputError("Only global models have a preprocessing module.")
    _check_preprocessing(data)
    with staged_blobs() as blobs, transaction.atomic():
        model = Model.objects.select_for_update().get(pk=model.pk)
        old_id = model.preprocessing_id
        model.preprocessing = blobs.put(f"{model_prefix(model.id)}/preprocessing", data)
        model.save(update_fields=["preprocessing", "updated_at"])
        if old_id is not None:
            Blob.objects.filter(id=old_id).delete()


def create_mean_model(owner: User, name: str, description: str, members: Sequence[Model]) -> MeanModel:
    """Create an ensemble whose prediction averages the given global models."""
    distinct = {member.id: member for member in members}
    if len(distinct) < 2:
        raise InvalidInputError("models: a mean model needs at least two distinct global models.")
    not_global = [str(m.id) for m in distinct.values() if not m.is_global]
    if not_global:
        raise InvalidInputError(f"models: not global models: {', '.join(not_global)}.")
    with transaction.atomic():
        model = MeanModel.objects.create(name=name, description=description, owner=owner)
        model.members.set(distinct.values())
    return model


def copy_global_model(model: Model, owner: User, kind: str = ModelKind.GLOBAL) -> GlobalModel:
    """A new global model (round 0) with the same architecture, weights and preprocessing."""
    storage = get_model_storage()
    model_id = uuid.uuid4()
    prefix = model_prefix(model_id)
    with staged_blobs() as blobs, transaction.atomic():
        copy = GlobalModel.objects.create(
            id=model_id,
            kind=kind,
            name=model.name,
            description=model.description,
            owner=owner,
            archive=blobs.put(f"{prefix}/archive", export_torchscript(model)),
            weights=blobs.put(f"{prefix}/weights", storage.get(model.weights.key)),
            weights_format=model.weights_format,
            tensor_spec=model.tensor_spec,
            parameter_count=model.parameter_count,
            preprocessing=(
                blobs.put(f"{prefix}/preprocessing", storage.get(model.preprocessing.key))
                if model.preprocessing_id
                else None
            ),
            input_shape=model.input_shape,
        )
    return copy


def tensor_spec(model: Model) -> list[serialization.TensorSpec]:
    """The weights' names, shapes and dtypes of a model."""
    return [serialization.TensorSpec.from_json(entry) for entry in model.tensor_spec]


def read_weights(model: Model, blob: Blob | None = None) -> dict[str, torch.Tensor]:
    """The current weights of a model (or the weights stored in `blob`)."""
    return serialization.safetensors_to_weights(read_blob(blob or model.weights))


def weights_version(model: Model, round_number: int) -> Blob:
    """The global weights after `round_number` rounds, as kept by the version history."""
    if round_number == model.round:
        return model.weights
    version = WeightsVersion.objects.select_related("weights").filter(model=model, round=round_number).first()
    if version is None:
        kept = sorted(WeightsVersion.objects.filter(model=model).values_list("round", flat=True))
        raise NotFoundError(f"No weights of round {round_number} are kept for this model (kept rounds: {kept}).")
    return version.weights


def export_torchscript(model: Model, weights: Blob | None = None) -> bytes:
    """The model (global, or a local update on its base model's architecture) as TorchScript with its weights."""
    archive = read_blob(model.base_model.archive if model.kind == ModelKind.LOCAL else model.archive)
    weights = weights or model.weights
    if model.is_global and weights.sha256 == _archive_weights_sha256(model):
        return archive  # the archive's own weights: no need to rebuild it
    return serialization.export_torchscript(archive, read_weights(model, weights))


def _archive_weights_sha256(model: Model) -> str | None:
    """Checksum of the weights the archive was uploaded with (its round-0 version)."""
    if model.round == 0:
        return model.weights.sha256
    first = WeightsVersion.objects.filter(model=model, round=0).select_related("weights").first()
    return first.weights.sha256 if first else None


def delete_model(model: Model) -> None:
    """Delete a model, its updates and metrics; its store objects go after commit."""
    training = getattr(model, "training", None)
    if training is None and model.base_model_id is not None:  # a local update counts for its base model's training
        training = getattr(model.base_model, "training", None)
    if training is not None and training.state in (TrainingState.ONGOING, TrainingState.SWAG_ROUND):
        raise ConflictError("The model belongs to a running training; abort or finish the training first.")
    model.delete()


def parse_metrics(names: Sequence[str], values: Sequence[Any]) -> list[tuple[str, float | bytes]]:
    """Pair `metric_names` with `metric_values` (numbers, or uploaded files as binary values)."""
    if len(names) != len(values):
        raise InvalidInputError(
            f"metric_names and metric_values must have the same length (got {len(names)} and {len(values)})."
        )
    pairs: list[tuple[str, float | bytes]] = []
    for name, value in zip(names, values, strict=True):
        key = str(name).strip()
        if not key or len(key) > 256:
            raise InvalidInputError("metric_names: every name must be 1 to 256 characters long.")
        if "\x00" in key:
            raise InvalidInputError("metric_names: names must not contain NUL characters.")
        if hasattr(value, "read"):
            pairs.append((key, value.read()))
            continue
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = float("inf")
        except (TypeError, ValueError):
            raise InvalidInputError(f"metric_values: {value!r} (for {key!r}) is not a number.") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise InvalidInputError(f"metric_values: the value of {key!r} is not finite.")
        pairs.append((key, number))
    return pairs


def record_metrics(
    model: Model, pairs: Sequence[tuple[str, float | bytes]], step: int, reporter: User | None
) -> list[Metric]:
    """Store metric values for a model."""
    metrics = [
        Metric(
            model=model,
            key=key,
            step=step,
            reporter=reporter,
            value_float=value if isinstance(value, float) else None,
            value_binary=value if isinstance(value, bytes) else None,
        )
        for key, value in pairs
    ]
    return Metric.objects.bulk_create(metrics)
