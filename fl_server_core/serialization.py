"""Safe reading and writing of model files (see PROTOCOL.md "Model formats", ARCHITECTURE.md decision 2).

Uploaded bytes are never handed to a loader that can execute code:

* TorchScript archives are loaded with ``torch.jit.load`` after a static check of the archive: archives whose
  TorchScript code defines ``__setstate__``/``__getstate__`` are refused, because ``torch.jit.load`` runs
  ``__setstate__`` while loading and TorchScript can call operators with side effects (``aten::save`` writes files).
* ``torch.save`` archives are loaded with ``torch.load(..., weights_only=True)`` only.
* safetensors files are parsed by the safetensors library.
* Raw pickles (``pickle.dumps``, legacy non-zip ``torch.save``) are refused without being loaded.

The only exception is :func:`load_global_model` with ``allow_pickle=True``, meant for trusted deployments.
All failures surface as :class:`ModelFormatError` (a ``ValueError``) whose message is safe to show to API users.
This module is pure: it imports torch, safetensors and the standard library only (no Django).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import safetensors.torch
import torch

__all__ = [
    "FORMAT_SAFETENSORS",
    "FORMAT_STATE_DICT",
    "FORMAT_TORCHSCRIPT",
    "ModelFormatError",
    "PickledModelError",
    "TensorSpec",
    "WeightsMismatchError",
    "detect_format",
    "export_torchscript",
    "load_global_model",
    "load_torchscript",
    "parameter_count",
    "parameter_spec",
    "read_flat_tensor",
    "read_weights",
    "safetensors_to_weights",
    "spec_of_weights",
    "validate_weights",
    "weights_to_safetensors",
]

FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_STATE_DICT = "state_dict"
FORMAT_SAFETENSORS = "safetensors"

_ACCEPTED_UPDATE_FORMATS = (
    "a TorchScript archive (torch.jit.save(torch.jit.script(model), f)), "
    "a state_dict saved with torch.save(model.state_dict(), f), "
    "or a safetensors file (safetensors.torch.save_file(model.state_dict(), path))"
)
_GLOBAL_MODEL_HOWTO = "Upload the global model as a TorchScript archive: torch.jit.save(torch.jit.script(model), f)."
_MAX_LIST = 5  # names listed per problem category in error messages
_MAX_ARCHIVE_TEXT_ENTRY = 256 * 1024 * 1024  # bytes read per non-tensor zip entry when scanning TorchScript archives
_PICKLE_SCAN_WINDOW = 1024 * 1024  # bytes parsed (never executed) when sniffing for a pickle: ~0.3 s of opcodes
# Declared content bytes a zip archive may hold per byte of archive. torch stores tensor data uncompressed and
# deflates only its code (legitimate archives stay below ~2); a zip bomb declares hundreds of times its size.
_MAX_ZIP_EXPANSION = 16
_FORBIDDEN_TORCHSCRIPT_HOOKS = (b"__setstate__", b"__getstate__")
_ORDER_KEY = "fl_server.order"  # safetensors metadata entry recording the original key order


class ModelFormatError(ValueError):
    """The bytes are unreadable or not in a supported model format; the message is meant for API users."""


class PickledModelError(ModelFormatError):
    """A pickled Python object (e.g. ``torch.save(model)``) that only a code-executing loader could read."""

    def __init__(self, message: str | None = None, *, global_model: bool = False) -> None:
        super().__init__(message or _pickle_message("The upload is a pickled Python object.", global_model))


class WeightsMismatchError(ModelFormatError):
    """The weights do not match the global model (names, shapes, dtypes) or contain NaN/Inf."""


def _pickle_message(what: str, global_model: bool) -> str:
    instead = _GLOBAL_MODEL_HOWTO if global_model else f"Upload {_ACCEPTED_UPDATE_FORMATS} instead."
    return f"{what} The server does not unpickle uploads, because unpickling can execute arbitrary code. {instead}"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one ``state_dict`` entry; ``is_parameter`` is False for buffers."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    is_parameter: bool

    def placeholder(self) -> torch.Tensor:
        """A tensor of this shape and dtype on the ``meta`` device: no data, nothing allocated."""
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"Unknown dtype {self.dtype!r} in the tensor spec of {self.name!r}.")
        return torch.empty(self.shape, dtype=dtype, device="meta")

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serializable dict."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "is_parameter": self.is_parameter}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TensorSpec:
        """Build a spec from :meth:`to_json` output; raises ``ValueError`` on malformed input."""
        try:
            name, shape, dtype, is_parameter = data["name"], data["shape"], data["dtype"], data["is_parameter"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"Invalid tensor spec {data!r}: expected keys name, shape, dtype, is_parameter.") from exc
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(is_parameter, bool):
            raise ValueError(f"Invalid tensor spec {data!r}: name and dtype must be strings, is_parameter a boolean.")
        if not isinstance(shape, list | tuple) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"Invalid tensor spec {data!r}: shape must be a list of non-negative integers.")
        return cls(name=name, shape=tuple(shape), dtype=dtype, is_parameter=is_parameter)


# --------------------------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------------------------


def _short(exc: BaseException) -> str:
    """First line of an exception message, shortened, for inclusion in user-facing errors."""
    text = str(exc).strip().splitlines()[0].rstrip(" .?!") if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _open_zip(data: bytes) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # BadZipFile, OSError, EOFError, ValueError, ... on truncated or corrupt archives
        raise ModelFormatError(
            f"The file looks like a zip archive but cannot be read (corrupt or truncated upload?): {_short(exc)}. "
            f"Expected {_ACCEPTED_UPDATE_FORMATS}."
        ) from exc
    names = archive.namelist()
    if len(names) != len(set(names)):
        archive.close()
        raise ModelFormatError("The zip archive contains duplicate entry names; re-save the model with torch.")
    declared = sum(info.file_size for info in archive.infolist())
    if declared > _MAX_ZIP_EXPANSION * len(data):
        archive.close()
        raise ModelFormatError(
            f"The zip archive declares {declared} bytes of content in a file of {len(data)} bytes (more than "
            f"{_MAX_ZIP_EXPANSION} times its size), which is how zip bombs look; it is refused unread. "
            "Upload the file as torch.save or torch.jit.save wrote it."
        )
    return archive


def _zip_kind(archive: zipfile.ZipFile) -> str:
    """Classify a zip archive as TorchScript or torch.save by its entry names."""
    has_code = has_constants = has_data = False
    for name in archive.namelist():
        parts = name.split("/")
        if len(parts) < 2:
            continue
        if parts[1] == "model.json":
            raise ModelFormatError(
                "This is a TorchScript archive in the legacy (model.json) format, which is not supported. "
                "Re-save it with a current PyTorch: torch.jit.save(torch.jit.script(model), f)."
            )
        if parts[1] == "code" and len(parts) > 2:
            has_code = True
        elif len(parts) == 2 and parts[1] == "constants.pkl":
            has_constants = True
        elif len(parts) == 2 and parts[1] == "data.pkl":
            has_data = True
    if has_code or has_constants:
        return FORMAT_TORCHSCRIPT
    if has_data:
        return FORMAT_STATE_DICT
    raise ModelFormatError(
        f"The zip archive is neither a TorchScript archive nor a torch.save file. Expected {_ACCEPTED_UPDATE_FORMATS}."
    )


def _is_safetensors(data: bytes) -> bool:
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


def _looks_like_pickle(data: bytes) -> bool:
    """Whether ``data`` parses as pickle opcodes (static parse with pickletools; nothing is executed)."""
    if data[0] == pickle.PROTO[0]:
        return len(data) >= 2 and 2 <= data[1] <= pickle.HIGHEST_PROTOCOL
    window = io.BytesIO(data[:_PICKLE_SCAN_WINDOW])
    try:
        for opcode, _arg, _pos in pickletools.genops(window):
            if opcode.name == "STOP":
                return True
    except Exception:  # a parse failure inside the window means "not a pickle"
        # running out of window is no failure: valid opcodes up to its end, with more data beyond, look like a pickle
        return window.tell() == _PICKLE_SCAN_WINDOW < len(data)
    return False


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite: a sum first (cheap, no full-size mask), the exact check only if it is not.

    A NaN or infinity anywhere makes the sum non-finite, so a finite sum proves every value finite. The sum is taken
    in the tensor's own dtype (several times faster than a widened one); if it overflows without any NaN or
    infinity (large values), the element-by-element check decides.
    """
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    if torch.isfinite(tensor.sum()):
        return True
    return bool(torch.isfinite(tensor).all())


