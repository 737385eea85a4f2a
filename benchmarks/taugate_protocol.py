"""The TauGate "brain modes" protocol (Ghasemlou 2026, arXiv 2602.11726): one command, both protocols, tables and plots.

    python benchmarks/taugate_protocol.py                    # 8x8 digits, offline (~1 h on 2 shared cores)
    python benchmarks/taugate_protocol.py --data mnist       # MNIST 784-256-256-10, files under data/MNIST/raw
    python benchmarks/taugate_protocol.py --quick            # 2 seeds, few epochs: a quick run of the pipeline
    python benchmarks/taugate_protocol.py --smoke --out /tmp/tg   # seconds (CI): 1 seed, 1 epoch, one lr each
    python benchmarks/taugate_protocol.py --arch transformer --protocols headroom   # digits as 8 rows of 8 pixels
    python benchmarks/taugate_protocol.py --arch ctm --protocols headroom          # the digits CTM, gating its neurons

Protocols (both run; per seed s a foundation is trained with seed s, then every method is fine-tuned from that
same foundation with seed s, so differences are paired by seed). The foundation (`--arch`): the MLP in-256-256-10,
a small Transformer (`transformer`: 2 pre-norm layers, d_model 64, GELU feed-forward 128, one token per image row)
or the digits CTM (`ctm`: configs/ctm/digits.yaml's model; TauGate gates its 128 neurons alone, LoRA adapts its
Linear layers -- the attention's fused weights are read directly, so LoRA does not target them):
- mix: the foundation learns a 50/50 mixture (every training image upright and rotated by +45 degrees, bilinear);
  each method then specialises it to the rotated mode for a fixed number of epochs (`--epochs`, 30).
- headroom: the foundation learns upright images only; each method trains until validation stops improving
  (early stopping with `--patience` epochs, at most `--max-epochs`).
Methods: frozen, TauGate, LoRA r=1/2/4/8 (peft, target_modules = the Linear layers by name, and the
Transformer's attention blocks, alpha = 2r),
BitFit, head-only, full fine-tune. All of them: AdamW (no weight decay), constant learning rate, batch 128, the
same epochs, and the same selection rule -- the epoch with the lowest validation loss on rotated images (KeepBest).
The learning rate of each method is chosen from a grid (`--lrs`, `--headroom-lrs`) by the same rule on a separate
tuning seed (`--tune-seed`).

Reported per method (test sets: the same held-out images upright and rotated): rotated accuracy, the paired
difference to frozen (mean, 95% t-interval, wins/ties/losses), upright accuracy with the rotated mode active,
trainable parameters, the fraction of strongly active hidden units on rotated images (output above the frozen
foundation's mean output in that layer), and for TauGate soft- against hard-gate accuracy, the fraction of units
passing the hard gate, and a check that `use_mode(None)` gives the foundation's logits exactly.

Outputs in --out (runs/taugate_protocol/<data>/): results.md (the tables), results.json (every run),
tradeoff.png (accuracy against trainable parameters), neurons_<protocol>.png (which neurons fire, per class,
in the base and rotated modes), adapters/ (each TauGate run's rotated-mode adapter). Finished runs are cached in
runs.jsonl, so an interrupted protocol resumes; --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from biozoo._core import as_output
from biozoo.envs.rotated import RotatedDigitsDataModule, RotatedMNISTDataModule
from biozoo.models import load_pretrained
from biozoo.models.taugate import TauGate, find_gate_sites, plot_class_activity, record_outputs
from biozoo.train import SupervisedTask
from biozoo.train.taugate import KeepBest, PEFTTask, TemperatureAnneal, trainable_count

METHODS = {  # name: PEFTTask arguments
    "frozen": {"method": "frozen"},
    "TauGate": {"method": "taugate"},
    **{f"LoRA r={r}": {"method": "lora", "lora_rank": r} for r in (1, 2, 4, 8)},
    "BitFit": {"method": "bitfit"},
    "head-only": {"method": "head"},
    "full fine-tune": {"method": "full"},
}
PROTOCOLS = {
    "mix": {"title": "50/50 foundation (upright + rotated), specialised to rotated",
            "foundation": {"rotated_fraction": 0.5, "mixture": "both"}},
    "headroom": {"title": "headroom: upright-only foundation, specialised to rotated",
                 "foundation": {"rotated_fraction": 0.0, "mixture": "subset"}},
}
CTM_DIGITS = Path(__file__).resolve().parents[1] / "configs" / "ctm" / "digits.yaml"


def ctm_kwargs() -> dict:
    import yaml

    return yaml.safe_load(CTM_DIGITS.read_text())["model"]["init_args"]["model_kwargs"]


ARCHS = {  # foundation model, its loss and learning rate, LoRA's target modules, TauGate's sites (None: all)
    "mlp": {"model": "mlp", "kwargs": lambda: {"hidden": [256, 256]}, "loss": "cross_entropy", "lr": 2e-3,
            "lora": ["features.0", "features.2", "head"], "include": None},
    "transformer": {"model": "transformer", "kwargs": lambda: {"d_model": 64, "heads": 4, "layers": 2,
                                                              "dim_feedforward": 128},
                    "loss": "cross_entropy", "lr": 1e-3, "include": None,
                    "lora": ["embed", *(f"encoder.layers.{i}.{m}" for i in range(2)
                                        for m in ("self_attn", "linear1", "linear2")), "head"]},
    "ctm": {"model": "ctm", "kwargs": ctm_kwargs, "loss": "ctm", "lr": 1e-3, "include": ["neurons"],
            "lora": ["positional_embedding.Wr", "positional_embedding.mlp.0", "positional_embedding.mlp.2",
                     "kv_proj.0", "q_proj", "synapses.1", "output_projector.0"]},
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def datamodule(data: str, seed: int, **kwargs: Any):
    if data == "mnist":
        return RotatedMNISTDataModule(data_dir="data", seed=seed, batch_size=128, **kwargs)
    return RotatedDigitsDataModule(seed=seed, batch_size=128, **kwargs)


def trainer(max_epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                     callbacks=callbacks, deterministic=True)


def fit(task: L.LightningModule, dm, max_epochs: int, patience: int | None, extra: list | None = None) -> KeepBest:
    keep = KeepBest("val/loss", "min")
    callbacks: list = [keep, *(extra or [])]
    if patience:
        callbacks.append(L.pytorch.callbacks.EarlyStopping("val/loss", patience=patience, mode="min"))
    trainer(max_epochs, callbacks).fit(task, datamodule=dm)
    return keep


def foundation(args, protocol: str, seed: int) -> Path:
    """Train (or reuse) the foundation (`--arch`) of `protocol` for `seed`; returns its portable folder."""
    folder = args.out / "foundations" / f"{protocol}_s{seed}"
    if (folder / "model.safetensors").exists():
        return folder
    L.seed_everything(seed, verbose=False)
    dm = datamodule(args.data, seed, **PROTOCOLS[protocol]["foundation"])
    arch = ARCHS[args.arch]
    task = SupervisedTask(model=arch["model"], model_kwargs=arch["kwargs"](), data_dims=dm.dims, loss=arch["loss"],
                          lr=arch["lr"], scheduler="constant")
    fit(task, dm, args.foundation_epochs, patience=10)
    task.model.save_pretrained(folder)
    return folder


def tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(dataset, "tensors"):
        return dataset.tensors
    xs, ys = zip(*DataLoader(dataset, batch_size=1000))
    return torch.cat(xs), torch.cat(ys)


@torch.no_grad()
def logits_of(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([as_output(model(chunk)).logits for chunk in x.split(2000)])


def accuracy(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    return 100.0 * (logits_of(model, data[0]).argmax(1) == data[1]).float().mean().item()


def hidden_modules(model: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
    """The foundation's activation modules inside any wrapped model (TauGate, peft or plain)."""
    inner = model.base if isinstance(model, TauGate) else getattr(getattr(model, "base_model", None), "model", model)
    return [inner.get_submodule(n) for n in names]


