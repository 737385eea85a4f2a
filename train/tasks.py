"""SupervisedTask: the one LightningModule that trains any registered model on any DataModule whose shapes fit.

The model is named (`model: mlp`) and built from the registry with its arguments derived from the DataModule's
`DataSpec`, linked in by the CLI (`data.dims` -> `model.data_dims`), so a config never repeats them; a model that
cannot take the data refuses there, in one line (`kwargs_for_spec`). Hyper-parameters are primitives only, so
`torch.load(ckpt, weights_only=True)` reads every checkpoint this task writes.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from biozoo._core import DataSpec, check_choice
from biozoo.models import accepted_kwargs, create_model, get_builder, kwargs_for_spec

from .losses import LossOutput, get_loss


def data_spec(data_dims: dict[str, Any] | None) -> DataSpec | None:
    """The DataSpec inside linked data dims (None for hand-written dims without one)."""
    spec = (data_dims or {}).get("spec")
    return DataSpec.from_dict(spec) if isinstance(spec, dict) else spec


def build_model(model: str, model_kwargs: dict[str, Any] | None, data_dims: dict[str, Any] | None,
                pretrained: bool | str = False, checkpoint_path: str | None = None) -> nn.Module:
    """Build a registered model with its arguments derived from the data's spec (explicit kwargs merged by the
    model's `spec_kwargs`); it refuses in one line when it cannot take the data."""
    name = model.split(".", 1)[0]
    spec = data_spec(data_dims)
    if spec is not None:
        kwargs = kwargs_for_spec(name, spec, model_kwargs)  # checks the pair even for pretrained weights
    else:
        kwargs = {**accepted_kwargs(get_builder(name), data_dims or {}), **(model_kwargs or {})}
    if pretrained:
        return create_model(model, pretrained=pretrained)
    return create_model(model, checkpoint_path=checkpoint_path, **kwargs)


def target_like(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Regression targets (B, *P, D) in the logits' layout (B, D, *P)."""
    if target.shape != logits.shape and target.dim() == logits.dim() > 2 and target.movedim(-1, 1).shape == logits.shape:
        return target.movedim(-1, 1).contiguous()
    return target


SCHEDULERS = ("cosine", "linear", "constant")


def lr_schedule(optimizer: torch.optim.Optimizer, scheduler: str, warmup_steps: int, total_steps: int,
                min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LRScheduler:
    """torch's schedulers chained by `SequentialLR`: a linear warmup from lr / warmup_steps to lr (`LinearLR`), then
    "cosine" from lr to lr * min_lr_ratio at `total_steps`, "linear" (`LinearLR`) the same in a straight line, or
    "constant" (`ConstantLR`). The cosine is a `LambdaLR` factor, since `CosineAnnealingLR`'s floor is one absolute
    lr for every parameter group and the groups here differ (the ccRNN's cerebellum, a policy's critic)."""
    from torch.optim.lr_scheduler import ConstantLR, LambdaLR, LinearLR, SequentialLR

    check_choice("scheduler", scheduler, SCHEDULERS)
    span = max(1, total_steps - warmup_steps)
    if scheduler == "constant":
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    elif scheduler == "linear":
        after = LinearLR(optimizer, start_factor=1.0, end_factor=min_lr_ratio, total_iters=span)
    else:
        after = LambdaLR(optimizer, lambda step: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, step / span))))
    if warmup_steps <= 0:
        return after
    warmup = LinearLR(optimizer, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=max(1, warmup_steps - 1))
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


