"""Persisting a round's running weighted sum in the model store between uploads."""

import json

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fl_server_ai.aggregation import RunningWeightedSum
from fl_server_core.models import TrainingRound
from fl_server_core.receivers import release_blobs
from fl_server_core.services.blobs import BlobWriter, read_blob


def load_accumulator(round_: TrainingRound) -> RunningWeightedSum:
    """The round's running sum (empty before the first upload)."""
    if round_.accumulator_id is None:
        return RunningWeightedSum()
    data = read_blob(round_.accumulator)
    header_length = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
    return RunningWeightedSum.from_state(load_safetensors(data), metadata)


def fold_into_round(round_: TrainingRound, weights: dict[str, torch.Tensor], weight: float, blobs: BlobWriter) -> None:
    """Add one update to the round's running sum; the new sum replaces the old in the same transaction."""
    accumulator = load_accumulator(round_)
    accumulator.fold(weights, weight)
    tensors, metadata = accumulator.to_state()
    old = round_.accumulator_id
    round_.accumulator = blobs.put(f"rounds/{round_.id}/sum", save_safetensors(tensors, metadata=metadata))
    round_.total_samples += int(weight)
    round_.save(update_fields=["accumulator", "total_samples"])
    if old is not None:
        release_blobs([old])
