"""The field's own libraries as zoo models, each built by its library (optional extra `peers`:
`pip install -e ".[peers]"`):

- `cfc`, `ltc`: ncps's closed-form continuous-time (Hasani et al. 2022, Nat. Mach. Intell.) and liquid
  time-constant (Hasani et al. 2021, AAAI) cells wired by `AutoNCP` (Lechner et al. 2020, the neural circuit
  policy wiring: sensory -> inter -> command -> motor neurons, sparse), a linear readout of the motor neurons.
- `lif_snn`: an snnTorch network of leaky integrate-and-fire neurons (Eshraghian et al. 2023, Proc. IEEE), the input
  as a current each step, a hidden layer of spiking neurons trained through a fast-sigmoid surrogate gradient, and a
  non-spiking leaky output layer whose membrane potential is the answer (snnTorch's tutorial readout). Its spikes
  are `ModelOutput.extras["spikes"]` (for activation sparsity).

All three step through time: the answer at step t reads steps <= t (they link to online tasks). Sequences
(B, T, F), (B, T) or an image row by row; one answer per step or the last; one observation step (B, F) with
`state` runs them as recurrent policies (`initial_state`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from biozoo._core import DataSpec, ModelOutput, SpecError

from ._hub import PretrainedMixin
from ._registry import register_model
from .baselines import as_steps
from .errors import BiozooError, check_shape


def import_peer(module: str, extra: str = "peers") -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise BiozooError(f"this model is built by {module.split('.')[0]}, which is not installed: "
                          f'pip install -e ".[{extra}]"') from None


class StepModel(PretrainedMixin, nn.Module):
    """What the peer models share: the spec's dimensions, the input layouts, one answer per step or the last."""

    reads = ("sequence", "image", "observation")
    predicts = ("classes", "regression", "discrete_actions", "continuous_actions")
    online = True

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        if spec.input == "observation":
            return {"input_size": spec.in_features, "num_classes": spec.classes, **kwargs}
        length, features = spec.sequence_shape
        if spec.positions not in ((), (length,)):
            raise SpecError(f"{cls.registry_name} cannot predict {spec.describe_target()}: it answers at every step "
                            "or the last")
        return {"input_size": features, "num_classes": spec.classes, "per_step": bool(spec.positions), **kwargs}

    input_size: int
    per_step: bool

    def steps(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(B, T, F) and whether x was one observation step (B, F)."""
        one_step = x.dim() == 2 and x.size(1) == self.input_size and self.input_size != 1
        x = x.unsqueeze(1) if one_step else as_steps(x, self.input_size)
        check_shape(self.registry_name, x, f"(B, T, {self.input_size}), one step (B, {self.input_size}) or an image "
                    f"(B, C, H, W) with C*W = {self.input_size}", x.dim() == 3 and x.size(-1) == self.input_size)
        return x, one_step

    def answer(self, per_step: torch.Tensor, one_step: bool, **fields: Any) -> ModelOutput:
        """(B, T, C) answers -> `.logits` (B, C, T), or (B, C) at the last step."""
        logits = per_step.transpose(1, 2) if self.per_step and not one_step else per_step[:, -1]
        return ModelOutput(logits, **fields)


class NCPModel(StepModel):
    library_cell = ""

    def __init__(self, input_size: int = 3, num_classes: int = 3, units: int = 32, motor_neurons: int = 8,
                 sparsity_level: float = 0.5, wiring_seed: int = 22222, per_step: bool = True, **cell_kwargs: Any):
        super().__init__()
        torch_ncps, wirings = import_peer("ncps.torch"), import_peer("ncps.wirings")
        if not 0 < motor_neurons < units - 2:
            raise BiozooError(f"AutoNCP needs 0 < motor_neurons < units - 2, got {motor_neurons} and {units}")
        self.input_size, self.num_classes, self.units, self.per_step = input_size, num_classes, units, per_step
        wiring = wirings.AutoNCP(units, motor_neurons, sparsity_level=sparsity_level, seed=wiring_seed)
        self.rnn = getattr(torch_ncps, self.library_cell)(input_size, wiring, batch_first=True, **cell_kwargs)
        self.head = nn.Linear(motor_neurons, num_classes)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.zeros(batch_size, self.units, device=device)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> ModelOutput:
        x, one_step = self.steps(x)
        motor, state = self.rnn(x, state)
        return self.answer(self.head(motor), one_step, state=state)


@register_model(name="cfc")
class CfCModel(NCPModel):
    """ncps `CfC` on an `AutoNCP(units, motor_neurons)` wiring, then Linear(motor_neurons, num_classes)."""

    library_cell = "CfC"

    def __init__(self, input_size: int = 3, num_classes: int = 3, units: int = 32, motor_neurons: int = 8,
                 sparsity_level: float = 0.5, wiring_seed: int = 22222, per_step: bool = True,
                 mode: str = "default"):
        super().__init__(input_size, num_classes, units, motor_neurons, sparsity_level, wiring_seed, per_step,
                         mode=mode)


@register_model(name="ltc")
class LTCModel(NCPModel):
    """ncps `LTC` (an ODE solved in `ode_unfolds` semi-implicit steps per input step) on an `AutoNCP` wiring."""

    library_cell = "LTC"

    def __init__(self, input_size: int = 3, num_classes: int = 3, units: int = 32, motor_neurons: int = 8,
                 sparsity_level: float = 0.5, wiring_seed: int = 22222, per_step: bool = True, ode_unfolds: int = 6):
        super().__init__(input_size, num_classes, units, motor_neurons, sparsity_level, wiring_seed, per_step,
                         ode_unfolds=ode_unfolds)


@register_model(name="lif_snn")
class LIFNetwork(StepModel):
    """Linear -> snnTorch `Leaky` (spiking, fast-sigmoid surrogate of slope `slope`) -> Linear -> `Leaky` output
    (no spikes; its membrane potential is the answer). `beta`: the membrane decay per step."""

    def __init__(self, input_size: int = 3, num_classes: int = 3, hidden_size: int = 128, beta: float = 0.9,
                 slope: float = 25.0, learn_beta: bool = True, per_step: bool = True):
        super().__init__()
        snn, surrogate = import_peer("snntorch"), import_peer("snntorch.surrogate")
        self.input_size, self.num_classes, self.hidden_size, self.per_step = input_size, num_classes, hidden_size, \
            per_step
        self.fc_in = nn.Linear(input_size, hidden_size)
        self.lif = snn.Leaky(beta=beta, spike_grad=surrogate.fast_sigmoid(slope=slope), learn_beta=learn_beta)
        self.fc_out = nn.Linear(hidden_size, num_classes)
        self.readout = snn.Leaky(beta=beta, learn_beta=learn_beta, reset_mechanism="none")

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden membrane (B, H), output membrane (B, C)): zeros."""
        return (torch.zeros(batch_size, self.hidden_size, device=device),
                torch.zeros(batch_size, self.num_classes, device=device))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        x, one_step = self.steps(x)
        mem, out_mem = state if state is not None else self.initial_state(x.size(0), x.device)
        current = self.fc_in(x)  # (B, T, H), every step at once
        answers, spikes = [], []
        for t in range(x.size(1)):
            spike, mem = self.lif(current[:, t], mem)
            _, out_mem = self.readout(self.fc_out(spike), out_mem)
            answers.append(out_mem)
            spikes.append(spike)
        return self.answer(torch.stack(answers, 1), one_step, state=(mem, out_mem),
                           extras={"spikes": torch.stack(spikes, 1)})


__all__ = ["CfCModel", "LIFNetwork", "LTCModel", "import_peer"]
