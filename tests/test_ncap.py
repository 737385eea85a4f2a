"""NCAP, the N-link swimmer and the control harness (PPO / ES / evaluate)."""

import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import biozoo.envs  # noqa: F401  (registers biozoo/Swimmer-v0)
from biozoo.envs.swimmer import SwimmerEnv
from biozoo.models import BiozooError, CheckpointError, create_model, list_pretrained, load_pretrained
from biozoo.envs.control import make_vec_env
from biozoo.models.baselines import RunningNorm
from biozoo.models.ncap import NCAP, graded, transfer_to
from biozoo.train.control import fit_policy, rollout, transfer_returns
from biozoo.train.es import centered_ranks
from biozoo.train.policy import GaussianHead, evaluate
from biozoo.train.ppo import gae

from conftest import run_biozoo


def obs_for(joint_angles, step: int) -> torch.Tensor:
    """An observation: the joint angles, then the normalised time (body velocities are not read by NCAP)."""
    return torch.tensor([[*joint_angles, step / 1000]], dtype=torch.float32)


class ZeroPolicy(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n, self.dummy = n, torch.nn.Parameter(torch.zeros(1))

    def forward(self, obs):
        return torch.zeros(obs.shape[0], self.n)


# Environment ------------------------------------------------------------------------------------------------------

def test_swimmer_physics_matches_dm_control():
    env = SwimmerEnv(n_links=6)
    assert env.model.opt.timestep == pytest.approx(0.002) and env.dt == pytest.approx(0.03) and env.n_substeps == 15
    assert env.model.opt.density == 3000 and env.model.nu == 5
    assert np.allclose(env.model.jnt_range[3:], [[-math.pi / 3, math.pi / 3]] * 5)  # 2*pi/n_links
    assert np.allclose(env.model.body_mass[1:], 0.01)
    assert env.observation_space.shape == (23,) and env.action_space.shape == (5,)
    assert SwimmerEnv(n_links=12).observation_space.shape == (11 + 36,)
    with pytest.raises(BiozooError, match="n_links"):
        SwimmerEnv(n_links=2)
    with pytest.raises(BiozooError, match="swim"):
        SwimmerEnv(task="reach")


@pytest.mark.parametrize("n_links", [3, 6])
def test_check_env(n_links):
    check_env(gym.make("biozoo/Swimmer-v0", n_links=n_links).unwrapped, skip_render_check=True)  # render: below


def test_swim_reward_is_a_linear_ramp_of_forward_speed():
    import mujoco

    env = SwimmerEnv(n_links=3)
    env.reset(seed=0)
    for speed, reward in [(0.05, 0.5), (0.1, 1.0), (0.3, 1.0), (0.0, 0.0), (-0.1, 0.0)]:
        env.data.qpos[:] = 0  # heading 0: the nose points along -y
        env.data.qvel[:] = 0
        env.data.qvel[1] = -speed
        mujoco.mj_forward(env.model, env.data)
        assert env.forward_speed() == pytest.approx(speed, abs=1e-9)
        assert env._reward() == pytest.approx(reward, abs=1e-9)


def test_render_or_one_line_gl_error():
    env = gym.make("biozoo/Swimmer-v0", n_links=3, render_mode="rgb_array")
    env.reset(seed=0)
    try:
        frame = env.render()
    except BiozooError as e:
        assert "MUJOCO_GL=egl" in str(e) and "\n" not in str(e)
        pytest.skip(f"no OpenGL here: {e}")
    assert frame.shape == (240, 320, 3) and frame.std() > 5
    env.close()


def test_render_a_rollout_gif_of_the_shipped_swimmer(tmp_path):
    """With OpenGL (CI: libosmesa6 + MUJOCO_GL=osmesa, see .ci/run): 30 rendered steps of ncap.swim6 as a GIF."""
    import imageio.v2 as imageio

    try:
        traj = rollout(create_model("ncap.swim6"), "biozoo/Swimmer-v0", render=True, n_links=6, max_episode_steps=30)
    except BiozooError as e:
        assert "\n" not in str(e)
        pytest.skip(f"no OpenGL here: {e}")
    frames = traj["frames"]
    assert len(frames) == 30 and frames[0].shape == (240, 320, 3)
    assert np.abs(frames[-1].astype(float) - frames[0].astype(float)).mean() > 0.5  # the swimmer moved
    gif = tmp_path / "swim6.gif"
    imageio.mimsave(gif, frames, duration=33, loop=0)
    assert len(imageio.mimread(gif)) == 30


GL_PROBE = """
import json, sys
import numpy as np
import biozoo, biozoo.envs
imported_early = "mujoco" in sys.modules  # registering biozoo/Swimmer-v0 must not import mujoco
import gymnasium as gym
from biozoo.models import BiozooError
env = gym.make("biozoo/Swimmer-v0", n_links=3, render_mode="rgb_array")
obs, _ = env.reset(seed=0)
for t in range(30):
    obs, *_ = env.step(np.array([np.sin(t / 5), np.cos(t / 5)], dtype=np.float32))
try:
    render = list(env.render().shape)
except BiozooError as e:
    render = str(e)
env.close()  # an OSMesa renderer left to interpreter teardown prints to stdout and raises in __del__
print(json.dumps({"imported_early": imported_early, "obs": obs.tolist(), "render": render}))
"""


def test_import_and_physics_survive_a_missing_gl_backend():
    """With MUJOCO_GL naming a backend whose library may be missing (say, no libOSMesa), biozoo still imports,
    the physics is unchanged, and render() gives a frame or a one-line error naming the fix."""
    procs = {}
    for backend in ("egl", "osmesa"):  # side by side: each pays the full biozoo import
        env = {**os.environ, "MUJOCO_GL": backend}
        env.pop("PYOPENGL_PLATFORM", None)
        procs[backend] = subprocess.Popen([sys.executable, "-c", GL_PROBE], stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=env)
    ref = SwimmerEnv(n_links=3)
    obs, _ = ref.reset(seed=0)
    for t in range(30):
        obs, *_ = ref.step(np.array([np.sin(t / 5), np.cos(t / 5)], dtype=np.float32))
    assert np.abs(obs).max() > 0.01
    for backend, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0, f"MUJOCO_GL={backend}: {stderr[-2000:]}"
        out = json.loads(stdout.strip().splitlines()[-1])
        assert out["imported_early"] is False
        assert np.allclose(out["obs"], obs, atol=1e-8)
        if isinstance(out["render"], str):
            assert f"MUJOCO_GL={backend}" in out["render"] and "\n" not in out["render"]
        else:
            assert out["render"] == [240, 320, 3]


# The circuit --------------------------------------------------------------------------------------------------------

def test_ncap_hand_computed_torques():
    model = NCAP(n_links=4)  # 3 joints, all weights at their constant init
    q = model.joint_limit
    obs = obs_for([0.5 * q, -1.0 * q, 0.0], step=0)
    # joint 0: oscillator dorsal -> +1; joint 1: s_d(joint 0) = 0.5 -> +0.5; joint 2: s_v(joint 1) = 1 -> -1
    assert torch.allclose(model(obs).logits, torch.tensor([[1.0, 0.5, -1.0]]))
    obs = obs_for([0.5 * q, -1.0 * q, 0.0], step=30)  # second half of the 60-step period: ventral
    assert torch.allclose(model(obs).logits, torch.tensor([[-1.0, 0.5, -1.0]]))
    obs = obs_for([0.0, 0.0, 0.0], step=61)
    assert torch.allclose(model(obs).logits, torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(NCAP(4, oscillator_period=20)(obs_for([0, 0, 0], step=10)).logits, torch.tensor([[-1.0, 0, 0]]))


def test_parameter_counts_and_ablations():
    assert create_model("ncap", n_links=6).num_parameters() == 4
    assert create_model("ncap", n_links=13).num_parameters() == 4
    assert create_model("ncap_unshared", n_links=6).num_parameters() == 30  # 6J
    assert NCAP(6, proprioception=False).num_parameters() == 3
    head_only = NCAP(6, proprioception=False)(obs_for([0.5] * 5, step=0)).logits
    assert head_only[0, 0] == 1 and torch.all(head_only[0, 1:] == 0)
    assert NCAP(6, head_oscillator=False)(obs_for([0.0] * 5, step=0)).logits.abs().sum() == 0
    assert create_model("mlp_policy", in_features=24, num_classes=5).num_parameters(True) == 24 * 64 + 64 * 64 + 64 * 5 + 64 + 64 + 5
    assert create_model("mlp_policy_256", in_features=24, num_classes=5).num_parameters(True) == 73_477  # the NCAP paper's MLP with the time feature


def test_sign_constraints_and_init():
    torch.manual_seed(0)
    model = NCAP(6)
    assert model.prop.item() == 1 and model.osc.item() == 1 and model.muscle_ipsi.item() == 1
    assert model.muscle_contra.item() == -1
    obs = obs_for([0.3, -0.2, 0.5, 0.1, -0.4], step=3)
    with torch.no_grad():
        model.prop.fill_(-2.0)  # an excitatory weight below zero acts as zero
    clamped = model(obs).logits
    with torch.no_grad():
        model.prop.fill_(0.0)
    assert torch.equal(clamped, model(obs).logits)
    free = NCAP(6, sign_constraints=False)
    with torch.no_grad():
        free.prop.fill_(-2.0)
    assert not torch.equal(free(obs).logits, clamped)
    unsigned = NCAP(13, weight_sharing=False, sign_constraints=False)
    assert set(unsigned.muscle_ipsi.flatten().tolist()) == {-1.0, 1.0}
    uniform = NCAP(13, weight_sharing=False, constant_init=False)
    assert (uniform.muscle_ipsi >= 0).all() and (uniform.muscle_contra <= 0).all()
    assert len(set(uniform.muscle_ipsi.flatten().tolist())) > 10


def test_graded_passes_gradient_at_its_bounds():
    x = torch.tensor([0.0, 0.5, 1.0, 1.5, -0.5], requires_grad=True)
    y = graded(x)
    y.sum().backward()
    assert torch.equal(y.detach(), x.detach().clamp(0, 1))
    assert torch.equal(x.grad, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))
    model = NCAP(6)  # constant init puts the head B-neuron exactly at 1: the oscillator weight still learns
    model(obs_for([0.1, -0.2, 0.3, 0.1, 0.0], step=0)).logits.sum().backward()
    assert model.osc.grad.abs().item() > 0


def test_weights_transfer_across_body_lengths(tmp_path):
    model = create_model("ncap", n_links=6)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.mul_(1.5 + i)
    model.save_pretrained(tmp_path / "ncap6")
    for n in (3, 9, 13):
        moved = load_pretrained(tmp_path / "ncap6", n_links=n)
        assert moved.n_links == n and moved.joint_limit == pytest.approx(2 * math.pi / n)
        assert all(torch.equal(a, b) for a, b in zip(moved.parameters(), model.parameters()))
        assert moved(obs_for([0.1] * (n - 1), step=5)).logits.shape == (1, n - 1)
        assert torch.equal(transfer_to(model, n).prop, model.prop)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        transfer_to(create_model("ncap_unshared", n_links=6), 9)


def test_gaussian_head_fixed_and_learned_noise():
    mean = torch.zeros(4, 5)
    fixed, learned = GaussianHead(5, 0.1), GaussianHead(5, 0.5, learn_std=True)
    assert not fixed.log_std.requires_grad and learned.log_std.requires_grad
    dist = fixed(mean)
    assert torch.allclose(dist.stddev, torch.full((4, 5), 0.1))
    a = dist.sample()
    assert torch.allclose(dist.log_prob(a), torch.distributions.Normal(0.0, 0.1).log_prob(a))
    learned(mean).log_prob(torch.ones(4, 5)).sum().backward()
    assert learned.log_std.grad is not None


def test_running_norm_matches_batch_statistics():
    x = torch.randn(300, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -1.0, 0.0])
    norm = RunningNorm(3)
    for chunk in x.split([17, 100, 183]):
        norm.update(chunk)
    assert torch.allclose(norm.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, x.var(0, unbiased=False), rtol=1e-4)
    assert torch.allclose(norm(x).mean(0), torch.zeros(3), atol=1e-4)


