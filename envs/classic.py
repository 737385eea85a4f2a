"""Partially observed classic control: CartPole-v1 and Acrobot-v1 with the velocities zeroed in the observation
(the official CTM `MaskVelocityWrapper`, arXiv 2505.05522 section 8), registered as `biozoo/CartPoleMasked-v1`
(200 steps) and `biozoo/AcrobotMasked-v1` (500 steps) by `biozoo.envs.registration`.

    import gymnasium as gym, biozoo
    env = gym.make("biozoo/CartPoleMasked-v1")
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

VELOCITY_MASKS = {"CartPole-v1": [1, 0, 1, 0], "Acrobot-v1": [1, 1, 1, 1, 0, 0]}


class MaskVelocity(gym.ObservationWrapper):
    """Zero the velocity entries of a classic-control observation."""

    def __init__(self, env: gym.Env, mask: list[float]):
        super().__init__(env)
        self.mask = np.asarray(mask, dtype=np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return (observation * self.mask).astype(np.float32)


def make_masked(base: str, **kwargs: Any) -> gym.Env:
    return MaskVelocity(gym.make(base, **kwargs), VELOCITY_MASKS[base])
