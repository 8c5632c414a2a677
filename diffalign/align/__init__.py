"""Preference alignment of diffusion models: one accelerate training engine, methods as small modules.

    from diffalign.align import config_for, train
    cfg = config_for("d3po", overrides={"model": "builtin:digits", "reward": "brightness", "max_steps": 20})
    out = train("d3po", cfg, "runs/d3po")             # LoRA weights, config.yaml, metrics.jsonl, reward_curve.png
    pipe = diffalign.load_pipeline("runs/d3po")       # the aligned pipeline
"""

from .config import (
    D3POConfig,
    DDPOConfig,
    DiffusionDPOConfig,
    LoraSettings,
    PreferenceConfig,
    RankDPOConfig,
    SmPOConfig,
    TrainConfig,
    config_for,
)
from .data import PreferenceData, load_preferences
from .evaluate import evaluate_kl, evaluate_reward, evaluate_rewards
from .methods import METHODS, get_method
from .policy import Policy, load_aligned_pipeline
from .trainer import list_checkpoints, read_metrics, train

__all__ = [
    "METHODS",
    "D3POConfig",
    "DDPOConfig",
    "DiffusionDPOConfig",
    "PreferenceConfig",
    "PreferenceData",
    "RankDPOConfig",
    "SmPOConfig",
    "LoraSettings",
    "Policy",
    "TrainConfig",
    "config_for",
    "evaluate_kl",
    "evaluate_reward",
    "evaluate_rewards",
    "get_method",
    "load_preferences",
    "load_aligned_pipeline",
    "list_checkpoints",
    "read_metrics",
    "train",
]
