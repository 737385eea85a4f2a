"""Perforated dendrite nodes: artificial dendrites added to the nn.Linear / nn.Conv1d / nn.Conv2d layers of any model.

Brenner & Itti 2025, "Perforated Backpropagation: A Neuroscience Inspired Extension to Artificial Neural
Networks" (arXiv 2501.18018), and the open-source `perforatedai` package (PerforatedAI/PerforatedAI).

For a wrapped layer L with input x and neurons n (output features, or output channels of a convolution), the k-th
dendrite set is a fresh layer D_k of L's shape, and (broadcast over every axis but the neuron axis)

    d_k   = f(D_k(x) + sum_{j<k} c_{k,j} * d_j)        cascade: later dendrites see the earlier ones' outputs
    out_n = L(x)_n + sum_k v_{k,n} * d_{k,n}            f = sigmoid by default

where c_{k,j} and v_{k,n} are one scalar per neuron, both initialised to zero, so adding a dendrite set changes
nothing until it is trained. D_k copies L's hyper-parameters, its bias flag included, and starts at randn * 0.01
(the official `candidate_weight_initialization_multiplier`).

Two ways to train the dendrites (`mode`):
- `gd` ("GD dendrites", what the open-source package does): every parameter learns jointly by backpropagation,
  and the error reaching x flows through the dendrites too.
- `perforated` (the paper's method; its code is proprietary): a new candidate set is trained alone, with the rest
  of the network fixed, to maximise the correlation of d_{k,n} with the remaining error of neuron n, the gradient
  of the task loss at L's output: Fahlman & Lebiere's (1989) cascade-correlation score, for each neuron n over
  the samples p (batch, time steps and positions),
      S_n = |sum_p (d_pn - mean d_n)(e_pn - mean e_n)|,
  unnormalised as in cascade correlation (the paper's normalisation is not published); progress is reported as the
  Pearson correlation over each epoch. The candidate is then frozen: in the forward pass it is an
  extra input of fixed value, and in the backward pass it is skipped ("perforated"): no task gradient reaches D_k
  or c_k, and none flows back to x through it. Only v_k, the neuron's weight on its dendrite, keeps learning.
  Candidate training runs the network in eval mode so that BatchNorm statistics stay those of the neurons.

Differences from the official package, on purpose:
- Nothing is copied: the layer stays where it is and keeps its parameter names; with its first dendrite it gains
  a `dendrites` child (holding the dendrite sets) and a forward hook, both removed again if its dendrites are.
  A wrapped model with no dendrites is the original model, module for module, with no hidden copy of any layer.
- Output sizes come from the layer (`out_features` / `out_channels`) when it is wrapped, not from a first backward
  pass, so a layer that is frozen or has not been trained yet can still grow dendrites.
- All state lives on the model and in the caller's objects: no global tracker, no settings file.

A wrapped zoo model saves with `save_pretrained`; its config names the hidden builder `dendrites` with the base
model's config and the number of dendrite sets per layer, so `load_pretrained` rebuilds it exactly.
Only calls through the layer's `__call__` see the dendrites: code that reads `layer.weight` directly bypasses them.
nn.MultiheadAttention's out_proj (a Linear subclass used that way) is refused when wrapping; for other modules,
`check_dendrites_used` (run by candidate training and by the callback after each growth) raises instead of letting
dendrites silently do nothing. nn.LSTM / nn.GRU hold fused weights, not nn.Linear modules, and are not wrapped;
recurrent models built from nn.Linear projections are.
"""

from __future__ import annotations

import fnmatch
import types
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ._registry import create_model, register_model
from .errors import BiozooError, CheckpointError, check_choice

MODES = ("gd", "perforated")
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


# Blocks ---------------------------------------------------------------------------------------------------------

