"""An N-link swimmer in a viscous medium, built with the `mujoco` package directly (no dm_control).

The body and physics follow the DeepMind Control Suite swimmer (Tassa et al. 2018, `suite/swimmer.py`), which
NCAP (Bhattasali, Zador & Engel, NeurIPS 2022) swims in:

- a head and `n_links - 1` capsule segments, 0.1 m apart, joined by hinges limited to +-2*pi/n_links
  (360/n_links degrees), motors with gear 5e-4 and controls in [-1, 1];
- each body's mass (0.01 kg) and inertia come from a thin box, moving through a fluid of density 3000
  (MuJoCo's inertia-box fluid model), contacts off;
- physics step 0.002 s, control step 0.03 s (15 physics steps), 1000 control steps = 30 s per episode;
- reset: hinge angles uniform within their limits, heading uniform in [-pi, pi), at rest at the origin.

Task `swim` (the NCAP code's custom task, `neurobo/ncap/envs.py`): the target is dropped and the reward is a
linear ramp of the forward head speed, r = clip(v / 0.1, 0, 1) with v = -head_vel_y (the nose points along -y
in the head frame) -- 0 when still or swimming backwards, 1 at >= 0.1 m/s -- so an episode returns at most 1000.
Observation: the J = n_links - 1 joint angles, then the body velocities (vx, vy, wz in each body's frame, head
first; 3 * n_links values) -- 23 values for 6 links. The NCAP oscillator's clock is appended by the harness
(gymnasium's `TimeAwareObservation`), as Tonic's TimeFeature did for the official PPO runs.

Task `navigate` (dm_control's own `swimmer` task; biozoo/SwimmerNavigate-v0): a target sphere of radius 0.1 m
is dropped uniformly in [-2, 2]^2 (with probability 0.2 in [-0.3, 0.3]^2, a close target); the observation is
the joint angles, `to_target` (target minus nose, in the head frame: x, y) and the body velocities -- 25 values
for 6 links -- and the reward is dm_control's tolerance(nose-target distance, bounds=(0, 0.1), margin=0.5,
sigmoid='long_tail'): 1 inside the target, 1 / (1 + (9 * (d - 0.1) / 0.5)^2) outside (0.1 at 0.5 m beyond it).
Differences from dm_control's task: the target is drawn with the env's numpy Generator after the joints and
heading (dm_control uses its own RandomState, so the same seed gives other episodes); the target's light and
the frame sensors are left out (the observation computes `to_target` from geom positions, as dm_control does).

Differences from dm_control: the target geom and the frame sensors that only the target task reads are left
out (they do not touch the dynamics); the rendering assets are our own. Each control step runs
`mj_step` 15 times then `mj_step1`, so sensors describe the state after the step, as dm_control's legacy step does.

MuJoCo is imported on first use (`load_mujoco`), not when the env id is registered. It loads the OpenGL backend
named by MUJOCO_GL at import time, so a missing libEGL / libOSMesa breaks `import mujoco` itself; physics needs
no GL, so mujoco is then imported with rendering disabled (one warning) and only `render()` fails, with a
one-line error saying how to enable it.

    import gymnasium as gym, biozoo                              # biozoo.envs.registration registers the id
    env = gym.make("biozoo/Swimmer-v0", n_links=6)              # also: gym.make_vec(..., num_envs=8)
    env = gym.make("biozoo/Swimmer-v0", render_mode="rgb_array")  # needs MUJOCO_GL=egl or osmesa
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from biozoo._core import BiozooError, first_line

PHYSICS_DT = 0.002
CONTROL_DT = 0.03
EPISODE_STEPS = 1000  # 30 s
TASKS = ("swim", "navigate")
SWIM_SPEED = 0.1  # m/s at which the swim reward saturates
TARGET_SIZE = 0.1  # radius of dm_control's target sphere (m)
TARGET_BOX, CLOSE_BOX, P_CLOSE = 2.0, 0.3, 0.2  # target x, y ~ U(-box, box); the close box with probability 0.2


def swimmer_xml(n_links: int, target: bool = False) -> str:
    """MJCF of an `n_links`-body swimmer with the dm_control swimmer's physics (and the target sphere)."""
    limit = 360.0 / n_links
    scale = n_links / 6.0  # tracking camera moves back with body length
    segments, close, actuators, sensors = [], [], [], []
    for i in range(n_links - 1):
        segments.append(f"""
      <body name="segment_{i}" pos="0 .1 0">
        <geom name="visual_{i}" class="visual"/>
        <geom name="inertial_{i}" class="inertial"/>
        <site name="site_{i}"/>
        <joint name="joint_{i}" range="{-limit} {limit}"/>""")
        close.append("\n      </body>")
        actuators.append(f'    <motor name="motor_{i}" joint="joint_{i}"/>')
        sensors.append(f'    <velocimeter name="velocimeter_{i}" site="site_{i}"/>\n'
                       f'    <gyro name="gyro_{i}" site="site_{i}"/>')
    nl = "\n"
    target_geom = (f'\n    <geom name="target" type="sphere" pos="1 1 .05" size="{TARGET_SIZE}" rgba=".6 .3 .3 1"/>'
                   if target else "")
    return f"""<mujoco model="swimmer{n_links}">
  <compiler angle="degree"/>
  <option timestep="{PHYSICS_DT}" density="3000">
    <flag contact="disable"/>
  </option>
  <visual>
    <headlight ambient=".4 .4 .4" diffuse=".8 .8 .8" specular=".1 .1 .1"/>
    <global offwidth="640" offheight="480"/>
  </visual>
  <asset>
    <texture name="sky" type="skybox" builtin="gradient" rgb1=".4 .6 .8" rgb2="0 0 0" width="200" height="200"/>
    <texture name="grid" type="2d" builtin="checker" rgb1=".1 .2 .3" rgb2=".2 .3 .4" width="300" height="300"
             mark="edge" markrgb=".2 .3 .4"/>
    <material name="grid" texture="grid" texrepeat="1 1" texuniform="true" reflectance=".2"/>
    <material name="self" rgba=".7 .5 .3 1"/>
    <material name="effector" rgba=".7 .4 .2 1"/>
    <material name="eye" rgba="0 .2 1 1"/>
  </asset>
  <default>
    <default class="swimmer">
      <joint type="hinge" pos="0 -.05 0" axis="0 0 1" limited="true" solreflimit=".05 1" solimplimit="0 .8 .1"
             armature="1e-6"/>
      <default class="inertial">
        <geom type="box" size=".001 .05 .01" rgba="0 0 0 0" mass=".01"/>
      </default>
      <default class="visual">
        <geom type="capsule" size=".01" fromto="0 -.05 0 0 .05 0" material="self" mass="0"/>
      </default>
      <site size=".01" rgba="0 0 0 0"/>
    </default>
    <default class="free">
      <joint limited="false" stiffness="0" armature="0"/>
    </default>
    <motor gear="5e-4" ctrllimited="true" ctrlrange="-1 1"/>
  </default>
  <worldbody>
    <geom name="ground" type="plane" size="2.5 2.5 0.1" material="grid"/>
    <body name="head" pos="0 0 .05" childclass="swimmer">
      <light name="light" diffuse=".8 .8 .8" pos="0 0 1.5"/>
      <geom name="head" type="ellipsoid" size=".02 .04 .017" pos="0 -.022 0" material="self" mass="0"/>
      <geom name="nose" type="sphere" pos="0 -.06 0" size=".004" material="effector" mass="0"/>
      <geom name="eyes" type="capsule" fromto="-.006 -.054 .005 .006 -.054 .005" size=".004" material="eye" mass="0"/>
      <camera name="tracking" pos="0 {-.2 * scale:.4f} {.5 * scale:.4f}" xyaxes="1 0 0 0 1 1" mode="trackcom" fovy="60"/>
      <joint name="rootx" class="free" type="slide" axis="1 0 0" pos="0 -.05 0"/>
      <joint name="rooty" class="free" type="slide" axis="0 1 0" pos="0 -.05 0"/>
      <joint name="rootz" class="free" type="hinge" axis="0 0 1" pos="0 -.05 0"/>
      <geom name="inertial" class="inertial"/>
      <geom name="visual" class="visual"/>
      <site name="head"/>{"".join(segments)}{"".join(close)}
    </body>{target_geom}
  </worldbody>
  <actuator>
{nl.join(actuators)}
  </actuator>
  <sensor>
    <velocimeter name="head_vel" site="head"/>
    <gyro name="head_gyro" site="head"/>
{nl.join(sensors)}
  </sensor>
</mujoco>
"""