def strongly_active(model, names: list[str], x: torch.Tensor, thresholds: list[float]) -> float:
    outs = record_outputs(model.eval(), hidden_modules(model, names), x)
    return 100.0 * statistics.mean((out > t).float().mean().item() for out, t in zip(outs, thresholds))


def run_method(args, protocol: str, name: str, seed: int, lr: float, tests: dict) -> tuple[dict, torch.nn.Module]:
    """Fine-tune one method from the seed's foundation; returns its measurements and the model."""
    folder = foundation(args, protocol, seed)
    L.seed_everything(seed, verbose=False)
    dm = datamodule(args.data, seed, rotated_fraction=1.0)
    arch = ARCHS[args.arch]
    task = PEFTTask(**METHODS[name], model=arch["model"], model_kwargs=arch["kwargs"](), checkpoint_path=str(folder),
                    data_dims=dm.dims, loss=arch["loss"], lr=lr,
                    scheduler="constant", lora_targets=arch["lora"], taugate_include=arch["include"])
    start = time.perf_counter()
    keep = None
    if trainable_count(task) > 0:
        anneal = [TemperatureAnneal(0.05, args.anneal)] if name == "TauGate" and args.anneal else []
        keep = fit(task, dm, args.epochs if protocol == "mix" else args.max_epochs,
                   None if protocol == "mix" else args.patience, anneal)
    model = task.model.eval()
    base = load_pretrained(folder)
    row = {"protocol": protocol, "method": name, "seed": seed, "lr": lr, "trainable": trainable_count(task),
           "rotated": accuracy(model, tests["rotated"]), "upright": accuracy(model, tests["upright"]),
           "strong": None, "best_epoch": keep.best_epoch if keep else None,
           "val_loss": keep.best_score if keep else None, "seconds": time.perf_counter() - start}
    if args.arch == "mlp":  # its hidden units are modules, so every method's can be read the same way
        names = [n for n, *_ in find_gate_sites(base)]
        rotated = tests["rotated"][0]
        thresholds = [out.mean().item() for out in record_outputs(base, hidden_modules(base, names), rotated)]
        row["strong"] = strongly_active(model, names, rotated, thresholds)
    if isinstance(model, TauGate):
        row["hard"] = row["rotated"]
        row["soft"] = accuracy(model.set_mode("soft"), tests["rotated"])
        model.set_mode("auto")
        row["gate_on"] = 100.0 * statistics.mean(a.float().mean().item()
                                                 for a in model.active_neurons(tests["rotated"][0]).values())
        model.store_mode("rotated")
        model.use_mode(None)
        row["base_restored_exactly"] = bool(torch.equal(logits_of(model, tests["upright"][0]),
                                                        logits_of(base, tests["upright"][0])))
        model.use_mode("rotated")
        model.save_adapter(args.out / "adapters" / f"{protocol}_s{seed}_lr{lr:g}")
    return row, model


