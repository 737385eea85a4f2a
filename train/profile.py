"""What a model costs: `profile(model, example_input)` and `biozoo profile -c TASK -c MODEL`.

- parameters, and NeuroBench's `footprint` (bytes of parameters and buffers) and `connection_sparsity` (the
  fraction of weights that are exactly zero);
- `macs` per sample: multiply-accumulates counted by `torch.utils.flop_counter.FlopCounterMode` (MACs = FLOPs / 2,
  so matmuls, convolutions, einsums and attention all count), plus the gate matmuls of PyTorch's fused recurrent
  kernels (`nn.LSTM`, `nn.GRU`, `nn.RNN`), which the counter does not see (`rnn_macs`, counted from their sizes).
  NeuroBench's dense `synaptic_operations` is the same number;
- `ticks`: a CTM's internal ticks per sample (mean `ticks_used` with early exit, otherwise its ticks), None for
  models without ticks;
- `activation_sparsity` (NeuroBench's): the fraction of zero outputs of the neurons (a spiking model's spikes,
  otherwise the activation-function modules' outputs), None when the model has neither;
- `seconds_per_sample`: the median forward wall time over `repeats` runs, divided by the batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from biozoo._core import BiozooError, as_output

# modules whose outputs are neuron activations (the CTM's `Neurons`, snnTorch's neurons by name, see `is_neuron`)
ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.GLU, nn.LeakyReLU, nn.ELU, nn.Softplus)
RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def is_neuron(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATIONS) or type(module).__name__ in ("Neurons", "Leaky", "Synaptic", "Lapicque")


def batch_size_of(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, (tuple, list)) and x:
        return batch_size_of(x[0])
    if isinstance(x, dict) and x:
        return batch_size_of(next(iter(x.values())))
    raise BiozooError(f"profile needs a batched tensor input (or a tuple/dict of them), got {type(x).__name__}")


def rnn_macs(model: nn.Module, x: Any) -> tuple[float, list[Any]]:
    """Hooks that add each fused recurrent module's gate MACs: gates * (input + hidden) * hidden per step."""
    total = [0.0]
    handles = []
    for m in model.modules():
        if isinstance(m, nn.RNNBase):
            def hook(mod: nn.RNNBase, args: tuple, _out: Any) -> None:
                inp = args[0]
                steps = inp.shape[1] if mod.batch_first and inp.dim() == 3 else (inp.shape[0] if inp.dim() == 3 else 1)
                batch = inp.shape[0] if mod.batch_first and inp.dim() == 3 else (inp.shape[1] if inp.dim() == 3 else 1)
                dirs = 2 if mod.bidirectional else 1
                per_step = 0
                for layer in range(mod.num_layers):
                    width = mod.input_size if layer == 0 else mod.hidden_size * dirs
                    per_step += RNN_GATES[mod.mode] * (width + mod.hidden_size) * mod.hidden_size * dirs
                total[0] += per_step * steps * batch
            handles.append(m.register_forward_hook(hook))
    return total, handles


def activation_hooks(model: nn.Module) -> tuple[list[int], list[Any]]:
    counts = [0, 0]  # zeros, total
    handles = []

    def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            counts[0] += int((t == 0).sum())
            counts[1] += t.numel()

    for m in model.modules():
        if is_neuron(m):
            handles.append(m.register_forward_hook(hook))
    return counts, handles


@torch.no_grad()
def profile(model: nn.Module, example_input: Any, repeats: int = 3) -> dict[str, Any]:
    """The cost of one forward of `model` on a batch `example_input`, per sample (module docstring)."""
    was_training = model.training
    model.eval()
    try:
        batch = batch_size_of(example_input)
        call = (lambda: model(*example_input)) if isinstance(example_input, tuple) else (lambda: model(example_input))
        rnn, rnn_handles = rnn_macs(model, example_input)
        counts, act_handles = activation_hooks(model)
        counter = FlopCounterMode(display=False)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the fused encoder kernel is invisible to the counter
        try:
            with counter:
                out = as_output(call())
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
            for h in rnn_handles + act_handles:
                h.remove()
        times = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    params = list(model.parameters())
    weights = [p for p in params if p.dim() > 1]
    macs = counter.get_total_flops() / 2 / batch + rnn[0] / batch
    spikes = out.extras.get("spikes")
    if isinstance(spikes, torch.Tensor):
        sparsity = float((spikes == 0).float().mean())
    else:
        sparsity = counts[0] / counts[1] if counts[1] else None
    ticks = None
    if out.ticks_used is not None:
        ticks = float(out.ticks_used.float().mean())
    elif out.ticks_logits is not None:
        ticks = float(out.ticks_logits.shape[-1])
    elif getattr(model, "ticks_per_step", None):
        ticks = float(model.ticks_per_step)  # an online CTM's ticks per input step
    return {
        "parameters": sum(p.numel() for p in params),
        "footprint": sum(t.numel() * t.element_size() for t in [*params, *model.buffers()]),
        "connection_sparsity": (sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights))
        if weights else 0.0,
        "macs": macs,
        "rnn_macs": rnn[0] / batch,
        "synaptic_operations": macs,
        "ticks": ticks,
        "activation_sparsity": sparsity,
        "seconds_per_sample": statistics.median(times) / batch,
    }


def example_batch(task: Path, batch_size: int = 8) -> tuple[Any, Any]:
    """One validation batch of a task config's data (small generated sizes, as `biozoo matrix` builds them); a
    control task's observations (B, F) from its spec."""
    from .matrix import _class, data_init_args, read, task_spec

    spec = task_spec(task)
    if spec.input == "observation":
        return torch.randn(batch_size, *spec.shape), spec
    data = read(task)["data"]
    dm = _class(data["class_path"])(**{**data_init_args(task, small=True), "batch_size": batch_size})
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    return (batch[0] if isinstance(batch, (tuple, list)) else batch), spec


def profile_pair(task: Path, model: Path, batch_size: int = 8, repeats: int = 3) -> dict[str, Any]:
    """`profile` of a model config built for a task config (as `biozoo fit -c TASK -c MODEL` would build it)."""
    from biozoo.models import create_model, kwargs_for_spec

    from .matrix import model_entry

    x, spec = example_batch(task, batch_size)
    name, kwargs = model_entry(model)
    base = name.split(".", 1)[0]
    net = create_model(name, **({} if "." in name else kwargs_for_spec(base, spec, kwargs)))
    return profile(net, x, repeats)


def format_profile(p: dict[str, Any]) -> str:
    fmt = lambda v: "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    return "\n".join(f"{k}: {fmt(v)}" for k, v in p.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="biozoo profile", description="What a model costs on a task's data.")
    parser.add_argument("-c", "--config", action="append", required=True, type=Path,
                        help="a task config then a model config (configs/tasks/X.yaml, configs/models/Y.yaml)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if len(args.config) != 2:
        raise BiozooError("biozoo profile takes two configs: -c configs/tasks/TASK.yaml -c configs/models/MODEL.yaml")
    for path in args.config:
        if not path.is_file():
            raise BiozooError(f"no config at {path}")
    print(format_profile(profile_pair(args.config[0], args.config[1], args.batch_size, args.repeats)))
    return 0
