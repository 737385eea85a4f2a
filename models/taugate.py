"""TauGate: dopamine-style "brain modes" on a frozen network (activation-gated PEFT by threshold and gain).

Ghasemlou, "Dopamine: Brain Modes, Not Brains -- Activation-Gated PEFT via Threshold-and-Gain Tuning",
arXiv 2602.11726 (2026). No official code exists; this follows the abstract and the formulation in the
reference sheet. Every base weight is frozen. After each hidden activation `a` (ReLU/GELU/SiLU/... that follows a
Linear or a Conv) a per-neuron gate with a threshold tau_j and a gain gamma_j is inserted:

    soft (training):   h_j = gamma_j * sigmoid((a_j - tau_j) / T) * a_j
    hard (inference):  h_j = gamma_j * 1[a_j > tau_j] * a_j

so 2 parameters are trained per gated neuron (a conv channel counts as one neuron). The temperature T is a
buffer that a schedule may anneal (`set_temperature`). Choices the abstract leaves open: the gate acts on the
post-activation `a` (not on the pre-activation), the classifier head stays frozen, gamma is unconstrained (it may
change sign), and there is no sparsity penalty.

Initialisation (exact start). gamma = 1 and tau = lower_bound(activation) - margin * T (margin 16, T 0.05 by
default). The hard gate then passes every value (a >= lower_bound > tau), so it is the identity exactly; the soft
gate differs from 1 by at most exp(-margin) and the error |a| * (1 - g) is below 1.2e-7 * max(T, |lower_bound|)
for ReLU (a >= 0), GELU (a >= -0.17), SiLU (a >= -0.2785) and Tanh (a >= -1): the wrapped model starts equal
to the base to well within 1e-5 in both modes.

Surrogate gradient for tau (our addition, needed by the exact start). A gate that is exactly open everywhere is
saturated, so the true d h / d tau there is ~exp(-16) -- below Adam's epsilon, and tau would never move. In soft
mode the forward value is exactly the formula above, but the gradient that reaches tau is that of a wider gate,
sigmoid((a - tau) / w) with w = `surrogate_width` (0.5; w <= T gives the exact gradient). Gradients to gamma and
to the activations are exact.

Gates are forward hooks on the activation modules, so the base keeps its own modules, names and state dict.
Modes are adapters: `save_adapter` writes only tau and gamma (safetensors) with a config naming the base and a
fingerprint of its weights; `load_adapter(path, name)` checks the fingerprint; `use_mode(name)` swaps the gate
values in place (the base is never copied) and `use_mode(None)` disables the gates, which is the base exactly.

    from biozoo.models import create_model
    from biozoo.models.taugate import TauGate

    model = TauGate.wrap(create_model("mlp", in_features=64))   # base frozen; 1,024 trainable for 64-256-256-10
    ... train model (only tau and gamma have requires_grad) ...
    model.save_adapter("adapters/rotated")
    model.load_adapter("adapters/rotated", "rotated"); model.use_mode("rotated"); model.use_mode(None)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ._hub import PretrainedMixin, first_line
from ._registry import create_model, register_model, suggest
from .errors import BiozooError, CheckpointError, ShapeError, UnknownNameError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "biozoo-taugate-adapter"

# The smallest value each gateable activation can output: tau starts below it, so every unit passes at init.
LOWER_BOUNDS: dict[type[nn.Module], float] = {
    nn.ReLU: 0.0, nn.ReLU6: 0.0, nn.GELU: -0.17, nn.SiLU: -0.2785, nn.Tanh: -1.0,
}
PRODUCERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# layers that may sit between the Linear/Conv and its activation without changing the neuron count
PASS_THROUGH = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.Identity)
GATE_MODES = ("auto", "soft", "hard")


class NeuronGate(nn.Module):
    """The gate of one layer: `num_neurons` thresholds and gains along `neuron_dim` (-1 for Linear, 1 for Conv)."""

    def __init__(self, num_neurons: int, neuron_dim: int, lower_bound: float, temperature: float = 0.05,
                 init_margin: float = 16.0, surrogate_width: float = 0.5):
        super().__init__()
        self.surrogate_width = float(surrogate_width)
        self.num_neurons, self.neuron_dim = num_neurons, neuron_dim
        self.tau = nn.Parameter(torch.full((num_neurons,), lower_bound - init_margin * temperature))
        self.gamma = nn.Parameter(torch.ones(num_neurons))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.mode = "auto"  # auto: soft while training, hard in eval
        self.enabled = True  # off: the activation passes unchanged (the base mode)
        self.record = False
        self.last_input: torch.Tensor | None = None  # the pre-gate activation, kept only while recording

    def _per_neuron(self, p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        shape = [1] * a.dim()
        shape[self.neuron_dim] = self.num_neurons
        return p.view(shape)

    def is_hard(self) -> bool:
        return self.mode == "hard" or (self.mode == "auto" and not self.training)

    def gate(self, a: torch.Tensor, hard: bool | None = None) -> torch.Tensor:
        """g in [0, 1] per element: 1[a > tau] (hard) or sigmoid((a - tau) / T) (soft)."""
        tau = self._per_neuron(self.tau, a)
        if self.is_hard() if hard is None else hard:
            return (a > tau).to(a.dtype)
        width = self.surrogate_width
        if width <= float(self.temperature) or not torch.is_grad_enabled():
            return torch.sigmoid((a - tau) / self.temperature)
        # same value; the gradient reaching tau is that of a gate of width `width` (a surrogate gradient)
        surrogate = torch.sigmoid((a.detach() - tau) / width)
        return torch.sigmoid((a - tau.detach()) / self.temperature) + (surrogate - surrogate.detach())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.dim() < 2 or a.shape[self.neuron_dim] != self.num_neurons:
            raise ShapeError(f"TauGate gate expects {self.num_neurons} neurons on dim {self.neuron_dim}, "
                             f"got activation of shape {tuple(a.shape)}")
        gamma = self._per_neuron(self.gamma, a)
        if self.is_hard():
            return torch.where(a > self._per_neuron(self.tau, a), gamma * a, torch.zeros_like(a))
        return gamma * self.gate(a, hard=False) * a

    def hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on the activation module (a bound method, so deep copies stay wired to their gates)."""
        if self.record:
            self.last_input = output.detach()
        return self(output) if self.enabled else None

    def extra_repr(self) -> str:
        return f"num_neurons={self.num_neurons}, neuron_dim={self.neuron_dim}, mode={self.mode!r}"