class DendriteSet(nn.Module):
    """One dendrite for every neuron of a layer: a layer of the same shape, cascade weights from the earlier sets
    (c, one per neuron and earlier set) and the dendrite-to-neuron weights (v, one per neuron); c and v start at 0."""

    def __init__(self, layer: nn.Module, index: int, init_scale: float):
        super().__init__()
        factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
        bias = layer.bias is not None
        if isinstance(layer, nn.Linear):
            self.node: nn.Module = nn.Linear(layer.in_features, layer.out_features, bias=bias, **factory)
        else:
            conv = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
            self.node = conv(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, layer.groups, bias, layer.padding_mode, **factory)
        with torch.no_grad():
            for p in self.node.parameters():
                p.normal_(0.0, init_scale)
        neurons = self.node.weight.shape[0]
        self.cascade = nn.Parameter(torch.zeros(index, neurons, **factory)) if index else None
        self.to_neuron = nn.Parameter(torch.zeros(neurons, **factory))

    def input_parameters(self) -> list[nn.Parameter]:
        """What the correlation objective trains: the node and the cascade weights (not v)."""
        return list(self.node.parameters()) + ([self.cascade] if self.cascade is not None else [])


class DendriteStack(nn.Module):
    """The dendrite sets of one layer, attached to it as `layer.dendrites`; called by the layer's forward hook."""

    def __init__(self, layer: nn.Module, mode: str, activation: str, init_scale: float):
        super().__init__()
        self.mode, self.activation, self.init_scale = mode, activation, init_scale
        self.linear = isinstance(layer, nn.Linear)
        self.neurons = layer.out_features if self.linear else layer.out_channels
        # per-neuron scalars broadcast over (..., neurons) for Linear, (B, neurons, *spatial) for convolutions
        self.view = (-1,) if self.linear else (-1,) + (1,) * (2 if isinstance(layer, nn.Conv2d) else 1)
        self.sets = nn.ModuleList()
        self.training_candidate = False  # perforated mode: the last set is a candidate being trained
        self.capture: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (candidate d, layer output)
        self.called = False  # set by every forward: `unused_dendrite_layers` finds layers their module bypasses

    def extra_repr(self) -> str:
        return f"mode={self.mode}, activation={self.activation}, neurons={self.neurons}"

    def grow(self, layer: nn.Module) -> DendriteSet:
        new = DendriteSet(layer, len(self.sets), self.init_scale)
        self.sets.append(new)
        return new

    def _node_outputs(self, x: torch.Tensor, sets: list[DendriteSet]) -> list[torch.Tensor]:
        # functional calls, not module calls: the per-call overhead matters for small layers. Concatenating the
        # sets' weights into one matmul was measured slower (the concatenation costs more than it saves).
        nodes = [s.node for s in sets]
        if self.linear:
            return [F.linear(x, n.weight, n.bias) for n in nodes]
        return [n._conv_forward(x, n.weight, n.bias) for n in nodes]

    def _broadcast(self, p: torch.Tensor) -> torch.Tensor:
        return p if self.linear else p.view(self.view)

    def _activations(self, x: torch.Tensor, sets: list[DendriteSet],
                     earlier: list[torch.Tensor] = ()) -> list[torch.Tensor]:
        """d for each set in `sets`, given the outputs of the sets before them (the cascade inputs)."""
        act = ACTIVATIONS[self.activation]
        ds = list(earlier)
        for s, z in zip(sets, self._node_outputs(x, sets)):
            for j, d in enumerate(ds):
                z = torch.addcmul(z, self._broadcast(s.cascade[j]), d)
            ds.append(act(z))
        return ds[len(earlier):]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.called = True
        sets = list(self.sets)
        if not sets:
            return out
        if self.mode == "gd":
            ds = self._activations(x, sets)
        else:
            frozen = sets[:-1] if self.training_candidate else sets
            with torch.no_grad():
                ds = self._activations(x.detach(), frozen) if frozen else []
            if self.training_candidate:  # v of a candidate is 0: it is observed, not added
                candidate = self._activations(x.detach(), sets[-1:], ds)[0]
                if self.capture is not None:
                    if not out.requires_grad:
                        out = out.detach().requires_grad_()
                    self.capture.append((candidate, out))
        for s, d in zip(sets, ds):
            out = torch.addcmul(out, self._broadcast(s.to_neuron), d)
        return out


