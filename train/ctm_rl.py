"""The CTM as a recurrent policy on partially observed classic control (arXiv 2505.05522, section 8; official
`tasks/rl/train.py`, CleanRL's recurrent PPO).

Environments (`biozoo.envs.classic`, registered by `import biozoo`): `biozoo/CartPoleMasked-v1` and
`biozoo/AcrobotMasked-v1`, CartPole-v1 and Acrobot-v1 with the velocities zeroed in the observation (official
`MaskVelocityWrapper`), episodes capped at 200 and 500 steps as in the official scripts. The policy has to infer
the velocities from its own history: the `ctm_rl_agent` carries its state (pre-activation trace and post-activation
window) across environment steps and resets it to the learned start when an episode begins.

`RecurrentPPOTask` extends the shared control harness (`biozoo.train.control`: its `EnvDataModule`, `gae` and
episode bookkeeping) with what a recurrent, discrete policy needs, following the official trainer:
- rollouts of `steps_per_env` steps from every env, remembering the state at the rollout's start;
- GAE(lambda) with `done` = terminated or truncated treated as terminal (no bootstrap, as the official code);
- the update replays each env's sequence from that start state (minibatches are groups of envs), with the
  clipped surrogate (clip 0.1), value loss x `vf_coef` (0.25), entropy bonus x `ent_coef` (0.1), grad-norm 0.5,
  one Adam with a linearly annealed learning rate;
- rewards normalised by gymnasium's `NormalizeReward` (episode returns are logged before it).
`val/return` / `test/return`: the mean return of `eval_episodes` greedy (argmax) episodes; `env_steps` is logged
with them, and the wall time in `train/wall_s`.
"""

from __future__ import annotations

import time
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.wrappers.vector import NormalizeReward, RecordEpisodeStatistics
from torch import nn

from biozoo.envs.classic import VELOCITY_MASKS, MaskVelocity, make_masked  # noqa: F401  (the envs live there)
from biozoo.models.errors import BiozooError

from .control import ControlTask, EnvDataModule, finished_episodes, gae, to_tensor
from .tasks import BiozooTask, build_model


def make_discrete_vec(env_id: str, num_envs: int, normalize_reward: bool = False, gamma: float = 0.99,
                      **env_kwargs: Any) -> gym.vector.VectorEnv:
    """Sync vector envs that reset in the same step an episode ends (the old gym semantics of the official
    trainer), with episode statistics of the raw rewards and optional reward normalisation after them."""
    envs = gym.make_vec(env_id, num_envs=num_envs, vectorization_mode="sync",
                        vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}, **env_kwargs)
    envs = RecordEpisodeStatistics(envs)
    return NormalizeReward(envs, gamma=gamma) if normalize_reward else envs


@torch.no_grad()
def evaluate_recurrent(agent: nn.Module, env_id: str, episodes: int = 20, seed: int = 0,
                       **env_kwargs: Any) -> list[float]:
    """Returns of `episodes` greedy episodes (all side by side, episode i reset with seed `seed + i`)."""
    was_training = agent.training
    agent.eval()
    envs = make_discrete_vec(env_id, episodes, **env_kwargs)
    try:
        obs, _ = envs.reset(seed=[seed + i for i in range(episodes)])
        state = agent.initial_state(episodes)
        done: dict[int, float] = {}
        while len(done) < episodes:
            logits, _, state = agent(to_tensor(obs), state)
            obs, _, _, _, info = envs.step(logits.argmax(-1).numpy())
            for i, ret in finished_episodes(info):
                done.setdefault(i, ret)
    finally:
        envs.close()
    agent.train(was_training)
    return [done[i] for i in range(episodes)]


class DiscreteEnvDataModule(EnvDataModule):
    """An `EnvDataModule` for discrete actions: `dims` holds `obs_dim` and `num_actions`. No time feature."""

    def __init__(self, env_id: str = "biozoo/CartPoleMasked-v1", env_kwargs: dict[str, Any] | None = None,
                 num_envs: int = 16, seed: int = 0, rollouts_per_epoch: int = 10):
        super().__init__(env_id, env_kwargs, num_envs, "sync", time_feature=False, seed=seed,
                         rollouts_per_epoch=rollouts_per_epoch)

    @property
    def dims(self) -> dict[str, Any]:
        if self._dims is None:
            env = gym.make(self.env_id, **self.env_kwargs)
            if not isinstance(env.action_space, gym.spaces.Discrete):
                raise BiozooError(f"{self.env_id} has {env.action_space}; DiscreteEnvDataModule needs discrete actions")
            self._dims = {"obs_dim": int(np.prod(env.observation_space.shape)), "num_actions": int(env.action_space.n)}
            env.close()
        return self._dims


