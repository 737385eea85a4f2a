"""PPO (Schulman et al. 2017, arXiv 1707.06347), one implementation for every policy in the zoo: recurrent or not,
discrete or continuous. It reads like CleanRL's ppo.py / ppo_continuous_action.py / ppo_atari_lstm.py.

One iteration (`PPO.iterate`):
1. rollout: `steps_per_env` steps from every env of a gymnasium vector env. Gymnasium 1.x autoresets on the step
   after an episode ends: that step's transition is masked out (`valid`), and the observation it returns starts a
   new episode (`first`, where a recurrent policy's state goes back to its initial state). The rollout remembers
   the state at its start.
2. GAE(lambda): `terminated` cuts the bootstrap; a truncated episode bootstraps from its final observation, whose
   value the autoreset step computed; `done` (terminated or truncated) cuts the advantage recursion.
3. `epochs` passes of the clipped surrogate + `vf_coef` x value loss - `ent_coef` x entropy, in `minibatches`
   per epoch: shuffled transitions for a stateless policy, groups of whole env sequences replayed from the
   rollout's start state for a recurrent one (as ppo_atari_lstm). Gradient norms are clipped per parameter group
   (the policy's, the critic's); the epochs stop early once the mean approximate KL passes `target_kl`.

Differences from the two loops it replaces: the CTM's official trainer (tasks/rl/train.py) treats a truncated
episode as terminal and resets in the same step; here truncation bootstraps and the reset comes a step later
(gymnasium's default). The old swimmer loop kept fitting the critic after the KL stop; here both stop (CleanRL).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from biozoo._core import BiozooError, map_state, suggest
from biozoo.models.baselines import RunningNorm

from .policy import Policy, finished_episodes, one_thread, to_env, to_tensor


@dataclass
class PPOConfig:
    steps_per_env: int = 512  # rollout length per env; a rollout holds steps_per_env * num_envs transitions
    epochs: int = 10
    minibatches: int = 4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    target_kl: float | None = 0.015  # stop the epochs once the mean approximate KL passes this
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    critic_lr: float = 1e-3  # the separate critic's Adam learning rate (models without their own value)
    critic_hidden: list[int] = (64, 64)
    max_grad_norm: float = 0.5
    normalize_advantages: bool = True
    normalize_reward: bool = False  # gymnasium's NormalizeReward: rewards / running std of the discounted return


def make_config(cls: type, values: dict[str, Any] | None) -> Any:
    """A config dataclass from a dict, refusing unknown options in one line."""
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values or {}) - set(known))
    if unknown:
        raise BiozooError(f"unknown {cls.__name__} option {unknown[0]!r}.{suggest(unknown[0], known)} "
                          f"Known: {', '.join(known)}")
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


class PPO:
    """The rollout and update of PPO for one `Policy` on one vector env (module docstring). The env's state
    between iterations (last observation, recurrent state, episode flags) lives here."""

    def __init__(self, policy: Policy, envs: gym.vector.VectorEnv, cfg: PPOConfig, seed: int = 0):
        self.policy, self.envs, self.cfg = policy, envs, cfg
        self.device = next(policy.parameters()).device
        obs, _ = envs.reset(seed=seed)
        n = envs.num_envs
        self.obs = to_tensor(obs, self.device)
        self.first = torch.ones(n, dtype=torch.bool, device=self.device)  # the state resets before acting
        self.autoreset = torch.zeros(n, dtype=torch.bool, device=self.device)  # the next step only resets the env
        self.state = policy.initial_state(n, self.device)
        self.env_steps = 0

    @torch.no_grad()
    @one_thread()
    def collect(self) -> dict[str, Any]:
        """One rollout: (T, N) tensors, the start state, and the returns of the episodes that ended in it."""
        policy, T = self.policy, self.cfg.steps_per_env
        buf = {k: [] for k in ("obs", "first", "valid", "actions", "logp", "values", "rewards", "terminated", "done")}
        start_state, returns = self.state, []
        for _ in range(T):
            out = policy(self.obs, self.state, self.first)
            dist = policy.distribution(out.logits)
            action = dist.sample()
            for key, value in (("obs", self.obs), ("first", self.first), ("valid", ~self.autoreset),
                               ("actions", action), ("logp", dist.log_prob(action)), ("values", out.value)):
                buf[key].append(value)
            obs, reward, terminated, truncated, info = self.envs.step(to_env(action, self.envs.single_action_space))
            self.env_steps += self.envs.num_envs
            returns += [r for _, r in finished_episodes(info)]
            done = torch.as_tensor(terminated | truncated, device=self.device)
            buf["rewards"].append(to_tensor(reward, self.device))
            buf["terminated"].append(to_tensor(terminated, self.device))
            buf["done"].append(done.float())
            self.first, self.autoreset = self.autoreset, done  # after an autoreset step, a new episode begins
            self.obs, self.state = to_tensor(obs, self.device), out.state
        data = {k: torch.stack(v) for k, v in buf.items()}
        data["last_value"] = policy(self.obs, self.state, self.first).value
        data.update(start_state=start_state, episode_returns=returns)
        return data

    def evaluate_actions(self, data: dict[str, Any], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(log-prob, entropy, value, mask) of the rollout's actions at `idx`: transition indices into the valid
        flattened rollout (stateless), or env indices whose whole sequences replay from the start state."""
        policy = self.policy
        if not policy.recurrent:
            out = policy(data["flat_obs"][idx])
            dist = policy.distribution(out.logits)
            return dist.log_prob(data["flat_actions"][idx]), dist.entropy(), out.value, None
        state = map_state(lambda s: s[idx].detach(), data["start_state"])
        logps, entropies, values = [], [], []
        for t in range(data["obs"].shape[0]):
            out = policy(data["obs"][t, idx], state, data["first"][t, idx])
            dist = policy.distribution(out.logits)
            logps.append(dist.log_prob(data["actions"][t, idx]))
            entropies.append(dist.entropy())
            values.append(out.value)
            state = out.state
        return torch.stack(logps), torch.stack(entropies), torch.stack(values), data["valid"][:, idx]

    def update(self, data: dict[str, Any], optimizer: torch.optim.Optimizer,
               step: Any = None) -> dict[str, float]:
        """`epochs` passes of minibatch updates on one rollout; `step(loss)` backpropagates (Lightning's
        manual_backward), plain `loss.backward()` by default."""
        cfg, policy = self.cfg, self.policy
        backward = step or (lambda loss: loss.backward())
        next_values = torch.cat([data["values"][1:], data["last_value"][None]])
        advantages, targets = gae(data["rewards"], data["values"], next_values, data["terminated"], data["done"],
                                  cfg.gamma, cfg.gae_lambda)
        valid = data["valid"]
        if policy.recurrent:  # minibatches of whole env sequences
            n, keyed = valid.shape[1], lambda x, idx: x[:, idx]  # noqa: E731
        else:  # minibatches of valid transitions
            data["flat_obs"], data["flat_actions"] = data["obs"][valid], data["actions"][valid]
            data["logp"], advantages, targets = data["logp"][valid], advantages[valid], targets[valid]
            n, keyed = len(targets), lambda x, idx: x[idx]  # noqa: E731
        size = max(1, n // cfg.minibatches)
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "entropy", "approx_kl", "clipfrac")}
        for _ in range(cfg.epochs):
            order = torch.randperm(n, device=self.device)
            epoch_kls = []
            for start in range(0, n - size + 1, size):
                idx = order[start:start + size]
                logp, entropy, value, mask = self.evaluate_actions(data, idx)
                mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
                log_ratio = (logp - keyed(data["logp"], idx))[mask]
                ratio = log_ratio.exp()
                adv = keyed(advantages, idx)[mask]
                if cfg.normalize_advantages and adv.numel() > 1:
                    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
                pg_loss = torch.max(-adv * ratio, -adv * ratio.clamp(1 - cfg.clip, 1 + cfg.clip)).mean()
                v_loss = 0.5 * (value[mask] - keyed(targets, idx)[mask]).square().mean()
                loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * entropy[mask].mean()
                optimizer.zero_grad()
                backward(loss)
                for group in optimizer.param_groups:
                    nn.utils.clip_grad_norm_(group["params"], cfg.max_grad_norm)
                optimizer.step()
                with torch.no_grad():
                    epoch_kls.append(float(((ratio - 1) - log_ratio).mean()))
                    stats["clipfrac"].append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
                stats["policy_loss"].append(float(pg_loss.detach()))
                stats["value_loss"].append(float(v_loss.detach()))
                stats["entropy"].append(float(entropy[mask].mean().detach()))
            stats["approx_kl"] += epoch_kls
            if cfg.target_kl is not None and epoch_kls and np.mean(epoch_kls) > cfg.target_kl:
                break
        obs = data["obs"][valid]
        for norm in running_norms(policy):  # after the update: the rollout's log-probs stay valid
            norm.update(obs)
        out = {k: float(np.mean(v)) for k, v in stats.items() if v}
        if data["episode_returns"]:
            out["return"] = float(np.mean(data["episode_returns"]))
        return out


def running_norms(*modules: nn.Module) -> list[RunningNorm]:
    """Every observation normaliser inside (a policy's own, the critic's): updated from each rollout."""
    return [m for module in modules for m in module.modules() if isinstance(m, RunningNorm)]
