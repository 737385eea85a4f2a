"""Gymnasium conventions and a light `import biozoo`: every env registered by the import, none of its code loaded."""

import json
import subprocess
import sys

from conftest import REPO


def run_python(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_biozoo_registers_every_env_without_loading_lightning_or_mujoco():
    out = run_python("import json, sys, biozoo, gymnasium as gym\n"
                     "heavy = [m for m in ('lightning', 'mujoco') if m in sys.modules]\n"
                     "ids = sorted(k for k in gym.registry if k.startswith('biozoo/'))\n"
                     "env = gym.make('biozoo/Swimmer-v0')\nobs, _ = env.reset(seed=0)\nenv.close()\n"
                     "print(json.dumps({'heavy': heavy, 'ids': ids, 'obs': len(obs)}))")
    assert out["heavy"] == []
    assert out["ids"] == ["biozoo/AcrobotMasked-v1", "biozoo/CartPoleMasked-v1", "biozoo/MiniGrid-FourRooms-v0",
                          "biozoo/NeuroGym-v0", "biozoo/Swimmer-v0", "biozoo/SwimmerNavigate-v0"]
    assert out["obs"] > 0


def test_module_prefixed_ids_work_without_any_import():
    out = run_python("import json, gymnasium as gym\n"
                     "env = gym.make('biozoo:biozoo/Swimmer-v0')\nobs, _ = env.reset(seed=0)\n"
                     "masked = gym.make('biozoo:biozoo/CartPoleMasked-v1')\nm, _ = masked.reset(seed=0)\n"
                     "print(json.dumps({'obs': len(obs), 'masked': [float(v) for v in m]}))")
    assert out["obs"] > 0 and out["masked"][1] == out["masked"][3] == 0.0  # CartPole's velocities zeroed


def test_minigrid_view_passes_check_env():
    """biozoo/MiniGrid-FourRooms-v0: the official symbolic view (ImgObsWrapper) read flat, capped at 300 steps."""
    import pytest

    pytest.importorskip("minigrid")
    import warnings

    import gymnasium as gym
    import numpy as np
    from gymnasium.utils.env_checker import check_env

    import biozoo  # noqa: F401  (registers the ids)

    env = gym.make("biozoo/MiniGrid-FourRooms-v0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env's note that the env is wrapped: the wrapper is the point
        check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (147,) and obs.dtype == np.float32 and env.spec.max_episode_steps == 300
    assert env.get_wrapper_attr("minigrid_view") == (7, 7, 3) and env.action_space.n == 7
    env.close()
