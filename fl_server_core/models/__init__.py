"""The data model."""

from fl_server_core.models.blob import Blob
from fl_server_core.models.metric import Metric
from fl_server_core.models.model import GlobalModel, LocalModel, MeanModel, Model, ModelKind, SWAGModel, SWAGUpdate
from fl_server_core.models.round import (
    DeliveryState,
    Notification,
    RoundArrival,
    RoundKind,
    RoundState,
    TrainingRound,
    WeightsVersion,
)
from fl_server_core.models.training import AggregationMethod, Training, TrainingState, UncertaintyMethod
from fl_server_core.models.user import User

__all__ = [
    "AggregationMethod",
    "Blob",
    "DeliveryState",
    "GlobalModel",
    "LocalModel",
    "MeanModel",
    "Metric",
    "Model",
    "ModelKind",
    "Notification",
    "RoundArrival",
    "RoundKind",
    "RoundState",
    "SWAGModel",
    "SWAGUpdate",
    "Training",
    "TrainingRound",
    "TrainingState",
    "UncertaintyMethod",
    "User",
    "WeightsVersion",
]