# Harness ----------------------------------------------------------------------------------------------------------

def test_gae_bootstraps_truncation_and_masks_the_autoreset_step():
    # one env, 4 steps: episode ends (truncated) at t=1; t=2 is the autoreset step; t=3 starts the next episode
    rewards = torch.tensor([[1.0], [2.0], [0.0], [3.0]])
    values = torch.tensor([[0.5], [0.6], [9.0], [0.7]])
    next_values = torch.tensor([[0.6], [9.0], [0.7], [0.8]])  # after t=1: V(final observation) = 9
    terminated = torch.zeros(4, 1)
    done = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    gamma, lam = 0.9, 0.5
    adv, ret = gae(rewards, values, next_values, terminated, done, gamma, lam)
    d1 = 2.0 + gamma * 9.0 - 0.6  # truncated: bootstrap from the final observation, no carry from t=2
    d0 = 1.0 + gamma * 0.6 - 0.5
    assert adv[1, 0] == pytest.approx(d1) and adv[0, 0] == pytest.approx(d0 + gamma * lam * d1)
    assert adv[3, 0] == pytest.approx(3.0 + gamma * 0.8 - 0.7)
    assert torch.allclose(ret, adv + values)
    terminal, _ = gae(rewards, values, next_values, torch.tensor([[0.0], [1.0], [0.0], [0.0]]), done, gamma, lam)
    assert terminal[1, 0] == pytest.approx(2.0 - 0.6)  # terminated: no bootstrap


