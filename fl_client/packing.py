"""Turning models into bytes and back, without ever unpickling.

Packing:

* a TorchScript module (`torch.jit.ScriptModule`) -> `torch.jit.save` archive (architecture and weights);
* a plain `torch.nn.Module` -> its `state_dict()` saved with `torch.save` (weights only: the server reads it
  with `torch.load(weights_only=True)`);
* a mapping of tensors -> `torch.save` of a plain dict;
* `bytes` -> unchanged (already packed).

Unpacking accepts exactly the formats that can be loaded without running code: TorchScript archives
(`torch.jit.load`), `torch.save` files holding tensors and containers (`torch.load(weights_only=True)`)
and safetensors files. A pickled `nn.Module` (`torch.save(module)`) or any other pickle is refused
with :class:`~fl_client.exceptions.ModelFormatException` before any of its code could run.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import safetensors.torch
import torch

from fl_client.exceptions import ModelFormatException

FORMAT_TORCHSCRIPT = "torchscript"
FORMAT_TORCH_SAVE = "torch.save"
FORMAT_SAFETENSORS = "safetensors"


def pack_model(model: Any) -> bytes:
    """Pack a model (TorchScript module, `nn.Module`, mapping of tensors, or bytes) into bytes."""
    if isinstance(model, bytes | bytearray | memoryview):
        return bytes(model)
    buffer = io.BytesIO()
    if isinstance(model, torch.jit.ScriptModule):
        torch.jit.save(model, buffer)
    elif isinstance(model, torch.nn.Module):
        torch.save(_plain_state(model.state_dict()), buffer)
    elif isinstance(model, Mapping) and all(isinstance(v, torch.Tensor) for v in model.values()):
        torch.save(_plain_state(model), buffer)
    elif isinstance(model, torch.Tensor):
        torch.save(model.detach().cpu(), buffer)
    else:
        raise TypeError(
            f"cannot pack a {type(model).__name__}: pass a TorchScript module, an nn.Module, "
            "a mapping of tensors or bytes"
        )
    return buffer.getvalue()


def _plain_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain `dict` of detached CPU tensors (no OrderedDict metadata, nothing but tensors to unpickle)."""
    return {str(name): tensor.detach().cpu() for name, tensor in state.items()}


def _is_safetensors(blob: bytes) -> bool:
    if len(blob) < 10:
        return False
    (header_size,) = struct.unpack("<Q", blob[:8])
    if header_size <= 0 or 8 + header_size > len(blob) or blob[8:9] != b"{":
        return False
    try:
        header = json.loads(blob[8 : 8 + header_size])
    except ValueError:
        return False
    return isinstance(header, dict)


def _zip_names(blob: bytes) -> list[str] | None:
    if not zipfile.is_zipfile(io.BytesIO(blob)):
        return None
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return None


def detect_format(blob: bytes) -> str:
    """Which of the safe formats the blob is (`torchscript`, `torch.save` or `safetensors`); raises otherwise."""
    if _is_safetensors(blob):
        return FORMAT_SAFETENSORS
    names = _zip_names(blob)
    if names is not None:
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in names):
            return FORMAT_TORCHSCRIPT
        if any(name.endswith("data.pkl") for name in names):
            return FORMAT_TORCH_SAVE
        raise ModelFormatException("the zip archive is neither a TorchScript archive nor a torch.save file")
    if blob[:1] == b"\x80":  # a legacy (non-zip) torch.save file or a raw pickle: weights_only decides
        return FORMAT_TORCH_SAVE
    raise ModelFormatException("unknown model format: expected TorchScript, torch.save (tensors) or safetensors")


def unpack_model(blob: bytes) -> Any:
    """Unpack bytes into a TorchScript module, a (state) dict of tensors, or a tensor; never unpickles code."""
    fmt = detect_format(blob)
    if fmt == FORMAT_SAFETENSORS:
        try:
            return safetensors.torch.load(blob)
        except Exception as exc:
            raise ModelFormatException(f"invalid safetensors file: {exc}") from exc
    if fmt == FORMAT_TORCHSCRIPT:
        try:
            return torch.jit.load(io.BytesIO(blob), map_location="cpu")
        except Exception as exc:
            raise ModelFormatException(f"invalid TorchScript archive: {exc}") from exc
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFormatException(
            "refusing to unpickle: the file holds Python objects other than tensors (e.g. a pickled nn.Module, "
            "saved with torch.save(module)); loading it could run arbitrary code. Save model.state_dict() or "
            f"a TorchScript archive instead. ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc
    except Exception as exc:
        raise ModelFormatException(f"invalid torch.save file: {type(exc).__name__}: {exc}") from exc
