"""The gymnasium ids of biozoo's environments. `import biozoo` runs this; it imports gymnasium only: each entry
point is a "module:attr" string, so an env's code (and MuJoCo) loads on the first `gymnasium.make`.

    import gymnasium as gym
    env = gym.make("biozoo:biozoo/Swimmer-v0")   # gymnasium imports `biozoo` first, which registers the ids
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym

# id -> gymnasium.register arguments. Swimmer: 1000 control steps of 0.03 s (swimmer.EPISODE_STEPS); the masked
# classic-control caps follow the official CTM RL scripts.
ENVS: dict[str, dict[str, Any]] = {
    "biozoo/Swimmer-v0": {"entry_point": "biozoo.envs.swimmer:SwimmerEnv", "max_episode_steps": 1000,
                          "kwargs": {"n_links": 6, "task": "swim"}},
    "biozoo/SwimmerNavigate-v0": {"entry_point": "biozoo.envs.swimmer:SwimmerEnv", "max_episode_steps": 1000,
                                  "kwargs": {"n_links": 6, "task": "navigate"}},
    "biozoo/CartPoleMasked-v1": {"entry_point": "biozoo.envs.classic:make_masked", "max_episode_steps": 200,
                                 "kwargs": {"base": "CartPole-v1"}},
    "biozoo/AcrobotMasked-v1": {"entry_point": "biozoo.envs.classic:make_masked", "max_episode_steps": 500,
                                "kwargs": {"base": "Acrobot-v1"}},
    "biozoo/MiniGrid-FourRooms-v0": {"entry_point": "biozoo.envs.minigrid_view:make_minigrid",
                                     "max_episode_steps": 300, "kwargs": {"base": "MiniGrid-FourRooms-v0"}},
    # any NeuroGym id as `task=` (needs neurogym, see envs/neurogym.py); an episode is 1000 steps of trials
    "biozoo/NeuroGym-v0": {"entry_point": "biozoo.envs.neurogym:NeuroGymEnv", "max_episode_steps": 1000,
                           "kwargs": {"task": "PerceptualDecisionMaking-v0"}},
}


def register_envs() -> None:
    """Register every id in `ENVS` that is not registered yet (idempotent: gymnasium warns on a re-register)."""
    for env_id, spec in ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, **{**spec, "kwargs": dict(spec["kwargs"])})


register_envs()