def test_centered_ranks():
    assert torch.allclose(centered_ranks(torch.tensor([3.0, 1.0, 2.0, 10.0])), torch.tensor([1 / 6, -0.5, -1 / 6, 0.5]))


def test_vector_env_reports_episodes_with_the_episode_mask():
    envs = make_vec_env("biozoo/Swimmer-v0", 2, n_links=3)
    obs, _ = envs.reset(seed=0)
    assert obs.shape == (2, 2 + 9 + 1) and np.all(obs[:, -1] == 0)
    for step in range(1000):
        obs, _, _, truncated, info = envs.step(np.zeros((2, 2), np.float32))
    assert truncated.all() and info["_episode"].all() and np.all(info["episode"]["l"] == 1000)
    envs.close()


def test_untrained_ncap_swims_and_baselines_do_not():
    ncap = evaluate(create_model("ncap", n_links=6), "biozoo/Swimmer-v0", episodes=2, seed=0, n_links=6)
    zero = evaluate(ZeroPolicy(5), "biozoo/Swimmer-v0", episodes=2, seed=0, n_links=6)
    assert len(ncap) == 2 and 700 < np.mean(ncap) < 900  # dm_control reference: ~801 (of 1000)
    assert max(zero) < 5


def test_evaluate_and_transfer_on_other_envs():
    mlp = create_model("mlp_policy", in_features=8 + 1, num_classes=2)
    returns = evaluate(mlp, "Swimmer-v5", episodes=2, seed=0)
    assert len(returns) == 2 and all(np.isfinite(returns))
    ncap = create_model("ncap", n_links=3, joint_offset=1)  # gymnasium's swimmer observes the tip angle first
    assert np.mean(evaluate(ncap, "Swimmer-v5", episodes=1, seed=0)) > 40
    moved = transfer_returns(create_model("ncap", n_links=6), "biozoo/Swimmer-v0", [3], episodes=1)
    assert 200 < moved[3][0] < 400  # the untrained circuit on 3 links: ~290


