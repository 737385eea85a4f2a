"""Perforated dendrites: accuracy gain on a deliberately small network, and the cost of the dendrites per step.

    python benchmarks/dendrites.py overhead [--rounds 7]      # ResNet-8 (width 16) and MLP 64-32-32-10
    python benchmarks/dendrites.py accuracy [--seeds 0 1 2] [--monitor val/loss]  # digits; CIFAR-10 when on disk
    python benchmarks/dendrites.py overhead --smoke    # seconds (CI): MLP, 2 rounds; accuracy --smoke: 1 seed, 1 epoch

overhead: CPU time of one forward+backward step (batch 64, cross-entropy, 1 thread) with 0, 1 and 3 dendrite sets
on every layer, as a ratio to the unwrapped model timed in the same process (lower quartile over interleaved
rounds of the thread's CPU time, so that other processes on the machine count as little as possible).
Beside it: "plain" is the same maths written naively in PyTorch (each layer replaced by main + a loop over its
dendrite layers), the issue's reference cost; "perforated" times frozen dendrites (no backward through them).
Memory: parameter count and the bytes autograd saves for backward, against the unwrapped model. If the
`perforatedai` package is importable, its open (GD) implementation is timed on the same network in a subprocess
(it keeps a global tracker and writes a config file) with its own unwrapped baseline, and its ratios are printed.

accuracy: SupervisedTask + the Dendrites callback on digits, MLP 64-8-10, constant learning rate, 3 seeds. The
baseline is trained by the same callback with no dendrite cycles and a larger patience (100 validations against the
dendrite runs' 25 per cycle) under the same epoch budget, so it is at least as fully trained as the dendrite runs.
Every run monitors `--monitor` (val/acc by default; val/loss is a finer signal on the 180 validation digits), keeps
its best model by it and reports test accuracy. Larger MLPs without dendrites (64-12/16/24/32-10) answer whether
64-8-10 with dendrites matches a bigger network: the compression line names the smallest plain network at least
as accurate and the parameter ratio (the paper's "90% compression" would be 0.10x). CIFAR-10 (narrow ResNet-8, width 4 vs 6, 8 and 16)
runs the same protocol when its files are under --cifar-dir; it is skipped otherwise.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from biozoo.envs import CIFAR10DataModule, DigitsDataModule
from biozoo.models import create_model
from biozoo.models.dendrites import add_dendrite_set, add_dendrites, dendrite_counts, freeze_candidates, select_layers
from biozoo.train import Dendrites, SupervisedTask


# Overhead ---------------------------------------------------------------------------------------------------------

class PlainDendriteLayer(nn.Module):
    """The reference: out = L(x) + sum_k v_k * sigmoid(D_k(x) + sum_{j<k} c_kj * d_j), one call per dendrite."""

    def __init__(self, layer: nn.Module, k: int):
        super().__init__()
        self.layer = layer
        self.nodes = nn.ModuleList(copy.deepcopy(layer) for _ in range(k))
        n = layer.weight.shape[0]
        self.shape = (-1,) if isinstance(layer, nn.Linear) else (-1,) + (1,) * (layer.weight.dim() - 2)
        self.v = nn.ParameterList(nn.Parameter(torch.randn(n) * 0.1) for _ in range(k))
        self.c = nn.ParameterList(nn.Parameter(torch.randn(j, n) * 0.1) for j in range(k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer(x)
        ds = []
        for k, node in enumerate(self.nodes):
            z = node(x)
            for j, d in enumerate(ds):
                z = z + self.c[k][j].view(self.shape) * d
            d = torch.sigmoid(z)
            ds.append(d)
            out = out + self.v[k].view(self.shape) * d
        return out


def plain_dendrites(model: nn.Module, k: int) -> nn.Module:
    model = copy.deepcopy(model)
    for name in select_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PlainDendriteLayer(getattr(parent, child), k))
    return model


def ours(model: nn.Module, k: int, mode: str = "gd") -> nn.Module:
    model = copy.deepcopy(model)
    add_dendrites(model, mode)
    for _ in range(k):
        add_dendrite_set(model)
        freeze_candidates(model)
    return model


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the model's logits (zoo models return a ModelOutput; a wrapped copy may return a tensor)."""
    out = model(x)
    return F.cross_entropy(out if isinstance(out, torch.Tensor) else out.logits, y)


