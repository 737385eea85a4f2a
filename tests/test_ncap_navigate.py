"""NCAP navigation: the speed / turn control units, biozoo/SwimmerNavigate-v0 (dm_control's target task), the
navigator; and two swimmer-harness checks (non-finite actions, the video when OpenGL is missing)."""

import math

import biozoo.envs  # noqa: F401  (registers the env ids)
import gymnasium as gym
import mujoco
import numpy as np
import pytest
import torch
from biozoo.envs.swimmer import SwimmerEnv, reach_reward
from biozoo.models import BiozooError, create_model, list_pretrained
from biozoo.train.control import render_error
from biozoo.train.policy import evaluate
from conftest import run_biozoo
from gymnasium.utils.env_checker import check_env


def test_control_units_api_and_observation_layout():
    model = create_model("ncap", n_links=4, turn_control=True, speed_control=True, head_oscillator=False)
    assert [n for n, _ in model.named_parameters()] == ["prop", "muscle_ipsi", "muscle_contra", "speed", "turn"]
    assert model.effective_weights()["speed"].item() == -1.0  # inhibitory, init -1

    def head_torque(right, left, speed):  # obs: [joint angles (3), right, left, speed, t / 1000]
        return model(torch.tensor([[0.0, 0, 0, right, left, speed, 0.0]])).logits[0, 0].item()

    assert head_torque(1, 0, 1) == 1.0 and head_torque(0, 1, 1) == -1.0 and head_torque(0, 0, 1) == 0.0
    assert head_torque(1, 0, 0) == 0.0  # speed 0 = full brake silences the turn drive
    assert head_torque(1, 0, 0.5) == 0.5 and head_torque(2.0, 0, 7.0) == 1.0  # controls are clipped to [0, 1]
    unshared = create_model("ncap", n_links=6, turn_control=True, speed_control=True, n_turn_joints=2,
                            weight_sharing=False)
    assert unshared.speed.shape == (2, 5) and unshared.turn.shape == (2, 2)
    with pytest.raises(BiozooError, match="n_turn_joints"):
        create_model("ncap", n_links=4, turn_control=True, n_turn_joints=4)
    with pytest.raises(BiozooError, match="controls"):  # obs too short for angles + 3 controls + clock
        model(torch.zeros(1, 5))


def test_swim_only_models_and_the_shipped_weights_are_unchanged():
    model = create_model("ncap.swim6")
    assert [n for n, _ in model.named_parameters()] == ["prop", "osc", "muscle_ipsi", "muscle_contra"]
    assert model.n_controls == 0 and "turn_control" in model.biozoo_config()["kwargs"]


def test_navigate_env_follows_dm_control():
    env = SwimmerEnv(n_links=6, task="navigate")
    assert env.observation_space.shape == (5 + 2 + 18,)
    check_env(gym.make("biozoo/SwimmerNavigate-v0", n_links=4).unwrapped, skip_render_check=True)
    assert gym.make("biozoo/SwimmerNavigate-v0", n_links=9).observation_space.shape == (8 + 2 + 27,)
    env.reset(seed=0)
    env.model.geom("target").pos[:2] = [1.0, 1.0]
    # the heading turns about rootz at (0, -.05): the nose moves to (.01, -.05)
    for heading, expected in [(0.0, [1.0, 1.06]), (math.pi / 2, [1.05, -0.99])]:
        env.data.qpos[:] = 0
        env.data.qpos[2] = heading
        mujoco.mj_forward(env.model, env.data)
        np.testing.assert_allclose(env.to_target(), expected, atol=1e-9)  # target - nose in the head frame
        obs = env._obs()
        np.testing.assert_allclose(obs[5:7], expected, atol=1e-9)
    # dm_control tolerance(d, bounds=(0, .1), margin=.5, sigmoid='long_tail'): 0.1 at the margin
    assert reach_reward(0.05) == 1.0 and reach_reward(0.1) == 1.0
    assert reach_reward(0.6) == pytest.approx(0.1) and reach_reward(0.35) == pytest.approx(1 / (1 + 9 / 4))
    targets = np.array([(env.reset(seed=s), env.model.geom("target").pos[:2].copy())[1] for s in range(200)])
    assert np.abs(targets).max() <= 2.0 and (np.abs(targets).max(1) <= 0.3).mean() > 0.1  # some close targets


