"""SWAG (diagonal) maths: the variance from the first and second moments, weight samples, flat parameter vectors."""

import math

import torch


def _check_moments(first: torch.Tensor, second: torch.Tensor) -> None:
    """ValueError unless both moments are finite floating-point 1-D tensors of the same shape."""
    for label, tensor in (("first", first), ("second", second)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"SWAG {label} moment must be a tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1:
            raise ValueError(f"SWAG {label} moment must be a flat (1-D) tensor, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"SWAG {label} moment must be floating point, got {tensor.dtype}")
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"SWAG {label} moment has non-finite values")
    if first.shape != second.shape:
        raise ValueError(f"SWAG moments differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")


def _check_non_negative(value: float, label: str) -> float:
    """The value as a float; ValueError unless it is finite and >= 0."""
    number = float(value)
    if not (math.isfinite(number) and number >= 0):
        raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
    return number


def swag_variance(first: torch.Tensor, second: torch.Tensor, floor: float = 1e-30) -> torch.Tensor:
    """The diagonal variance second - first**2, clamped to at least `floor` (negative or zero variance -> floor)."""
    if first.shape != second.shape:
        raise ValueError(f"SWAG moments differ in shape: {tuple(first.shape)} vs {tuple(second.shape)}")
    return torch.clamp(second - first**2, min=_check_non_negative(floor, "floor"))


def sample_swag_weights(
    first: torch.Tensor,
    second: torch.Tensor,
    n: int,
    generator: torch.Generator,
    floor: float = 1e-30,
    scale: float = 1.0,
) -> list[torch.Tensor]:
    """`n` independent flat weight vectors drawn from N(first, scale * diag(swag_variance(first, second, floor)))."""
    _check_moments(first, second)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of SWAG samples must be an integer >= 1, got {n!r}")
    scale = _check_non_negative(scale, "scale")
    std = (swag_variance(first, second, floor) * scale).sqrt()
    return [
        first + std * torch.randn(first.shape, generator=generator, dtype=first.dtype, device=first.device)
        for _ in range(n)
    ]


def flatten_parameters(module: torch.nn.Module) -> torch.Tensor:
    """The module's parameters, in `parameters()` order, as one detached flat vector (a copy)."""
    parts = [parameter.detach().reshape(-1) for parameter in module.parameters()]
    return torch.cat(parts) if parts else torch.empty(0)


def assign_flat_parameters(module: torch.nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the module's parameters in `parameters()` order; ValueError unless numel matches."""
    parameters = list(module.parameters())
    expected = sum(parameter.numel() for parameter in parameters)
    if flat.numel() != expected:
        raise ValueError(f"flat vector has {flat.numel()} values, the module's parameters need {expected}")
    flat = flat.reshape(-1)
    offset = 0
    with torch.no_grad():
        for parameter in parameters:
            count = parameter.numel()
            parameter.copy_(flat[offset : offset + count].view_as(parameter))
            offset += count