class RecurrentPPOTask(BiozooTask):
    """Recurrent PPO for a discrete-action agent with state (`ctm_rl_agent`); see the module docstring."""

    def __init__(self, model: str = "ctm_rl_agent", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, total_env_steps: int = 200_000, steps_per_env: int = 100,
                 epochs: int = 1, minibatches: int = 4, gamma: float = 0.99, gae_lambda: float = 0.95,
                 clip: float = 0.1, ent_coef: float = 0.1, vf_coef: float = 0.25, max_grad_norm: float = 0.5,
                 normalize_reward: bool = True, anneal_lr: bool = True, eval_episodes: int = 20,
                 pretrained: bool | str = False, checkpoint_path: str | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.0):
        super().__init__(lr, weight_decay, 0, "constant", 0.0)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = build_model(model, model_kwargs, data_dims, pretrained, checkpoint_path)
        self.env_steps, self.updates = 0, 0
        self.envs: gym.vector.VectorEnv | None = None
        self.started = time.perf_counter()

    def configure_optimizers(self):
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams.lr, eps=1e-5,
                                weight_decay=self.hparams.weight_decay)

    datamodule = ControlTask.datamodule  # the trainer's EnvDataModule, or a clear error

    def on_fit_start(self) -> None:
        dm = self.datamodule
        self.envs = make_discrete_vec(dm.env_id, dm.num_envs, self.hparams.normalize_reward, self.hparams.gamma,
                                      **dm.env_kwargs)
        obs, _ = self.envs.reset(seed=dm.seed)
        self._obs = to_tensor(obs, self.device)
        self._first = torch.ones(dm.num_envs, dtype=torch.bool, device=self.device)
        self._state = self.model.initial_state(dm.num_envs)
        self.started = time.perf_counter()

    def on_fit_end(self) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None

    @torch.no_grad()
    def collect(self) -> dict[str, Any]:
        T = self.hparams.steps_per_env
        start_state = tuple(s.clone() for s in self._state)
        buf = {k: [] for k in ("obs", "first", "actions", "logp", "values", "rewards", "done")}
        returns = []
        state = self._state
        for _ in range(T):
            logits, value, state = self.model(self._obs, state, self._first)
            dist = torch.distributions.Categorical(logits=logits)
            action = dist.sample()
            buf["obs"].append(self._obs)
            buf["first"].append(self._first)
            buf["actions"].append(action)
            buf["logp"].append(dist.log_prob(action))
            buf["values"].append(value)
            obs, reward, terminated, truncated, info = self.envs.step(action.cpu().numpy())
            self.env_steps += self.envs.num_envs
            returns += [r for _, r in finished_episodes(info)]
            done = torch.as_tensor(terminated | truncated, device=self.device)
            buf["rewards"].append(to_tensor(reward, self.device))
            buf["done"].append(done.float())
            self._obs, self._first = to_tensor(obs, self.device), done  # the env already reset: a new episode
        self._state = state
        out = {k: torch.stack(v) for k, v in buf.items()}
        _, last_value, _ = self.model(self._obs, state, self._first)
        out.update(start_state=start_state, last_value=last_value, episode_returns=returns)
        return out

    def training_step(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        opt = self.optimizers()
        total_updates = max(1, hp.total_env_steps // (hp.steps_per_env * self.datamodule.num_envs))
        if hp.anneal_lr:
            for group in opt.param_groups:
                group["lr"] = hp.lr * max(0.0, 1.0 - self.updates / total_updates)
        self.model.train()
        data = self.collect()
        next_values = torch.cat([data["values"][1:], data["last_value"][None]])
        advantages, targets = gae(data["rewards"], data["values"], next_values, data["done"], data["done"],
                                  hp.gamma, hp.gae_lambda)
        n_envs = data["obs"].shape[1]
        per_mb = max(1, n_envs // hp.minibatches)
        stats = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": []}
        for _ in range(hp.epochs):
            order = torch.randperm(n_envs, device=self.device)
            for start in range(0, n_envs, per_mb):
                envs = order[start:start + per_mb]
                state = tuple(s[envs] for s in data["start_state"])
                logps, entropies, values = [], [], []
                for t in range(data["obs"].shape[0]):  # replay the sequence from the rollout's start state
                    logits, value, state = self.model(data["obs"][t, envs], state, data["first"][t, envs])
                    dist = torch.distributions.Categorical(logits=logits)
                    logps.append(dist.log_prob(data["actions"][t, envs]))
                    entropies.append(dist.entropy())
                    values.append(value)
                logp, entropy, value = torch.stack(logps), torch.stack(entropies), torch.stack(values)
                log_ratio = logp - data["logp"][:, envs]
                ratio = log_ratio.exp()
                adv = advantages[:, envs]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - hp.clip, 1 + hp.clip)).mean()
                v_loss = 0.5 * (value - targets[:, envs]).square().mean()
                loss = pg_loss + hp.vf_coef * v_loss - hp.ent_coef * entropy.mean()
                opt.zero_grad()
                self.manual_backward(loss)
                nn.utils.clip_grad_norm_(self.model.parameters(), hp.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))
                stats["policy_loss"].append(pg_loss.item())
                stats["value_loss"].append(v_loss.item())
                stats["entropy"].append(entropy.mean().item())
        self.updates += 1
        logged = {f"train/{k}": float(np.mean(v)) for k, v in stats.items()}
        if data["episode_returns"]:
            logged["train/return"] = float(np.mean(data["episode_returns"]))
        logged["train/wall_s"] = time.perf_counter() - self.started
        self.log_dict(logged, on_step=True, on_epoch=False)
        self.log("env_steps", float(self.env_steps), on_step=True, on_epoch=False, prog_bar=True)
        if self.env_steps >= hp.total_env_steps:
            self.trainer.should_stop = True

    def _evaluate(self) -> list[float]:
        dm = self.datamodule
        return evaluate_recurrent(self.model, dm.env_id, self.hparams.eval_episodes, seed=dm.seed + 10_000,
                                  **dm.env_kwargs)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        returns = self._evaluate()
        self.log("val/return", float(np.mean(returns)), prog_bar=True, batch_size=1)
        self.log("val/return_std", float(np.std(returns)), batch_size=1)
        self.log("val/env_steps", float(self.env_steps), batch_size=1)
        self.log("val/wall_s", time.perf_counter() - self.started, batch_size=1)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        returns = self._evaluate()
        self.log("test/return", float(np.mean(returns)), batch_size=1)
        self.log("test/return_std", float(np.std(returns)), batch_size=1)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["control"] = {"env_steps": self.env_steps, "updates": self.updates}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("control", {})
        self.env_steps, self.updates = state.get("env_steps", 0), state.get("updates", 0)
