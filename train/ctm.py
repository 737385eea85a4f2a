"""Training and evaluation pieces for the Continuous Thought Machine (arXiv 2505.05522; official `utils/losses.py`).

Losses (registered for `SupervisedTask`):
- `ctm`: cross-entropy at every tick, (B, T) -- for per-position targets (B, L) (parity) the mean over positions
  first. Per sample the mean of the CE at its min-loss tick t1 and at its most-certain tick t2; the batch mean of
  that. `use_most_certain=False` takes the last tick as t2 (the official LSTM baselines). The scored logits are
  the most-certain tick's: (B, C), or (B, C, L) per position. A model without ticks: plain cross-entropy.
- `ctm_ctc`: sorting, CTC over the ticks with the blank as the last class. Scored logits: the greedy (best-path)
  decoding as one-hot (B, C, N); a decoded sequence shorter than N counts its missing positions wrong.

Evaluation: `adaptive_compute_table` (accuracy and mean ticks per certainty threshold), the plots
`plot_neural_dynamics`, `plot_tick_curves` and `plot_attention` (PNG + GIF), all callable from Python and run at
the end of `biozoo test` by the `CTMReport` callback.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from biozoo._core import BiozooError, ModelOutput, as_output

from .losses import (LossOutput, at_ticks, chosen_ticks, cross_entropy, label_weights, min_and_certain, register_loss,
                     tick_losses)


@register_loss("ctm")
def ctm_loss(output: ModelOutput, target: torch.Tensor | None, use_most_certain: bool = True,
             ignore_index: int = -100, class_weights: list[float] | None = None, **_: Any) -> LossOutput:
    """The official CTM loss: mean of the CE at the min-loss tick and at the most-certain (or last) tick. For a
    model without ticks both are its one output: plain cross-entropy. Positions labelled `ignore_index` are
    masked out of each sample's mean; `class_weights` weigh each position by its label."""
    ticks_logits, certainties = as_output(output).per_tick()
    certain = chosen_ticks(certainties, use_most_certain)
    logits = at_ticks(ticks_logits, certain)
    if target is None:
        return LossOutput(logits.new_zeros(()), logits)
    weight = label_weights(class_weights, ticks_logits)
    loss = min_and_certain(tick_losses(ticks_logits, target, ignore_index, weight), certain)
    return LossOutput(loss, logits, {"certain_tick": certain.float().mean() + 1})


def ctc_greedy_decode(predictions: torch.Tensor, blank: int) -> list[list[int]]:
    """Best path: argmax per tick, collapse repeats, drop blanks (the official `decode_predictions`)."""
    best = predictions.argmax(1).tolist()
    decoded = []
    for path in best:
        seq, previous = [], -1
        for c in path:
            if c != blank and c != previous:
                seq.append(c)
            previous = c if c != blank else previous
        decoded.append(seq)
    return decoded


@register_loss("ctm_ctc")
def ctm_ctc_loss(output: ModelOutput, target: torch.Tensor | None, **_: Any) -> LossOutput:
    """Sorting: CTC over the ticks (blank = last class), as the official `sort_loss`. A model without ticks has
    no time to align: it predicts each position directly (logits (B, N + 1, N)), scored by cross-entropy."""
    output = as_output(output)
    if output.ticks_logits is None:
        return cross_entropy(output, target)
    predictions = output.ticks_logits
    B, C, T = predictions.shape
    length = target.size(1) if target is not None else C - 1
    if T < length:
        raise BiozooError(f"CTC needs at least as many ticks as target positions: {T} ticks < {length}")
    decoded = ctc_greedy_decode(predictions.detach(), C - 1)
    logits = predictions.new_zeros(B, C, length)
    logits[:, C - 1] = 1.0  # positions the decoding did not reach read as blank, which is never a target
    for b, seq in enumerate(decoded):
        seq = torch.tensor(seq[:length], dtype=torch.long, device=predictions.device)
        logits[b, C - 1, : len(seq)] = 0.0
        logits[b, seq, torch.arange(len(seq), device=predictions.device)] = 1.0
    if target is None:
        return LossOutput(logits.new_zeros(()), logits)
    log_probs = F.log_softmax(predictions.float(), 1).permute(2, 0, 1)
    loss = F.ctc_loss(log_probs, target, torch.full((B,), T, dtype=torch.long),
                      torch.full((B,), length, dtype=torch.long), blank=C - 1, reduction="mean")
    exact = torch.tensor([seq == t for seq, t in zip(decoded, target.tolist())], dtype=torch.float32).mean()
    return LossOutput(loss, logits, {"sequence_acc": exact})


