"""Calibration of any classifier, the CTM's per tick included (CTM paper, calibration of the ImageNet and CIFAR-10
models; official `tasks/image_classification/analysis/run_imagenet_analysis.py` ~360-405).

The official readout: at tick t the prediction is the argmax of tick t's logits and its confidence is the softmax
probability of that class averaged over ticks 1..t (so a CTM's confidence integrates its thinking). A model without
ticks reads as one tick: its softmax probability of the predicted class. The reliability diagram bins confidence in
the official 9 equal bins; ECE is torchmetrics' binary calibration error of (confidence, correct), l1 norm, over
`n_bins` equal bins (15 by default, the usual ECE).

    report = calibration_report({"ctm": ctm, "resnet": resnet}, loader, "calibration/")
    # report["ctm"]["ece"], report["ctm"]["ece_per_tick"], calibration/calibration.png

At the end of `biozoo test`, the `Calibration` callback writes the same for the tested model into
`<log dir>/calibration/` (calibration.png, calibration.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from biozoo._core import as_output

from .ctm import _save

OFFICIAL_BIN_EDGES = torch.linspace(0, 1, 10)  # the official plot's 9 bins


def tick_confidences(ticks_logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(confidence, correct), each (N, T), from per-tick logits (N, C, T): the official tick-averaged readout."""
    probs = ticks_logits.float().softmax(1)  # (N, C, T)
    pred = ticks_logits.argmax(1)  # (N, T)
    t = pred.shape[1]
    # q[n, t, s] = probs[n, pred[n, t], s]: tick t's predicted class, its probability at every tick s
    q = probs.gather(1, pred.unsqueeze(2).expand(-1, -1, t))
    until = torch.tril(torch.ones(t, t))  # [t, s] = 1 where s <= t
    confidence = (q * until).sum(-1) / until.sum(-1)
    return confidence, pred == targets.unsqueeze(1)


def reliability(confidence: torch.Tensor, correct: torch.Tensor, edges: torch.Tensor = OFFICIAL_BIN_EDGES
                ) -> tuple[list[float], list[float], list[int]]:
    """Per bin (last bin closed): mean confidence, accuracy and count; empty bins are left out."""
    centres, accuracies, counts = [], [], []
    for i in range(len(edges) - 1):
        upper = confidence <= edges[i + 1] if i == len(edges) - 2 else confidence < edges[i + 1]
        mask = (confidence >= edges[i]) & upper
        if mask.any():
            centres.append(float(confidence[mask].mean()))
            accuracies.append(float(correct[mask].float().mean()))
            counts.append(int(mask.sum()))
    return centres, accuracies, counts


def ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    from torchmetrics.functional.classification import binary_calibration_error

    return float(binary_calibration_error(confidence.float().contiguous(), correct.long().contiguous(), n_bins=n_bins,
                                          norm="l1"))


@torch.no_grad()
def collect(model: nn.Module, batches: Any, max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tick logits (N, C, T) and targets (N,) of a classifier over `batches` ((x, y) pairs)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    logits, targets = [], []
    for i, (x, y) in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        ticks, _ = as_output(model(x.to(device))).per_tick()
        if ticks.dim() != 3:
            raise ValueError(f"calibration reads class logits (B, C[, T]); got {tuple(ticks.shape)} (per-position outputs?)")
        logits.append(ticks.cpu())
        targets.append(y.cpu())
    model.train(was_training)
    return torch.cat(logits), torch.cat(targets)


def summarise(ticks_logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> dict[str, Any]:
    confidence, correct = tick_confidences(ticks_logits, targets)
    per_tick = [ece(confidence[:, t], correct[:, t], n_bins) for t in range(confidence.shape[1])]
    centres, accuracies, counts = reliability(confidence[:, -1], correct[:, -1])
    return {"n": len(targets), "ticks": confidence.shape[1], "accuracy": float(correct[:, -1].float().mean()),
            "ece": per_tick[-1], "ece_per_tick": per_tick, "n_bins": n_bins,
            "reliability": {"confidence": centres, "accuracy": accuracies, "count": counts}}


def plot(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: str | Path) -> Path:
    """Reliability diagram: per model its curve after all ticks (bold), and for a ticked model every tick's (thin,
    coloured by tick), as the official plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    cmap = matplotlib.colormaps["viridis"]
    styles = iter(["-", "--", "-.", ":"])
    for name, (ticks_logits, targets) in curves.items():
        confidence, correct = tick_confidences(ticks_logits, targets)
        t = confidence.shape[1]
        for tick in range(t - 1):
            c, a, _ = reliability(confidence[:, tick], correct[:, tick])
            ax.plot(c, a, ".-", color=cmap(tick / max(1, t - 1)), alpha=0.4, lw=0.8)
        c, a, _ = reliability(confidence[:, -1], correct[:, -1])
        ax.plot(c, a, marker="o", ls=next(styles, "-"), lw=2,
                label=f"{name}{' after all ticks' if t > 1 else ''} (ECE {ece(confidence[:, -1], correct[:, -1]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="mean predicted probability", ylabel="fraction correct")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def calibration_report(models: dict[str, nn.Module], batches: Any, out_dir: str | Path,
                       max_batches: int | None = None, n_bins: int = 15) -> dict[str, dict[str, Any]]:
    """ECE (per tick for ticked models) and one reliability diagram for several classifiers on the same data."""
    batches = list(batches) if not isinstance(batches, list) else batches
    collected = {name: collect(model, batches, max_batches) for name, model in models.items()}
    out_dir = Path(out_dir)
    report = {name: summarise(*c, n_bins=n_bins) for name, c in collected.items()}
    plot(collected, out_dir / "calibration.png")
    (out_dir / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


class Calibration(L.Callback):
    """After `biozoo test`: the tested classifier's ECE and reliability diagram in `<log dir>/calibration/`
    (add under trainer.callbacks in a config)."""

    def __init__(self, max_batches: int | None = None, n_bins: int = 15):
        self.max_batches, self.n_bins = max_batches, n_bins

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "calibration"
        name = getattr(pl_module.model, "registry_name", None) or type(pl_module.model).__name__
        report = calibration_report({name: pl_module.model}, trainer.datamodule.test_dataloader(), out_dir,
                                    self.max_batches, self.n_bins)[name]
        print(f"calibration ({out_dir}): accuracy {report['accuracy']:.4f}, ECE {report['ece']:.4f}")
