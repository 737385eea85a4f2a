"""The control harness: trains, evaluates and reports any registered policy on gymnasium environments.

A policy is any zoo model mapping observations (B, D) to actions (B, A) (`ncap`, `mlp_policy`, ...); it is
deterministic, and training puts a `GaussianHead` (fixed or learned std) around it. A policy that wants
normalised inputs carries its own `RunningNorm` (saved with its weights); the harness updates every RunningNorm
it finds after each rollout. Two algorithms, both in `ControlTask` (manual optimisation):

- PPO (Schulman et al. 2017; the details of CleanRL's ppo_continuous_action and Tonic's PPO, which NCAP used):
  rollouts of `steps_per_env` steps from every vector env, GAE(lambda) advantages that bootstrap truncated
  episodes from the final observation, the clipped surrogate objective, early stop of the actor epochs at
  `target_kl`, a separate value network (MLP on normalised observations, its own Adam) and optional reward
  scaling by the running std of the discounted return (SB3's VecNormalize / gymnasium NormalizeReward).
- ES (Salimans et al. 2017, the NCAP repo's estorch script): antithetic Gaussian perturbations of all trainable
  weights, one episode per member (member pairs share their start state), centred-rank fitness shaping and Adam
  (coupled L2 weight decay), each member in its own vector env with `torch.func.vmap`.

Gymnasium 1.x vector envs autoreset on the step after an episode ends (NEXT_STEP): that step's transition is
masked out of the update, and episode returns come from `RecordEpisodeStatistics` (`info["episode"]` with
the `info["_episode"]` mask). Observations get the normalised elapsed time appended (TimeAwareObservation) so
the NCAP oscillator, and any policy, can read the clock.

    biozoo fit -c configs/ncap/swim6_ppo.yaml
    returns = evaluate(policy, "biozoo/Swimmer-v0", episodes=10, n_links=6)    # list of episode returns
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers import TimeAwareObservation
from gymnasium.wrappers.vector import RecordEpisodeStatistics
from torch import nn
from torch.utils.data import TensorDataset

import biozoo.envs  # noqa: F401  (registers biozoo/Swimmer-v0)
from biozoo.envs import BiozooDataModule
from biozoo.envs.swimmer import load_mujoco
from biozoo.models.baselines import MLP
from biozoo.models.errors import BiozooError
from biozoo.models.ncap import GaussianHead, RunningNorm, transfer_to

from .tasks import BiozooTask, build_model, cosine_with_warmup

JOINT_OFFSET = {"Swimmer-v4": 1, "Swimmer-v5": 1}  # gymnasium's swimmer observes the tip angle first


# Environments ---------------------------------------------------------------------------------------------------

def import_env_deps(env_id: str) -> None:
    """gymnasium's MuJoCo envs import mujoco themselves; import it first through the swimmer's loader, which
    falls back to physics without rendering when the MUJOCO_GL backend is missing (envs/swimmer.py)."""
    spec = gym.registry.get(env_id)
    if spec is not None and "mujoco" in str(spec.entry_point):
        load_mujoco()


def env_wrappers(time_feature: bool) -> list:
    return [lambda env: TimeAwareObservation(env, normalize_time=True)] if time_feature else []


def make_env(env_id: str, time_feature: bool = True, **env_kwargs: Any) -> gym.Env:
    import_env_deps(env_id)
    env = gym.make(env_id, **env_kwargs)
    for wrap in env_wrappers(time_feature):
        env = wrap(env)
    return env


def make_vec_env(env_id: str, num_envs: int, time_feature: bool = True, vectorization_mode: str = "sync",
                 **env_kwargs: Any) -> gym.vector.VectorEnv:
    """Vector envs with episode statistics in info["episode"] / info["_episode"] (gymnasium 1.x)."""
    import_env_deps(env_id)
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode=vectorization_mode,
                        wrappers=env_wrappers(time_feature), **env_kwargs)
    return RecordEpisodeStatistics(envs)


@contextmanager
def one_thread():
    """Run the policy's many tiny forward passes on one thread: a thread pool only adds synchronisation (and
    milliseconds per call on a busy machine) at batch sizes of a few environments."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def to_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float32, device=device)