# --- Evaluation: adaptive compute ---------------------------------------------------------------------------------

THRESHOLDS = (0.5, 0.8, 0.9, 0.95)


def accuracy_at_certain_tick(output: Any, target: torch.Tensor) -> tuple[int, int]:
    """(correct, total) of the argmax at each sample's most-certain tick (per position for (B, L) targets),
    or at its halting tick if it halted early (`CTMOutput.most_certain_tick`)."""
    logits = at_ticks(output.ticks_logits, output.most_certain_tick())
    correct = (logits.argmax(1) == target).sum().item()
    return int(correct), target.numel()


@torch.no_grad()
def adaptive_compute_table(model: torch.nn.Module, batches: Any, thresholds: Sequence[float] = THRESHOLDS,
                           min_ticks: int = 1, halt_on: str | None = None) -> list[dict[str, Any]]:
    """Accuracy and mean ticks used per certainty threshold, and for all ticks (threshold None, the official
    most-certain evaluation). `batches` yields (x, y); `halt_on` (default: the model's) "min" or "mean"."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    stats = {t: [0, 0, 0.0, 0] for t in list(thresholds) + [None]}  # correct, total, tick sum, samples
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        for threshold in stats:
            out = model(x, halt_threshold=threshold, min_ticks=min_ticks, halt_on=halt_on)
            correct, total = accuracy_at_certain_tick(out, y)
            ticks = out.ticks.float().sum().item() if out.ticks is not None else out.predictions.size(-1) * len(x)
            s = stats[threshold]
            s[0] += correct
            s[1] += total
            s[2] += ticks
            s[3] += len(x)
    model.train(was_training)
    return [{"threshold": t, "accuracy": s[0] / max(1, s[1]), "mean_ticks": s[2] / max(1, s[3])}
            for t, s in stats.items()]


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `adaptive_compute_table` rows."""
    full = rows[-1]["mean_ticks"]
    lines = ["| certainty threshold | accuracy | mean ticks | compute saved |", "|---|---|---|---|"]
    for r in rows:
        name = "all ticks" if r["threshold"] is None else f"{r['threshold']:.2f}"
        lines.append(f"| {name} | {100 * r['accuracy']:.2f}% | {r['mean_ticks']:.2f} | {full / r['mean_ticks']:.2f}x |")
    return "\n".join(lines)


# --- Plots --------------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_neural_dynamics(output: Any, path: str | Path, n_neurons: int = 16, sample: int = 0) -> Path:
    """Post-activation traces of `n_neurons` neurons across the ticks for one sample (needs track=True)."""
    plt = _pyplot()
    if output.post_activations is None:
        raise BiozooError("plot_neural_dynamics needs a result from model(x, track=True)")
    traces = output.post_activations[:, sample].float().cpu()  # (T, D)
    picks = torch.linspace(0, traces.size(1) - 1, min(n_neurons, traces.size(1))).long()
    cols = 4
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 1.6 * rows), sharex=True, squeeze=False)
    for ax, d in zip(axes.flat, picks.tolist()):
        ax.plot(range(1, traces.size(0) + 1), traces[:, d].numpy(), lw=1.2)
        ax.set_title(f"neuron {d}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(picks):]:
        ax.axis("off")
    fig.supxlabel("tick")
    fig.suptitle("CTM neural dynamics (post-activations)")
    fig.tight_layout()
    return _save(fig, path)


def plot_tick_curves(output: Any, target: torch.Tensor, path: str | Path) -> Path:
    """Loss, certainty and accuracy per tick (mean over the batch)."""
    plt = _pyplot()
    losses = tick_losses(output.ticks_logits, target).float().mean(0).detach().cpu()
    certainty = output.certainties[:, 1].float().mean(0).detach().cpu()
    T = losses.numel()
    accuracy = torch.tensor([accuracy_at_tick(output, target, t) for t in range(T)])
    ticks = range(1, T + 1)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, values, name in zip(axes, (losses, certainty, accuracy), ("loss", "certainty", "accuracy")):
        ax.plot(ticks, values.numpy(), marker=".")
        ax.set_xlabel("tick")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_at_tick(output: Any, target: torch.Tensor, tick: int) -> float:
    ticks = torch.full((len(target),), tick, dtype=torch.long, device=target.device)
    return (at_ticks(output.ticks_logits, ticks).argmax(1) == target).float().mean().item()


def attention_maps(output: Any, sample: int = 0) -> torch.Tensor:
    """(T, h, w) attention over the input tokens, averaged over heads (1-D inputs are shown as one row)."""
    if output.attention is None:
        raise BiozooError("attention maps need a CTM with attention and a result from model(x, track=True)")
    maps = output.attention[:, sample].float().mean(1).squeeze(1).cpu()  # (T, L)
    shape = output.token_shape if output.token_shape and len(output.token_shape) == 2 else (1, maps.size(1))
    return maps.view(maps.size(0), *shape)


def plot_attention(output: Any, inputs: torch.Tensor, png_path: str | Path, gif_path: str | Path | None = None,
                   sample: int = 0, max_panels: int = 12) -> list[Path]:
    """Attention over the input per tick: a PNG grid of evenly spaced ticks and (optionally) a GIF of every tick,
    each frame showing the input and the attention map."""
    plt = _pyplot()
    maps = attention_maps(output, sample)
    T = maps.size(0)
    image = inputs[sample].float().cpu()
    image = image.view(1, -1) if image.dim() == 1 else image.permute(1, 2, 0).squeeze(-1) if image.dim() == 3 else image
    picks = torch.linspace(0, T - 1, min(max_panels, T)).round().long().tolist()
    cols = min(6, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows * (0.5 if maps.size(1) == 1 else 1)),
                             squeeze=False)
    for ax, t in zip(axes.flat, picks):
        ax.imshow(maps[t].numpy(), cmap="magma", aspect="auto")
        ax.set_title(f"tick {t + 1}", fontsize=8)
        ax.axis("off")
    for ax in list(axes.flat)[len(picks):]:
        ax.axis("off")
    fig.suptitle("CTM attention over the input per tick")
    fig.tight_layout()
    written = [_save(fig, png_path)]
    if gif_path is not None:
        written.append(attention_gif(maps, image, output, sample, gif_path))
    return written


