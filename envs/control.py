"""Control environments for the harness: one env factory and one DataModule for every gymnasium env.

`make_env` / `make_vec_env` build any registered id (biozoo's swimmer and masked classic control, gymnasium's
own) the same way, with one time-feature rule (`wants_time_feature`): the normalised elapsed time is appended to
the observation (gymnasium's TimeAwareObservation, normalize_time=True) for MuJoCo swimmers, whose NCAP circuit
reads its oscillator's clock there (the official Tonic runs appended a TimeFeature), and not for classic control
(the official CTM RL scripts observe the masked state only). A DataModule's `time_feature` overrides it; training,
validation and every evaluation read the DataModule's one value.

Vector envs autoreset on the step after an episode ends (gymnasium 1.x NEXT_STEP): that step's transition is not
a real one (the harness masks it) and its observation is the new episode's first. Episode returns come from
`RecordEpisodeStatistics` (`info["episode"]` with the `info["_episode"]` mask), before any reward normalisation.

`EnvDataModule.spec` is the env's `DataSpec`: input "observation" (obs size,), target "discrete_actions" (n) or
"continuous_actions" (action size, with bounds); a swimmer adds `n_links` and `joint_offset` (where its joint
angles start in the observation) to the extras, which NCAP reads.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import TimeAwareObservation
from gymnasium.wrappers.vector import NormalizeReward, RecordEpisodeStatistics
from torch.utils.data import TensorDataset

from biozoo._core import BiozooError, DataSpec, UnknownNameError, suggest

from .datamodules import BiozooDataModule

JOINT_OFFSET = {"Swimmer-v4": 1, "Swimmer-v5": 1}  # gymnasium's swimmer observes the tip angle first


def import_env_deps(env_id: str) -> None:
    """gymnasium's MuJoCo envs import mujoco themselves; import it first through the swimmer's loader, which
    falls back to physics without rendering when the MUJOCO_GL backend is missing (envs/swimmer.py)."""
    spec = gym.registry.get(env_id)
    if spec is None:
        raise UnknownNameError(f"unknown environment {env_id!r}.{suggest(env_id, list(gym.registry))}")
    if "mujoco" in str(spec.entry_point) or "swimmer" in str(spec.entry_point):
        from .swimmer import load_mujoco

        load_mujoco()


def wants_time_feature(env_id: str) -> bool:
    """The one default: MuJoCo swimmers observe the normalised elapsed time, everything else does not."""
    return "swimmer" in env_id.lower()


def env_wrappers(time_feature: bool) -> list:
    return [lambda env: TimeAwareObservation(env, normalize_time=True)] if time_feature else []


def registered(env_id: str, max_episode_steps: int | None = None) -> str | gym.envs.registration.EnvSpec:
    """The id, or a copy of its registration with another episode cap (shorter episodes for smoke runs)."""
    import_env_deps(env_id)
    if max_episode_steps is None:
        return env_id
    return dataclasses.replace(gym.spec(env_id), max_episode_steps=max_episode_steps)


def make_env(env_id: str, time_feature: bool | None = None, max_episode_steps: int | None = None,
             **env_kwargs: Any) -> gym.Env:
    env = gym.make(registered(env_id, max_episode_steps), **env_kwargs)
    for wrap in env_wrappers(wants_time_feature(env_id) if time_feature is None else time_feature):
        env = wrap(env)
    return env


def make_vec_env(env_id: str, num_envs: int, time_feature: bool | None = None, vectorization_mode: str = "sync",
                 normalize_reward: bool = False, gamma: float = 0.99, max_episode_steps: int | None = None,
                 **env_kwargs: Any) -> gym.vector.VectorEnv:
    """Vector envs with episode statistics of the raw rewards and, optionally, rewards scaled by the running std
    of the discounted return (gymnasium's NormalizeReward, after the statistics)."""
    time_feature = wants_time_feature(env_id) if time_feature is None else time_feature
    env = registered(env_id, max_episode_steps)
    envs = RecordEpisodeStatistics(gym.make_vec(env, num_envs=num_envs, vectorization_mode=vectorization_mode,
                                                wrappers=env_wrappers(time_feature), **env_kwargs))
    return NormalizeReward(envs, gamma=gamma) if normalize_reward else envs


def env_spec(env: gym.Env | gym.vector.VectorEnv, env_id: str = "", env_kwargs: dict[str, Any] | None = None
             ) -> DataSpec:
    """The DataSpec of an env (single or vector): observation in, discrete or continuous actions out."""
    obs_space = getattr(env, "single_observation_space", env.observation_space)
    action_space = getattr(env, "single_action_space", env.action_space)
    if not isinstance(obs_space, gym.spaces.Box):
        raise BiozooError(f"{env_id or env} observes {obs_space}; the harness reads Box observations")
    obs_dim = int(np.prod(obs_space.shape))
    extras: dict[str, Any] = {"obs_dim": obs_dim}
    try:  # a MiniGrid symbolic view read flat (biozoo.envs.minigrid_view): its grid shape, for navigation backbones
        extras["minigrid_view"] = list(env.get_wrapper_attr("minigrid_view"))
    except AttributeError:
        pass
    n_links = (env_kwargs or {}).get("n_links", getattr(getattr(env, "unwrapped", env), "n_links", None))
    if n_links is not None or env_id in JOINT_OFFSET:
        extras["n_links"] = int(n_links if n_links is not None else np.prod(action_space.shape) + 1)
        extras["joint_offset"] = JOINT_OFFSET.get(env_id, 0)
    if isinstance(action_space, gym.spaces.Discrete):
        return DataSpec("observation", (obs_dim,), "discrete_actions", num_classes=int(action_space.n),
                        extras={**extras, "action_dim": int(action_space.n)})
    if isinstance(action_space, gym.spaces.Box):
        action_dim = int(np.prod(action_space.shape))
        return DataSpec("observation", (obs_dim,), "continuous_actions", target_dim=action_dim,
                        action_low=float(np.min(action_space.low)), action_high=float(np.max(action_space.high)),
                        extras={**extras, "action_dim": action_dim})
    raise BiozooError(f"{env_id or env} acts in {action_space}; the harness takes Discrete or Box actions")


class EnvDataModule(BiozooDataModule):
    """A gymnasium environment as a DataModule for `ControlTask`: its `spec` (linked into the task's `data_dims`
    by the CLI) describes observations and actions, `make_vec` builds the training envs. The "batches" are only
    a clock: one per rollout (PPO) or generation (ES), `rollouts_per_epoch` of them between validations.

    Args:
        env_id / env_kwargs: any registered gymnasium id and its `gym.make` arguments.
        num_envs: parallel training envs (ES uses one per population member instead).
        time_feature: append the normalised elapsed time; None follows `wants_time_feature`.
        max_episode_steps: another episode cap than the registered one (None keeps it).
    """

    def __init__(self, env_id: str = "biozoo/Swimmer-v0", env_kwargs: dict[str, Any] | None = None,
                 num_envs: int = 8, vectorization_mode: str = "sync", time_feature: bool | None = None,
                 max_episode_steps: int | None = None, seed: int = 0, rollouts_per_epoch: int = 10):
        super().__init__(batch_size=1, seed=seed)
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        self.num_envs, self.vectorization_mode = num_envs, vectorization_mode
        self.time_feature = wants_time_feature(env_id) if time_feature is None else time_feature
        self.rollouts_per_epoch = rollouts_per_epoch
        if max_episode_steps is not None:  # every env of this DataModule (training, evaluation) gets the cap
            self.env_kwargs["max_episode_steps"] = max_episode_steps
        self._spec: DataSpec | None = None

    @property
    def spec(self) -> DataSpec:
        if self._spec is None:
            env = self.make_env()
            try:
                self._spec = env_spec(env, self.env_id, self.env_kwargs)
            finally:
                env.close()
        return self._spec

    def make_env(self, **override: Any) -> gym.Env:
        return make_env(self.env_id, self.time_feature, **{**self.env_kwargs, **override})

    def make_vec(self, num_envs: int | None = None, normalize_reward: bool = False, gamma: float = 0.99,
                 **override: Any) -> gym.vector.VectorEnv:
        """`num_envs` training envs (default `self.num_envs`); see `make_vec_env` for the reward normalisation."""
        return make_vec_env(self.env_id, num_envs or self.num_envs, self.time_feature, self.vectorization_mode,
                            normalize_reward, gamma, **{**self.env_kwargs, **override})

    def build_datasets(self):
        clock = lambda n: TensorDataset(torch.arange(n))  # noqa: E731
        return clock(self.rollouts_per_epoch), clock(1), clock(1)
