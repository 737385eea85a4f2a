"""Evolution strategies (Salimans et al. 2017, arXiv 1703.03864; the NCAP repo's estorch script) on the same
`Policy` interface as PPO.

One generation (`es_generation`): antithetic Gaussian perturbations theta +- sigma * eps of all the model's
trainable weights, one deterministic episode per member (member pairs share their start state), centred-rank
fitness shaping, and one step of the given optimiser (Adam with coupled L2 weight decay, as estorch) along
grad = sum_i rank_i * eps_i / (population * sigma). The members run side by side, one vector env each: a stateless model through `torch.func.vmap` over
`functional_call`, a recurrent one member by member, each carrying its state from the initial one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import torch
from torch import nn

from biozoo._core import BiozooError

from .policy import Policy, finished_episodes, one_thread, to_env, to_tensor
from .ppo import running_norms


@dataclass
class ESConfig:
    population: int = 8  # even: antithetic pairs; one vector env per member
    sigma: float = 0.02
    weight_decay: float = 0.005


def centered_ranks(x: torch.Tensor) -> torch.Tensor:
    """Fitness shaping: ranks scaled to [-0.5, 0.5] (ties broken by order)."""
    ranks = torch.empty_like(x)
    ranks[x.argsort()] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    return ranks / (len(x) - 1) - 0.5


@one_thread()
def es_generation(policy: Policy, envs: gym.vector.VectorEnv, cfg: ESConfig,
                  optimizer: torch.optim.Optimizer) -> tuple[dict[str, float], int]:
    """One generation (module docstring): (stats, environment steps taken)."""
    if envs.num_envs != cfg.population or cfg.population % 2:
        raise BiozooError(f"es needs an even population with one env per member, got population "
                          f"{cfg.population} and {envs.num_envs} envs")
    model = policy.model
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    theta = nn.utils.parameters_to_vector(params.values()).detach()
    half = cfg.population // 2
    eps = torch.randn(half, theta.numel(), device=theta.device)
    eps = torch.cat([eps, -eps])
    members = theta + cfg.sigma * eps
    stacked, offset = {}, 0
    for name, p in params.items():
        stacked[name] = members[:, offset:offset + p.numel()].reshape(len(members), *p.shape)
        offset += p.numel()

    def act(weights: dict[str, torch.Tensor], obs: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        kwargs = {"state": state} if policy.recurrent else {}
        out = torch.func.functional_call(model, weights, (obs,), kwargs)
        return policy.greedy(out.logits), out.state

    def act_all(obs: torch.Tensor, states: list[Any]) -> tuple[torch.Tensor, list[Any]]:
        if not policy.recurrent:  # every member at once
            return torch.func.vmap(lambda w, o: act(w, o[None])[0][0])(stacked, obs), states
        outs = [act({k: v[i] for k, v in stacked.items()}, obs[i:i + 1], states[i]) for i in range(len(members))]
        return torch.cat([a for a, _ in outs]), [s for _, s in outs]

    seeds = [int(s) for s in torch.randint(0, 2**31 - 1, (half,))] * 2  # pairs share a start state
    obs, _ = envs.reset(seed=seeds)
    obs = to_tensor(obs, theta.device)
    states = [policy.initial_state(1, theta.device) for _ in range(len(members))]  # recurrent: one per member
    fitness: dict[int, float] = {}
    seen, steps = [], 0
    model.eval()
    with torch.no_grad():
        while len(fitness) < len(members):  # each member's first episode
            seen.append(obs)
            action, states = act_all(obs, states)
            obs, _, _, _, info = envs.step(to_env(action, envs.single_action_space))
            obs, steps = to_tensor(obs, theta.device), steps + envs.num_envs
            for i, ret in finished_episodes(info):
                fitness.setdefault(i, ret)
    model.train()
    returns = torch.tensor([fitness[i] for i in range(len(members))], device=theta.device)
    grad = centered_ranks(returns) @ eps / (len(members) * cfg.sigma)
    optimizer.zero_grad()
    offset = 0
    for p in params.values():  # the optimiser minimises: hand it the negative of the ascent direction
        p.grad = -grad[offset:offset + p.numel()].reshape(p.shape).clone()
        offset += p.numel()
    optimizer.step()
    for norm in running_norms(model):
        norm.update(torch.cat(seen))
    stats = {"return": float(returns.mean()), "return_max": float(returns.max()), "grad_norm": float(grad.norm())}
    return stats, steps