def find_gate_sites(model: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """(path, activation module, neuron count, neuron dim) for each supported activation module that follows a
    Linear or Conv in registration order (norm layers in between are allowed). Functional activations
    (F.relu inside forward) are invisible here and stay ungated."""
    sites, producer = [], None
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        if isinstance(module, PRODUCERS):
            producer = module
        elif isinstance(module, PASS_THROUGH):
            continue
        elif type(module) in LOWER_BOUNDS and producer is not None:
            is_linear = isinstance(producer, nn.Linear)
            width = producer.out_features if is_linear else producer.out_channels
            sites.append((name, module, width, -1 if is_linear else 1))
            producer = None
        else:
            producer = None
    return sites


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and values of a model's state dict: the identity of a base."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class TauGate(PretrainedMixin, nn.Module):
    """A frozen base with a threshold-and-gain gate after each hidden activation. Build it with `TauGate.wrap`."""

    def __init__(self, base: nn.Module, temperature: float = 0.05, init_margin: float = 16.0,
                 surrogate_width: float = 0.5):
        super().__init__()
        if getattr(base, "_taugate_hooks", None):
            raise BiozooError(f"this {type(base).__name__} is already wrapped by a TauGate; wrap each base once")
        sites = find_gate_sites(base)
        if not sites:
            raise BiozooError(f"TauGate found no ReLU/GELU/SiLU/Tanh module after a Linear or Conv in "
                              f"{type(base).__name__} (functional activations such as F.relu cannot be gated)")
        self.base = base
        self.init_temperature, self.init_margin = float(temperature), float(init_margin)
        self.surrogate_width = float(surrogate_width)
        for p in base.parameters():
            p.requires_grad_(False)
        self.gate_names = [name for name, *_ in sites]
        self.gates = nn.ModuleList(NeuronGate(n, dim, LOWER_BOUNDS[type(act)], temperature, init_margin, surrogate_width)
                                   for _, act, n, dim in sites)
        self.activations = [type(act).__name__ for _, act, *_ in sites]
        self.current_mode: str | None = "trainable"
        self.modes: dict[str, dict[str, torch.Tensor]] = {}
        hooks = [act.register_forward_hook(gate.hook) for (_, act, *_), gate in zip(sites, self.gates)]
        object.__setattr__(base, "_taugate_hooks", hooks)
        self._base_fingerprint: str | None = None

    @classmethod
    def wrap(cls, base_model: nn.Module, temperature: float = 0.05, init_margin: float = 16.0,
             surrogate_width: float = 0.5) -> "TauGate":
        """Freeze `base_model` and gate every hidden activation; the result starts equal to the base."""
        return cls(base_model, temperature, init_margin, surrogate_width)

    @property
    def enabled(self) -> bool:
        return self.gates[0].enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for gate in self.gates:
            gate.enabled = value

    def unwrap(self) -> nn.Module:
        """Remove the gates from the base (it stays frozen) and return it."""
        for handle in getattr(self.base, "_taugate_hooks", []):
            handle.remove()
        object.__setattr__(self.base, "_taugate_hooks", [])
        return self.base

    def forward(self, x: torch.Tensor) -> Any:
        return self.base(x)

    # configuration ------------------------------------------------------------------------------------------

    def set_mode(self, mode: str) -> "TauGate":
        """'soft' or 'hard' gates in every state, or 'auto' (soft while training, hard in eval; the default)."""
        if mode not in GATE_MODES:
            raise UnknownNameError(f"unknown gate mode {mode!r}: use one of {', '.join(GATE_MODES)}")
        for gate in self.gates:
            gate.mode = mode
        return self

    @property
    def temperature(self) -> float:
        return float(self.gates[0].temperature)

    def set_temperature(self, temperature: float) -> "TauGate":
        """Set T of every soft gate (anneal it towards 0 to close the soft/hard gap)."""
        if not temperature > 0:
            raise BiozooError(f"TauGate temperature must be > 0, got {temperature}")
        for gate in self.gates:
            gate.temperature.fill_(float(temperature))
        return self

    def parameter_counts(self) -> dict[str, int]:
        """{"trainable": 2 per gated neuron, "total": base + gates}."""
        return {"trainable": self.num_parameters(trainable_only=True), "total": self.num_parameters()}

    def biozoo_config(self) -> dict[str, Any]:
        config = getattr(self.base, "biozoo_config", None)
        if config is None:
            raise CheckpointError(f"the base {type(self.base).__name__} is not a zoo model, so this TauGate "
                                  "cannot be saved portably; save an adapter with save_adapter instead")
        return {"model": "taugate", "kwargs": {"base": config(), "temperature": self.init_temperature,
                                               "init_margin": self.init_margin,
                                               "surrogate_width": self.surrogate_width}}

    # attribution ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def active_neurons(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: bool (B, neurons[, ...])}: the units that pass the hard gate (a > tau) and fire (a > 0) on
        each input. Uses the current mode's gate values; with the gates off (`use_mode(None)`), tau = -inf."""
        for gate in self.gates:
            gate.record = True
        try:
            self.base(x)
            out = {}
            for name, gate in zip(self.gate_names, self.gates):
                a = gate.last_input
                passes = gate.gate(a, hard=True).bool() if self.enabled else torch.ones_like(a, dtype=torch.bool)
                out[name] = passes & (a > 0)
        finally:
            for gate in self.gates:
                gate.record, gate.last_input = False, None
        return out

    @torch.no_grad()
    def class_activity(self, x: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> dict[str, torch.Tensor]:
        """{layer: (classes, neurons)}: how often each neuron is active (see active_neurons) per class."""
        num_classes = num_classes or int(y.max()) + 1
        out = {}
        for name, active in self.active_neurons(x).items():
            neuron_dim = active.dim() - 1 if self.gates[self.gate_names.index(name)].neuron_dim == -1 else 1
            rate = active.float().movedim(neuron_dim, -1).flatten(1, -2) if active.dim() > 2 else active.float()[:, None]
            rate = rate.mean(1)  # average over positions for conv channels: (B, neurons)
            out[name] = torch.stack([rate[y == c].mean(0) if (y == c).any() else torch.zeros(rate.shape[1])
                                     for c in range(num_classes)])
        return out

    # modes as adapters ----------------------------------------------------------------------------------------

    def base_fingerprint(self) -> str:
        if self._base_fingerprint is None:  # the base is frozen, so its fingerprint never changes
            self._base_fingerprint = fingerprint(self.base)
        return self._base_fingerprint

    def gate_state(self) -> dict[str, torch.Tensor]:
        """The live gate values, {"<layer>.tau": ..., "<layer>.gamma": ...}."""
        return {f"{name}.{p}": getattr(gate, p).detach().clone()
                for name, gate in zip(self.gate_names, self.gates) for p in ("tau", "gamma")}

    def store_mode(self, name: str) -> None:
        """Keep the live gate values as mode `name` (e.g. after training)."""
        self.modes[name] = self.gate_state()

    def stored_mode(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.modes:
            known = ", ".join(sorted(self.modes)) or "none"
            raise UnknownNameError(f"unknown TauGate mode {name!r} (known: {known}).{suggest(name, list(self.modes))}"
                                   " Load one with load_adapter(path, name) or keep the live gates with store_mode(name)")
        return self.modes[name]

    def use_mode(self, name: str | None) -> "TauGate":
        """Switch to a stored or loaded mode (its tau/gamma go into the gates), or to the base itself with None."""
        if name is None:
            self.enabled, self.current_mode = False, None
            return self
        state = self.stored_mode(name)
        with torch.no_grad():
            for layer, gate in zip(self.gate_names, self.gates):
                gate.tau.copy_(state[f"{layer}.tau"])
                gate.gamma.copy_(state[f"{layer}.gamma"])
        self.enabled, self.current_mode = True, name
        return self

    def adapter_config(self) -> dict[str, Any]:
        config = getattr(self.base, "biozoo_config", None)
        base = config() if config is not None else {"model": type(self.base).__name__, "kwargs": None}
        return {"format": ADAPTER_FORMAT, "format_version": 1, "base": base,
                "base_fingerprint": self.base_fingerprint(), "temperature": self.temperature,
                "gates": [{"layer": n, "activation": act, "neurons": g.num_neurons, "neuron_dim": g.neuron_dim}
                          for n, act, g in zip(self.gate_names, self.activations, self.gates)]}

    def save_adapter(self, path: str | Path, mode: str | None = None) -> Path:
        """Write the gate values alone (the live ones, or a stored mode's) as adapter.safetensors +
        adapter_config.json in folder `path`."""
        state = self.gate_state() if mode is None else self.stored_mode(mode)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / ADAPTER_CONFIG).write_text(json.dumps(self.adapter_config(), indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in state.items()}, str(path / ADAPTER_WEIGHTS), metadata={"format": ADAPTER_FORMAT})
        return path

    def load_adapter(self, path: str | Path, name: str) -> "TauGate":
        """Read an adapter folder as mode `name`; refuses adapters trained on another base."""
        path = Path(path)
        config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
        if not config_file.exists() or not weights_file.exists():
            raise CheckpointError(f"no TauGate adapter at {path} (expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        if config.get("format") != ADAPTER_FORMAT:
            raise CheckpointError(f"{config_file} is not a TauGate adapter config (format {config.get('format')!r})")
        if config.get("base_fingerprint") != self.base_fingerprint():
            base = config.get("base", {}).get("model")
            raise CheckpointError(f"adapter {path} was trained on another base ({base}, fingerprint "
                                  f"{str(config.get('base_fingerprint'))[:12]}) than this one ({self.base_fingerprint()[:12]}); "
                                  "load it onto the base it was trained on")
        try:
            tensors = load_file(str(weights_file))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{weights_file} is not a readable safetensors file: {first_line(e)}") from None
        expected = {k: tuple(v.shape) for k, v in self.gate_state().items()}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != expected:
            raise CheckpointError(f"{weights_file} does not match this TauGate's gates "
                                  f"(layers {sorted({k.rsplit('.', 1)[0] for k in got})} vs {self.gate_names})")
        self.modes[name] = tensors
        return self


@register_model(name="taugate", hidden=True)
def taugate(base: dict[str, Any], temperature: float = 0.05, init_margin: float = 16.0,
            surrogate_width: float = 0.5) -> TauGate:
    """Rebuilds a saved TauGate: the base from its config, then the gates (their values load from the weights)."""
    return TauGate.wrap(create_model(base["model"], **base.get("kwargs", {})), temperature, init_margin,
                        surrogate_width)


# Activity of any model's hidden units (used to compare TauGate with LoRA, BitFit, ...) ---------------------------

@torch.no_grad()
def record_outputs(model: nn.Module, modules: Iterable[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Run `model(x)` and return the outputs of `modules` (after any gate hook on them), in order."""
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out.detach())) for m in modules]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def plot_class_activity(rates: dict[str, dict[str, torch.Tensor]], out: str | Path, title: str = "") -> Path:
    """Heatmaps of per-class firing rates: one row per mode ({mode: {layer: (classes, neurons)}}), one column per
    layer. Neurons are ordered by their mean rate in the first mode, so mode differences show as changed cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(rates)
    layers = list(rates[modes[0]])
    fig, axes = plt.subplots(len(modes), len(layers), figsize=(4.2 * len(layers), 2.1 * len(modes) + 0.6),
                             squeeze=False, sharex="col", gridspec_kw={"hspace": 0.35})
    for j, layer in enumerate(layers):
        order = rates[modes[0]][layer].mean(0).argsort(descending=True)
        for i, mode in enumerate(modes):
            ax = axes[i][j]
            im = ax.imshow(rates[mode][layer][:, order].numpy(), aspect="auto", vmin=0, vmax=1, cmap="magma",
                           interpolation="nearest")
            frac = float(rates[mode][layer].mean())
            ax.set_title(f"{mode} | {layer} (mean {frac:.0%} on)", fontsize=8)
            ax.set_ylabel("class", fontsize=8)
            ax.set_yticks(range(rates[mode][layer].shape[0]))
            ax.tick_params(labelsize=6)
            if i == len(modes) - 1:
                ax.set_xlabel("neuron (sorted by first-mode rate)", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.8, label="fraction of inputs active")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
