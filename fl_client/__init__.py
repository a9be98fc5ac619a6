"""Client SDK of the FL server: model transfers (`Communication`), the worker side (`Participant`) and a CLI.

Needs only torch, requests, tqdm and safetensors. `python -m fl_client --help` lists the CLI commands.
Names are imported on first use, so the CLI starts without loading torch when it does not need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fl_client.api import ApiClient
    from fl_client.communication import Communication, is_torchscript_instance
    from fl_client.exceptions import (
        CommunicationException,
        MetricsUploadException,
        ModelDownloadException,
        ModelFormatException,
        ModelUploadException,
        ServerRequestException,
    )
    from fl_client.packing import pack_model, unpack_model
    from fl_client.participant import (
        NotificationServer,
        Participant,
        ScriptFailedError,
        run_script,
        sign,
        verify_signature,
    )

_EXPORTS = {
    "ApiClient": "fl_client.api",
    "Communication": "fl_client.communication",
    "is_torchscript_instance": "fl_client.communication",
    "CommunicationException": "fl_client.exceptions",
    "MetricsUploadException": "fl_client.exceptions",
    "ModelDownloadException": "fl_client.exceptions",
    "ModelFormatException": "fl_client.exceptions",
    "ModelUploadException": "fl_client.exceptions",
    "ServerRequestException": "fl_client.exceptions",
    "pack_model": "fl_client.packing",
    "unpack_model": "fl_client.packing",
    "NotificationServer": "fl_client.participant",
    "Participant": "fl_client.participant",
    "ScriptFailedError": "fl_client.participant",
    "run_script": "fl_client.participant",
    "sign": "fl_client.participant",
    "verify_signature": "fl_client.participant",
}

__all__ = [
    "ApiClient",
    "Communication",
    "CommunicationException",
    "MetricsUploadException",
    "ModelDownloadException",
    "ModelFormatException",
    "ModelUploadException",
    "NotificationServer",
    "Participant",
    "ScriptFailedError",
    "ServerRequestException",
    "is_torchscript_instance",
    "pack_model",
    "run_script",
    "sign",
    "unpack_model",
    "verify_signature",
]


def __getattr__(name: str) -> Any:
    """Import an exported name on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fl_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