class BiozooTask(L.LightningModule):
    """Shared plumbing: the optimiser, the schedule and the portable model config inside each checkpoint."""

    model: nn.Module

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 scheduler: str = "cosine", min_lr_ratio: float = 0.0):
        super().__init__()
        check_choice("scheduler", scheduler, SCHEDULERS)

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimiser's parameter groups: every trainable parameter at `lr`. Tasks that need their own groups
        (the ccRNN's cerebellum at a scaled lr) override this hook; the scheduler follows each group's lr."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, weight_decay=hp.weight_decay, eps=1e-8)
        if hp.scheduler == "constant" and not hp.warmup_steps:
            return optimizer
        total = self.trainer.estimated_stepping_batches if self.trainer else 1
        total = int(total) if math.isfinite(total) else 10**9
        scheduler = lr_schedule(optimizer, hp.scheduler, hp.warmup_steps, total, hp.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["biozoo_model_config"] = self.model.biozoo_config()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class SupervisedTask(BiozooTask):
    """Trains `model` with a pluggable `loss` and torchmetrics metrics, logged as train/loss, val/acc, ...

    Args:
        model: a registered model name (`biozoo list`), optionally `name.tag` for pretrained weights.
        model_kwargs: the builder's arguments (dimensions come from the data unless given here).
        data_dims: filled in by the CLI from the DataModule (`input_shape`, `num_classes`, ...).
        loss: a registered loss (`cross_entropy`, `mse`, `ctm`, ...); `loss_kwargs` are passed to it.
        pretrained / checkpoint_path: start from shipped weights or from a portable checkpoint (fine-tuning).
    """

    def __init__(self, model: str = "mlp", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, loss: str = "cross_entropy",
                 loss_kwargs: dict[str, Any] | None = None, pretrained: bool | str = False,
                 checkpoint_path: str | None = None, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_steps: int = 0, scheduler: str = "cosine", min_lr_ratio: float = 0.0):
        super().__init__(lr, weight_decay, warmup_steps, scheduler, min_lr_ratio)
        self.save_hyperparameters()
        self.model = build_model(model, model_kwargs, data_dims, pretrained, checkpoint_path)
        self.loss_fn = get_loss(loss)
        self.loss_kwargs = loss_kwargs or {}
        spec = data_spec(data_dims)
        num_classes = spec.classes if spec is not None and spec.target == "classes" else \
            (data_dims or {}).get("num_classes") if spec is None else None
        self.classification = num_classes is not None and loss != "mse"
        make = (lambda: MulticlassAccuracy(num_classes, average="micro", ignore_index=-100)) if self.classification \
            else MeanSquaredError
        self.metric_name = "acc" if self.classification else "mse"
        self.train_metric, self.val_metric, self.test_metric = make(), make(), make()
        self.val_best = MaxMetric() if self.classification else None
        # the decision period (NeuroGym: steps whose label is not fixation), scored as NeuroGym scores its tasks
        self.fixation = spec.extras.get("fixation_label") if spec is not None and self.classification else None
        self.decision_metric = nn.ModuleDict({f"{s}_acc": make() for s in ("train", "val", "test")}) \
            if self.fixation is not None else None
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def _step(self, batch: Any, stage: str, metric) -> torch.Tensor:
        x, y = batch
        out: LossOutput = self.loss_fn(self.model(x), y, **self.loss_kwargs)
        if not self.classification:
            y = target_like(out.logits, y)
        on_step = stage == "train"
        sync = not on_step
        if on_step:
            self.log(f"{stage}/loss", out.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        else:  # the mean over every rank's samples: MeanMetric syncs sums and counts exactly, once per epoch
            # (Lightning's own sync_dist averages the integer sample counts, which rounds when the ranks differ)
            mean = self.eval_loss[stage]
            mean.update(out.loss.detach(), weight=len(y))
            self.log(f"{stage}/loss", mean, prog_bar=True, on_step=False, on_epoch=True)
        metric(out.logits.detach().contiguous(), y)  # torchmetrics' regression metrics flatten with .view
        self.log(f"{stage}/{self.metric_name}", metric, prog_bar=True, on_step=False, on_epoch=True)
        if self.decision_metric is not None:
            decision = self.decision_metric[f"{stage}_acc"]
            decision(out.logits.detach().contiguous(), y.masked_fill(y == self.fixation, -100))
            self.log(f"{stage}/acc_decision", decision, prog_bar=True, on_step=False, on_epoch=True)
        for name, value in out.extras.items():
            if value.numel() == 1:
                self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=sync)
        return out.loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_metric)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val", self.val_metric)

    def on_validation_epoch_end(self) -> None:
        if self.val_best is not None and not self.trainer.sanity_checking:
            self.val_best(self.val_metric.compute())
            self.log("val/acc_best", self.val_best.compute(), prog_bar=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test", self.test_metric)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        out = self.loss_fn(self.model(x), None, **self.loss_kwargs)  # target None: logits only
        return out.logits.softmax(1) if self.classification else out.logits
