"""Uncertainty measures over stacked predictions (samples or ensemble members first)."""

import torch


def _entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (natural log) over the last dim, with 0 * log 0 = 0."""
    return -torch.special.xlogy(probabilities, probabilities).sum(dim=-1)


def _per_row(values: torch.Tensor) -> torch.Tensor:
    """Mean over every dim after the batch dim, so that the result has shape (B,)."""
    return values.reshape(values.shape[0], -1).mean(dim=1) if values.dim() > 1 else values


def uncertainty_measures(stacked: torch.Tensor, probabilities: bool) -> dict[str, torch.Tensor]:
    """Variance/std over samples and, for probabilities over the last dim, entropies and mutual information per row.

    `stacked` has shape (S samples, B batch, ...outputs). `variance` and `std` are population statistics over the
    S samples (correction 0) with shape (B, ...outputs); they are zero for S == 1. With `probabilities`, the last dim
    holds a distribution: `predictive_entropy` is H[mean_s p], `expected_entropy` is mean_s H[p_s] and `mutual_info`
    their difference clamped at 0 (zero for S == 1), each of shape (B,); outputs with extra dims between batch and
    classes (B, ..., C) get the mean entropy over those positions.
    """
    if not isinstance(stacked, torch.Tensor):
        raise TypeError(f"stacked must be a tensor, got {type(stacked).__name__}")
    if stacked.dim() < 2 or stacked.shape[0] < 1:
        raise ValueError(f"stacked must have shape (S >= 1 samples, B batch, ...), got {tuple(stacked.shape)}")
    if probabilities and stacked.dim() < 3:
        raise ValueError(f"probabilities need shape (S, B, ..., C) with classes last, got {tuple(stacked.shape)}")
    if not stacked.is_floating_point():
        stacked = stacked.to(torch.get_default_dtype())
    samples = stacked.shape[0]
    variance = torch.zeros_like(stacked[0]) if samples == 1 else stacked.var(dim=0, correction=0)
    measures = {"variance": variance, "std": variance.sqrt()}
    if probabilities:
        predictive = _per_row(_entropy(stacked.mean(dim=0)))
        expected = _per_row(_entropy(stacked).mean(dim=0))
        mutual_info = torch.zeros_like(predictive) if samples == 1 else (predictive - expected).clamp(min=0)
        measures.update(predictive_entropy=predictive, expected_entropy=expected, mutual_info=mutual_info)
    return measures
