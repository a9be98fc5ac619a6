"""Uncertainty maths: measures, SWAG sampling and prediction methods over torch modules (no Django)."""

from fl_server_ai.uncertainty.measures import uncertainty_measures
from fl_server_ai.uncertainty.methods import (
    METHODS,
    SWAG,
    Ensemble,
    MCDropout,
    NoUncertainty,
    UncertaintyMethod,
    is_dropout,
    method_for,
)
from fl_server_ai.uncertainty.swag import (
    assign_flat_parameters,
    flatten_parameters,
    sample_swag_weights,
    swag_variance,
)

__all__ = [
    "METHODS",
    "SWAG",
    "Ensemble",
    "MCDropout",
    "NoUncertainty",
    "UncertaintyMethod",
    "assign_flat_parameters",
    "flatten_parameters",
    "is_dropout",
    "method_for",
    "sample_swag_weights",
    "swag_variance",
    "uncertainty_measures",
]
