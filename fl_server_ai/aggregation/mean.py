"""Sample-size-weighted means of model updates, streaming (fold as they arrive) and direct."""

import math
from collections.abc import Mapping, Sequence

import torch

from fl_server_core.serialization import all_finite

Weights = Mapping[str, torch.Tensor]

# Sums live in float64 on the CPU so that the result does not depend on arrival order beyond float64 rounding.
ACCUMULATOR_DTYPE = torch.float64
# Elements converted to float64 at a time while folding: an in-place add of another dtype is several times slower
# than converting a cache-sized chunk into a float64 buffer and adding that, and no full-size float64 copy is made.
FOLD_CHUNK = 1 << 18


def _checked_weight(weight: float) -> float:
    """The weight as a float; ValueError unless it is finite and > 0."""
    value = float(weight)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"weight (sample size) must be a finite number > 0, got {weight!r}")
    return value


def _check_matches(shapes: Mapping[str, torch.Size], weights: Weights, what: str) -> None:
    """ValueError naming the first tensor of `weights` that is missing, unexpected, non-finite or of another shape."""
    for name in shapes:
        if name not in weights:
            raise ValueError(f"{what} is missing tensor {name!r}")
    for name, tensor in weights.items():
        if name not in shapes:
            raise ValueError(f"{what} has unexpected tensor {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what} tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.shape != shapes[name]:
            raise ValueError(f"{what} tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}")
        if tensor.is_complex():
            raise ValueError(f"{what} tensor {name!r} is complex ({tensor.dtype}); only real tensors are averaged")
        if tensor.is_floating_point() and not tensor.is_meta and not all_finite(tensor):
            raise ValueError(f"{what} tensor {name!r} contains NaN or infinite values")


def _shapes(weights: Weights) -> dict[str, torch.Size]:
    """Tensor name -> shape; ValueError naming a value that is not a tensor."""
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    return {name: tensor.shape for name, tensor in weights.items()}


def _as_float64(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's values as a CPU float64 tensor (no copy when it already is one)."""
    return tensor.detach().to(device="cpu", dtype=ACCUMULATOR_DTYPE)


def _add_scaled(total: torch.Tensor, tensor: torch.Tensor, weight: float, buffer: torch.Tensor) -> None:
    """total += weight * tensor for a contiguous float64 `total`, through `buffer` (FOLD_CHUNK float64 elements)."""
    flat_total = total.view(-1)
    flat = tensor.detach().to(device="cpu").reshape(-1)
    if flat.dtype == flat_total.dtype:
        flat_total.add_(flat, alpha=weight)
        return
    for start in range(0, flat.numel(), FOLD_CHUNK):
        part = flat[start : start + FOLD_CHUNK]
        chunk = buffer[: part.numel()]
        chunk.copy_(part)
        flat_total[start : start + part.numel()].add_(chunk, alpha=weight)


def _cast_like(mean: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The float64 mean in the dtype of `like`: floats are cast, integers (and bools) rounded to nearest."""
    if like.is_floating_point():
        return mean.to(like.dtype)
    # Truncation would bias integer buffers (BatchNorm num_batches_tracked) downwards.
    return torch.round(mean).to(like.dtype)


def _finalized(sums: Mapping[str, torch.Tensor], total_weight: float, like: Weights) -> dict[str, torch.Tensor]:
    """sum / total_weight per tensor, in the names, order and dtypes of `like`."""
    _check_matches(_shapes(sums), like, "like")
    return {name: _cast_like(sums[name] / total_weight, tensor) for name, tensor in like.items()}


class RunningWeightedSum:
    """Streaming sample-size-weighted sum of updates: memory O(model size), order-independent up to float64 rounding."""

    def __init__(self, sums: dict[str, torch.Tensor] | None = None, total_weight: float = 0.0, count: int = 0) -> None:
        """Start empty, or continue from saved sums (taken over, converted to float64 if needed)."""
        sums = {} if sums is None else sums
        total_weight = float(total_weight)
        if count < 0 or not (math.isfinite(total_weight) and total_weight >= 0):
            raise ValueError(f"invalid state: count={count}, total_weight={total_weight}")
        if (count == 0) != (total_weight == 0) or (count == 0 and sums):
            raise ValueError(f"inconsistent state: count={count}, total_weight={total_weight}, {len(sums)} tensors")
        self.sums: dict[str, torch.Tensor] = {name: _as_float64(tensor) for name, tensor in sums.items()}
        self.total_weight: float = total_weight
        self.count: int = int(count)

    def fold(self, weights: Weights, weight: float) -> None:
        """Add weight * update to the sums in place; the first fold fixes the tensor names and shapes."""
        weight = _checked_weight(weight)
        if self.count:
            _check_matches(_shapes(self.sums), weights, "update")
        else:
            _check_matches(_shapes(weights), weights, "update")
            self.sums = {name: torch.zeros(t.shape, dtype=ACCUMULATOR_DTYPE) for name, t in weights.items()}
        # Everything is validated before the first add, so a rejected update leaves the sums untouched.
        buffer = torch.empty(FOLD_CHUNK, dtype=ACCUMULATOR_DTYPE)
        for name, tensor in weights.items():
            _add_scaled(self.sums[name], tensor, weight, buffer)
        self.total_weight += weight
        self.count += 1

    def finalize(self, like: Weights) -> dict[str, torch.Tensor]:
        """The weighted mean, in the names and dtypes of `like` (meta tensors will do); ValueError if nothing folded."""
        if not self.count:
            raise ValueError("nothing to aggregate: no update was folded")
        return _finalized(self.sums, self.total_weight, like)

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and string metadata for safetensors (shares the sums' storage; save before folding again)."""
        return dict(self.sums), {"total_weight": repr(self.total_weight), "count": str(self.count)}

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> "RunningWeightedSum":
        """Rebuild from `to_state` output; tensors are copied (safetensors may hand out read-only buffers)."""
        try:
            total_weight, count = float(metadata["total_weight"]), int(metadata["count"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid running-sum metadata {dict(metadata)!r}") from error
        sums = {
            name: tensor.detach().to(device="cpu", dtype=ACCUMULATOR_DTYPE, copy=True)
            for name, tensor in tensors.items()
        }
        return cls(sums, total_weight, count)


def weighted_mean(updates: Sequence[tuple[Weights, float]], like: Weights) -> dict[str, torch.Tensor]:
    """Direct sum(n_i * w_i) / sum(n_i) over all updates at once, one tensor name at a time."""
    if not updates:
        raise ValueError("nothing to aggregate: no updates")
    shapes = _shapes(like)
    sample_sizes = [_checked_weight(weight) for _, weight in updates]
    for index, (weights, _) in enumerate(updates):
        _check_matches(shapes, weights, f"update {index}")
    total = math.fsum(sample_sizes)
    factors = torch.tensor(sample_sizes, dtype=ACCUMULATOR_DTYPE)
    result = {}
    for name, tensor in like.items():
        stacked = torch.stack([_as_float64(weights[name]) for weights, _ in updates])
        summed = torch.tensordot(factors, stacked, dims=1)
        result[name] = _cast_like(summed / total, tensor)
    return result
