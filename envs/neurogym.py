"""NeuroGym's cognitive tasks (Molano-Mazon et al., neurogym 2.3.1) as biozoo tasks: any NeuroGym id as a
DataModule of fixed-length windows with a target at every step, and as a gymnasium env for the PPO path.

NeuroGym 2.3.1 pins gymnasium 0.29 while biozoo needs gymnasium >= 1.0, so pip would silently pick neurogym 0.0.2;
its tasks work under gymnasium 1.x when installed without its pins (README, "NeuroGym"):

    pip install --no-deps neurogym==2.3.1 && pip install pydantic-settings loguru tqdm tomlkit natsort scipy

Data (as NeuroGym's `Dataset` builds them: trials drawn one after another into one stream, cut into `seq_len`
windows, so a window may start mid-trial) but seeded and split here: NeuroGym's `Dataset` seeds itself from OS
entropy and env i with s + i, so two datasets overlap; here train, val and test each draw from their own env,
seeded by `numpy.random.SeedSequence(seed).spawn(3)`, the same windows every run.

The spec is online (`DataSpec.online`): the answer at step t may use the observations of steps <= t only.
Label 0 is fixation in every NeuroGym task with discrete actions; `val/acc_decision` scores the other steps.
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch.utils.data import TensorDataset

from biozoo._core import BiozooError, DataSpec, suggest

from .datamodules import BiozooDataModule

INSTALL = ("pip install --no-deps neurogym==2.3.1 && "
           "pip install pydantic-settings loguru tqdm tomlkit natsort scipy")
FIXATION = 0  # NeuroGym's fixation action / label


def import_neurogym() -> Any:
    try:
        import neurogym
    except ImportError:
        raise BiozooError(f"NeuroGym tasks need neurogym 2.3.1 (its gymnasium pin must be skipped): {INSTALL}") \
            from None
    return neurogym


def neurogym_ids() -> list[str]:
    import_neurogym()  # registers its ids with gymnasium
    return sorted(k for k, v in gym.registry.items() if str(v.entry_point).startswith("neurogym"))


def make_neurogym(task: str, env_kwargs: dict[str, Any] | None = None, seed: int | None = None) -> Any:
    """The unwrapped NeuroGym env (its `new_trial`, `ob`, `gt` are not reachable through gymnasium 1.x's wrappers),
    seeded before anything is drawn."""
    ids = neurogym_ids()
    if task not in ids:
        raise BiozooError(f"unknown NeuroGym task {task!r}.{suggest(task, ids)} Known: {', '.join(ids)}")
    with warnings.catch_warnings():  # NeuroGym's metadata lacks gymnasium 1.x's render_modes
        warnings.simplefilter("ignore")
        env = gym.make(task, **(env_kwargs or {})).unwrapped
    env.seed(seed)
    return env


def trial_stream(env: Any, n_windows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, seq_len, F) float32 observations and (n, seq_len) int64 labels: trials back to back, cut into windows."""
    total = n_windows * seq_len
    obs, labels, filled = [], [], 0
    while filled < total:
        env.new_trial()
        obs.append(np.asarray(env.ob, np.float32).reshape(len(env.ob), -1))
        labels.append(np.asarray(env.gt).reshape(len(env.gt)))
        filled += len(env.ob)
    x = np.concatenate(obs)[:total].reshape(n_windows, seq_len, -1)
    y = np.concatenate(labels)[:total].astype(np.int64).reshape(n_windows, seq_len)
    return x, y


class NeuroGymDataModule(BiozooDataModule):
    """Any NeuroGym task with discrete actions, in windows of `seq_len` steps: x (B, L, F), targets (B, L).

    Args:
        task: a NeuroGym id (`PerceptualDecisionMaking-v0`, `GoNogo-v0`, `DelayMatchSample-v0`, `yang19.dms-v0`,
            ...); `env_kwargs` go to its constructor (`dt`, `timing`, ...).
        seq_len: steps per window (NeuroGym's supervised examples use 100).
        train_size / val_size / test_size: windows per split, drawn once from the split's own seeded env.
    """

    def __init__(self, task: str = "PerceptualDecisionMaking-v0", env_kwargs: dict[str, Any] | None = None,
                 seq_len: int = 100, batch_size: int = 16, train_size: int = 4096, val_size: int = 256,
                 test_size: int = 256, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if seq_len < 1 or min(train_size, val_size, test_size) < 1:
            raise BiozooError("seq_len, train_size, val_size and test_size must be positive")
        self.task, self.env_kwargs, self.seq_len = task, dict(env_kwargs or {}), seq_len
        self.sizes = (train_size, val_size, test_size)
        self._spec: DataSpec | None = None

    @property
    def spec(self) -> DataSpec:
        if self._spec is None:
            env = make_neurogym(self.task, self.env_kwargs, seed=self.seed)
            if not isinstance(env.action_space, gym.spaces.Discrete):
                raise BiozooError(f"NeuroGym task {self.task!r} has {type(env.action_space).__name__} actions; "
                                  "NeuroGymDataModule takes tasks with discrete actions")
            env.new_trial()
            if getattr(env, "gt", None) is None or getattr(env, "ob", None) is None:
                raise BiozooError(f"NeuroGym task {self.task!r} gives no per-step targets (an RL-only task): train it "
                                  f"as an env, gymnasium.make('biozoo/NeuroGym-v0', task={self.task!r})")
            features = int(np.prod(env.observation_space.shape))
            self._spec = DataSpec("sequence", (self.seq_len, features), "classes",
                                  num_classes=int(env.action_space.n), positions=(self.seq_len,), online=True,
                                  extras={"fixation_label": FIXATION})
        return self._spec

    def build_datasets(self):
        seeds = np.random.SeedSequence(self.seed).spawn(3)
        out = []
        for size, seed in zip(self.sizes, seeds):
            env = make_neurogym(self.task, self.env_kwargs, seed=int(seed.generate_state(1)[0]))
            x, y = trial_stream(env, size, self.seq_len)
            out.append(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)))
        return tuple(out)


class NeuroGymEnv(gym.Env):
    """A NeuroGym task as a plain gymnasium 1.x env (`biozoo/NeuroGym-v0` with `task=...`, for the PPO path):
    flat float32 observations, NeuroGym's discrete actions and rewards; `reset(seed=...)` seeds its trials."""

    metadata = {"render_modes": []}

    def __init__(self, task: str = "PerceptualDecisionMaking-v0", **env_kwargs: Any):
        self.inner = make_neurogym(task, env_kwargs)
        shape = self.inner.observation_space.shape
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (int(np.prod(shape)),), np.float32)
        self.action_space = self.inner.action_space

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.inner.seed(seed)
        obs, info = self.inner.reset()
        return np.asarray(obs, np.float32).ravel(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.inner.step(action)
        return np.asarray(obs, np.float32).ravel(), float(reward), bool(terminated), bool(truncated), info