def test_es_and_ppo_update_the_policy():
    torch.manual_seed(0)
    es = fit_policy("ncap", env_kwargs={"n_links": 3}, algorithm="es", total_env_steps=4000, lr=0.05,
                    es={"population": 4, "sigma": 0.05}, eval_episodes=1, rollouts_per_epoch=1)
    assert es.env_steps >= 4000 and len(es.history) == 2 and es.history[0][0] == 0  # untrained, then trained
    assert not torch.allclose(torch.cat([p.flatten() for p in es.model.parameters()]), torch.tensor([1.0, 1, 1, -1]))
    ppo = fit_policy("mlp_policy", env_kwargs={"n_links": 3}, num_envs=2, total_env_steps=256, eval_episodes=1,
                     rollouts_per_epoch=1, ppo={"steps_per_env": 128, "minibatches": 2})
    assert ppo.model.obs_norm.count.item() == 256 and ppo.history[-1][0] == 256
    assert np.isfinite(ppo.history[-1][1])


def test_ppo_anneals_a_fixed_std_and_the_learning_rate():
    ppo = fit_policy("ncap", env_kwargs={"n_links": 3}, num_envs=2, total_env_steps=256, eval_episodes=1,
                     rollouts_per_epoch=2, initial_eval=False, action_std=0.5, action_std_final=0.1,
                     scheduler="cosine", lr=0.01, ppo={"steps_per_env": 64})
    # the second (last) rollout starts at 128 of 256 steps: std = 0.5^(1/2) * 0.1^(1/2)
    assert ppo.policy.noise.log_std.exp().mean().item() == pytest.approx(math.sqrt(0.05), rel=1e-5)
    assert ppo.optimizers().param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine to 0 in 2 rollouts
    with pytest.raises(BiozooError, match="action_std_final"):
        fit_policy("ncap", env_kwargs={"n_links": 3}, learn_std=True, action_std_final=0.1, total_env_steps=64)


