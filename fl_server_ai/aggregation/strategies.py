"""Aggregation strategies: small objects with a narrow interface over the pure maths."""

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from fl_server_ai.aggregation.mean import RunningWeightedSum, Weights, weighted_mean


class AggregationStrategy(ABC):
    """How a round's updates become the next global model, and what clients are told per round."""

    name: ClassVar[str]
    streaming: ClassVar[bool]  # True: fold updates into new_accumulator() as they arrive

    def round_config(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Extra `config` for UPDATE_ROUND_START bodies."""
        return {}

    def is_aggregation_round(self, round_number: int, options: Mapping[str, Any]) -> bool:
        """Whether the 0-based round ends with an aggregation."""
        return True

    def new_accumulator(self) -> RunningWeightedSum:
        """An empty running sum for a streaming round."""
        if not self.streaming:
            raise TypeError(f"{self.name} is not a streaming strategy; use aggregate()")
        return RunningWeightedSum()

    @abstractmethod
    def aggregate(self, updates: Sequence[tuple[Weights, float]], like: Weights) -> dict[str, torch.Tensor]:
        """The aggregate of (update, sample size) pairs, in the names and dtypes of `like`."""


class FedAvg(AggregationStrategy):
    """Federated averaging: the sample-size-weighted mean of the updates."""

    name = "FedAvg"
    streaming = True

    def aggregate(self, updates: Sequence[tuple[Weights, float]], like: Weights) -> dict[str, torch.Tensor]:
        """The sample-size-weighted mean."""
        return weighted_mean(updates, like)


class FedProx(FedAvg):
    """FedAvg on the server; clients add a proximal term mu/2 * ||w - w_global||^2 to their loss."""

    name = "FedProx"

    def round_config(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The proximal coefficient mu (default 0.01)."""
        mu = float(options.get("proximal_mu", 0.01))
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"proximal_mu must be a finite number >= 0, got {mu!r}")
        return {"proximal_mu": mu}


class FedDC(FedAvg):
    """Federated daisy chaining: local models are passed between clients, averaged every period-th round."""

    name = "FedDC"

    @staticmethod
    def _period(options: Mapping[str, Any]) -> int:
        """The daisy-chain period (default 1); ValueError unless it is an integer >= 1."""
        period = options.get("daisy_chain_period", 1)
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"daisy_chain_period must be an integer >= 1, got {period!r}")
        return period

    def round_config(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The daisy-chain period."""
        return {"daisy_chain_period": self._period(options)}

    def is_aggregation_round(self, round_number: int, options: Mapping[str, Any]) -> bool:
        """True for the last round of each period: (round + 1) % period == 0."""
        return (round_number + 1) % self._period(options) == 0


STRATEGIES: dict[str, type[AggregationStrategy]] = {cls.name: cls for cls in (FedAvg, FedProx, FedDC)}


def get_strategy(name: str) -> AggregationStrategy:
    """A new instance of the strategy called `name`; ValueError listing the known names otherwise."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown aggregation strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