_mujoco: Any = None
_gl_failure: str | None = None  # why the MUJOCO_GL backend did not load, when mujoco fell back to no rendering
_GL_OFF = ("disable", "disabled", "off", "false", "0")


def load_mujoco() -> Any:
    """The `mujoco` module, imported on first use. If the OpenGL backend that MUJOCO_GL names fails to load
    (which fails `import mujoco` itself), import mujoco again with rendering disabled: physics works and
    `render()` explains the failure. MUJOCO_GL then stays "disable" so worker processes import it the same way."""
    global _mujoco, _gl_failure
    if _mujoco is not None:
        return _mujoco
    backend = os.environ.get("MUJOCO_GL", "")
    pyopengl_platform = os.environ.get("PYOPENGL_PLATFORM")
    try:
        import mujoco
    except Exception as e:  # noqa: BLE001  (a broken GL library raises ImportError, OSError, AttributeError, ...)
        if backend.strip().lower() in ("", *_GL_OFF):
            raise
        _gl_failure = f"MUJOCO_GL={backend} did not load ({first_line(e, with_type=True)})"
        # forget the half-imported GL modules (the compiled physics modules stay loaded) and import without GL
        for name in list(sys.modules):
            if name in ("mujoco", "OpenGL") or name.startswith(("mujoco.rendering", "mujoco.osmesa", "mujoco.egl",
                                                                "mujoco.glfw", "mujoco.cgl", "OpenGL.")):
                del sys.modules[name]
        os.environ["MUJOCO_GL"] = "disable"
        if pyopengl_platform is None:  # mujoco's EGL / OSMesa modules set it for PyOpenGL
            os.environ.pop("PYOPENGL_PLATFORM", None)
        import mujoco
        warnings.warn(f"biozoo: {_gl_failure}; MuJoCo physics works, rendering is off", RuntimeWarning, stacklevel=2)
    _mujoco = mujoco
    return mujoco