def detect_format(data: bytes) -> str:
    """Return ``FORMAT_TORCHSCRIPT``, ``FORMAT_STATE_DICT`` or ``FORMAT_SAFETENSORS`` by looking at the content.

    Raises :class:`PickledModelError` for raw pickles and :class:`ModelFormatError` for anything else unreadable.
    A ``torch.save`` archive is reported as ``FORMAT_STATE_DICT`` even if it holds a pickled module; the loaders
    find that out safely (``weights_only=True``).
    """
    if not data:
        raise ModelFormatError(f"The uploaded file is empty. Expected {_ACCEPTED_UPDATE_FORMATS}.")
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        with _open_zip(data) as archive:
            return _zip_kind(archive)
    if _is_safetensors(data):
        return FORMAT_SAFETENSORS
    if _looks_like_pickle(data):
        raise PickledModelError(
            _pickle_message(
                "The upload is a raw Python pickle (pickle.dump, or torch.save with the legacy non-zip format), "
                "for example a pickled torch.nn.Module.",
                global_model=False,
            )
        )
    raise ModelFormatError(f"Unrecognized model file format. Expected {_ACCEPTED_UPDATE_FORMATS}.")


# --------------------------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------------------------


def _check_torchscript_archive(data: bytes) -> None:
    """Refuse TorchScript archives that would run their own code while being loaded or saved."""
    with _open_zip(data) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or (len(parts) > 2 and parts[1] in ("data", ".data")):
                continue  # raw tensor storages; torch.jit.load never compiles them
            if info.file_size > _MAX_ARCHIVE_TEXT_ENTRY:
                raise ModelFormatError(f"The TorchScript archive entry {info.filename!r} is unexpectedly large.")
            try:
                with archive.open(info) as entry:
                    content = entry.read(_MAX_ARCHIVE_TEXT_ENTRY + 1)
            except Exception as exc:  # BadZipFile, zlib.error, encrypted entries (RuntimeError), ...
                raise ModelFormatError(
                    f"The TorchScript archive is corrupt (entry {info.filename!r}): {_short(exc)}."
                ) from exc
            for hook in _FORBIDDEN_TORCHSCRIPT_HOOKS:
                if hook in content:
                    raise ModelFormatError(
                        f"The TorchScript archive defines {hook.decode()} (in {info.filename!r}); TorchScript "
                        "__setstate__/__getstate__ methods run while the archive is loaded or saved, so the server "
                        "refuses them. Remove the custom __getstate__/__setstate__ methods and save the model again."
                    )


