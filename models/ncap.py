"""NCAP: the C. elegans swimming circuit as a control policy (Bhattasali, Zador & Engel, "Neural circuit
architectural priors for embodied control", NeurIPS 2022, arXiv 2201.05242; official code nikhilxb/ncap-swimmer,
`neurobo/ncap/swimmer.py`, MIT).

For joints i = 0..J-1 (head first, J = n_links - 1) and the two sides d (dorsal) and v (ventral):

    x_i   = clip(q_i / q_max, -1, 1),   q_max = 2*pi / n_links          (normalised joint angle)
    s^d_i = clip(x_i, 0, 1),   s^v_i = clip(-x_i, 0, 1)                  (stretch receptors)
    o^d, o^v = (1, 0) if (t mod P) < P/2 else (0, 1)                     (head oscillator, P = 60 steps)
    b^d_i = g(w_prop * s^d_{i-1})  for i > 0,   b^d_0 = g(w_osc * o^d)   (B-class motor neurons; same for v)
    m^d_i = g(w_ipsi * b^d_i + w_contra * b^v_i)                          (muscles; same for v with d <-> v)
    a_i   = m^d_i - m^v_i                                                 (torque in [-1, 1])

with g = clamp(0, 1) ("graded"). Proprioception comes from the previous (anterior) joint, so the oscillation
travels head to tail. w_prop, w_osc, w_ipsi are excitatory (clamped to >= 0 in the forward pass), w_contra
inhibitory (clamped to <= 0); the raw parameters are unconstrained. Initialisation is constant: +1 / -1.
With weight sharing the 4 weights serve every segment, so the same parameters drive any body length
(`load_pretrained(folder, n_links=9)` or `transfer_to(model, 9)` moves a 6-link circuit to 9 links). Unshared: 2(J-1) + 2 + 4J = 6J weights.

The ablation switches follow the official code: `weight_sharing`, `sign_constraints` (off: no clamping; a
constant init then draws +-1 at random), `constant_init` (off: uniform [0, 1] / [-1, 0], unsigned [-1, 1]),
`proprioception`, `head_oscillator`.

Control units (the official `include_speed_control` / `include_turn_control` / `n_turn_joints`), off by default:

    b^d_i += w_speed * (1 - clip(speed, 0, 1))   every joint; w_speed inhibitory (a brake: speed 1 = swim freely)
    b^d_i += w_turn * clip(right, 0, 1)          for i < n_turn_joints; b^v_i the same with `left`; w_turn excitatory

With them the observation carries the controls between the joint angles and the clock:
[joint angles (J), right, left, speed, t / time_scale] (only the units that are on, in that order). The shared
weights are `speed` and `turn` (init -1 / +1); unshared, (dorsal, ventral) rows per joint: speed (2, J), turn
(2, n_turn_joints). `ncap_navigator` (below) computes the controls from dm_control's `to_target`.

Observations: the circuit reads the joint angles at `obs[joint_offset : joint_offset + J]` and its clock from
the last entry, the normalised elapsed time t / time_scale in [0, 1] (gymnasium's TimeAwareObservation with
normalize_time=True; the official Tonic runs appended TimeFeature in [-1, 1] and mapped it back the same way).
The circuit reads raw observations; policies that want normalised inputs carry their own `RunningNorm`.

As a zoo model NCAP reads a swimmer's observation (`DataSpec` input "observation" with `n_links` and
`joint_offset` in its extras) and predicts continuous actions; `.logits` of its `ModelOutput` are the torques.
The harness (`biozoo.train.policy.as_policy`) adds the exploration noise and a critic for training.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from biozoo._core import DataSpec, ModelOutput, SpecError

from ._hub import PretrainedMixin
from ._registry import register_model
from .errors import BiozooError, check_shape


INHIBITORY = ("muscle_contra", "speed")  # weights clamped to <= 0 (init -1); the others to >= 0 (init +1)


def graded(x: torch.Tensor) -> torch.Tensor:
    """clamp(x, 0, 1) whose gradient also passes at the bounds. torch's clamp gives 0 gradient at exactly 0 or
    1, where the constant init puts the head B-neurons and muscles, so the oscillator weight would never learn."""
    inside = (x >= 0) & (x <= 1)
    return torch.where(inside, x, x.detach().clamp(0.0, 1.0))


@register_model(name="ncap")
class NCAP(PretrainedMixin, nn.Module):
    """The swimmer circuit (module docstring). forward(obs (B, D)) -> ModelOutput with torques (B, J) as logits."""

    reads = ("observation",)
    predicts = ("continuous_actions",)

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        if "n_links" not in spec.extras:
            raise SpecError(f"ncap cannot take {spec.describe_input()} without a body: it reads a swimmer's joint "
                            "angles (a task with n_links)")
        return {"n_links": spec.extras["n_links"], "joint_offset": spec.extras.get("joint_offset", 0), **kwargs}

    def __init__(self, n_links: int = 6, oscillator_period: int = 60, weight_sharing: bool = True,
                 sign_constraints: bool = True, constant_init: bool = True, proprioception: bool = True,
                 head_oscillator: bool = True, joint_offset: int = 0, joint_limit: float | None = None,
                 time_scale: float = 1000.0, turn_control: bool = False, speed_control: bool = False,
                 n_turn_joints: int = 1):
        super().__init__()
        if n_links < 3:
            raise BiozooError(f"ncap needs n_links >= 3 (2 joints), got {n_links}")
        if turn_control and not 1 <= n_turn_joints <= n_links - 1:
            raise BiozooError(f"n_turn_joints must be in [1, {n_links - 1}] for {n_links} links, got {n_turn_joints}")
        self.turn_control, self.speed_control, self.n_turn_joints = turn_control, speed_control, n_turn_joints
        self.n_controls = 2 * turn_control + speed_control
        self.n_links, self.n_joints = n_links, n_links - 1
        self.oscillator_period, self.time_scale = oscillator_period, time_scale
        self.weight_sharing, self.sign_constraints = weight_sharing, sign_constraints
        self.proprioception, self.head_oscillator = proprioception, head_oscillator
        self.joint_offset = joint_offset
        self.joint_limit = joint_limit if joint_limit is not None else 2 * math.pi / n_links
        j = self.n_joints
        # shared: one weight for every segment and both sides; unshared: rows (dorsal, ventral) per joint
        shapes = {"prop": (1,) if weight_sharing else (2, j - 1), "osc": (1,) if weight_sharing else (2, 1),
                  "muscle_ipsi": (1,) if weight_sharing else (2, j), "muscle_contra": (1,) if weight_sharing else (2, j)}
        if not proprioception:
            del shapes["prop"]
        if not head_oscillator:
            del shapes["osc"]
        if speed_control:
            shapes["speed"] = (1,) if weight_sharing else (2, j)
        if turn_control:
            shapes["turn"] = (1,) if weight_sharing else (2, n_turn_joints)
        for name, shape in shapes.items():
            sign = -1.0 if name in INHIBITORY else 1.0
            self.register_parameter(name, nn.Parameter(self._init(shape, sign, sign_constraints, constant_init)))

    @staticmethod
    def _init(shape: tuple[int, ...], sign: float, signed: bool, constant: bool) -> torch.Tensor:
        if signed and constant:
            return torch.full(shape, sign)
        if signed:
            return torch.rand(shape) * sign
        if constant:  # unsigned constant: +1 or -1 with probability 1/2
            return torch.where(torch.rand(shape) < 0.5, 1.0, -1.0)
        return torch.rand(shape) * 2 - 1

    def excitatory(self, w: torch.Tensor) -> torch.Tensor:
        return w.clamp(min=0) if self.sign_constraints else w

    def inhibitory(self, w: torch.Tensor) -> torch.Tensor:
        return w.clamp(max=0) if self.sign_constraints else w

    def sides(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dorsal, ventral) weights, broadcastable over (B, joints)."""
        return (w, w) if self.weight_sharing else (w[0], w[1])

    def oscillator(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phase = torch.remainder(t.round(), self.oscillator_period)
        dorsal = (phase < self.oscillator_period // 2).to(t.dtype)
        return dorsal, 1 - dorsal

    def effective_weights(self) -> dict[str, torch.Tensor]:
        """The weights as the circuit uses them (after the sign constraints)."""
        return {name: (self.inhibitory(p) if name in INHIBITORY else self.excitatory(p)).detach()
                for name, p in self.named_parameters()}

    def forward(self, obs: torch.Tensor, timestep: torch.Tensor | None = None) -> ModelOutput:
        b_d, b_v = self.bneurons(obs, timestep)
        ipsi_d, ipsi_v = self.sides(self.excitatory(self.muscle_ipsi))
        contra_d, contra_v = self.sides(self.inhibitory(self.muscle_contra))
        m_d = graded(b_d * ipsi_d + b_v * contra_d)
        m_v = graded(b_v * ipsi_v + b_d * contra_v)
        return ModelOutput(m_d - m_v)

    def bneurons(self, obs: torch.Tensor, timestep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The dorsal and ventral B-neuron activities, (B, J) each."""
        j, start, c = self.n_joints, self.joint_offset, self.n_controls
        controls = f", the {c} controls after them" if c else ""
        check_shape("ncap", obs, f"(B, D) with D >= {start + j + c + 1}: joint angles at [{start}:{start + j}]"
                    f"{controls} and the normalised time last", obs.dim() == 2 and obs.shape[1] >= start + j + c + 1)
        x = (obs[:, start:start + j] / self.joint_limit).clamp(-1, 1)
        s_d, s_v = x.clamp(0, 1), (-x).clamp(0, 1)
        zero = torch.zeros_like(x[:, :1])
        if self.head_oscillator:
            t = obs[:, -1:] * self.time_scale if timestep is None else timestep.reshape(-1, 1).to(obs.dtype)
            o_d, o_v = self.oscillator(t)
            w_d, w_v = self.sides(self.excitatory(self.osc))
            head_d, head_v = o_d * w_d.reshape(-1)[:1], o_v * w_v.reshape(-1)[:1]
        else:
            head_d = head_v = zero
        if self.proprioception:
            w_d, w_v = self.sides(self.excitatory(self.prop))
            body_d, body_v = s_d[:, :-1] * w_d, s_v[:, :-1] * w_v
        else:
            body_d = body_v = zero.expand(-1, j - 1)
        b_d, b_v = torch.cat([head_d, body_d], 1), torch.cat([head_v, body_v], 1)
        if c:
            b_d, b_v = self.add_controls(obs[:, start + j:start + j + c], b_d, b_v)
        return graded(b_d), graded(b_v)

    def add_controls(self, controls: torch.Tensor, b_d: torch.Tensor, b_v: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """B-neuron inputs plus the speed brake (every joint) and the turn drives (the first n_turn_joints)."""
        if self.speed_control:
            brake = 1 - graded(controls[:, -1:])
            w_d, w_v = self.sides(self.inhibitory(self.speed))
            b_d, b_v = b_d + brake * w_d, b_v + brake * w_v
        if self.turn_control:
            n = self.n_turn_joints
            w_d, w_v = self.sides(self.excitatory(self.turn))
            pad = b_d.new_zeros(b_d.shape[0], self.n_joints - n)
            b_d = b_d + torch.cat([graded(controls[:, :1]) * w_d.expand(n), pad], 1)
            b_v = b_v + torch.cat([graded(controls[:, 1:2]) * w_v.expand(n), pad], 1)
        return b_d, b_v


def transfer_to(policy: nn.Module, n_links: int) -> nn.Module:
    """The same weights in a policy rebuilt for another body length. Only shared-weight circuits transfer;
    anything else raises a one-line CheckpointError naming the mismatched weights."""
    from ._hub import check_state_dict
    from ._registry import create_model

    config = policy.biozoo_config()
    if "n_links" not in config["kwargs"]:
        raise BiozooError(f"{config['model']} has no n_links argument, so it cannot move to another body")
    new = create_model(config["model"], **{**config["kwargs"], "n_links": n_links})
    state = policy.state_dict()
    check_state_dict(new, {k: tuple(v.shape) for k, v in state.items()}, f"{config['model']} -> n_links={n_links}")
    new.load_state_dict(state)
    return new.eval()


# Registered variants -------------------------------------------------------------------------------------------

@register_model
def ncap_unshared(n_links: int = 6, oscillator_period: int = 60, joint_offset: int = 0) -> NCAP:
    """NCAP without weight sharing: 6J weights (30 for 6 links); does not transfer across body lengths."""
    return NCAP(n_links, oscillator_period, weight_sharing=False, joint_offset=joint_offset)


# learned navigator starts: (weight, bias) of Linear(2, 3): (x, |y|) -> (right, left, speed); "official" = torch's
TASK_INITS = {"official": None, "neutral": ([[0.0, 0.0]] * 3, [0.0, 0.0, 1.0]),
              "hardcoded": ([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]], [-0.5, -0.5, -0.7])}


@register_model(name="ncap_navigator")
class NCAPNavigator(PretrainedMixin, nn.Module):
    """NCAP with its turn and speed units driven by the target (the official `SwimmerPolicy(use_task=...)`).

    Reads dm_control's swimmer observation: joint angles (J) at `joint_offset`, `to_target` (the target in the
    head frame, x then y) right after them, the normalised time last (biozoo/SwimmerNavigate-v0 with the time
    feature). With x = -to_target_x and y = to_target_y:
    - task "hardcoded": right = [x > turn_range], left = [x < -turn_range], speed = [|y| > speed_range]
      (0.1 and 0.12 m, the official values): turn toward the target, stop once it is just ahead or behind;
    - task "learned": (right, left, speed) = Linear(2, 3)(x, |y|). `task_init="official"` keeps torch's default
      init (the official code); "neutral" starts at zero weights and biases (0, 0, 1): no turning, full speed,
      i.e. the plain swimming circuit; "hardcoded" starts at a clipped-linear copy of the fixed mapping:
      right = 10 x - 0.5, left = -10 x - 0.5, speed = 10 |y| - 0.7 (each clipped to [0, 1] by the circuit).
    The circuit is `ncap` with turn_control and speed_control (6 shared weights); `train_circuit=False` freezes
    it (requires_grad off), so training changes the navigation mapping only.
    """

    reads = ("observation",)
    predicts = ("continuous_actions",)

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        return NCAP.spec_kwargs.__func__(cls, spec, kwargs)

    def __init__(self, n_links: int = 6, task: str = "hardcoded", n_turn_joints: int = 1,
                 turn_sensor_range: float = 0.1, speed_sensor_range: float = 0.12, task_init: str = "official",
                 oscillator_period: int = 60, weight_sharing: bool = True, sign_constraints: bool = True,
                 constant_init: bool = True, joint_offset: int = 0, train_circuit: bool = True):
        super().__init__()
        if task not in ("hardcoded", "learned"):
            raise BiozooError(f"ncap_navigator task must be 'hardcoded' or 'learned', got {task!r}")
        if task_init not in TASK_INITS:
            raise BiozooError(f"ncap_navigator task_init must be one of {', '.join(TASK_INITS)}, got {task_init!r}")
        self.task, self.joint_offset = task, joint_offset
        self.turn_sensor_range, self.speed_sensor_range = turn_sensor_range, speed_sensor_range
        self.circuit = NCAP(n_links, oscillator_period, weight_sharing, sign_constraints, constant_init,
                            turn_control=True, speed_control=True, n_turn_joints=n_turn_joints)
        self.circuit.requires_grad_(train_circuit)
        self.n_links, self.n_joints = n_links, n_links - 1
        if task == "learned":
            self.task_module = nn.Linear(2, 3)  # (x, |y|) -> (right, left, speed)
            if task_init != "official":
                with torch.no_grad():
                    self.task_module.weight.copy_(torch.tensor(TASK_INITS[task_init][0]))
                    self.task_module.bias.copy_(torch.tensor(TASK_INITS[task_init][1]))

    def controls(self, to_target: torch.Tensor) -> torch.Tensor:
        """(B, 2) target in the head frame -> (B, 3) right, left, speed."""
        x, y = -to_target[:, :1], to_target[:, 1:2]
        if self.task == "learned":
            return self.task_module(torch.cat([x, y.abs()], 1))
        right, left = x > self.turn_sensor_range, x < -self.turn_sensor_range
        return torch.cat([right, left, y.abs() > self.speed_sensor_range], 1).to(to_target.dtype)

    def effective_weights(self) -> dict[str, torch.Tensor]:
        return self.circuit.effective_weights()

    def circuit_obs(self, obs: torch.Tensor) -> torch.Tensor:
        """The circuit's input: [joint angles, right, left, speed, t / 1000]."""
        j, start = self.n_joints, self.joint_offset
        check_shape("ncap_navigator", obs, f"(B, D) with D >= {start + j + 3}: joint angles at [{start}:{start + j}], "
                    "to_target after them and the normalised time last", obs.dim() == 2 and obs.shape[1] >= start + j + 3)
        joints, to_target = obs[:, start:start + j], obs[:, start + j:start + j + 2]
        return torch.cat([joints, self.controls(to_target), obs[:, -1:]], 1)

    def forward(self, obs: torch.Tensor) -> ModelOutput:
        return self.circuit(self.circuit_obs(obs))
