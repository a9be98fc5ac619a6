"""Predictions with uncertainty from a stored model: the service behind `POST /api/inference/`."""

import base64
import io
from typing import Any

import torch
from django.conf import settings

from fl_server_ai.uncertainty import method_for
from fl_server_core import serialization
from fl_server_core.exceptions import ConflictError, InvalidInputError, TooLargeError
from fl_server_core.models import Model, ModelKind, Training, UncertaintyMethod
from fl_server_core.services.blobs import read_blob
from fl_server_core.services.models import export_torchscript

DEFAULT_SAMPLES = 10


def parse_json_input(values: Any) -> torch.Tensor:
    """`model_input` as nested JSON lists of numbers (one row per input) -> a float32 tensor."""
    if not isinstance(values, list) or not values:
        raise InvalidInputError("model_input must be a non-empty list of input rows.")
    try:
        tensor = torch.tensor(values, dtype=torch.float32)
    except (TypeError, ValueError, OverflowError) as error:
        raise InvalidInputError(f"model_input must be a rectangular array of numbers: {error}") from None
    return _checked(tensor)


def parse_tensor_file(data: bytes) -> torch.Tensor:
    """An input tensor uploaded as a file (safetensors with one tensor, or torch.save of a tensor; never unpickled)."""
    try:
        fmt = serialization.detect_format(data)
        if fmt == serialization.FORMAT_SAFETENSORS:
            tensors = list(serialization.safetensors_to_weights(data).values())
            tensor = tensors[0] if len(tensors) == 1 else None
        else:
            tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except serialization.ModelFormatError as error:
        raise InvalidInputError(f"model_input: {error}") from error
    except Exception as error:
        raise InvalidInputError(f"model_input: not a tensor file ({type(error).__name__}: {error}).") from None
    if not isinstance(tensor, torch.Tensor):
        raise InvalidInputError("model_input: the file must hold exactly one tensor.")
    return _checked(tensor)


def _checked(tensor: torch.Tensor) -> torch.Tensor:
    """Size first: a file can declare an expanded view far larger than its data, which `float()` would allocate."""
    if tensor.numel() > settings.FL_INFERENCE_MAX_ELEMENTS:
        raise TooLargeError(
            f"model_input has {tensor.numel()} values; the limit is {settings.FL_INFERENCE_MAX_ELEMENTS}."
        )
    if tensor.dim() == 0:
        raise InvalidInputError("model_input must have a batch dimension.")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise InvalidInputError("model_input holds NaN or infinite values.")
    return tensor


def check_input_shape(model: Model, x: torch.Tensor) -> None:
    """The input must match the model's `input_shape` (None: any size); 400 otherwise."""
    shape = model.input_shape
    if not shape:
        return
    wanted = "(" + ", ".join("*" if d is None else str(d) for d in shape) + ")"
    if x.dim() != len(shape) or any(d is not None and d != actual for d, actual in zip(shape, x.shape, strict=True)):
        raise InvalidInputError(f"model_input has shape {tuple(x.shape)}, but the model expects {wanted}.")


def _load(model: Model) -> torch.nn.Module:
    try:
        return serialization.load_torchscript(export_torchscript(model))
    except serialization.ModelFormatError as error:
        raise ConflictError(f"The model cannot be loaded for inference: {error}") from error


def _method(model: Model) -> tuple[Any, dict[str, Any]]:
    """The uncertainty method of the model (its training's, an ensemble for mean models) and its options."""
    if model.kind == ModelKind.MEAN:
        members = list(model.members.select_related("weights", "archive"))
        # softmax (and other output options) as the members' trainings agree on them
        member_options = [t.options.get("uncertainty", {}) for t in Training.objects.filter(model__in=members)]
        softmax = bool(member_options) and all(o.get("softmax", False) for o in member_options)
        options = {"N": len(members), "softmax": softmax}
        return method_for("ENSEMBLE", members=[_load(member) for member in members]), options
    training = Training.objects.filter(model=model).first() if model.is_global else None
    name = training.uncertainty_method if training is not None else UncertaintyMethod.NONE
    options = dict(training.options.get("uncertainty", {})) if training is not None else {}
    module = _load(model)
    if name == UncertaintyMethod.SWAG:
        if model.swag_first_moment_id is None:
            raise ConflictError("The model has no SWAG statistics yet (its SWAG round has not closed).")
        first = serialization.safetensors_to_weights(read_blob(model.swag_first_moment))["m"]
        second = serialization.safetensors_to_weights(read_blob(model.swag_second_moment))["m"]
        return method_for(name, module=module, first=first, second=second), options
    if name == UncertaintyMethod.ENSEMBLE:
        return method_for("NONE", module=module), options  # a single model: its ensemble is a mean model
    return method_for(name, module=module), options


def _preprocess(model: Model, x: torch.Tensor) -> torch.Tensor:
    source = model
    if model.kind == ModelKind.LOCAL:
        source = model.base_model
    if source is None or source.preprocessing_id is None:
        return x
    module = serialization.load_torchscript(read_blob(source.preprocessing))
    with torch.no_grad():
        return module(x)


def predict(model: Model, x: torch.Tensor, seed: int | None = None) -> dict[str, Any]:
    """`{"inference": ..., "uncertainty": {...}}` for a batch of inputs."""
    check_input_shape(model, x)
    method, options = _method(model)
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**63)
    samples = int(options.get("N", DEFAULT_SAMPLES))
    try:
        mean, measures = method.predict(_preprocess(model, x), samples, bool(options.get("softmax", False)), generator)
    except (RuntimeError, ValueError) as error:
        raise InvalidInputError(f"The model could not process model_input: {error}") from None
    return {
        "inference": mean.tolist(),
        "uncertainty": {key: value.tolist() for key, value in measures.items()},
        "method": method.name,
        "samples": 1 if method.name == "NONE" else samples,
    }


def encode_tensor(x: torch.Tensor) -> str:
    """A tensor as text, for a task message."""
    return base64.b64encode(serialization.weights_to_safetensors({"x": x})).decode("ascii")


def decode_tensor(text: str) -> torch.Tensor:
    """The tensor of `encode_tensor`."""
    return serialization.safetensors_to_weights(base64.b64decode(text))["x"]
