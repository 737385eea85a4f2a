"""MiniGrid navigation as the CTM paper's RL section runs it (arXiv 2505.05522, section 8; official
`tasks/rl/train.py` `make_env_minigrid`): the agent's 7x7 symbolic view (object, colour and state ids per cell,
MiniGrid's `ImgObsWrapper`), episodes capped at 300 steps (the official 4rooms scripts), read flat as (147,) so
that every model of the harness takes it; the spec names the view (`minigrid_view`), which the CTM agent's
navigation-backbone reshapes. Registered as `biozoo/MiniGrid-FourRooms-v0` by `biozoo.envs.registration`; needs
`pip install minigrid` (the `rl` extra), imported on the first `gymnasium.make`.

    import gymnasium as gym, biozoo
    env = gym.make("biozoo/MiniGrid-FourRooms-v0")
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from biozoo._core import BiozooError


class MiniGridView(gym.ObservationWrapper):
    """The symbolic view (grid, grid, 3) read flat as float32 ids; `minigrid_view` keeps its shape."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.minigrid_view = tuple(int(n) for n in env.observation_space.shape)
        high = float(np.max(env.observation_space.high))
        self.observation_space = gym.spaces.Box(0.0, high, (int(np.prod(self.minigrid_view)),), np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation.reshape(-1).astype(np.float32)


def make_minigrid(base: str = "MiniGrid-FourRooms-v0", max_steps: int = 300, **kwargs: Any) -> gym.Env:
    """MiniGrid's `base` env with its symbolic view only, flattened to (grid * grid * 3,) float32 ids."""
    try:
        import minigrid  # noqa: F401  (registers the MiniGrid ids)
        from minigrid.wrappers import ImgObsWrapper
    except ImportError:
        raise BiozooError(f"{base} needs the minigrid package: pip install minigrid (or biozoo[rl])") from None
    return MiniGridView(ImgObsWrapper(gym.make(base, max_steps=max_steps, **kwargs)))