class Cache:
    """runs.jsonl: one finished run per line, keyed by protocol, method, seed, lr and the settings that matter."""

    def __init__(self, path: Path, settings: dict, fresh: bool):
        self.path, self.settings = path, settings
        if fresh and path.exists():
            path.unlink()
        self.rows = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.rows[self.key(row["protocol"], row["method"], row["seed"], row["lr"], row["settings"])] = row

    @staticmethod
    def key(protocol: str, method: str, seed: int, lr: float, settings: dict) -> str:
        fields = ["data", "arch", "foundation_epochs", "anneal"] + (["epochs"] if protocol == "mix" else ["max_epochs", "patience"])
        return json.dumps([protocol, method, seed, lr, {k: settings.get(k) for k in fields}], sort_keys=True)

    def get(self, protocol: str, method: str, seed: int, lr: float) -> dict | None:
        return self.rows.get(self.key(protocol, method, seed, lr, self.settings))

    def put(self, row: dict) -> None:
        row = {**row, "settings": self.settings}
        self.rows[self.key(row["protocol"], row["method"], row["seed"], row["lr"], self.settings)] = row
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def test_sets(args, seed: int) -> dict:
    dm = datamodule(args.data, seed)
    return {"upright": tensors(dm.split("test", 0.0)), "rotated": tensors(dm.split("test", 1.0))}


