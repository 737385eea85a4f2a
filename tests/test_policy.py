"""The control contract: any model whose spec fits is a policy (`as_policy`), one env factory with one time-feature
rule, and one PPO whose replayed minibatches reproduce the rollout exactly, recurrent or not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import biozoo
from biozoo._core import SpecError
from biozoo.envs.control import EnvDataModule, make_env
from biozoo.models import kwargs_for_spec
from biozoo.train.es import ESConfig, es_generation
from biozoo.train.policy import as_policy, evaluate
from biozoo.train.ppo import PPO, PPOConfig

SMALL_CTM = dict(iterations=2, d_model=24, d_input=8, heads=0, n_synch_out=6, n_synch_action=6, memory_length=3,
                 memory_hidden_dims=2, backbone_type="none")


def spec_of(env_id: str, **env_kwargs):
    return EnvDataModule(env_id, env_kwargs).spec


def build(name: str, spec, **kwargs):
    return biozoo.create_model(name, **kwargs_for_spec(name, spec, kwargs))


def test_one_time_feature_rule_and_the_env_spec():
    swimmer, cartpole = spec_of("biozoo/Swimmer-v0", n_links=4), spec_of("biozoo/CartPoleMasked-v1")
    assert swimmer.shape == (3 + 3 * 4 + 1,) and swimmer.target == "continuous_actions" and swimmer.target_dim == 3
    assert swimmer.extras["n_links"] == 4 and (swimmer.action_low, swimmer.action_high) == (-1.0, 1.0)
    assert cartpole.shape == (4,) and cartpole.target == "discrete_actions" and cartpole.num_classes == 2
    assert "n_links" not in cartpole.extras
    assert make_env("biozoo/CartPoleMasked-v1", time_feature=True).observation_space.shape == (5,)
    env = make_env("biozoo/CartPoleMasked-v1", max_episode_steps=7)
    env.reset(seed=0)
    assert env.spec.max_episode_steps == 7


@pytest.mark.parametrize("name, env_id, kwargs", [
    ("ncap", "biozoo/Swimmer-v0", {}), ("mlp", "biozoo/Swimmer-v0", {"hidden": [16]}),
    ("ctm", "biozoo/Swimmer-v0", SMALL_CTM), ("lstm", "biozoo/CartPoleMasked-v1", {"hidden_size": 8}),
    ("ccrnn", "biozoo/AcrobotMasked-v1", {"hidden_size": 8}), ("ctm", "biozoo/CartPoleMasked-v1", SMALL_CTM),
    ("ctm_rl_agent", "biozoo/CartPoleMasked-v1", {"d_model": 16, "d_input": 8, "n_synch_out": 4, "memory_length": 3}),
])
def test_any_fitting_model_is_a_policy(name, env_id, kwargs):
    torch.manual_seed(0)
    spec = spec_of(env_id, n_links=4) if "Swimmer" in env_id else spec_of(env_id)
    policy = as_policy(build(name, spec, **kwargs), spec)
    assert policy.recurrent == (name in ("ctm", "lstm", "ccrnn", "ctm_rl_agent"))
    assert (policy.critic is None) == (name == "ctm_rl_agent")  # the agent brings its own value head
    obs = torch.randn(3, *spec.shape)
    out = policy(obs)
    assert out.logits.shape == (3, spec.classes) and out.value.shape == (3,)
    action = policy.distribution(out.logits).sample()
    assert action.shape == ((3,) if spec.target == "discrete_actions" else (3, spec.classes))
    assert (out.state is not None) == policy.recurrent
    returns = evaluate(policy.model, env_id, episodes=2, max_episode_steps=20,
                       **({"n_links": 4} if "Swimmer" in env_id else {}))
    assert len(returns) == 2 and all(np.isfinite(returns))


def test_a_row_that_starts_an_episode_starts_from_the_initial_state():
    spec = spec_of("biozoo/CartPoleMasked-v1")
    policy = as_policy(build("lstm", spec, hidden_size=8), spec)
    obs = torch.randn(2, 4)
    carried = policy(obs).state
    first = torch.tensor([True, False])
    out = policy(obs, carried, first)
    fresh, kept = policy(obs[:1]), policy(obs[1:], tuple(s[1:] for s in carried))
    assert torch.allclose(out.logits[0], fresh.logits[0]) and torch.allclose(out.logits[1], kept.logits[0])


@pytest.mark.parametrize("name, env_id", [("ncap", "biozoo/Swimmer-v0"), ("lstm", "biozoo/CartPoleMasked-v1"),
                                          ("ctm_rl_agent", "biozoo/CartPoleMasked-v1")])
def test_ppo_minibatches_replay_the_rollout_exactly(name, env_id):
    """Before any update, the log-probs and values the update recomputes (by transition for a stateless policy,
    by whole env sequences from the start state for a recurrent one, across episode resets) are the rollout's."""
    torch.manual_seed(0)
    dm = EnvDataModule(env_id, {"n_links": 3} if "Swimmer" in env_id else {}, num_envs=3, max_episode_steps=9)
    kwargs = {"d_model": 16, "d_input": 8, "n_synch_out": 4, "memory_length": 3} if name == "ctm_rl_agent" else {}
    policy = as_policy(build(name, dm.spec, **kwargs), dm.spec)
    envs = dm.make_vec()
    runner = PPO(policy, envs, PPOConfig(steps_per_env=25))
    data = runner.collect()
    assert (~data["valid"]).any() and data["first"][1:].any()  # episodes ended and restarted inside the rollout
    with torch.no_grad():
        if policy.recurrent:
            logp, _, value, mask = runner.evaluate_actions(data, torch.arange(3))
            assert torch.allclose(logp, data["logp"], atol=1e-5) and torch.allclose(value, data["values"], atol=1e-5)
        else:
            valid = data["valid"]
            data["flat_obs"], data["flat_actions"] = data["obs"][valid], data["actions"][valid]
            logp, _, value, _ = runner.evaluate_actions(data, torch.arange(int(valid.sum())))
            assert torch.allclose(logp, data["logp"][valid], atol=1e-5)
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-3)
    stats = runner.update(data, optimizer)
    assert np.isfinite(stats["policy_loss"]) and np.isfinite(stats["value_loss"])
    envs.close()


