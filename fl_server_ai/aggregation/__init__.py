"""Aggregation maths: pure functions and strategy objects over tensors and sample sizes (no Django)."""

from fl_server_ai.aggregation.clients import daisy_chain_permutation, sample_clients
from fl_server_ai.aggregation.mean import RunningWeightedSum, Weights, weighted_mean
from fl_server_ai.aggregation.strategies import STRATEGIES, AggregationStrategy, FedAvg, FedDC, FedProx, get_strategy

__all__ = [
    "STRATEGIES",
    "AggregationStrategy",
    "FedAvg",
    "FedDC",
    "FedProx",
    "RunningWeightedSum",
    "Weights",
    "daisy_chain_permutation",
    "get_strategy",
    "sample_clients",
    "weighted_mean",
]