def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        loss_of(model, x, y).backward()
    return step


def saved_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one step (distinct storages counted once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model, x, y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def time_variants(variants: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int,
                  block_time: float = 0.05) -> dict[str, float]:
    """CPU time per step of each variant over `rounds` interleaved blocks (shuffled order each round), as a ratio to
    variants['unwrapped']. With one thread the whole step, backward included, runs in this thread, so its CPU
    time (time.thread_time) does not count the time other processes hold the core; the lower quartile of the
    blocks also drops the blocks slowed by cache contention."""
    steps = {name: step_fn(m, x, y) for name, m in variants.items()}
    for step in steps.values():  # warm-up
        for _ in range(2):
            step()
    t0 = time.thread_time()
    steps["unwrapped"]()
    n = max(1, int(block_time / max(time.thread_time() - t0, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            t0 = time.thread_time()
            for _ in range(n):
                steps[name]()
            times[name].append((time.thread_time() - t0) / n)
    q = {name: statistics.quantiles(t, n=4)[0] if len(t) > 1 else t[0] for name, t in times.items()}
    out = {name: q[name] / q["unwrapped"] for name in variants}
    out["_base_ms"] = q["unwrapped"] * 1e3
    return out


def build(which: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    if which == "resnet8":
        return create_model("resnet8", width=16), torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    return create_model("mlp", in_features=64, hidden=[32, 32]), torch.randn(64, 64), torch.randint(0, 10, (64,))


def overhead(rounds: int, models: list[str]) -> None:
    torch.set_num_threads(1)
    for which in models:
        base, x, y = build(which)
        # "unwrapped copy": a second copy of the same model, the noise floor of these ratios
        variants = {"unwrapped": base, "unwrapped copy": copy.deepcopy(base), "ours k=0": ours(base, 0)}
        for k in (1, 3):
            variants[f"ours k={k}"] = ours(base, k)
            variants[f"plain k={k}"] = plain_dendrites(base, k)
            variants[f"perforated k={k}"] = ours(base, k, "perforated")
        ratios = time_variants(variants, x, y, rounds)
        params0 = sum(p.numel() for p in base.parameters())
        mem0 = saved_bytes(base, x, y)
        print(f"\n{which}: batch 64, 1 thread, unwrapped {ratios['_base_ms']:.2f} ms CPU per forward+backward, "
              f"{params0:,} parameters")
        print(f"  {'variant':<16}{'time':>8}{'params':>10}{'saved for backward':>20}")
        for name, model in variants.items():
            params = sum(p.numel() for p in model.parameters())
            memory = saved_bytes(model, x, y) / mem0
            print(f"  {name:<16}{ratios[name]:>7.2f}x{params / params0:>9.2f}x{memory:>19.2f}x")
        pai = time_perforatedai(which, rounds)
        if pai:
            print(f"  perforatedai {pai.pop('version')} (open GD dendrites, own process, own unwrapped baseline "
                  f"{pai.pop('_base_ms'):.2f} ms):")
            params = pai.pop("params")
            for name, ratio in pai.items():
                print(f"  {name:<16}{ratio:>7.2f}x{params[name]:>9.2f}x   (ours / perforatedai time at the same k: "
                      f"{variants_ratio(ratios, pai, name):.2f})")


def variants_ratio(ratios: dict[str, float], pai: dict[str, float], pai_name: str) -> float:
    k = pai_name.split("k=")[1]
    return ratios[f"ours k={k}"] / pai[pai_name]


PAI_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {bench_dir!r})
from dendrites import build, loss_of, time_variants
import perforatedai
from perforatedai import globals_perforatedai as GPA, modules_perforatedai as PA, utils_perforatedai as UPA
GPA.pc.set_testing_dendrite_capacity(False)
GPA.pc.set_silent(True)
GPA.pc.set_unwrapped_modules_confirmed(True)
GPA.pc.set_configuration_confirmed(True)
base, x, y = build({which!r})
variants = {{"unwrapped": base}}
for k in (0, 1, 3):
    model = UPA.perforate_model(build({which!r})[0], save_name="PAI", making_graphs=False)
    loss_of(model, x[:2], y[:2]).backward()  # it learns output sizes from a backward
    for _ in range(k):
        for m in model.modules():
            if isinstance(m, PA.PAINeuronModule):
                UPA.simulate_cycles(m, 2, True)  # one neuron -> dendrite -> neuron cycle: one dendrite set
    variants[f"perforatedai k={{k}}"] = model
ratios = time_variants(variants, x, y, {rounds})
ratios.pop("unwrapped")
params0 = sum(p.numel() for p in base.parameters())
ratios["params"] = {{name: sum(p.numel() for p in m.parameters()) / params0 for name, m in variants.items()}}
ratios["version"] = perforatedai.__version__ if hasattr(perforatedai, "__version__") else "?"
print("RESULT" + json.dumps(ratios))
"""


def time_perforatedai(which: str, rounds: int) -> dict | None:
    try:
        from importlib.metadata import version

        pai_version = version("perforatedai")
    except Exception:
        print("  perforatedai is not installed: its timing is skipped (pip install perforatedai)")
        return None
    script = PAI_SCRIPT.format(bench_dir=str(Path(__file__).parent), which=which, rounds=rounds)
    with tempfile.TemporaryDirectory() as tmp:  # it writes PAI/PAI_config.json into the working directory
        proc = subprocess.run([sys.executable, "-c", script], cwd=tmp, capture_output=True, text=True, timeout=1800)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
    if proc.returncode or not lines:
        print(f"  perforatedai {pai_version} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        return None
    result = json.loads(lines[-1][len("RESULT"):])
    result["version"] = pai_version
    return result


# Accuracy ---------------------------------------------------------------------------------------------------------

CIFAR_DIR = "data"


def make_data(name: str, seed: int):
    if name == "digits":
        return DigitsDataModule(batch_size=64, seed=seed)
    return CIFAR10DataModule(data_dir=CIFAR_DIR, batch_size=128, seed=seed, num_workers=2)


def train_run(data: str, model: str, model_kwargs: dict, seed: int, mode: str, max_cycles: int, patience: int,
              max_epochs: int, lr: float, monitor: str = "val/acc") -> dict:
    """One fit with the Dendrites callback (max_cycles=0: a plain run with early stopping and best restore)."""
    L.seed_everything(seed, verbose=False)
    dm = make_data(data, seed)
    task = SupervisedTask(model, model_kwargs, dm.dims, lr=lr, scheduler="constant")
    callback = Dendrites(mode=mode, monitor=monitor, monitor_mode="min" if "loss" in monitor else "max",
                         patience=patience, max_cycles=max_cycles, verbose=False, plot=False)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu" if data == "digits" else "auto", devices=1,
                            logger=False, default_root_dir=tmp, callbacks=[callback],
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0)
        t0 = time.process_time()
        trainer.fit(task, dm)
        test = trainer.test(task, dm, verbose=False)[0]["test/acc"]
    return {"test": test, "val": callback.best, "params": task.num_parameters(), "epochs": trainer.current_epoch,
            "dendrites": max(dendrite_counts(task.model).values()), "cpu_s": time.process_time() - t0,
            "cycles": [(h["dendrites"], h["params"], round(h["best"], 4), h["epochs"]) for h in callback.history]}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def accuracy(seeds: list[int], data: str, max_epochs: int, patience: int, baseline_patience: int,
             monitor: str) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    make_data(data, 0).setup()  # absent data fails here, in one line
    if data == "digits":
        small, bigger, lr = ("mlp", {"hidden": [8]}), [("mlp", {"hidden": [w]}) for w in (12, 16, 24, 32)], 3e-3
    else:
        small, bigger, lr = ("resnet8", {"width": 4}), [("resnet8", {"width": w}) for w in (6, 8, 16)], 3e-3
    runs = [(f"{small[0]} {small[1]} baseline", small, "gd", 0, baseline_patience),
            (f"{small[0]} {small[1]} + gd dendrites", small, "gd", 3, patience),
            (f"{small[0]} {small[1]} + perforated dendrites", small, "perforated", 3, patience)]
    runs += [(f"{name} {kwargs} baseline", (name, kwargs), "gd", 0, baseline_patience) for name, kwargs in bigger]
    print(f"{data}: constant lr {lr}, Adam(W), batch {64 if data == 'digits' else 128}, at most {max_epochs} epochs; "
          f"dendrite runs switch after {patience} validations without improvement (at most 3 dendrite sets); "
          f"baselines stop after {baseline_patience}; every run monitors {monitor} and keeps its best model by it",
          flush=True)
    table = []
    for label, (name, kwargs), mode, cycles, pat in runs:
        results = [train_run(data, name, kwargs, seed, mode, cycles, pat, max_epochs, lr, monitor) for seed in seeds]
        for seed, r in zip(seeds, results):
            print(f"    seed {seed}: {r}", flush=True)
        print(f"  {label:<42} test acc {mean_std([r['test'] for r in results])}   best {monitor} "
              f"{mean_std([r['val'] for r in results])}   params {[r['params'] for r in results]}   "
              f"epochs {[r['epochs'] for r in results]}   dendrites kept {[r['dendrites'] for r in results]}",
              flush=True)
        table.append((label, statistics.mean(r["test"] for r in results), statistics.mean(r["params"] for r in results),
                      mean_std([r["test"] for r in results]), statistics.mean(r["epochs"] for r in results)))
    print(f"\n| {data} run | params (mean) | test acc | epochs (mean) |\n|---|---|---|---|")
    for label, _, params, acc, epochs in table:
        print(f"| {label} | {params:,.0f} | {acc} | {epochs:.0f} |")
    plain = [(acc, params) for label, acc, params, *_ in table if label.endswith("baseline")]
    for label, acc, params, *_ in table[1:3]:  # compression: the smallest plain net at least as accurate
        match = min((p for a, p in plain if a >= acc), default=None)
        print(f"compression, {label}: {acc:.3f} with {params:,.0f} params; "
              + (f"the smallest plain network as accurate has {match:,.0f} ({params / match:.2f}x the parameters)"
                 if match else "no plain network tried is as accurate"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    o = sub.add_parser("overhead")
    o.add_argument("--rounds", type=int, default=20)
    o.add_argument("--models", nargs="+", default=["resnet8", "mlp"], choices=["resnet8", "mlp"])
    o.add_argument("--smoke", action="store_true", help="2 rounds: checks the code, no figures")
    a = sub.add_parser("accuracy")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--data", nargs="+", default=["digits", "cifar10"], choices=["digits", "cifar10"])
    a.add_argument("--max-epochs", type=int, default=1000)
    a.add_argument("--patience", type=int, default=25)
    a.add_argument("--baseline-patience", type=int, default=100)
    a.add_argument("--cifar-dir", default="data", help="folder holding cifar-10-batches-py/")
    a.add_argument("--monitor", default="val/acc", choices=["val/acc", "val/loss"])
    a.add_argument("--smoke", action="store_true", help="digits, seed 0, 1 epoch: checks the code, no figures")
    args = parser.parse_args()
    if args.what == "overhead":
        overhead(2, ["mlp"]) if args.smoke else overhead(args.rounds, args.models)
    elif args.smoke:
        accuracy([0], "digits", 1, 1, 1, args.monitor)
    else:
        from biozoo._core import DataNotFoundError

        global CIFAR_DIR
        CIFAR_DIR = args.cifar_dir
        for data in args.data:
            try:
                accuracy(args.seeds, data, args.max_epochs, args.patience, args.baseline_patience, args.monitor)
            except DataNotFoundError as e:
                print(f"{data}: skipped ({str(e)[:160]}...)")


if __name__ == "__main__":
    main()