def attention_gif(maps: torch.Tensor, image: torch.Tensor, output: Any, sample: int, path: str | Path) -> Path:
    from PIL import Image

    plt = _pyplot()
    certainty = output.certainties[sample, 1].float().cpu()
    frames = []
    for t in range(maps.size(0)):
        fig, (left, right) = plt.subplots(1, 2, figsize=(6, 3))
        left.imshow(image.numpy(), cmap="gray", aspect="auto")
        left.set_title("input")
        left.axis("off")
        right.imshow(maps[t].numpy(), cmap="magma", aspect="auto", vmin=0, vmax=float(maps.max()))
        right.set_title(f"tick {t + 1}, certainty {certainty[t]:.2f}")
        right.axis("off")
        fig.tight_layout()
        fig.canvas.draw()
        frames.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
        plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=250, loop=0)
    return path


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Any, out_dir: str | Path, thresholds: Sequence[float] = THRESHOLDS,
             max_batches: int | None = None) -> dict[str, Any]:
    """The CTM report: the adaptive-compute table (markdown + JSON) and the plots of the first batch
    (neural dynamics, loss/certainty/accuracy per tick, attention PNG + GIF) in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = [b for i, b in zip(range(max_batches or 10**9), batches)]
    rows = adaptive_compute_table(model, batches, thresholds)
    table = format_table(rows)
    (out_dir / "adaptive_compute.md").write_text(table + "\n")
    (out_dir / "adaptive_compute.json").write_text(json.dumps(rows, indent=2) + "\n")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in batches[0])
    out = model(x, track=True)
    files = [plot_neural_dynamics(out, out_dir / "neural_dynamics.png"),
             plot_tick_curves(out, y, out_dir / "tick_curves.png")]
    if out.attention is not None:
        files += plot_attention(out, x, out_dir / "attention.png", out_dir / "attention.gif")
    model.train(was_training)
    return {"table": rows, "markdown": table, "files": files}


class CTMReport(L.Callback):
    """After `biozoo test`: the adaptive-compute table and the CTM plots of the test set, in
    `<log dir>/ctm_report/` (add under trainer.callbacks in a config)."""

    def __init__(self, thresholds: Sequence[float] = THRESHOLDS, max_batches: int = 8):
        self.thresholds, self.max_batches = list(thresholds), max_batches

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.datamodule is None:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "ctm_report"
        report = evaluate(pl_module.model, trainer.datamodule.test_dataloader(), out_dir, self.thresholds,
                          self.max_batches)
        print(f"CTM adaptive compute ({out_dir}):\n{report['markdown']}")