def _torch_load_weights_only(data: bytes, *, global_model: bool = False) -> Any:
    """``torch.load(weights_only=True)``; a refused pickle global becomes :class:`PickledModelError`."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL\s+([\w.]+)", str(exc))
        if match or "global" in str(exc).lower():
            what = f"a pickled {match.group(1)}" if match else "a pickled Python object"
            raise PickledModelError(
                _pickle_message(
                    f"The torch.save file contains {what} (for example torch.save(model) instead of "
                    "torch.save(model.state_dict())), which only a code-executing unpickler could load.",
                    global_model,
                ),
                global_model=global_model,
            ) from exc
        raise ModelFormatError(f"The torch.save file cannot be read (corrupt upload?): {_short(exc)}.") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ValueError, ... on bad bytes
        raise ModelFormatError(
            f"The torch.save file cannot be read (corrupt or truncated upload?): {_short(exc)}."
        ) from exc


def _check_backed(name: str, tensor: torch.Tensor, source: str) -> None:
    """Refuse a tensor with more elements than its stored data (an expanded or overlapping view).

    A few bytes can declare a tensor of any size that way; copying, converting or summing it would allocate or
    compute at that size.
    """
    stored = tensor.untyped_storage().nbytes()
    if tensor.numel() * tensor.element_size() > stored:
        raise ModelFormatError(
            f"The {source} entry {name!r} declares {tensor.numel()} elements (shape {list(tensor.shape)}) but "
            f"stores only {stored} bytes: an expanded view, not a real tensor. Save real tensors (.contiguous())."
        )


def _jit_load(data: bytes) -> torch.jit.ScriptModule:
    _check_torchscript_archive(data)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError and friends on bad archives
        raise ModelFormatError(
            f"The TorchScript archive cannot be loaded (corrupt or truncated upload?): {_short(exc)}."
        ) from exc
    for name, value in module.state_dict().items():
        if isinstance(value, torch.Tensor) and value.layout == torch.strided:
            _check_backed(name, value, "TorchScript model's state_dict")
    return module


def load_torchscript(data: bytes) -> torch.jit.ScriptModule:
    """Load a TorchScript archive on the CPU.

    Raises :class:`PickledModelError` for a ``torch.save`` file holding a pickled module and
    :class:`ModelFormatError` for anything else that is not a loadable TorchScript archive.
    """
    fmt = detect_format(data)
    if fmt == FORMAT_STATE_DICT:
        _torch_load_weights_only(data)  # raises PickledModelError for torch.save(module)
        raise ModelFormatError(
            "Expected a TorchScript archive but got a torch.save file (weights only). "
            "Save the model with torch.jit.save(torch.jit.script(model), f)."
        )
    if fmt != FORMAT_TORCHSCRIPT:
        raise ModelFormatError(
            "Expected a TorchScript archive but got a safetensors file (weights only). "
            "Save the model with torch.jit.save(torch.jit.script(model), f)."
        )
    return _jit_load(data)


def load_global_model(data: bytes, allow_pickle: bool = False) -> torch.nn.Module:
    """Load a global model, which must carry its architecture: a TorchScript archive.

    Only with ``allow_pickle=True`` (trusted deployments) is a pickled ``torch.nn.Module`` accepted; it is loaded
    with ``torch.load(weights_only=False)``, which can execute arbitrary code. Otherwise such files raise
    :class:`PickledModelError`. Weights-only files (state_dict, safetensors) raise :class:`ModelFormatError`.
    """
    weights_only_msg = (
        "A global model must carry its architecture, but this file holds only weights ({what}). " + _GLOBAL_MODEL_HOWTO
    )
    if not data:
        raise ModelFormatError("The uploaded file is empty. " + _GLOBAL_MODEL_HOWTO)
    try:
        fmt = detect_format(data)
    except PickledModelError:
        if not allow_pickle:
            raise PickledModelError(
                _pickle_message("The upload is a raw Python pickle.", global_model=True), global_model=True
            ) from None
        fmt = FORMAT_STATE_DICT  # a raw / legacy pickle, loaded below like a torch.save file
    except ModelFormatError:
        raise ModelFormatError("Unrecognized file: it is not a TorchScript archive. " + _GLOBAL_MODEL_HOWTO) from None
    if fmt == FORMAT_TORCHSCRIPT:
        return _jit_load(data)
    if fmt == FORMAT_SAFETENSORS:
        raise ModelFormatError(weights_only_msg.format(what="a safetensors file"))
    if not allow_pickle:
        _torch_load_weights_only(data, global_model=True)  # raises PickledModelError for a pickled module
        raise ModelFormatError(weights_only_msg.format(what="a torch.save state_dict"))
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # trusted deployments only
    except Exception as exc:  # arbitrary unpickling errors
        raise ModelFormatError(
            f"The pickled model cannot be loaded with torch.load: {_short(exc)}. "
            "Save it with torch.jit.save(torch.jit.script(model), f), or torch.save(model, f) in trusted deployments."
        ) from exc
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, Mapping):
        raise ModelFormatError(weights_only_msg.format(what="a torch.save state_dict"))
    raise ModelFormatError(
        f"The pickled file holds a {type(obj).__name__}, not a torch.nn.Module. " + _GLOBAL_MODEL_HOWTO
    )


_CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "model_state", "net", "weights", "params")


def _flat_weights(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Check that ``obj`` is a flat ``str -> dense Tensor`` mapping and return plain detached tensors."""
    if isinstance(obj, torch.Tensor):
        raise ModelFormatError(
            f"The {source} holds a single tensor, not a state_dict. Save model.state_dict() instead."
        )
    if not isinstance(obj, Mapping):
        raise ModelFormatError(
            f"The {source} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors). "
            "Save model.state_dict() instead."
        )
    if not obj:
        raise ModelFormatError(f"The {source} holds an empty state_dict (no tensors).")
    nested = [k for k in _CHECKPOINT_KEYS if isinstance(obj.get(k), Mapping)]
    if nested:
        raise ModelFormatError(
            f"The {source} looks like a training checkpoint: entry {nested[0]!r} is a nested dict. "
            f"Upload the state_dict alone, e.g. torch.save(checkpoint[{nested[0]!r}], f)."
        )
    weights: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise ModelFormatError(f"The {source} has a non-string key {key!r}; state_dict keys must be strings.")
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(
                f"The {source} entry {key!r} is a {type(value).__name__}, not a tensor; "
                "a state_dict must map names to tensors only (no nested dicts or extra objects)."
            )
        if value.layout != torch.strided:
            raise ModelFormatError(f"The {source} entry {key!r} is a {value.layout} tensor; only dense tensors work.")
        _check_backed(key, value, source)
        weights[key] = value.detach()
    return weights