def _dendrite_hook(layer: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
    # .forward, not __call__: the stack is internal, and a module call per layer would cost time at every step
    return layer.dendrites.forward(args[0] if args else kwargs["input"], output)


# The transform --------------------------------------------------------------------------------------------------

def dendrite_layers(model: nn.Module) -> dict[str, nn.Module]:
    """{name: layer} for every wrapped layer of `model` (with or without dendrites yet), in module order."""
    return {name: model.get_submodule(name) for name in model.__dict__.get("_dendrite_layers", [])}


def _stack(layer: nn.Module) -> DendriteStack | None:
    return layer._modules.get("dendrites")


def _stacks(model: nn.Module) -> list[DendriteStack]:
    return [s for s in map(_stack, dendrite_layers(model).values()) if s is not None]


def _matches(name: str, pattern: str) -> bool:
    """A pattern selects a module by its dotted name, or every layer inside a module it names."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(1, len(parts) + 1))


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or [])


def select_layers(model: nn.Module, include: str | Iterable[str] | None = None,
                  exclude: str | Iterable[str] | None = None) -> list[str]:
    """Names of the layers `add_dendrites` would wrap. Every pattern must select something, or this raises."""
    inside = {f"{n}.{sub}".rstrip(".") for n, m in model.named_modules() if isinstance(m, DendriteStack)
              for sub, _ in m.named_modules()}
    modules = {n: m for n, m in model.named_modules() if n not in inside}  # not the dendrites' own layers
    # exact types: subclasses such as nn.MultiheadAttention's out_proj are used through their weights, not called
    candidates = [n for n, m in modules.items() if n and type(m) in LAYER_TYPES]
    chosen = []
    for pattern in _as_list(include) or ["*"]:
        hits = [n for n in candidates if _matches(n, pattern)]
        if not hits:
            named = modules.get(pattern)
            why = (f"{pattern!r} is a {type(named).__name__}; dendrites wrap nn.Linear, nn.Conv1d and nn.Conv2d "
                   f"layers called through their forward" if named is not None else f"{pattern!r} matches no layer")
            raise BiozooError(f"add_dendrites: include {why}. Layers: {', '.join(candidates[:12])}"
                              + (" ..." if len(candidates) > 12 else ""))
        chosen += [n for n in hits if n not in chosen]
    for pattern in _as_list(exclude):
        if not any(_matches(n, pattern) for n in modules if n):
            raise BiozooError(f"add_dendrites: exclude {pattern!r} matches no module")
        chosen = [n for n in chosen if not _matches(n, pattern)]
    if not chosen:
        raise BiozooError("add_dendrites: include/exclude left no layer to wrap")
    return [n for n in candidates if n in chosen]


def _wrap(model: nn.Module, names: list[str], mode: str, activation: str, init_scale: float,
          base_config: dict[str, Any] | None) -> nn.Module:
    for name in names:
        if isinstance(model.get_submodule(name).weight, nn.parameter.UninitializedParameter):
            raise BiozooError(f"add_dendrites: {name} is a lazy layer; run one forward pass before wrapping it")
    # only names: a layer gets its `dendrites` child and its hook with its first dendrite, so a wrapped model with
    # no dendrite is the original model, module for module
    model._dendrite_layers = list(names)
    model._dendrite_spec = {"base": base_config, "mode": mode, "activation": activation, "init_scale": init_scale}
    # an instance attribute shadows the class's biozoo_config: the saved config is the live structure
    model.biozoo_config = types.MethodType(_dendrite_config, model)
    return model


def _dendrite_config(model: nn.Module) -> dict[str, Any]:
    spec = model._dendrite_spec
    if spec["base"] is None:
        raise CheckpointError(f"{type(model).__name__} is not a registered zoo model, so its dendrites cannot be "
                              "saved portably; wrap a model built with create_model")
    return {"model": "dendrites", "kwargs": {**spec, "layers": dendrite_counts(model)}}


def add_dendrites(model: nn.Module, mode: str = "gd", include: str | Iterable[str] | None = None,
                  exclude: str | Iterable[str] | None = None, activation: str = "sigmoid",
                  init_scale: float = 0.01) -> nn.Module:
    """Make the chosen nn.Linear / nn.Conv1d / nn.Conv2d layers of `model` able to grow dendrites (in place).

    `include` / `exclude`: glob patterns over module names ("head", "blocks.*.conv1", "features"); a pattern naming
    a module selects the layers inside it. Default: every such layer. No dendrite is added yet: the model computes
    exactly what it did, at the same cost. Grow them with `add_dendrite_set`, or train with the `Dendrites`
    callback (biozoo.train). `init_scale`: std of the new dendrite layers' normal initialisation.
    """
    check_choice("mode", mode, MODES)
    check_choice("activation", activation, ACTIVATIONS)
    if not init_scale > 0:
        raise BiozooError(f"init_scale must be positive, got {init_scale}")
    if "_dendrite_spec" in model.__dict__:
        raise BiozooError("add_dendrites: this model already has dendrite layers; build a fresh model to re-wrap it")
    names = select_layers(model, include, exclude)
    base = model.biozoo_config() if hasattr(model, "biozoo_config") else None
    return _wrap(model, names, mode, activation, init_scale, base)


def dendrite_mode(model: nn.Module) -> str | None:
    spec = model.__dict__.get("_dendrite_spec")
    return spec["mode"] if spec else None


def dendrite_counts(model: nn.Module) -> dict[str, int]:
    """{layer name: number of dendrite sets}."""
    return {name: dendrite_counts_of(layer) for name, layer in dendrite_layers(model).items()}


def dendrite_counts_of(layer: nn.Module) -> int:
    stack = _stack(layer)
    return len(stack.sets) if stack is not None else 0


def _require_wrapped(model: nn.Module) -> dict[str, nn.Module]:
    layers = dendrite_layers(model)
    if not layers:
        raise BiozooError("this model has no dendrite layers; call add_dendrites(model) first")
    return layers


def unused_dendrite_layers(model: nn.Module) -> list[str]:
    """Layers that have dendrites but whose forward has not run since the last dendrites were added: their module
    uses the layer's weights directly (e.g. `F.linear(x, layer.weight)`), so the dendrites would do nothing."""
    return [name for name, layer in dendrite_layers(model).items()
            if _stack(layer) is not None and _stack(layer).sets and not _stack(layer).called]


def check_dendrites_used(model: nn.Module) -> None:
    """Raise if a layer's dendrites were bypassed (call after a forward pass that should reach every layer)."""
    unused = unused_dendrite_layers(model)
    if unused:
        raise BiozooError(f"the dendrites of {', '.join(unused)} never ran: the model reads "
                          f"{'these layers' if len(unused) > 1 else 'this layer'}' weights without calling "
                          f"{'their' if len(unused) > 1 else 'its'} forward; exclude them (exclude=[...])")


def _grow(model: nn.Module, layer: nn.Module, frozen: bool) -> DendriteSet:
    stack = _stack(layer)
    if stack is None:
        spec = model._dendrite_spec
        stack = layer.dendrites = DendriteStack(layer, spec["mode"], spec["activation"], spec["init_scale"])
        layer.register_forward_hook(_dendrite_hook, with_kwargs=True)
    stack.called = False
    new = stack.grow(layer)
    if frozen:
        for p in new.input_parameters():
            p.requires_grad_(False)
    return new


def add_dendrite_set(model: nn.Module) -> int:
    """Give every neuron of every wrapped layer one more dendrite; returns the number of new parameters.

    `gd`: the new dendrites train with everything else. `perforated`: they are candidates for
    `train_candidates`, invisible to the network (v = 0) until `freeze_candidates` installs them.
    """
    layers = _require_wrapped(model)
    candidates = dendrite_mode(model) == "perforated"
    if candidates and any(s.training_candidate for s in _stacks(model)):
        raise BiozooError("the previous candidates are still training; call freeze_candidates(model) first")
    added = 0
    for layer in layers.values():
        added += sum(p.numel() for p in _grow(model, layer, frozen=False).parameters())
        layer.dendrites.training_candidate = candidates
    return added


def set_dendrite_counts(model: nn.Module, counts: dict[str, int]) -> None:
    """Add or remove dendrite sets (the newest first) until each layer has `counts[name]`; added sets are
    installed as trained ones (frozen inputs in perforated mode), as when a saved model is rebuilt."""
    layers = _require_wrapped(model)
    if set(counts) != set(layers):
        raise CheckpointError(f"dendrite layers differ: expected {sorted(layers)}, got {sorted(counts)}")
    frozen = dendrite_mode(model) == "perforated"
    for name, layer in layers.items():
        stack = _stack(layer)
        if stack is not None:
            stack.training_candidate = False
            while len(stack.sets) > counts[name]:
                del stack.sets[len(stack.sets) - 1]
            if not stack.sets:  # back to the plain layer: no child, no hook
                del layer.dendrites
                for key in [k for k, hook in layer._forward_hooks.items() if hook is _dendrite_hook]:
                    del layer._forward_hooks[key]
                    layer._forward_hooks_with_kwargs.pop(key, None)
        while dendrite_counts_of(layer) < counts[name]:
            _grow(model, layer, frozen)


# Perforated mode: candidate training ----------------------------------------------------------------------------

def as_samples(t: torch.Tensor, stack: DendriteStack) -> torch.Tensor:
    """(samples, neurons): every axis but the neuron axis is a sample (batch, time steps, positions)."""
    if stack.linear:
        return t.reshape(-1, stack.neurons)
    return t.movedim(1 if t.dim() > len(stack.view) else 0, -1).reshape(-1, stack.neurons)


class CorrelationMeter:
    """Pearson correlation of dendrite outputs with neuron errors, per neuron, accumulated over many batches."""

    def __init__(self):
        self.sums: torch.Tensor | None = None  # n, sum d, sum e, sum d^2, sum e^2, sum d*e; each (neurons,)

    def update(self, d: torch.Tensor, e: torch.Tensor) -> None:
        """d, e: (samples, neurons)."""
        d, e = d.detach().double(), e.detach().double()
        sums = torch.stack([torch.full_like(d[0], len(d)), d.sum(0), e.sum(0), (d * d).sum(0), (e * e).sum(0),
                            (d * e).sum(0)])
        self.sums = sums if self.sums is None else self.sums + sums

    def correlation(self) -> torch.Tensor:
        n, sd, se, sdd, see, sde = self.sums
        cov = sde / n - sd * se / n**2
        var_d, var_e = (sdd / n - (sd / n) ** 2).clamp_min(0), (see / n - (se / n) ** 2).clamp_min(0)
        return cov / (var_d * var_e).sqrt().clamp_min(1e-30)


def candidate_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for s in _stacks(model) if s.training_candidate for p in s.sets[-1].input_parameters()]