def finished_episodes(info: dict[str, Any]) -> list[tuple[int, float]]:
    """(env index, return) of every episode that ended on this step."""
    mask = info.get("_episode")
    if mask is None or not mask.any():
        return []
    return [(int(i), float(info["episode"]["r"][i])) for i in np.flatnonzero(mask)]


@torch.no_grad()
@one_thread()
def evaluate(policy: nn.Module, env_id: str, episodes: int = 10, seed: int = 0, time_feature: bool = True,
             max_envs: int = 16, **env_kwargs: Any) -> list[float]:
    """Returns of `episodes` deterministic episodes (episode i starts from reset seed `seed + i`), for any
    policy in the zoo, trained or not. Up to `max_envs` episodes run side by side in a vector env."""
    was_training = policy.training
    policy.eval()
    device = next(iter(policy.parameters()), torch.empty(0)).device
    returns: list[float] = []
    for start in range(0, episodes, max_envs):
        n = min(max_envs, episodes - start)
        envs = make_vec_env(env_id, n, time_feature, **env_kwargs)
        try:
            obs, _ = envs.reset(seed=[seed + start + i for i in range(n)])
            done: dict[int, float] = {}
            while len(done) < n:
                action = policy(to_tensor(obs, device)).cpu().numpy()
                obs, _, _, _, info = envs.step(np.clip(action, envs.single_action_space.low,
                                                       envs.single_action_space.high))
                for i, ret in finished_episodes(info):
                    done.setdefault(i, ret)
        finally:
            envs.close()
        returns += [done[i] for i in range(n)]
    policy.train(was_training)
    return returns


def transfer_returns(policy: nn.Module, env_id: str, n_links: list[int], episodes: int = 3, seed: int = 0,
                     **env_kwargs: Any) -> dict[int, list[float]]:
    """Episode returns of the same weights moved to other body lengths, without retraining."""
    return {n: evaluate(transfer_to(policy, n), env_id, episodes, seed, **{**env_kwargs, "n_links": n})
            for n in n_links}


# Rollout plots and video --------------------------------------------------------------------------------------

@torch.no_grad()
@one_thread()
def rollout(policy: nn.Module, env_id: str, seed: int = 0, render: bool = False, time_feature: bool = True,
            **env_kwargs: Any) -> dict[str, Any]:
    """One deterministic episode: joint angles (T, J), head position (T, 2), rewards (T,) and, with
    `render`, RGB frames. Reads the MuJoCo state (qpos[:2] head, qpos[3:] joints), so it fits MuJoCo swimmers."""
    env = make_env(env_id, time_feature, render_mode="rgb_array" if render else None, **env_kwargs)
    policy.eval()
    device = next(iter(policy.parameters()), torch.empty(0)).device
    obs, _ = env.reset(seed=seed)
    joints, head, rewards, frames = [], [], [], []
    done = False
    try:
        while not done:
            action = policy(to_tensor(obs, device)[None])[0].cpu().numpy()
            obs, reward, terminated, truncated, _ = env.step(np.clip(action, env.action_space.low, env.action_space.high))
            qpos = env.unwrapped.data.qpos
            joints.append(qpos[3:].copy())
            head.append(qpos[:2].copy())
            rewards.append(reward)
            if render:
                frames.append(env.render())
            done = terminated or truncated
    finally:
        env.close()
    dt = getattr(env.unwrapped, "dt", 1.0)
    return {"joints": np.array(joints), "head": np.array(head), "rewards": np.array(rewards), "frames": frames,
            "dt": dt, "return": float(np.sum(rewards))}


