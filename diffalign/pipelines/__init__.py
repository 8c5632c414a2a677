"""diffusers pipelines for diffalign's shipped models, and loading models by name."""

from .class_conditional import ClassConditionalPipeline, ModelNotAvailableError, builtin_pipeline, load_pipeline

__all__ = ["ClassConditionalPipeline", "ModelNotAvailableError", "builtin_pipeline", "load_pipeline"]
