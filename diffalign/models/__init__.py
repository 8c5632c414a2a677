"""Closed-form reference models and their data."""

from .data import load_digits_tensor
from .reference import (
    PREDICTION_TYPES,
    GaussianMixtureDenoiser,
    NoiseSchedule,
    ReferenceModel,
    digits_reference_model,
    flow_alpha,
    solve_probability_flow,
    solve_reference,
    vp_alpha,
)

__all__ = [
    "PREDICTION_TYPES",
    "GaussianMixtureDenoiser",
    "NoiseSchedule",
    "ReferenceModel",
    "digits_reference_model",
    "flow_alpha",
    "load_digits_tensor",
    "solve_probability_flow",
    "solve_reference",
    "vp_alpha",
]