@torch.enable_grad()  # callers may be inside a no-grad context (a Lightning hook after validation)
def train_candidates(model: nn.Module, batches: Callable[[], Iterable[Any]], loss_fn: Callable[[Any], torch.Tensor],
                     epochs: int = 10, lr: float = 0.02, patience: int = 2, min_improvement: float = 0.01,
                     ) -> list[float]:
    """Train the candidate dendrites (perforated mode) for the cascade-correlation objective: for each neuron n,
    S_n = |sum_p (d_pn - mean d_n)(e_pn - mean e_n)|, where e is the gradient of `loss_fn(batch)` (which runs the
    model) at the layer's output, the neuron's remaining error.

    The network's own parameters are not changed, so e is fixed and S is a sum over samples: each batch ascends
    sign(S_n) * (its covariance, errors centred on the batch), the sign taken from the covariance accumulated so far
    (Fahlman & Lebiere's sigma). `batches()` returns one epoch of batches. Returns the mean over neurons of the
    |Pearson correlation| over each epoch; stops after `epochs`, or when it has not risen by `min_improvement`
    (relative) for `patience` epochs.
    """
    stacks = [s for s in _stacks(model) if s.training_candidate]
    if not stacks:
        raise BiozooError("no candidate dendrites to train; call add_dendrite_set(model) in perforated mode first")
    optimizer = torch.optim.Adam(candidate_parameters(model), lr=lr)
    covariance = {id(s): torch.zeros(s.neurons, dtype=torch.float64) for s in stacks}
    was_training = model.training
    model.eval()
    history: list[float] = []
    best, stale = 0.0, 0
    try:
        for _ in range(epochs):
            meters = {id(s): CorrelationMeter() for s in stacks}
            for batch in batches():
                for s in stacks:
                    s.capture = []
                loss = loss_fn(batch)
                check_dendrites_used(model)
                captured = [(s, d, out) for s in stacks for d, out in s.capture]
                errors = torch.autograd.grad(loss, [out for _, _, out in captured], allow_unused=True)
                objective = 0.0
                for (s, d, _), e in zip(captured, errors):
                    if e is None:
                        continue
                    d, e = as_samples(d, s), as_samples(e, s)
                    cov = (d * (e - e.mean(0))).sum(0)
                    covariance[id(s)] = covariance[id(s)].to(cov.device) + cov.detach().double()
                    objective = objective + (torch.where(covariance[id(s)] < 0, -1.0, 1.0).to(cov) * cov).sum()
                    meters[id(s)].update(d, e)
                if not torch.is_tensor(objective):
                    raise BiozooError("the loss does not depend on any wrapped layer's output; nothing to correlate")
                optimizer.zero_grad(set_to_none=True)
                (-objective).backward()
                optimizer.step()
            history.append(float(torch.stack([m.correlation().abs().mean() for m in meters.values()
                                              if m.sums is not None]).mean()))
            if history[-1] > best * (1 + min_improvement):
                best, stale = history[-1], 0
            else:
                stale += 1
                if stale >= patience:
                    break
    finally:
        for s in stacks:
            s.capture = None
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    return history