def gl_error(error: BaseException | None = None) -> BiozooError:
    """One line: why rendering failed and how to enable it."""
    how = ("set MUJOCO_GL=egl (GPU, needs libEGL) or MUJOCO_GL=osmesa (CPU, needs libOSMesa, e.g. apt install "
           "libosmesa6) before starting Python, or use render_mode=None")
    if _gl_failure is not None:
        return BiozooError(f"rendering is off: {_gl_failure}, so mujoco was imported without OpenGL; {how}")
    return BiozooError(f"rendering needs OpenGL, which failed here ({first_line(error, with_type=True)}); {how}")


def reach_reward(distance: float) -> float:
    """dm_control's rewards.tolerance(distance, bounds=(0, TARGET_SIZE), margin=5 * TARGET_SIZE,
    sigmoid='long_tail', value_at_margin=0.1)."""
    if distance <= TARGET_SIZE:
        return 1.0
    scaled = (distance - TARGET_SIZE) / (5 * TARGET_SIZE) * math.sqrt(1 / 0.1 - 1)
    return 1.0 / (scaled * scaled + 1.0)


class SwimmerEnv(gym.Env):
    """The dm_control N-link swimmer with NCAP's `swim` task or dm_control's target task `navigate`, as a
    gymnasium environment (see module docstring)."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": round(1 / CONTROL_DT)}

    def __init__(self, n_links: int = 6, task: str = "swim", render_mode: str | None = None,
                 width: int = 320, height: int = 240):
        if not isinstance(n_links, int) or n_links < 3:
            raise BiozooError(f"n_links must be an integer >= 3, got {n_links!r}")
        if task not in TASKS:
            raise BiozooError(f"unknown swimmer task {task!r}; choose one of {', '.join(TASKS)}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise BiozooError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.n_links, self.n_joints, self.task = n_links, n_links - 1, task
        self.joint_limit = 2 * math.pi / n_links
        mujoco = load_mujoco()
        self.model = mujoco.MjModel.from_xml_string(swimmer_xml(n_links, target=task == "navigate"))
        self.data = mujoco.MjData(self.model)
        self.n_substeps = round(CONTROL_DT / PHYSICS_DT)
        self.dt = CONTROL_DT
        self.render_mode, self.width, self.height = render_mode, width, height
        self._renderer: Any = None
        obs_dim = self.n_joints + 3 * n_links + 2 * (task == "navigate")
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, (self.n_joints,), np.float32)

    # state readers ------------------------------------------------------------------------------------------
    def joint_angles(self) -> np.ndarray:
        return self.data.qpos[3:].copy()

    def body_velocities(self) -> np.ndarray:
        """(vx, vy, wz) of the head and each segment in its own frame, from the velocimeter/gyro sensors."""
        return self.data.sensordata.reshape(-1, 6)[:, [0, 1, 5]].ravel()

    def head_position(self) -> np.ndarray:
        return self.data.qpos[:2].copy()

    def forward_speed(self) -> float:
        return float(-self.data.sensordata[1])  # head_vel y; the nose points along -y

    def to_target(self) -> np.ndarray:
        """Target minus nose in the head frame (x, y), as dm_control's `nose_to_target`."""
        delta = self.data.geom("target").xpos - self.data.geom("nose").xpos
        return delta @ self.data.body("head").xmat.reshape(3, 3)[:, :2]

    def _obs(self) -> np.ndarray:
        if self.task == "navigate":
            return np.concatenate([self.joint_angles(), self.to_target(), self.body_velocities()])
        return np.concatenate([self.joint_angles(), self.body_velocities()])

    def _reward(self) -> float:
        if self.task == "navigate":
            return reach_reward(float(np.linalg.norm(self.to_target())))
        return float(np.clip(self.forward_speed() / SWIM_SPEED, 0.0, 1.0))

    # gymnasium API -------------------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        mujoco = load_mujoco()
        mujoco.mj_resetData(self.model, self.data)
        rng = self.np_random
        self.data.qpos[2] = rng.uniform(-math.pi, math.pi)
        self.data.qpos[3:] = rng.uniform(-self.joint_limit, self.joint_limit, self.n_joints)
        if self.task == "navigate":
            box = CLOSE_BOX if rng.random() < P_CLOSE else TARGET_BOX
            self.model.geom("target").pos[:2] = rng.uniform(-box, box, 2)
        mujoco.mj_forward(self.model, self.data)
        return self._obs(), {}

    def step(self, action: np.ndarray):
        if not np.all(np.isfinite(action)):
            raise BiozooError(f"swimmer actions must be finite, got {np.asarray(action).tolist()}")
        self.data.ctrl[:] = np.clip(action, -1.0, 1.0)
        mujoco = load_mujoco()
        mujoco.mj_step(self.model, self.data, nstep=self.n_substeps)
        mujoco.mj_step1(self.model, self.data)  # sensors and positions of the new state
        reward = self._reward()
        info = {"forward_speed": self.forward_speed()}
        if self.task == "navigate":
            info["target_distance"] = float(np.linalg.norm(self.to_target()))
        return self._obs(), reward, False, False, info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        if self._renderer is None:
            if _gl_failure is not None:
                raise gl_error()
            try:
                self._renderer = load_mujoco().Renderer(self.model, self.height, self.width)
            except Exception as e:  # no display / no GL library: one clear line instead of a GL traceback
                raise gl_error(e) from None
        self._renderer.update_scene(self.data, camera="tracking")
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

