"""Training the cortico-cerebellar RNN: truncated BPTT with cerebellar synthetic gradients (manual optimisation).

`CCRNNTask(training=...)` trains a `ccrnn*` model three ways through one code path, `windowed_backward`:

- "ccrnn": windows of K steps; at each window end the cerebellum's prediction times lambda (`sg_scale`) is
  injected as the gradient from the future; the cerebellum regresses onto the gradient that reaches the
  window's start state (the bootstrapped target, which includes lambda times its own later prediction).
- "tbptt": the same windows without a cerebellum (the cRNN baseline: nothing crosses a window boundary).
- "bptt": one window covering the whole sequence (full backpropagation through time).

The injection back-propagates the surrogate sum_w (L_w + <s_end(w), g_end(w)>) with g detached: its gradient is
exactly each window's loss gradient plus the injected g pushed back through that window. Every window starts
from a detached leaf, so the graphs are disjoint and one backward pass equals one per window; each start
state's .grad is then that window's cerebellar target. One optimiser step per batch after all windows and
gradient-norm clipping (1.0) over cortex and cerebellum, as in the official code.

The targets are gradients of a batch-mean loss (~1e-3 here), while Adam moves every weight by ~lr per step
whatever the gradient's size, so a cerebellum at the cortex's rate predicts with noise comparable to its
targets; `cerebellum_lr_scale` < 1 (0.1 in our configs) lets it average that noise out.

Also here: the ataxia-like measures of drawn trajectories (deviation from the target, jerk) and the losses
(MSE on the feedback steps for drawing, cross-entropy at the last step for recognition).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from biozoo._core import check_choice

from .tasks import BiozooTask, build_model

TRAININGS = ("ccrnn", "tbptt", "bptt")


# Losses and measures ----------------------------------------------------------------------------------------------

def feedback_steps(seq_len: int, objective: str, feedback_every: int = 1) -> torch.Tensor:
    """Boolean (T,) mask of the steps that get a teacher signal: the last step for classification, every
    `feedback_every`-th step from t = 0 for drawing."""
    mask = torch.zeros(seq_len, dtype=torch.bool)
    if objective == "classification":
        mask[-1] = True
    else:
        mask[::feedback_every] = True
    return mask


def sequence_loss(outputs: torch.Tensor, target: torch.Tensor, objective: str, mask: torch.Tensor,
                  start: int = 0) -> torch.Tensor:
    """This window's share of the sequence loss. outputs (B, k, O) cover steps start..start+k-1 of the
    sequence; the shares of all windows sum to the loss of the whole sequence."""
    steps = mask[start:start + outputs.shape[1]].to(outputs.device)
    if not steps.any():
        return outputs.new_zeros(())
    if objective == "classification":  # the mask holds only the last step
        return F.cross_entropy(outputs[:, -1], target)
    window_target = target[:, start:start + outputs.shape[1]]
    return F.mse_loss(outputs[:, steps], window_target[:, steps], reduction="sum") / (
        outputs.shape[0] * outputs.shape[2] * int(mask.sum()))


def trajectory_deviation(drawn: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean Euclidean distance between drawn and target points, (B,) (dysmetria)."""
    return (drawn - target).norm(dim=-1).mean(-1)