def test_rollout_plot(tmp_path):
    from biozoo.train.control import plot_rollout

    traj = rollout(create_model("ncap", n_links=4), "biozoo/Swimmer-v0", seed=0, n_links=4)
    assert traj["joints"].shape == (1000, 3) and traj["head"].shape == (1000, 2)
    assert np.linalg.norm(traj["head"][-1] - traj["head"][0]) > 0.5  # it swims away from the start
    assert plot_rollout(traj, tmp_path / "r.png").stat().st_size > 10_000


def test_cli_fit_export_and_reload(tmp_path):
    root = tmp_path / "run"
    run_biozoo("fit", "-c", "configs/ncap/swim6_ppo.yaml", "--trainer.default_root_dir", str(root),
               "--model.init_args.total_env_steps", "2048", "--model.init_args.eval_episodes", "1",
               "--model.init_args.video", "false", "--data.init_args.num_envs", "4",
               "--data.init_args.env_kwargs", "{n_links: 4}", "--data.init_args.rollouts_per_epoch", "4")
    logs = root / "version_0"
    metrics = (logs / "metrics.csv").read_text()
    assert "val/return" in metrics and (logs / "rollout.png").exists()
    assert json.loads((logs / "rollout.json").read_text())["return"] > 100
    run_biozoo("export", str(root / "version_0" / "checkpoints" / "last.ckpt"), str(tmp_path / "out"))
    model = load_pretrained(tmp_path / "out")
    assert isinstance(model, NCAP) and model.n_links == 4 and model.num_parameters() == 4


def test_pretrained_ncap_swim6_keeps_its_return():
    assert "ncap.swim6" in list_pretrained()
    cfg = list_pretrained()["ncap.swim6"]
    model = create_model("ncap.swim6")
    returns = evaluate(model, "biozoo/Swimmer-v0", episodes=3, seed=cfg.extra["eval_seed"], n_links=6)
    assert np.mean(returns) >= 0.9 * cfg.metrics["return"]
