"""Any zoo model as a control policy: `as_policy(model, spec)`.

A model whose spec fits an env (input "observation", target discrete or continuous actions) becomes a `Policy`:
- discrete actions: `Categorical(logits)`; continuous: `GaussianHead`, a state-independent Normal(mean, std)
  around the model's `.logits` (fixed or learned std), clipped to the action bounds by the env loop;
- the value: the model's own `ModelOutput.value` where it has one (`has_value`, the CTM agent), otherwise a
  critic MLP (tanh) on normalised observations beside it;
- recurrent state (biozoo._core's protocol: `initial_state`, `forward(x, state=...)`, `.state`): carried across
  calls, and reset to the model's initial state for rows whose episode begins (`first`).

    policy = as_policy(biozoo.create_model("lstm", input_size=4, num_classes=2), env_spec(env))
    out = policy(obs, state, first)                 # ModelOutput: logits, value, state
    action = policy.distribution(out.logits).sample()

`evaluate` runs deterministic episodes (argmax or the mean) of any model or policy on any registered env.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from biozoo._core import DataSpec, ModelOutput, SpecError, as_output, is_recurrent, reset_state
from biozoo.envs.control import env_spec, make_vec_env
from biozoo.models.baselines import MLP, RunningNorm

ACTIONS = ("discrete_actions", "continuous_actions")


class GaussianHead(nn.Module):
    """A state-independent Normal(mean, std) around a deterministic policy's output; `learn_std` makes
    log(std) a trained parameter, otherwise it stays fixed."""

    def __init__(self, action_dim: int, std: float = 0.1, learn_std: bool = False):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(std)), requires_grad=learn_std)

    def forward(self, mean: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))


class Policy(nn.Module):
    """A zoo model with its action distribution, value and recurrent state (module docstring)."""

    def __init__(self, model: nn.Module, spec: DataSpec, action_std: float = 0.1, learn_std: bool = False,
                 critic_hidden: list[int] | tuple[int, ...] = (64, 64), critic: bool = True):
        super().__init__()
        if spec.target not in ACTIONS:
            raise SpecError(f"a policy acts: the task's target is {spec.describe_target()}")
        self.model, self.spec = model, spec
        self.discrete = spec.target == "discrete_actions"
        self.recurrent = is_recurrent(model)
        self.noise = None if self.discrete else GaussianHead(spec.classes, action_std, learn_std)
        self.critic = None
        if critic and not getattr(model, "has_value", False):
            self.critic = nn.Sequential(RunningNorm(spec.in_features),
                                        MLP(spec.in_features, 1, list(critic_hidden), "tanh"))

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> Any:
        return self.model.initial_state(batch_size, device) if self.recurrent else None

    def forward(self, obs: torch.Tensor, state: Any = None, first: torch.Tensor | None = None) -> ModelOutput:
        """The model's logits, the value (B,) and the next state; rows with `first` set start from the initial state."""
        if self.recurrent:
            start = self.initial_state(obs.shape[0], obs.device)
            state = start if state is None else state if first is None else reset_state(state, start, first)
            out = as_output(self.model(obs, state=state))
        else:
            out = as_output(self.model(obs))
        value = self.critic(obs).logits.squeeze(-1) if self.critic is not None else out.value
        return ModelOutput(out.logits, value=value, state=out.state)

    def distribution(self, logits: torch.Tensor) -> torch.distributions.Distribution:
        if self.discrete:
            return torch.distributions.Categorical(logits=logits)
        return torch.distributions.Independent(self.noise(logits), 1)  # log_prob and entropy sum over actions

    def greedy(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1) if self.discrete else logits

    def policy_parameters(self) -> list[nn.Parameter]:
        """The model's and the noise's trainable weights (the critic's are `self.critic.parameters()`)."""
        modules = [self.model] + ([self.noise] if self.noise is not None else [])
        return [p for m in modules for p in m.parameters() if p.requires_grad]


def as_policy(model: nn.Module, spec: DataSpec, **kwargs: Any) -> Policy:
    """`model` as a `Policy` for an env described by `spec`; a Policy passes through unchanged."""
    return model if isinstance(model, Policy) else Policy(model, spec, **kwargs)


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


def to_env(action: torch.Tensor, space: Any) -> np.ndarray:
    """An action batch as the vector env takes it: clipped to a Box's bounds, integers for Discrete."""
    action = action.detach().cpu().numpy()
    return np.clip(action, space.low, space.high) if hasattr(space, "low") else action.astype(np.int64)


def finished_episodes(info: dict[str, Any]) -> list[tuple[int, float]]:
    """(env index, return) of every episode that ended on this step."""
    mask = info.get("_episode")
    if mask is None or not mask.any():
        return []
    return [(int(i), float(info["episode"]["r"][i])) for i in np.flatnonzero(mask)]


@torch.no_grad()
@one_thread()
def evaluate(policy: nn.Module, env_id: str, episodes: int = 10, seed: int = 0, time_feature: bool | None = None,
             max_envs: int = 16, **env_kwargs: Any) -> list[float]:
    """Returns of `episodes` deterministic episodes (episode i starts from reset seed `seed + i`), for any model
    or policy whose spec fits the env, trained or not. Up to `max_envs` episodes run side by side."""
    was_training = policy.training
    policy.eval()
    device = next(iter(policy.parameters()), torch.empty(0)).device
    returns: list[float] = []
    for start in range(0, episodes, max_envs):
        n = min(max_envs, episodes - start)
        envs = make_vec_env(env_id, n, time_feature, **env_kwargs)
        try:
            actor = as_policy(policy, env_spec(envs, env_id, env_kwargs), critic=False)
            obs, _ = envs.reset(seed=[seed + start + i for i in range(n)])
            state, done = actor.initial_state(n, device), {}
            while len(done) < n:  # each env's first episode; later (autoreset) ones are ignored
                out = actor(to_tensor(obs, device), state)
                state = out.state
                obs, _, _, _, info = envs.step(to_env(actor.greedy(out.logits), envs.single_action_space))
                for i, ret in finished_episodes(info):
                    done.setdefault(i, ret)
        finally:
            envs.close()
        returns += [done[i] for i in range(n)]
    policy.train(was_training)
    return returns