def measure(args, cache: Cache, protocol: str, name: str, seed: int, lr: float, tests: dict) -> dict:
    row = cache.get(protocol, name, seed, lr)
    if row is None:
        row, _ = run_method(args, protocol, name, seed, lr, tests)
        cache.put(row)
        print(f"  {protocol:8s} {name:15s} seed {seed:3d} lr {lr:g}: rotated {row['rotated']:.1f} upright "
              f"{row['upright']:.1f} (epoch {row['best_epoch']}, {row['seconds']:.0f}s)", flush=True)
    return row


def choose_lrs(args, cache: Cache, protocol: str) -> dict[str, float]:
    """Per method, the learning rate with the lowest best validation loss on the tuning seed."""
    tests = test_sets(args, args.tune_seed)
    chosen = {"frozen": 0.0}
    for name in args.methods:
        if name == "frozen":
            continue
        grid = args.lrs if protocol == "mix" else args.headroom_lrs
        rows = [measure(args, cache, protocol, name, args.tune_seed, lr, tests) for lr in grid]
        chosen[name] = min(rows, key=lambda r: r["val_loss"])["lr"]
    return chosen


def t_interval(diffs: list[float]) -> tuple[float, float]:
    from scipy import stats

    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return mean, float("nan")
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, half


def summarise(rows: list[dict], protocol: str) -> list[dict]:
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        if row["protocol"] == protocol:
            by_method.setdefault(row["method"], []).append(row)
    frozen = {r["seed"]: r for r in by_method["frozen"]}
    out = []
    for name, runs in by_method.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        diffs = [r["rotated"] - frozen[r["seed"]]["rotated"] for r in runs]
        up_diffs = [r["upright"] - frozen[r["seed"]]["upright"] for r in runs]
        mean = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
        std = lambda key: statistics.stdev(r[key] for r in runs) if len(runs) > 1 else 0.0  # noqa: E731
        summary = {"method": name, "seeds": len(runs), "trainable": runs[0]["trainable"], "lr": runs[0]["lr"],
                   "rotated": mean("rotated"), "rotated_std": std("rotated"), "delta": t_interval(diffs),
                   "wtl": (sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)),
                   "upright": mean("upright"), "upright_std": std("upright"), "upright_delta": t_interval(up_diffs),
                   "strong": None if runs[0]["strong"] is None else mean("strong"),
                   "epochs": statistics.mean(r["best_epoch"] + 1 if r["best_epoch"] is not None else 0 for r in runs)}
        if "soft" in runs[0]:
            summary.update(soft=mean("soft"), hard=mean("hard"), gate_on=mean("gate_on"),
                           restored=all(r["base_restored_exactly"] for r in runs))
        out.append(summary)
    return out


