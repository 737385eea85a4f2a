"""TauGate: dopamine-style "brain modes" on a frozen network (activation-gated PEFT by threshold and gain).

Ghasemlou, "Dopamine: Brain Modes, Not Brains -- Activation-Gated PEFT via Threshold-and-Gain Tuning",
arXiv 2602.11726 (2026). No official code exists; this follows the abstract and the formulation in the
reference sheet. Every base weight is frozen. After each hidden activation `a` (ReLU/GELU/SiLU/... that follows a
Linear or a Conv, wherever it is computed) a per-neuron gate with a threshold tau_j and a gain gamma_j acts:

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

Where the gates go. `TauGate.wrap(model, example_input=...)` runs one forward under a TorchFunctionMode
(`CallTracer`) that sees every torch function call: each call of ReLU/ReLU6/GELU/SiLU/Tanh (as a module, as
`F.relu` inside a forward, or inside Hugging Face's GELUActivation and kin, which call the same functions) is a
site, sized from the last Linear/Conv before it (width, and the neuron axis: last for Linear, channels for Conv).
A shared activation module gets one gate per call (a ResNet Bottleneck's ReLU: three widths). Models can also
declare their neurons (`taugate_site`, e.g. the CTM's `neurons`, its post-activations z each tick): one gate per
neuron shared over the ticks, with tau starting below the lowest z the example input produced (less a quarter of
their range), so the start is exact on that distribution. A model that declares neurons gets those gates by
default (a CTM with an image backbone: its neurons, not the backbone's ReLUs); `include=` picks sites by name
(`["*"]`: all, `["neurons", "synapse_output"]`: a CTM's neurons and its optional synapse-output gate). The base
is never modified and keeps its names and state dict: the gates act only inside `TauGate.forward`, where the mode
is on (which also switches off fused fast paths that would skip the activations, such as
`nn.TransformerEncoderLayer`'s in eval). `describe()` lists the sites. Modes are adapters: `save_adapter` writes
only tau and gamma (safetensors) with a config naming the base and a fingerprint of its weights;
`load_adapter(path, name)` checks the fingerprint; `use_mode(name)` swaps the gate values in place (the base is
never copied) and `use_mode(None)` disables the gates, which is the base exactly.

    from biozoo.models import create_model
    from biozoo.models.taugate import TauGate

    model = TauGate.wrap(create_model("mlp", in_features=64))   # base frozen; 1,024 trainable for 64-256-256-10
    ... train model (only tau and gamma have requires_grad) ...
    model.save_adapter("adapters/rotated")
    model.load_adapter("adapters/rotated", "rotated"); model.use_mode("rotated"); model.use_mode(None)
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._hub import PretrainedMixin, first_line
from ._registry import create_model, register_model, suggest
from .errors import BiozooError, CheckpointError, ShapeError, UnknownNameError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_FORMAT = "biozoo-taugate-adapter"

# The gateable activations, as the functions that compute them (module activations call these too; so do Hugging
# Face's GELUActivation and kin), with the smallest value each can output: tau starts below it, so every unit
# passes at init.
ACTIVATION_FUNCTIONS: dict[Any, tuple[str, float]] = {
    F.relu: ("relu", 0.0), torch.relu: ("relu", 0.0), torch.Tensor.relu: ("relu", 0.0),
    F.relu6: ("relu6", 0.0), F.gelu: ("gelu", -0.17), F.silu: ("silu", -0.2785),
    torch.tanh: ("tanh", -1.0), torch.Tensor.tanh: ("tanh", -1.0), F.tanh: ("tanh", -1.0),
}
LOWER_BOUNDS: dict[str, float] = {name: bound for name, bound in ACTIVATION_FUNCTIONS.values()}
# the layers whose output neurons an activation gates: (function, neuron dim of its output)
PRODUCER_FUNCTIONS: dict[Any, int] = {F.linear: -1, F.conv1d: 1, F.conv2d: 1, F.conv3d: 1}
NEURON_MARGIN = 0.25  # of the range seen when sizing: tau's start below it, for declared neurons (CTM z)
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

    def apply(self, output: torch.Tensor) -> torch.Tensor:
        """The gated activation (or the activation itself while the gates are off)."""
        if self.record:
            self.last_input = output.detach()
        return self(output) if self.enabled else output

    def extra_repr(self) -> str:
        return f"num_neurons={self.num_neurons}, neuron_dim={self.neuron_dim}, mode={self.mode!r}"


def example_input_for(model: nn.Module) -> Any:
    """A small input for sizing the gates: `model.example_input()` where a model defines it, else one shaped for
    its first layer (Linear: (2, in_features); Conv: (2, C, 32[, 32[, 32]]); attention / transformer layers: 8
    tokens of embed_dim; Embedding: token ids)."""
    if callable(getattr(model, "example_input", None)):
        return model.example_input()
    for module in model.modules():
        if isinstance(module, nn.Linear):
            return torch.randn(2, module.in_features)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return torch.randn(2, module.in_channels, *[32] * (module.weight.dim() - 2))
        if isinstance(module, nn.MultiheadAttention):
            return torch.randn(2, 8, module.embed_dim) if module.batch_first else torch.randn(8, 2, module.embed_dim)
        if isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (2, 8))
    raise BiozooError(f"TauGate cannot guess an input for {type(model).__name__}; pass example_input=")


class CallTracer(TorchFunctionMode):
    """Sees every torch function call of a forward: the last Linear/Conv (its width and neuron dim) and each
    activation call, which it hands to `on_activation(site key, kind, output, producer)` for sizing or gating.

    A site is one call of an activation within one module: (innermost running module, k-th activation call in it
    during this forward), so a module activation called three times (a ResNet Bottleneck's shared ReLU) is three
    sites, and F.relu inside a block's forward is a site of that block. A module that declares `taugate_site`
    (the CTM's `neurons`, its post-activations z each tick) is one site for all its calls: the same neurons."""

    def __init__(self, names: dict[int, str], on_activation):
        super().__init__()
        self.names, self.on_activation = names, on_activation
        self.stack: list[str] = []
        self.counts: dict[str, int] = {}
        self.producer: tuple[int, int] | None = None  # (width, neuron dim) of the last Linear / Conv output
        self.handles: list[Any] = []

    def __enter__(self):
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        def push(module, _inputs):
            if id(module) in self.names:
                self.stack.append(self.names[id(module)])

        def pop(module, _inputs, output):
            if id(module) in self.names and self.stack:
                self.stack.pop()
            if getattr(module, "taugate_site", False) and id(module) in self.names:  # a model's declared neurons
                return self.on_activation((self.names[id(module)], -1), "neurons", output, None)
            return None

        self.handles = [register_module_forward_pre_hook(push), register_module_forward_hook(pop)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in PRODUCER_FUNCTIONS and len(args) > 1 and isinstance(args[1], torch.Tensor):
            self.producer = (int(args[1].shape[0]), PRODUCER_FUNCTIONS[func])
        elif func in ACTIVATION_FUNCTIONS and isinstance(out, torch.Tensor):
            where = self.stack[-1] if self.stack else ""
            k = self.counts.get(where, 0)
            self.counts[where] = k + 1
            out = self.on_activation((where, k), ACTIVATION_FUNCTIONS[func][0], out, self.producer)
        return out


def neuron_layout(output: torch.Tensor, producer: tuple[int, int] | None) -> tuple[int, int] | None:
    """(neurons, neuron dim) of an activation output: the producing layer's width where it matches, else the last
    dim of a (B, F) or (B, L, F) output; None where no neuron axis can be told."""
    if producer is not None:
        width, dim = producer
        if output.dim() >= 2 and output.shape[dim] == width:
            return width, dim
    if output.dim() in (2, 3):
        return int(output.shape[-1]), -1
    return None


def site_names(keys: list[tuple[str, int]], leaves: set[str]) -> list[str]:
    """Readable, stable names: a leaf activation module called once is its path ("features.1"); called more
    often, "path#k"; a functional call inside a module's forward, "path:k" (":k" at the top level)."""
    calls: dict[str, int] = {}
    for where, _ in keys:
        calls[where] = calls.get(where, 0) + 1
    return [(where if calls[where] == 1 else f"{where}#{k}") if where in leaves else f"{where}:{k}"
            for where, k in keys]


def find_gate_sites(model: nn.Module, example_input: Any = None) -> list[tuple[str, str, int, int]]:
    """(name, activation, neuron count, neuron dim) of every activation call in one forward of `model` on
    `example_input` (default: `example_input_for(model)`), in call order. Activation modules in any order,
    shared ones (one site per call), F.relu / F.gelu / F.silu / torch.tanh inside a forward and Hugging Face
    activation classes (they call the same functions) are all found; calls whose neuron axis cannot be told
    (no Linear/Conv before them, not a (B, F) or (B, L, F) output) are left ungated."""
    found = trace_sites(model, example_input)
    return [(name, kind, n, dim) for name, (_, kind, n, dim, _) in found.items()]


def trace_sites(model: nn.Module, example_input: Any = None) -> dict[str, tuple[tuple[str, int], str, int, int, float]]:
    """{name: (call key, activation, neurons, neuron dim, lower bound)} of one traced forward (find_gate_sites)."""
    names = {id(m): n for n, m in model.named_modules()}
    leaves = {n for n, m in model.named_modules() if not list(m.children())}
    raw: list[tuple[tuple[str, int], str, int, int]] = []
    lowest: dict[tuple[str, int], float] = {}
    highest: dict[tuple[str, int], float] = {}

    def record(key, kind, output, producer):
        if kind == "neurons":  # declared: (B, neurons), every call the same neurons
            if key not in lowest:
                raw.append((key, kind, int(output.shape[-1]), -1))
            lowest[key] = min(lowest.get(key, math.inf), float(output.min()))
            highest[key] = max(highest.get(key, -math.inf), float(output.max()))
            return output
        layout = neuron_layout(output, producer)
        if layout is not None:
            raw.append((key, kind, *layout))
        return output

    x = example_input_for(model) if example_input is None else example_input
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), CallTracer(names, record):
            model(*x) if isinstance(x, tuple) else model(x)
    except BiozooError:
        raise
    except Exception as e:  # noqa: BLE001 -- the probe's failure, in one line
        raise BiozooError(f"TauGate could not size its gates: {type(model).__name__} failed on an example input "
                          f"({type(e).__name__}: {first_line(e)[:160]}); pass example_input=") from None
    finally:
        model.train(was_training)
    names_ = site_names([r[0] for r in raw], leaves)
    names_ = [key[0] if kind == "neurons" else name for name, (key, kind, *_) in zip(names_, raw)]
    out = dict(zip(names_, raw))
    # an unbounded neuron's lower bound: the lowest value the probe saw, less a margin (NEURON_MARGIN of the
    # range seen, at least 1)
    bounds = {name: lowest[key] - max(1.0, NEURON_MARGIN * (highest[key] - lowest[key]))
              for name, (key, *_) in out.items() if key in lowest}
    return {name: (*site, bounds.get(name, LOWER_BOUNDS.get(site[1], 0.0))) for name, site in out.items()}


def select_sites(base: nn.Module, found: dict[str, tuple], include: list[str] | None) -> dict[str, tuple]:
    """The traced sites TauGate gates: those matching `include` (glob patterns), else the model's declared default
    sites (`taugate_site` modules without `taugate_default = False`) where it has any, else every activation."""
    if include is not None:
        return {n: site for n, site in found.items() if any(fnmatch.fnmatchcase(n, p) for p in include)}
    declared = {n: site for n, site in found.items() if site[0][1] == -1}
    default = {n: site for n, site in declared.items()
               if getattr(base.get_submodule(site[0][0]), "taugate_default", True)}
    return default or {n: site for n, site in found.items() if n not in declared}


def fingerprint(model: nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and values of a model's state dict: the identity of a base."""
    digest = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}|{value.dtype}|{tuple(value.shape)}|".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class TauGate(PretrainedMixin, nn.Module):
    """A frozen base with a threshold-and-gain gate after each hidden activation. Build it with `TauGate.wrap`."""

    def __init__(self, base: nn.Module, temperature: float = 0.05, init_margin: float = 16.0,
                 surrogate_width: float = 0.5, example_input: Any = None, include: list[str] | None = None):
        super().__init__()
        if getattr(base, "_taugate_wrapped", False):
            raise BiozooError(f"this {type(base).__name__} is already wrapped by a TauGate; wrap each base once")
        found = trace_sites(base, example_input)
        self.include = list(include) if include else None
        sites = select_sites(base, found, self.include)
        self._passthrough = {site[0] for name, site in found.items() if name not in sites}
        if not sites:
            what = f"matching {self.include} (sites: {', '.join(found) or 'none'})" if self.include else \
                "after a Linear or Conv"
            raise BiozooError(f"TauGate found no ReLU/GELU/SiLU/Tanh call {what} in {type(base).__name__}")
        self.base = base
        self.init_temperature, self.init_margin = float(temperature), float(init_margin)
        self.surrogate_width = float(surrogate_width)
        for p in base.parameters():
            p.requires_grad_(False)
        self.gate_names = list(sites)
        self.gates = nn.ModuleList(NeuronGate(n, dim, bound, temperature, init_margin, surrogate_width)
                                   for _, kind, n, dim, bound in sites.values())
        self.activations = [kind for _, kind, *_ in sites.values()]
        self._site_index = {key: i for i, (key, *_) in enumerate(sites.values())}
        self._module_names = {id(m): n for n, m in base.named_modules()}
        self._batch_norms = [m for m in base.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.current_mode: str | None = "trainable"
        self.modes: dict[str, dict[str, torch.Tensor]] = {}
        object.__setattr__(base, "_taugate_wrapped", True)
        self._base_fingerprint: str | None = None

    @classmethod
    def wrap(cls, base_model: nn.Module, temperature: float = 0.05, init_margin: float = 16.0,
             surrogate_width: float = 0.5, example_input: Any = None,
             include: list[str] | None = None) -> "TauGate":
        """Freeze `base_model` and gate every hidden activation; the result starts equal to the base. The gates
        are found and sized by one forward on `example_input` (default: `example_input_for(base_model)`).
        `include`: gate only the sites whose names (as `describe()` lists them) match one of these glob patterns,
        e.g. `["neurons", "synapse_output"]` for a CTM or `["*"]` for every site found. By default, a model that
        declares its neurons gets those (a CTM: its neurons z, 2 x d_model parameters, not its backbone's ReLUs);
        any other model every activation."""
        return cls(base_model, temperature, init_margin, surrogate_width, example_input, include)

    def describe(self) -> str:
        """The gated sites: name, activation, neurons (and the neuron axis), and the total."""
        rows = [f"{name:40s} {kind:6s} {g.num_neurons:6d} neurons (dim {g.neuron_dim})"
                for name, kind, g in zip(self.gate_names, self.activations, self.gates)]
        total = sum(g.num_neurons for g in self.gates)
        return "\n".join([*rows, f"{len(rows)} gated sites, {total} neurons, {2 * total} trainable parameters"])

    def _gate_call(self, key: tuple[str, int], kind: str, output: torch.Tensor, producer: Any) -> torch.Tensor:
        i = self._site_index.get(key)
        if i is None and key in self._passthrough:
            return output
        if i is None:
            raise BiozooError(f"TauGate: activation call {key[1]} in {key[0] or type(self.base).__name__!r} was "
                              f"not there when the gates were sized (a forward with another control flow?)")
        return self.gates[i].apply(output)

    @property
    def enabled(self) -> bool:
        return self.gates[0].enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        for gate in self.gates:
            gate.enabled = value

    def unwrap(self) -> nn.Module:
        """The base (frozen, never modified: the gates act only through this wrapper), free to wrap again."""
        object.__setattr__(self.base, "_taugate_wrapped", False)
        return self.base

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The base's forward with every gated activation call gated. While gated, torch functions go through a
        TorchFunctionMode, which also turns off fused fast paths that would skip the activations (for example
        `nn.TransformerEncoderLayer`'s in eval); with the gates off (`use_mode(None)`) the base runs as it is. The
        base's batch-norm layers always run in eval mode, so a fit never updates their running statistics: the base
        is never modified (peft's methods, by contrast, let batch norm adapt)."""
        for norm in self._batch_norms:  # frozen statistics: a fit never updates the base's running means
            norm.training = False
        if not self.enabled:
            return self.base(*args, **kwargs)
        with CallTracer(self._module_names, self._gate_call):
            return self.base(*args, **kwargs)

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
                                               "surrogate_width": self.surrogate_width, "include": self.include}}

    # attribution ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def active_neurons(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{layer: bool (B, neurons[, ...])}: the units that pass the hard gate (a > tau) and fire (a > 0) on
        each input. Uses the current mode's gate values; with the gates off (`use_mode(None)`), tau = -inf."""
        for gate in self.gates:
            gate.record = True
        try:
            with CallTracer(self._module_names, self._gate_call):  # records the gates' inputs, gated or not
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
            surrogate_width: float = 0.5, include: list[str] | None = None) -> TauGate:
    """Rebuilds a saved TauGate: the base from its config, then the gates (their values load from the weights)."""
    return TauGate.wrap(create_model(base["model"], **base.get("kwargs", {})), temperature, init_margin,
                        surrogate_width, include=include)


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
