"""SupervisedTask: the one LightningModule that trains any registered model on any DataModule whose shapes fit.

The model is named (`model: mlp`) and built from the registry with the DataModule's dimensions linked in by the
CLI (`data.dims` -> `model.data_dims`), so a config never repeats them. Hyper-parameters are primitives only,
so `torch.load(ckpt, weights_only=True)` reads every checkpoint this task writes.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from biozoo.models import create_model
from biozoo.models._registry import accepted_kwargs, get_builder

from .losses import LossOutput, get_loss


def build_model(model: str, model_kwargs: dict[str, Any] | None, data_dims: dict[str, Any] | None,
                pretrained: bool | str = False, checkpoint_path: str | None = None) -> nn.Module:
    """Build a registered model, passing the data dimensions that its builder takes (explicit kwargs win)."""
    dims = accepted_kwargs(get_builder(model.split(".", 1)[0]), data_dims or {})
    kwargs = {**dims, **(model_kwargs or {})}
    if pretrained:
        return create_model(model, pretrained=pretrained)
    return create_model(model, checkpoint_path=checkpoint_path, **kwargs)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BiozooTask(L.LightningModule):
    """Shared plumbing: the optimiser, the schedule and the portable model config inside each checkpoint."""

    model: nn.Module

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0,
                 scheduler: str = "cosine", min_lr_ratio: float = 0.0):
        super().__init__()
        if scheduler not in ("cosine", "constant"):
            from biozoo.models.errors import BiozooError

            raise BiozooError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, eps=1e-8)
        if hp.scheduler == "constant" and not hp.warmup_steps:
            return optimizer
        total = self.trainer.estimated_stepping_batches if self.trainer else 1
        total = int(total) if math.isfinite(total) else 10**9
        if hp.scheduler == "constant":
            total = 10**12  # warmup then flat
        scheduler = cosine_with_warmup(optimizer, hp.warmup_steps, total, hp.min_lr_ratio)
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
        num_classes = (data_dims or {}).get("num_classes")
        self.classification = num_classes is not None and loss != "mse"
        make = (lambda: MulticlassAccuracy(num_classes, average="micro", ignore_index=-100)) if self.classification \
            else MeanSquaredError
        self.metric_name = "acc" if self.classification else "mse"
        self.train_metric, self.val_metric, self.test_metric = make(), make(), make()
        self.val_best = MaxMetric() if self.classification else None
        self.eval_loss = nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def _step(self, batch: Any, stage: str, metric) -> torch.Tensor:
        x, y = batch
        out: LossOutput = self.loss_fn(self.model(x), y, **self.loss_kwargs)
        on_step = stage == "train"
        sync = not on_step
        if on_step:
            self.log(f"{stage}/loss", out.loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(y))
        else:  # the mean over every rank's samples: MeanMetric syncs sums and counts exactly, once per epoch
            # (Lightning's own sync_dist averages the integer sample counts, which rounds when the ranks differ)
            mean = self.eval_loss[stage]
            mean.update(out.loss.detach(), weight=len(y))
            self.log(f"{stage}/loss", mean, prog_bar=True, on_step=False, on_epoch=True)
        metric(out.logits.detach(), y)
        self.log(f"{stage}/{self.metric_name}", metric, prog_bar=True, on_step=False, on_epoch=True)
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