def read_weights(data: bytes) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` mapping from a TorchScript archive, a torch.save state_dict or safetensors.

    ``torch.save`` files are loaded with ``weights_only=True``; a pickled module raises :class:`PickledModelError`.
    """
    fmt = detect_format(data)
    if fmt == FORMAT_TORCHSCRIPT:
        module = _jit_load(data)
        return _flat_weights(module.state_dict(), "TorchScript model's state_dict")
    if fmt == FORMAT_SAFETENSORS:
        return _flat_weights(safetensors_to_weights(data), "safetensors file")
    return _flat_weights(_torch_load_weights_only(data), "torch.save file")


def read_flat_tensor(data: bytes, numel: int) -> torch.Tensor:
    """Read a flat floating tensor with exactly ``numel`` finite elements (e.g. SWAG moments).

    Accepts ``torch.save(tensor)`` (loaded with ``weights_only=True``; a dict holding exactly one tensor is
    accepted too) or a safetensors file with exactly one tensor. Returns a float32 or float64 tensor
    (half precision is widened to float32).
    """
    howto = "Upload torch.save(tensor, f) or a safetensors file holding exactly one 1-D tensor."
    fmt = detect_format(data)
    if fmt == FORMAT_TORCHSCRIPT:
        raise ModelFormatError(f"Expected a single flat tensor but got a TorchScript archive. {howto}")
    obj: Any = safetensors_to_weights(data) if fmt == FORMAT_SAFETENSORS else _torch_load_weights_only(data)
    if isinstance(obj, Mapping):
        if len(obj) != 1:
            raise ModelFormatError(f"Expected exactly one tensor but the file holds {len(obj)} entries. {howto}")
        obj = next(iter(obj.values()))
    if not isinstance(obj, torch.Tensor):
        raise ModelFormatError(f"Expected a tensor but the file holds a {type(obj).__name__}. {howto}")
    tensor = obj.detach()
    if tensor.layout != torch.strided:
        raise ModelFormatError(f"Expected a dense tensor but got a {tensor.layout} tensor. {howto}")
    if tensor.dim() != 1:
        raise ModelFormatError(
            f"Expected a 1-D tensor with {numel} elements but got shape {list(tensor.shape)}; "
            "flatten it, e.g. torch.cat([t.flatten() for t in tensors])."
        )
    if not tensor.is_floating_point():
        raise ModelFormatError(f"Expected a floating point tensor but got dtype {_dtype_name(tensor.dtype)}.")
    if tensor.numel() != numel:
        raise ModelFormatError(f"Expected a 1-D tensor with {numel} elements but got {tensor.numel()} elements.")
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.to(torch.float32)
    if not bool(torch.isfinite(tensor).all()):
        raise ModelFormatError("The tensor contains non-finite values (NaN or Inf).")
    return tensor.contiguous()


# --------------------------------------------------------------------------------------------------------------------
# Specs and validation
# --------------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_spec(module: torch.nn.Module) -> list[TensorSpec]:
    """Specs of ``module.state_dict()`` in order; ``is_parameter`` is True for entries of ``named_parameters()``."""
    parameter_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    specs = []
    for name, value in module.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ModelFormatError(
                f"The model's state_dict entry {name!r} is a {type(value).__name__}, not a tensor; "
                "models with non-tensor extra state are not supported."
            )
        specs.append(TensorSpec(name, tuple(value.shape), _dtype_name(value.dtype), name in parameter_names))
    return specs


def spec_of_weights(weights: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    """Specs of a ``name -> tensor`` mapping in order; without a module every entry counts as a parameter."""
    return [TensorSpec(name, tuple(t.shape), _dtype_name(t.dtype), True) for name, t in weights.items()]


def _capped(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LIST])
    return shown if len(names) <= _MAX_LIST else f"{shown} and {len(names) - _MAX_LIST} more"


def _mismatch_problems(
    weights: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec], check_dtypes: bool = True
) -> list[str]:
    expected = {s.name: s for s in spec}
    missing = [s.name for s in spec if s.name not in weights]
    unexpected = [name for name in weights if name not in expected]
    not_tensors, shapes, dtypes, non_finite = [], [], [], []
    for name, s in expected.items():
        if name not in weights:
            continue
        tensor = weights[name]
        if not isinstance(tensor, torch.Tensor):
            not_tensors.append(f"{name} ({type(tensor).__name__})")
            continue
        if tuple(tensor.shape) != s.shape:
            shapes.append(f"{name} (expected {list(s.shape)}, got {list(tensor.shape)})")
        if check_dtypes and _dtype_name(tensor.dtype) != s.dtype:
            dtypes.append(f"{name} (expected {s.dtype}, got {_dtype_name(tensor.dtype)})")
        if (tensor.is_floating_point() or tensor.is_complex()) and not all_finite(tensor):
            non_finite.append(name)
    problems = []
    for label, items in (
        ("missing tensors", missing),
        ("unexpected tensors", unexpected),
        ("not tensors", not_tensors),
        ("shape mismatch", shapes),
        ("dtype mismatch", dtypes),
        ("non-finite values (NaN or Inf) in", non_finite),
    ):
        if items:
            problems.append(f"{label}: {_capped(items)}")
    return problems


def validate_weights(weights: Mapping[str, torch.Tensor], spec: Sequence[TensorSpec]) -> None:
    """Check names, shapes, dtypes and finiteness against ``spec``; raise :class:`WeightsMismatchError`."""
    problems = _mismatch_problems(weights, spec)
    if problems:
        raise WeightsMismatchError("The weights do not match the global model: " + "; ".join(problems) + ".")


def parameter_count(spec: Sequence[TensorSpec], parameters_only: bool = False) -> int:
    """Total number of elements in ``spec`` (only trainable parameters when ``parameters_only``)."""
    return sum(math.prod(s.shape) for s in spec if s.is_parameter or not parameters_only)


# --------------------------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------------------------


def weights_to_safetensors(weights: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a ``name -> tensor`` mapping to safetensors bytes (contiguous CPU copies; shared storage is fine)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ModelFormatError(f"Cannot serialize entry {name!r}: expected a string name and a tensor.")
        tensors[name] = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    try:
        return safetensors.torch.save(tensors, metadata={_ORDER_KEY: json.dumps(list(tensors))})
    except Exception as exc:  # SafetensorError / ValueError for unsupported dtypes or layouts
        raise ModelFormatError(f"Cannot serialize the weights to safetensors: {_short(exc)}.") from exc


def safetensors_to_weights(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into a ``name -> tensor`` mapping (CPU)."""
    if not data:
        raise ModelFormatError("The safetensors file is empty.")
    if not _is_safetensors(data):
        raise ModelFormatError(
            "Not a safetensors file: expected an 8-byte little-endian header length followed by a JSON header."
        )
    try:
        weights = dict(safetensors.torch.load(data))
    except Exception as exc:  # SafetensorError and friends on corrupt headers or data
        raise ModelFormatError(f"The safetensors file cannot be read (corrupt or truncated?): {_short(exc)}.") from exc
    # safetensors stores tensors sorted by dtype and name; restore the writer's order when it recorded one
    header_len = int.from_bytes(data[:8], "little")
    try:
        order = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][_ORDER_KEY])
    except (ValueError, KeyError, TypeError):
        return weights
    if isinstance(order, list) and sorted(order) == sorted(weights):
        return {name: weights[name] for name in order}
    return weights


def export_torchscript(archive: bytes, weights: Mapping[str, torch.Tensor]) -> bytes:
    """Return a TorchScript archive: the architecture from ``archive`` with ``weights`` loaded (strict).

    Names and shapes must match and values must be finite (:class:`WeightsMismatchError`); dtypes are cast to
    the archive's dtypes by ``load_state_dict``.
    """
    module = load_torchscript(archive)
    problems = _mismatch_problems(weights, parameter_spec(module), check_dtypes=False)
    if problems:
        raise WeightsMismatchError("The weights do not match the model architecture: " + "; ".join(problems) + ".")
    try:
        module.load_state_dict(dict(weights), strict=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise WeightsMismatchError(f"The weights cannot be loaded into the model: {_short(exc)}.") from exc
    buffer = io.BytesIO()
    torch.jit.save(module, buffer)
    return buffer.getvalue()