def plot_rollout(traj: dict[str, Any], out: str | Path, title: str = "", seconds: float = 9.0) -> Path:
    """Joint angles against time (the first `seconds`) and the head's path, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = min(len(traj["joints"]), int(seconds / traj["dt"]))
    t = np.arange(steps) * traj["dt"]
    for j in range(traj["joints"].shape[1]):
        ax1.plot(t, traj["joints"][:steps, j], lw=1.2, label=f"joint {j}")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("angle (rad)")
    ax1.set_title("joint angles (head first)")
    ax1.legend(fontsize=7, ncol=2)
    ax2.plot(traj["head"][:, 0], traj["head"][:, 1], lw=1.2)
    ax2.plot(*traj["head"][0], "go", label="start")
    ax2.plot(*traj["head"][-1], "rs", label="end")
    ax2.set_aspect("equal", adjustable="datalim")
    ax2.set_xlabel("x (m)")
    ax2.set_ylabel("y (m)")
    ax2.set_title(f"head trajectory (return {traj['return']:.0f})")
    ax2.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def write_video(frames: list[np.ndarray], out: str | Path, fps: int) -> Path:
    """MP4 when imageio has ffmpeg, otherwise an animated GIF next to it."""
    import imageio.v2 as imageio

    out = Path(out)
    try:
        imageio.mimsave(out, frames, fps=fps)
    except (ValueError, RuntimeError, ImportError):
        out = out.with_suffix(".gif")
        imageio.mimsave(out, frames[::2], duration=2000 / fps, loop=0)
    return out


# The environment as a DataModule -------------------------------------------------------------------------------

class EnvDataModule(BiozooDataModule):
    """A gymnasium environment for `ControlTask`. `dims` (linked into the task's `data_dims` by the CLI) holds
    the observation and action sizes under the names builders take: `in_features`/`num_classes` (mlp_policy),
    `n_links`/`joint_offset` (ncap). The "batches" are only a clock: one per rollout (PPO) or generation (ES)."""

    def __init__(self, env_id: str = "biozoo/Swimmer-v0", env_kwargs: dict[str, Any] | None = None,
                 num_envs: int = 8, vectorization_mode: str = "sync", time_feature: bool = True, seed: int = 0,
                 rollouts_per_epoch: int = 10):
        super().__init__(batch_size=1, seed=seed)
        self.env_id, self.env_kwargs = env_id, dict(env_kwargs or {})
        self.num_envs, self.vectorization_mode = num_envs, vectorization_mode
        self.time_feature, self.rollouts_per_epoch = time_feature, rollouts_per_epoch
        self._dims: dict[str, Any] | None = None

    @property
    def dims(self) -> dict[str, Any]:
        if self._dims is None:
            env = make_env(self.env_id, self.time_feature, **self.env_kwargs)
            obs_dim, action_dim = int(np.prod(env.observation_space.shape)), int(np.prod(env.action_space.shape))
            n_links = self.env_kwargs.get("n_links", getattr(env.unwrapped, "n_links", action_dim + 1))
            env.close()
            self._dims = {"obs_dim": obs_dim, "action_dim": action_dim, "in_features": obs_dim,
                          "num_classes": action_dim, "n_links": n_links,
                          "joint_offset": JOINT_OFFSET.get(self.env_id, 0)}
        return self._dims

    def make_vec(self, num_envs: int | None = None) -> gym.vector.VectorEnv:
        return make_vec_env(self.env_id, num_envs or self.num_envs, self.time_feature, self.vectorization_mode,
                            **self.env_kwargs)

    def build_datasets(self):
        clock = lambda n: TensorDataset(torch.arange(n))  # noqa: E731
        return clock(self.rollouts_per_epoch), clock(1), clock(1)


# Algorithms ------------------------------------------------------------------------------------------------------

@dataclass
class PPOConfig:
    steps_per_env: int = 512  # rollout length per env; a rollout holds steps_per_env * num_envs transitions
    epochs: int = 10
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    target_kl: float | None = 0.015  # stop the actor's epochs when the approximate KL passes this
    critic_lr: float = 1e-3
    critic_hidden: list[int] = (64, 64)
    max_grad_norm: float = 0.5
    entropy_coef: float = 0.0
    normalize_advantages: bool = True
    scale_rewards: bool = False


@dataclass
class ESConfig:
    population: int = 8  # even: antithetic pairs; one vector env per member
    sigma: float = 0.02
    weight_decay: float = 0.005


def make_config(cls, values: dict[str, Any] | None):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise BiozooError(f"unknown {cls.__name__} option(s) {unknown}; known: {', '.join(sorted(known))}")
    return cls(**(values or {}))


def gae(rewards: torch.Tensor, values: torch.Tensor, next_values: torch.Tensor, terminated: torch.Tensor,
        done: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) over (T, N) tensors. next_values[t] is V of the observation after step t (the final
    observation when the episode ended there); `terminated` cuts the bootstrap, `done` (terminated or
    truncated) cuts the advantage recursion. Returns (advantages, value targets)."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_values[t] * (1 - terminated[t]) - values[t]
        last = delta + gamma * lam * (1 - done[t]) * last
        advantages[t] = last
    return advantages, advantages + values


def centered_ranks(x: torch.Tensor) -> torch.Tensor:
    """Fitness shaping: ranks scaled to [-0.5, 0.5] (ties broken by order)."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    return ranks / (len(x) - 1) - 0.5


def running_norms(*modules: nn.Module) -> list[RunningNorm]:
    return [m for module in modules for m in module.modules() if isinstance(m, RunningNorm)]


class ControlTask(BiozooTask):
    """Trains a registered policy on an `EnvDataModule` with PPO or ES (module docstring).

    Args:
        model / model_kwargs / pretrained / checkpoint_path: the policy, as in SupervisedTask.
        data_dims: filled in by the CLI from the EnvDataModule (obs/action sizes, n_links).
        algorithm: "ppo" or "es"; `ppo` / `es` hold that algorithm's options (PPOConfig / ESConfig fields).
        total_env_steps: training stops after this many environment steps.
        action_std / learn_std: the Gaussian exploration noise of PPO (fixed 0.1 for NCAP, as in its code).
        action_std_final: anneal a fixed std geometrically from action_std to this over total_env_steps.
        lr: the actor's (PPO) or the weights' (ES) Adam learning rate; the critic has `ppo.critic_lr`.
        weight_decay: PPO's decoupled (AdamW) decay of the policy weights; ES uses `es.weight_decay` (L2).
        scheduler / warmup_steps / min_lr_ratio: the actor's learning-rate schedule over the rollouts.
        eval_episodes: deterministic episodes behind val/return and test/return.
        transfer_links: body lengths the test stage also evaluates the policy on (shared-weight NCAP).
        report: at the end of fit, write rollout.png (and rollout.mp4 where OpenGL works) to the log folder.
    """

    def __init__(self, model: str = "ncap", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, algorithm: str = "ppo", total_env_steps: int = 200_000,
                 action_std: float = 0.1, learn_std: bool = False, ppo: dict[str, Any] | None = None,
                 es: dict[str, Any] | None = None, eval_episodes: int = 5, transfer_links: list[int] | None = None,
                 report: bool = True, video: bool = True, pretrained: bool | str = False,
                 checkpoint_path: str | None = None, lr: float = 3e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 0, scheduler: str = "constant", min_lr_ratio: float = 0.0,
                 action_std_final: float | None = None):
        super().__init__(lr, weight_decay, warmup_steps, scheduler, min_lr_ratio)
        if algorithm not in ("ppo", "es"):
            raise BiozooError(f"algorithm must be 'ppo' or 'es', got {algorithm!r}")
        if action_std_final is not None and (learn_std or action_std_final <= 0):
            raise BiozooError(f"action_std_final anneals a fixed std: needs learn_std=False and a value > 0, "
                              f"got {action_std_final!r} with learn_std={learn_std}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = build_model(model, model_kwargs, data_dims, pretrained, checkpoint_path)
        self.ppo_cfg, self.es_cfg = make_config(PPOConfig, ppo), make_config(ESConfig, es)
        dims = data_dims or {}
        action_dim = dims.get("action_dim") or getattr(self.model, "n_joints", None)
        if action_dim is None:
            raise BiozooError("ControlTask needs data_dims with action_dim (use an EnvDataModule)")
        self.noise = GaussianHead(action_dim, action_std, learn_std)
        if algorithm == "ppo":
            obs_dim = dims.get("obs_dim") or dims.get("in_features")
            self.critic = nn.Sequential(RunningNorm(obs_dim), MLP(obs_dim, 1, list(self.ppo_cfg.critic_hidden), "tanh"))
            self.return_norm = RunningNorm(1)  # scale of the discounted return, for scale_rewards
        self.env_steps = 0
        self.history: list[tuple[int, float]] = []  # (env steps, val/return) after each validation
        self.envs: gym.vector.VectorEnv | None = None

    # setup ------------------------------------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if hp.algorithm == "es":  # L2 added to the ES gradient, as estorch does
            return torch.optim.Adam(weights, lr=hp.lr, weight_decay=self.es_cfg.weight_decay)
        # decoupled weight decay on the policy (not on log std): it pulls weights out of saturated, zero-gradient
        # ranges -- for NCAP, an oscillator weight above 1 -- back to where the gradient can act on them
        groups = [{"params": weights, "weight_decay": hp.weight_decay},
                  {"params": [p for p in self.noise.parameters() if p.requires_grad], "weight_decay": 0.0}]
        actor_opt = torch.optim.AdamW(groups, lr=hp.lr, eps=1e-5)
        critic_opt = torch.optim.Adam(self.critic.parameters(), lr=self.ppo_cfg.critic_lr, eps=1e-5)
        if hp.scheduler == "constant" and not hp.warmup_steps:
            return [actor_opt, critic_opt]
        total = math.ceil(hp.total_env_steps / (self.ppo_cfg.steps_per_env * self.datamodule.num_envs))
        floor = 1.0 if hp.scheduler == "constant" else hp.min_lr_ratio  # constant after the warmup
        return [actor_opt, critic_opt], [cosine_with_warmup(actor_opt, hp.warmup_steps, total, floor)]

    @property
    def datamodule(self) -> EnvDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, EnvDataModule):
            raise BiozooError("ControlTask trains on an EnvDataModule (data.class_path: biozoo.train.EnvDataModule)")
        return dm

    def on_fit_start(self) -> None:
        dm = self.datamodule
        num_envs = self.es_cfg.population if self.hparams.algorithm == "es" else dm.num_envs
        if self.hparams.algorithm == "es" and self.es_cfg.population % 2:
            raise BiozooError(f"es.population must be even (antithetic pairs), got {self.es_cfg.population}")
        self.envs = dm.make_vec(num_envs)
        obs, _ = self.envs.reset(seed=dm.seed)
        self._obs = to_tensor(obs, self.device)
        self._done = torch.zeros(num_envs, dtype=torch.bool)
        self._discounted = torch.zeros(num_envs)

    def on_fit_end(self) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None
        if self.hparams.report and self.trainer.is_global_zero:
            self.write_report(Path(self.trainer.log_dir or self.trainer.default_root_dir))

    # training ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.algorithm == "ppo":
            stats = self.ppo_iteration()
        else:
            stats = self.es_generation()
        if hasattr(self.model, "effective_weights"):  # NCAP: the 4 (or 6J) weights are the whole policy
            stats.update({f"w_{k}": v.mean() for k, v in self.model.effective_weights().items()})
        self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, on_step=True, on_epoch=False)
        self.log("env_steps", float(self.env_steps), on_step=True, on_epoch=False, prog_bar=True)
        if self.env_steps >= self.hparams.total_env_steps:
            self.trainer.should_stop = True

    def _step_envs(self, action: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray, list]:
        space = self.envs.single_action_space
        obs, reward, terminated, truncated, info = self.envs.step(np.clip(action.cpu().numpy(), space.low, space.high))
        self.env_steps += self.envs.num_envs
        return to_tensor(obs, self.device), reward, terminated, truncated, finished_episodes(info)

    @torch.no_grad()
    @one_thread()
    def collect(self) -> dict[str, torch.Tensor]:
        """One PPO rollout of steps_per_env steps from every env."""
        T = self.ppo_cfg.steps_per_env
        buf = {k: [] for k in ("obs", "actions", "logp", "values", "rewards", "terminated", "done", "valid")}
        episode_returns = []
        for _ in range(T):
            obs = self._obs
            dist = self.noise(self.model(obs))
            action = dist.sample()
            buf["obs"].append(obs)
            buf["actions"].append(action)
            buf["logp"].append(dist.log_prob(action).sum(-1))
            buf["values"].append(self.critic(obs).squeeze(-1))
            buf["valid"].append((~self._done).to(self.device))  # False on the autoreset step after an episode ended
            self._obs, reward, terminated, truncated, episodes = self._step_envs(action)
            episode_returns += [r for _, r in episodes]
            self._done = torch.as_tensor(terminated | truncated)
            buf["rewards"].append(to_tensor(reward, self.device))
            buf["terminated"].append(to_tensor(terminated, self.device))
            buf["done"].append(self._done.float().to(self.device))
        out = {k: torch.stack(v) for k, v in buf.items()}
        out["last_value"] = self.critic(self._obs).squeeze(-1)
        out["episode_returns"] = torch.tensor(episode_returns)
        return out

    def scale_rewards(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Divide rewards by the running std of the discounted return (reset at episode ends)."""
        gamma = self.ppo_cfg.gamma
        discounted = []
        g = self._discounted.to(rewards.device)
        for t in range(rewards.shape[0]):
            g = g * gamma * valid[t].float() + rewards[t]
            discounted.append(g)
        self._discounted = g.cpu()
        self.return_norm.update(torch.stack(discounted)[valid].reshape(-1, 1))
        return rewards / torch.sqrt(self.return_norm.var + 1e-8)

    def ppo_iteration(self) -> dict[str, float]:
        cfg, hp = self.ppo_cfg, self.hparams
        if hp.action_std_final is not None:
            frac = min(1.0, self.env_steps / hp.total_env_steps)
            log_std = (1 - frac) * math.log(hp.action_std) + frac * math.log(hp.action_std_final)
            self.noise.log_std.data.fill_(log_std)
        self.model.train()
        data = self.collect()
        valid = data["valid"]
        rewards = data["rewards"]
        if cfg.scale_rewards:
            rewards = self.scale_rewards(rewards, valid)
        next_values = torch.cat([data["values"][1:], data["last_value"][None]])
        advantages, targets = gae(rewards, data["values"], next_values, data["terminated"], data["done"],
                                  cfg.gamma, cfg.gae_lambda)
        obs, actions, old_logp = data["obs"][valid], data["actions"][valid], data["logp"][valid]
        advantages, targets = advantages[valid], targets[valid]
        actor_opt, critic_opt = self.optimizers()
        n = len(obs)
        size = max(1, n // cfg.minibatches)
        actor_done, kls, clipfracs, pg_losses, v_losses = False, [], [], [], []
        for _ in range(cfg.epochs):
            order = torch.randperm(n, device=obs.device)
            epoch_kls = []
            for start in range(0, n - size + 1, size):
                mb = order[start:start + size]
                if not actor_done:
                    dist = self.noise(self.model(obs[mb]))
                    logp = dist.log_prob(actions[mb]).sum(-1)
                    log_ratio = logp - old_logp[mb]
                    ratio = log_ratio.exp()
                    adv = advantages[mb]
                    if cfg.normalize_advantages and len(mb) > 1:
                        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                    pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                    loss = pg_loss - cfg.entropy_coef * dist.entropy().sum(-1).mean()
                    actor_opt.zero_grad()
                    self.manual_backward(loss)
                    nn.utils.clip_grad_norm_([p for g in actor_opt.param_groups for p in g["params"]], cfg.max_grad_norm)
                    actor_opt.step()
                    with torch.no_grad():
                        epoch_kls.append(float(((ratio - 1) - log_ratio).mean()))
                        clipfracs.append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
                        pg_losses.append(float(pg_loss))
                v_loss = 0.5 * (self.critic(obs[mb]).squeeze(-1) - targets[mb]).square().mean()
                critic_opt.zero_grad()
                self.manual_backward(v_loss)
                nn.utils.clip_grad_norm_(self.critic.parameters(), cfg.max_grad_norm)
                critic_opt.step()
                v_losses.append(float(v_loss.detach()))
            kls += epoch_kls
            if cfg.target_kl is not None and epoch_kls and np.mean(epoch_kls) > cfg.target_kl:
                actor_done = True  # the critic keeps fitting, as in Tonic
        for norm in running_norms(self.model, self.critic):  # after the update: the rollout's log-probs stay valid
            norm.update(data["obs"][valid])
        sched = self.lr_schedulers()
        if sched is not None:
            sched.step()
        stats = {"policy_loss": np.mean(pg_losses) if pg_losses else 0.0, "value_loss": np.mean(v_losses),
                 "approx_kl": np.mean(kls) if kls else 0.0, "clipfrac": np.mean(clipfracs) if clipfracs else 0.0,
                 "action_std": float(self.noise.log_std.detach().exp().mean())}
        if len(data["episode_returns"]):
            stats["return"] = float(data["episode_returns"].mean())
        return stats

    @one_thread()
    def es_generation(self) -> dict[str, float]:
        """One ES generation: antithetic members, one episode each, rank-shaped gradient, one Adam step."""
        cfg, envs = self.es_cfg, self.envs
        params = {k: p for k, p in self.model.named_parameters() if p.requires_grad}
        theta = nn.utils.parameters_to_vector(params.values()).detach()
        half = cfg.population // 2
        eps = torch.randn(half, theta.numel(), device=theta.device)
        eps = torch.cat([eps, -eps])
        members = theta + cfg.sigma * eps
        stacked, offset = {}, 0
        for name, p in params.items():
            stacked[name] = members[:, offset:offset + p.numel()].reshape(len(members), *p.shape)
            offset += p.numel()

        def act(weights: dict[str, torch.Tensor], obs: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(self.model, weights, (obs[None],))[0]

        seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (half,))] * 2  # pairs share a start state
        obs, _ = envs.reset(seed=seeds)
        obs = to_tensor(obs, self.device)
        fitness: dict[int, float] = {}
        seen = []
        self.model.eval()
        with torch.no_grad():
            while len(fitness) < len(members):
                seen.append(obs)
                obs, _, _, _, episodes = self._step_envs(torch.func.vmap(act)(stacked, obs))
                for i, ret in episodes:
                    fitness.setdefault(i, ret)
        returns = torch.tensor([fitness[i] for i in range(len(members))], device=theta.device)
        grad = centered_ranks(returns) @ eps / (len(members) * cfg.sigma)
        opt = self.optimizers()
        opt.zero_grad()
        offset = 0
        for p in params.values():  # Adam minimises: hand it the negative of the ascent direction
            p.grad = -grad[offset:offset + p.numel()].reshape(p.shape).clone()
            offset += p.numel()
        opt.step()
        for norm in running_norms(self.model):
            norm.update(torch.cat(seen))
        return {"return": float(returns.mean()), "return_max": float(returns.max()), "grad_norm": float(grad.norm())}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["control"] = {"env_steps": self.env_steps, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("control", {})
        self.env_steps = state.get("env_steps", 0)
        self.history = [tuple(h) for h in state.get("history", [])]

    # evaluation --------------------------------------------------------------------------------------------------
    def _evaluate(self, policy: nn.Module, **override: Any) -> list[float]:
        dm = self.datamodule
        return evaluate(policy, dm.env_id, self.hparams.eval_episodes, seed=dm.seed + 10_000,
                        time_feature=dm.time_feature, **{**dm.env_kwargs, **override})

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        returns = self._evaluate(self.model)
        self.log("val/return", float(np.mean(returns)), prog_bar=True, batch_size=1)
        self.log("val/return_std", float(np.std(returns)), batch_size=1)
        if not self.trainer.sanity_checking:
            self.history.append((self.env_steps, float(np.mean(returns))))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        returns = self._evaluate(self.model)
        self.log("test/return", float(np.mean(returns)), batch_size=1)
        self.log("test/return_std", float(np.std(returns)), batch_size=1)
        for n in self.hparams.transfer_links or []:
            returns = self._evaluate(transfer_to(self.model, n), n_links=n)
            self.log(f"test/return_n{n}", float(np.mean(returns)), batch_size=1)

    def write_report(self, folder: Path) -> dict[str, Any]:
        """rollout.png (joint angles, head path) and, where OpenGL works, a video of one deterministic episode."""
        dm = self.datamodule
        folder.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        try:
            traj = rollout(self.model, dm.env_id, seed=dm.seed + 10_000, render=self.hparams.video,
                           time_feature=dm.time_feature, **dm.env_kwargs)
        except BiozooError as e:  # no OpenGL: plots only
            print(f"biozoo: no video ({e})")
            traj = rollout(self.model, dm.env_id, seed=dm.seed + 10_000, time_feature=dm.time_feature, **dm.env_kwargs)
        out["plot"] = str(plot_rollout(traj, folder / "rollout.png", title=f"{self.hparams.model} on {dm.env_id}"))
        if traj["frames"]:
            out["video"] = str(write_video(traj["frames"], folder / "rollout.mp4", fps=round(1 / traj["dt"])))
        out["return"] = traj["return"]
        (folder / "rollout.json").write_text(json.dumps(out, indent=2) + "\n")
        print("\n".join(f"  {k}: {v}" for k, v in out.items()))
        return out


def fit_policy(model: str = "ncap", env_id: str = "biozoo/Swimmer-v0", seed: int = 0,
               env_kwargs: dict[str, Any] | None = None, num_envs: int = 8, rollouts_per_epoch: int = 5,
               vectorization_mode: str = "sync", root_dir: str | None = None, initial_eval: bool = True,
               callbacks: list | None = None, **task_kwargs: Any) -> ControlTask:
    """Train in-process without logger or checkpoints (benchmarks, notebooks); the returned task holds
    `history`, the (env steps, val/return) pairs, starting with the untrained policy's return when
    `initial_eval`. The CLI (`biozoo fit`) is the route for shipped runs."""
    import lightning as L

    L.seed_everything(seed, verbose=False)
    data = EnvDataModule(env_id, env_kwargs, num_envs, vectorization_mode, seed=seed,
                         rollouts_per_epoch=rollouts_per_epoch)
    task = ControlTask(model, data_dims=data.dims, report=False, **task_kwargs)
    trainer = L.Trainer(max_epochs=10**6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root_dir, callbacks=callbacks)
    if initial_eval:
        trainer.validate(task, datamodule=data, verbose=False)
    trainer.fit(task, datamodule=data)
    return task