def trajectory_jerk(drawn: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean norm of the third finite difference (jerk per step^3), (B,); 0 for T < 4.
    A constant-speed straight line has zero jerk, so this measures the irregularity of the movement."""
    if drawn.shape[1] < 4:
        return drawn.new_zeros(drawn.shape[0])
    return torch.diff(drawn, n=3, dim=1).norm(dim=-1).mean(-1)


# Windowed backpropagation -------------------------------------------------------------------------------------

@dataclass
class WindowPass:
    loss: torch.Tensor  # the sequence's task loss (detached)
    outputs: torch.Tensor  # (B, T, O), detached
    starts: torch.Tensor | None = None  # (W, B, S) window start states (detached), with a synthetic gradient only
    targets: torch.Tensor | None = None  # (W, B, S) the gradients that reached them


# (states at window ends (W, B, S), their steps t) -> predicted dL_{>=t}/d state, (W, B, S)
GradientFn = Callable[[torch.Tensor, list[int]], torch.Tensor]


def windowed_backward(model: nn.Module, x: torch.Tensor, window_loss: Callable[[torch.Tensor, int], torch.Tensor],
                      window: int, sg_scale: float = 0.1, synthetic: GradientFn | None = None,
                      backward: Callable[[torch.Tensor], None] | None = None) -> WindowPass:
    """Run x (B, T, F) through a ccrnn in windows of `window` steps (<= 0: the whole sequence) and back-propagate;
    parameter gradients accumulate in .grad.

    The state is detached at every window start, so no gradient crosses a boundary except the injected one:
    `synthetic(states, steps)` predicts dL_{>=t}/d state at the window ends t < T, and sg_scale times it is added
    there. With it, the returned `targets` are the gradients that reached each window's start state (the
    cerebellar targets). Without it this is truncated BPTT (full BPTT when the window covers the sequence).
    The windows' graphs are disjoint, so a single backward pass over the summed surrogate losses is exactly the
    same as one pass per window, and cheaper.
    """
    backward = backward or torch.Tensor.backward
    seq_len = x.shape[1]
    window = seq_len if window <= 0 else window
    state = model.initial_state(x.shape[0], x)
    starts, ends, outputs = [], [], []
    loss = x.new_zeros(())
    for start in range(0, seq_len, window):
        starts.append(state.detach().requires_grad_(synthetic is not None))
        out, state = model.run_window(x[:, start:start + window], starts[-1])
        loss = loss + window_loss(out, start)
        ends.append(state)
        outputs.append(out.detach())
    surrogate = loss
    if synthetic is not None and len(ends) > 1:  # nothing is injected at the end of the sequence
        with torch.no_grad():
            injected = sg_scale * synthetic(torch.stack(ends[:-1]).detach(), list(range(window, seq_len, window)))
        surrogate = surrogate + sum((end * g).sum() for end, g in zip(ends, injected))
    if surrogate.requires_grad:
        backward(surrogate)
    result = WindowPass(loss=loss.detach(), outputs=torch.cat(outputs, 1))
    if synthetic is not None:
        result.starts = torch.stack([s.detach() for s in starts])
        result.targets = torch.stack([torch.zeros_like(s) if s.grad is None else s.grad.detach() for s in starts])
    return result


def cerebellum_loss(model: nn.Module, window_pass: WindowPass) -> torch.Tensor:
    """sum over windows of mean_batch ||C(s_start) - target||^2 (the inferior-olive error)."""
    error = model.predict_gradient(window_pass.starts) - window_pass.targets
    return error.pow(2).sum(-1).mean(-1).sum()


# The LightningModule -------------------------------------------------------------------------------------------

class CCRNNTask(BiozooTask):
    """Trains a `ccrnn*` model with cerebellar synthetic gradients ("ccrnn") or a baseline ("tbptt", "bptt").

    Args:
        model / model_kwargs: a registered ccrnn model and its arguments (dims come from the data).
        data_dims: from the DataModule: input_size, output_size, seq_len, objective, feedback_every, ...
        training: "ccrnn" | "tbptt" (same truncation, no cerebellum) | "bptt" (no truncation, no cerebellum).
        truncation / sg_scale: override the model's K and lambda (recorded in the model's config).
        cerebellum_lr_scale: the cerebellum's learning rate relative to `lr` (1 = one shared rate, as in the
            official code; a slower cerebellum gives less noisy feedback, see benchmarks/ccrnn.py).
        grad_clip: gradient-norm clipping per step (0 = off).
        lr, weight_decay, warmup_steps, scheduler, min_lr_ratio: the shared AdamW + schedule.
    """

    def __init__(self, model: str = "ccrnn", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, training: str = "ccrnn", truncation: int | None = None,
                 sg_scale: float | None = None, cerebellum_lr_scale: float = 1.0, grad_clip: float = 1.0,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0, scheduler: str = "cosine",
                 min_lr_ratio: float = 0.0):
        super().__init__(lr, weight_decay, warmup_steps, scheduler, min_lr_ratio)
        check_choice("training", training, TRAININGS)
        self.save_hyperparameters()
        self.automatic_optimization = False
        kwargs = dict(model_kwargs or {})
        if truncation is not None:
            kwargs["truncation"] = truncation
        if sg_scale is not None:
            kwargs["sg_scale"] = sg_scale
        if training != "ccrnn":
            kwargs["cerebellum"] = False
        if training == "bptt":
            kwargs["truncation"] = 0
        dims = data_dims or {}
        self.model = build_model(model, kwargs, dims)
        self.training_mode = training
        self.objective = dims.get("objective", "classification" if "num_classes" in dims else "regression")
        self.feedback_every = int(dims.get("feedback_every", 1))
        if self.objective == "classification":
            make = lambda: MulticlassAccuracy(self.model.output_size, average="micro")  # noqa: E731
            self.metrics = nn.ModuleDict({f"{s}_acc": make() for s in ("train", "val", "test")})
        else:
            names = ("mse", "deviation", "jerk", "excess_jerk")
            self.metrics = nn.ModuleDict({f"{s}_{n}": MeanMetric() for s in ("val", "test") for n in names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def param_groups(self) -> list[dict[str, Any]]:
        """The cerebellum in its own group at lr * cerebellum_lr_scale (the paper's slower cerebellar learning)."""
        scale = self.hparams.cerebellum_lr_scale
        if self.model.cerebellum is None or scale == 1.0:
            return super().param_groups()
        cerebellum = [p for p in self.model.cerebellum.parameters() if p.requires_grad]
        ids = {id(p) for p in cerebellum}
        main = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": main}, {"params": cerebellum, "lr": self.hparams.lr * scale}]

    def _window_loss(self, y: torch.Tensor, seq_len: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
        mask = feedback_steps(seq_len, self.objective, self.feedback_every)
        return lambda out, start: sequence_loss(out, y, self.objective, mask, start)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = self.model.as_sequence(x)
        optimizer = self.optimizers()
        optimizer.zero_grad()
        synthetic = None
        if self.training_mode == "ccrnn":
            synthetic = lambda states, steps: self.model.predict_gradient(states)  # noqa: E731
        window_pass = windowed_backward(self.model, x, self._window_loss(y, x.shape[1]), self.model.truncation,
                                        self.model.sg_scale, synthetic, self.manual_backward)
        if synthetic is not None:
            c_loss = cerebellum_loss(self.model, window_pass)
            self.manual_backward(c_loss)
            self.log("train/cerebellum_loss", c_loss.detach(), on_step=True, on_epoch=True, batch_size=len(y))
        if self.hparams.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log("train/loss", window_pass.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        if self.objective == "classification":
            self.metrics["train_acc"](window_pass.outputs[:, -1], y)
            self.log("train/acc", self.metrics["train_acc"], on_step=False, on_epoch=True)
        return window_pass.loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        x = self.model.as_sequence(x)
        out, _ = self.model.run_window(x, self.model.initial_state(x.shape[0], x))
        loss = self._window_loss(y, x.shape[1])(out, 0)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)
        values: dict[str, torch.Tensor] = {}
        if self.objective == "classification":
            logits = out[:, -1]
            self.metrics[f"{stage}_acc"](logits, y)
            values["acc"] = self.metrics[f"{stage}_acc"]
        else:
            jerk = trajectory_jerk(out)
            measures = {"mse": (out - y).pow(2).sum(-1).mean(-1), "deviation": trajectory_deviation(out, y),
                        "jerk": jerk, "excess_jerk": jerk - trajectory_jerk(y)}
            for name, value in measures.items():
                self.metrics[f"{stage}_{name}"](value)
                values[name] = self.metrics[f"{stage}_{name}"]
        for name, metric in values.items():
            self.log(f"{stage}/{name}", metric, prog_bar=name in ("acc", "deviation"), on_step=False, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.model(x).logits
        if self.objective == "classification" and out.dim() == 2:
            return out.softmax(-1)
        return out.transpose(1, 2) if out.dim() == 3 else out  # (B, T, O), the layout of the targets