def markdown(summaries: list[dict], title: str) -> str:
    lines = [f"### {title}", "",
             "| method | trainable params | lr | best epoch (mean) | rotated % | Δ rotated vs frozen (95% CI) | W/T/L "
             "| upright % with rotated mode | strongly active % | soft / hard % |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        delta, half = s["delta"]
        ci = "—" if s["method"] == "frozen" else f"{delta:+.2f} ± {half:.2f}"
        wtl = "—" if s["method"] == "frozen" else "/".join(map(str, s["wtl"]))
        gate = f"{s['soft']:.1f} / {s['hard']:.1f}" if "soft" in s else "—"
        epochs, lr = ("—", "—") if s["method"] == "frozen" else (f"{s['epochs']:.1f}", f"{s['lr']:g}")
        lines.append(f"| {s['method']} | {s['trainable']:,} | {lr} | {epochs} | "
                     f"{s['rotated']:.1f} ± {s['rotated_std']:.1f} | {ci} | {wtl} | "
                     f"{s['upright']:.1f} ± {s['upright_std']:.1f} | "
                     f"{'—' if s['strong'] is None else format(s['strong'], '.1f')} | {gate} |")
    tg = next((s for s in summaries if "soft" in s), None)
    if tg:
        lines += ["", f"TauGate: {tg['gate_on']:.1f}% of hidden units pass the hard gate and fire on rotated test "
                      f"images; soft − hard = {tg['soft'] - tg['hard']:+.2f} pt; use_mode(None) reproduced the "
                      f"foundation's logits exactly in {'every' if tg['restored'] else 'NOT every'} seed."]
    return "\n".join(lines)


def plot_tradeoff(all_summaries: dict[str, list[dict]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_summaries), figsize=(6.2 * len(all_summaries), 4.2), squeeze=False)
    for ax, (protocol, summaries) in zip(axes[0], all_summaries.items()):
        for s in summaries:
            x = max(s["trainable"], 1)
            ax.errorbar(x, s["rotated"], yerr=s["rotated_std"], fmt="o", color="C3" if s["method"] == "TauGate" else "C0")
            ax.errorbar(x, s["upright"], yerr=s["upright_std"], fmt="s", mfc="none",
                        color="C3" if s["method"] == "TauGate" else "C7")
            ax.annotate(s["method"], (x, s["rotated"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (frozen plotted at 1)")
        ax.set_ylabel("test accuracy %")
        ax.legend(handles=[plt.Line2D([], [], marker="o", ls="", color="C0", label="rotated"),
                           plt.Line2D([], [], marker="s", ls="", mfc="none", color="C7",
                                      label="upright, rotated mode active"),
                           plt.Line2D([], [], marker="o", ls="", color="C3", label="TauGate")],
                  fontsize=7, loc="lower left")
        ax.set_title(PROTOCOLS[protocol]["title"], fontsize=9)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def neuron_plot(args, protocol: str, lr: float, tests: dict) -> None:
    """Seed 0's TauGate (its saved adapter on its foundation): per-class firing in the base and rotated modes."""
    adapter = args.out / "adapters" / f"{protocol}_s0_lr{lr:g}"
    if not (adapter / "adapter.safetensors").exists():
        run_method(args, protocol, "TauGate", 0, lr, tests)
    model = TauGate.wrap(load_pretrained(foundation(args, protocol, 0))).load_adapter(adapter, "rotated").eval()
    rates = {}
    for mode, images in (("base mode, upright", "upright"), ("base mode, rotated", "rotated"),
                         ("rotated mode, rotated", "rotated"), ("rotated mode, upright", "upright")):
        model.use_mode(None if mode.startswith("base") else "rotated")
        rates[mode] = model.class_activity(*tests[images], num_classes=10)
    plot_class_activity(rates, args.out / f"neurons_{protocol}.png",
                        title=f"TauGate, {PROTOCOLS[protocol]['title']}: fraction of inputs on which each neuron "
                              "passes the hard gate and fires")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["digits", "mnist"], default="digits")
    parser.add_argument("--arch", choices=list(ARCHS), default="mlp", help="the foundation model")
    parser.add_argument("--seeds", type=int, default=10, help="seeds of the 50/50 (mix) protocol")
    parser.add_argument("--headroom-seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30, help="fine-tuning epochs of the mix protocol")
    parser.add_argument("--max-epochs", type=int, default=200, help="cap of the headroom protocol")
    parser.add_argument("--patience", type=int, default=20, help="early stopping patience (headroom)")
    parser.add_argument("--foundation-epochs", type=int, default=60)
    floats = lambda text: [float(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--lrs", type=floats, default=[0.001, 0.003, 0.01, 0.03], help="grid of the mix protocol")
    parser.add_argument("--headroom-lrs", type=floats, default=[0.003, 0.01, 0.03],
                        help="grid of the headroom protocol (0.001 needs more than the epoch cap there)")
    parser.add_argument("--tune-seed", type=int, default=100)
    parser.add_argument("--anneal", type=float, default=0.0, help="anneal the TauGate temperature to this value")
    parser.add_argument("--protocols", default="mix,headroom")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--methods", type=lambda text: text.split(","), default=list(METHODS)[1:],
                        help="run only these (comma-separated); the tables list these and frozen. To split the "
                             "work over processes, give each a share, then run once more with all (cached)")
    parser.add_argument("--quick", action="store_true", help="2 seeds, 3/10 epochs: checks the pipeline only")
    parser.add_argument("--fresh", action="store_true", help="ignore cached runs")
    parser.add_argument("--smoke", action="store_true",
                        help="1 seed, 1 epoch, one learning rate: checks the code")
    args = parser.parse_args(argv)
    unknown = [m for m in args.methods if m not in METHODS or m == "frozen"]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(list(METHODS)[1:])}")
    if args.quick:
        args.seeds, args.headroom_seeds, args.epochs, args.max_epochs, args.foundation_epochs = 2, 2, 3, 10, 10
        args.lrs, args.headroom_lrs = args.lrs[-2:], args.headroom_lrs[-2:]
    if args.smoke:
        args.seeds, args.headroom_seeds, args.epochs, args.max_epochs, args.foundation_epochs = 1, 1, 1, 1, 1
        args.lrs, args.headroom_lrs, args.fresh = args.lrs[-1:], args.headroom_lrs[-1:], True
    tag = (args.data + ("" if args.arch == "mlp" else f"_{args.arch}") + ("_quick" if args.quick else "")
           + ("_smoke" if args.smoke else ""))
    args.out = args.out or Path("runs/taugate_protocol") / tag
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    quiet()
    settings = {k: getattr(args, k) for k in ("data", "arch", "epochs", "max_epochs", "patience", "foundation_epochs", "anneal")}
    cache = Cache(args.out / "runs.jsonl", settings, args.fresh)
    started = time.perf_counter()
    all_rows, all_summaries, sections = [], {}, []
    for protocol in args.protocols.split(","):
        print(f"[{protocol}] tuning learning rates on seed {args.tune_seed}", flush=True)
        lrs = choose_lrs(args, cache, protocol)
        seeds = range(args.seeds if protocol == "mix" else args.headroom_seeds)
        for seed in seeds:
            tests = test_sets(args, seed)
            all_rows += [measure(args, cache, protocol, name, seed, lrs[name], tests) for name in lrs]
        all_summaries[protocol] = summarise(all_rows, protocol)
        sections.append(markdown(all_summaries[protocol], f"{PROTOCOLS[protocol]['title']} "
                                                           f"({args.data}, {len(seeds)} seeds)"))
        if args.arch == "mlp":
            neuron_plot(args, protocol, lrs["TauGate"], test_sets(args, 0))
    if not all_summaries:
        return
    plot_tradeoff(all_summaries, args.out / "tradeoff.png")
    header = (f"# TauGate protocol ({args.data}, {args.arch})\n\n`python benchmarks/taugate_protocol.py --data "
              f"{args.data} --arch {args.arch}{' --quick' if args.quick else ''}`: AdamW, constant lr per method from {args.lrs} (mix) or "
              f"{args.headroom_lrs} (headroom), chosen by the lowest validation loss on tuning seed {args.tune_seed}; batch 128, selection = lowest rotated validation "
              f"loss; mix: {args.epochs} epochs; headroom: early stopping (patience {args.patience}, cap "
              f"{args.max_epochs}). Test: {len(test_sets(args, 0)['rotated'][1])} held-out images, upright and "
              f"rotated +45°. ± is the std over seeds; Δ is paired by seed.\n")
    (args.out / "results.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")
    (args.out / "results.json").write_text(json.dumps({"rows": all_rows, "summaries": all_summaries}, indent=1))
    print("\n\n".join(sections))
    print(f"\nwrote {args.out / 'results.md'}, tradeoff.png, neurons_*.png in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