def freeze_candidates(model: nn.Module) -> None:
    """Install the trained candidates: their inputs are frozen and skipped by backprop; v (zero) starts to learn."""
    for stack in _stacks(model):
        if stack.training_candidate:
            for p in stack.sets[-1].input_parameters():
                p.requires_grad_(False)
            stack.training_candidate = False


# Builders -------------------------------------------------------------------------------------------------------

@register_model(name="dendrites", hidden=True)
def dendrites(base: dict[str, Any], mode: str = "gd", layers: dict[str, int] | None = None,
              activation: str = "sigmoid", init_scale: float = 0.01) -> nn.Module:
    """Rebuild a model with dendrites from its saved config: the base model, then the same wrapped layers and
    dendrite counts (weights come from the checkpoint)."""
    if not isinstance(base, dict) or "model" not in base:
        raise CheckpointError("dendrites config needs base = {\"model\": name, \"kwargs\": {...}}")
    model = create_model(base["model"], **base.get("kwargs", {}))
    layers = layers or {}
    missing = [n for n in layers if n not in dict(model.named_modules())]
    if missing:
        raise CheckpointError(f"dendrites config names layers that {base['model']} does not have: {missing[:5]}")
    check_choice("mode", mode, MODES)
    check_choice("activation", activation, ACTIVATIONS)
    _wrap(model, list(layers), mode, activation, init_scale, model.biozoo_config())
    set_dendrite_counts(model, layers)
    return model