def test_swimmer_refuses_non_finite_actions():
    env = SwimmerEnv(n_links=3)
    env.reset(seed=0)
    with pytest.raises(BiozooError, match="finite"):
        env.step(np.array([np.nan, 0.0], np.float32))
    with pytest.raises(BiozooError, match="finite"):
        env.step(np.array([0.0, np.inf], np.float32))


def test_navigator_controls_and_hardcoded_beats_plain_swimming():
    nav = create_model("ncap_navigator", n_links=4)
    controls = nav.controls(torch.tensor([[-0.5, -1.0], [0.5, 0.05], [0.0, 0.0]]))  # x = -to_target_x
    assert controls.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 0]]
    learned = create_model("ncap_navigator", n_links=4, task="learned", task_init="neutral")
    assert learned.controls(torch.randn(5, 2)).tolist() == [[0, 0, 1]] * 5  # neutral = plain swimming
    assert learned.num_parameters() == 6 + 9
    frozen = create_model("ncap_navigator", n_links=4, task="learned", train_circuit=False)
    assert frozen.num_parameters(trainable_only=True) == 9  # only the Linear(2, 3) mapping trains
    start = create_model("ncap_navigator", n_links=4, task="learned", task_init="hardcoded")
    to_target = torch.tensor([[-0.5, -1.0], [0.5, 0.05], [0.0, 0.0]])
    assert start.controls(to_target).clamp(0, 1).tolist() == controls.tolist()  # the clipped-linear copy
    with pytest.raises(BiozooError, match="hardcoded"):
        create_model("ncap_navigator", task="steer")
    kw = {"episodes": 4, "seed": 20000, "n_links": 6}
    plain = np.mean(evaluate(create_model("ncap", n_links=6), "biozoo/SwimmerNavigate-v0", **kw))
    hard = np.mean(evaluate(create_model("ncap_navigator", n_links=6), "biozoo/SwimmerNavigate-v0", **kw))
    assert hard > 2 * plain + 50, (hard, plain)


def test_shipped_navigator_keeps_its_return():
    tags = [t for t in list_pretrained() if t.startswith("ncap_navigator.")]
    if not tags:
        pytest.skip("no ncap_navigator weights shipped")
    cfg = list_pretrained()[tags[0]]
    returns = evaluate(create_model(tags[0]), "biozoo/SwimmerNavigate-v0", episodes=4, seed=cfg.extra["eval_seed"],
                       n_links=6)
    assert np.mean(returns) >= 0.8 * cfg.metrics["return_first4"]


@pytest.mark.slow
def test_report_without_opengl_skips_the_video_before_training(tmp_path):
    """configs/ncap/gym_swimmer_v5_mlp_ppo.yaml without a display: one line before training, then plots only."""
    env = {"MUJOCO_GL": "glfw", "DISPLAY": ""}  # GLFW without a display: mujoco imports, rendering fails
    proc = run_biozoo("fit", "-c", "configs/ncap/gym_swimmer_v5_mlp_ppo.yaml", "--trainer.default_root_dir",
                      str(tmp_path), "--model.init_args.total_env_steps", "64", "--model.init_args.eval_episodes",
                      "1", "--model.init_args.ppo", "{steps_per_env: 64, minibatches: 1}",
                      "--data.init_args.max_episode_steps", "50", "--data.init_args.rollouts_per_epoch", "1", env=env)
    assert "the report will have no video" in proc.stdout
    assert proc.stdout.index("no video") < proc.stdout.index("plot:")  # found before the report
    logs = tmp_path / "version_0"
    assert (logs / "rollout.png").exists() and not list(logs.glob("rollout.mp4")) + list(logs.glob("rollout.gif"))


def test_render_error_is_one_line():
    err = render_error("biozoo/Swimmer-v0", n_links=3)
    assert err is None or "\n" not in err