def test_es_runs_a_recurrent_policy_member_by_member():
    torch.manual_seed(0)
    dm = EnvDataModule("biozoo/CartPoleMasked-v1", max_episode_steps=15)
    policy = as_policy(build("lstm", dm.spec, hidden_size=4), dm.spec, critic=False)
    before = torch.nn.utils.parameters_to_vector(policy.model.parameters()).clone()
    envs = dm.make_vec(4)
    stats, steps = es_generation(policy, envs, ESConfig(population=4, sigma=0.1),
                                 torch.optim.Adam(policy.model.parameters(), lr=0.05))
    envs.close()
    assert steps >= 4 and np.isfinite(stats["return"])
    assert not torch.equal(before, torch.nn.utils.parameters_to_vector(policy.model.parameters()))


def test_models_that_cannot_act_refuse_in_one_line():
    cartpole, swimmer = spec_of("biozoo/CartPoleMasked-v1"), spec_of("biozoo/Swimmer-v0")
    for name, spec, words in (("ncap", cartpole, "ncap cannot predict discrete actions (2): it predicts continuous actions"),
                              ("resnet", swimmer, "resnet cannot take observation vectors (24,): it reads image inputs"),
                              ("ctm_rl", cartpole, "ctm_rl cannot predict discrete actions (2): it is a core"),
                              ("neuroformer", cartpole, "neuroformer cannot take observation vectors (4,)")):
        with pytest.raises(SpecError) as error:
            kwargs_for_spec(name, spec)
        assert str(error.value).startswith(words) and "\n" not in str(error.value)
    assert kwargs_for_spec("ncap", spec_of("Swimmer-v5"))["joint_offset"] == 1  # gymnasium's swimmer: tip angle first
    with pytest.raises(SpecError, match="ncap cannot take observation vectors .* without a body"):
        kwargs_for_spec("ncap", spec_of("Pendulum-v1"))
    digits = biozoo.envs.DigitsDataModule().spec
    with pytest.raises(SpecError, match="a policy acts"):
        as_policy(build("mlp", digits), digits)
