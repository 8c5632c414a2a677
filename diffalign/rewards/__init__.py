"""Pluggable reward models: one protocol, a registry with entry points, built-ins that work offline.

    from diffalign.rewards import get_reward
    reward = get_reward("jpeg_compressibility")
    scores, info = reward(images, prompts)          # images: [N, C, H, W] floats in [0, 1]
"""

from ..images import check_images
from .base import Reward, RewardModel, as_reward, combine, pareto_compare
from .registry import ENTRY_POINT_GROUP, available_rewards, get_reward, register_reward

__all__ = [
    "ENTRY_POINT_GROUP",
    "Reward",
    "RewardModel",
    "as_reward",
    "available_rewards",
    "check_images",
    "combine",
    "get_reward",
    "pareto_compare",
    "register_reward",
]
