"""Lightning pieces for dopamine-gated PEFT (TauGate, arXiv 2602.11726) and the baselines it is compared with.

- `apply_peft(model, method, ...)`: freezes a foundation model and opens what `method` trains:
  frozen (nothing), taugate (2 gate parameters per hidden neuron, `biozoo.models.taugate`), lora (the `peft`
  library, `target_modules` named explicitly, every Linear by default, alpha = 2r unless given), bitfit (biases
  only), head (the last Linear), full (everything).
- `PEFTTask`: SupervisedTask on such a model; the foundation comes from `pretrained` or `checkpoint_path`, so
  every method starts from the same weights and runs the same optimiser (AdamW), schedule and logging.
- `TemperatureAnneal`: geometric annealing of the TauGate temperature over the epochs of a fit.
- `KeepBest`: the selection rule of the protocol, in memory: after each validation epoch it keeps a copy of the
  weights if the monitored metric improved, and restores the best copy when the fit ends.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from biozoo._core import BiozooError, UnknownNameError
from biozoo.models.taugate import TauGate

from .tasks import SupervisedTask, data_spec

METHODS = ("frozen", "taugate", "lora", "bitfit", "head", "full")


def linear_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def apply_peft(model: nn.Module, method: str, lora_rank: int = 4, lora_alpha: float | None = None,
               lora_targets: list[str] | None = None, temperature: float = 0.05,
               surrogate_width: float = 0.5, example_input: Any = None,
               taugate_include: list[str] | None = None) -> nn.Module:
    """Return `model` prepared for `method` (see the module docstring); only the method's parameters train.
    `example_input` sizes TauGate's gates (default: guessed from the model's first layer); `taugate_include`
    picks its sites by name (`TauGate.wrap`'s include, e.g. ["neurons"] for a CTM's neurons alone)."""
    if method not in METHODS:
        raise UnknownNameError(f"unknown PEFT method {method!r}: use one of {', '.join(METHODS)}")
    if method == "taugate":
        return TauGate.wrap(model, temperature=temperature, surrogate_width=surrogate_width,
                            example_input=example_input, include=taugate_include)
    if method == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise BiozooError("method 'lora' needs the peft library: pip install peft") from None
        targets = list(lora_targets or linear_names(model))
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank if lora_alpha is None else lora_alpha,
                            target_modules=targets, lora_dropout=0.0, bias="none")
        return get_peft_model(model, config)
    head = linear_names(model)[-1] if linear_names(model) else ""
    for name, p in model.named_parameters():
        p.requires_grad_({"frozen": False, "full": True, "bitfit": name.endswith("bias"),
                          "head": name.startswith(head + ".")}[method])
    return model


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class PEFTTask(SupervisedTask):
    """Specialises a foundation model with one PEFT method; logs like SupervisedTask (train/loss, val/acc, ...).

    Args (beyond SupervisedTask's):
        method: frozen | taugate | lora | bitfit | head | full.
        lora_rank, lora_alpha (default 2 * rank), lora_targets (default: every Linear, by name).
        temperature, surrogate_width: the TauGate gate temperature T and the width of tau's surrogate gradient.
        taugate_include: TauGate's sites by name pattern (default: every activation; a CTM's neurons).
    """

    def __init__(self, method: str = "taugate", model: str = "mlp", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, loss: str = "cross_entropy",
                 loss_kwargs: dict[str, Any] | None = None, pretrained: bool | str = False,
                 checkpoint_path: str | None = None, lora_rank: int = 4, lora_alpha: float | None = None,
                 lora_targets: list[str] | None = None, temperature: float = 0.05, surrogate_width: float = 0.5,
                 lr: float = 1e-3, weight_decay: float = 0.0, warmup_steps: int = 0, scheduler: str = "constant",
                 min_lr_ratio: float = 0.0, taugate_include: list[str] | None = None):
        super().__init__(model, model_kwargs, data_dims, loss, loss_kwargs, pretrained, checkpoint_path, lr,
                         weight_decay, warmup_steps, scheduler, min_lr_ratio)
        self.save_hyperparameters()
        spec = data_spec(data_dims)
        example = (torch.randn(8, *spec.shape) if spec is not None and spec.input in ("image", "features", "sequence",
                                                                                      "observation") else None)
        self.model = apply_peft(self.model, method, lora_rank, lora_alpha, lora_targets, temperature, surrogate_width,
                                example, taugate_include)

    def configure_optimizers(self):
        if trainable_count(self) == 0:
            raise BiozooError(f"method {self.hparams.method!r} trains no parameter; evaluate it with `biozoo test`")
        return super().configure_optimizers()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if hasattr(self.model, "biozoo_config"):  # a peft model cannot be rebuilt from the registry
            super().on_save_checkpoint(checkpoint)


class TemperatureAnneal(L.Callback):
    """Anneals every TauGate temperature geometrically from `start` to `end` over the fit's epochs (or `epochs`);
    does nothing for a model without a TauGate (the baselines share the TauGate config)."""

    def __init__(self, start: float = 0.05, end: float = 0.01, epochs: int | None = None):
        if not (start > 0 and end > 0):
            raise BiozooError(f"TemperatureAnneal needs positive temperatures, got start={start}, end={end}")
        self.start, self.end, self.epochs = start, end, epochs

    def temperature_at(self, epoch: int, total: int) -> float:
        progress = min(1.0, epoch / max(1, total - 1))
        return self.start * math.exp(progress * math.log(self.end / self.start))

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        gated = [m for m in pl_module.modules() if isinstance(m, TauGate)]
        if not gated:  # a baseline (bitfit, head, lora, full) run with the TauGate config: no temperature
            if trainer.current_epoch == 0 and trainer.is_global_zero:
                print("biozoo: TemperatureAnneal: the model has no TauGate (method "
                      f"{getattr(pl_module.hparams, 'method', '?')}), nothing to anneal", flush=True)
            return
        total = self.epochs or trainer.max_epochs or 1
        for model in gated:
            model.set_temperature(self.temperature_at(trainer.current_epoch, total))
        pl_module.log("taugate/temperature", gated[0].temperature, on_step=False, on_epoch=True)


class KeepBest(L.Callback):
    """Keeps the weights of the best validation epoch (`monitor`, `mode`) in memory and restores them at fit end.
    The first of equally good epochs wins. `best_epoch` and `best_score` tell which was kept."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min"):
        if mode not in ("min", "max"):
            raise BiozooError(f"KeepBest mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode = monitor, mode
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise BiozooError(f"KeepBest monitors {self.monitor!r}, which was not logged "
                              f"(logged: {', '.join(sorted(trainer.callback_metrics)) or 'nothing'})")
        value = float(value)
        better = self.best_score is None or (value < self.best_score if self.mode == "min" else value > self.best_score)
        if better:
            self.best_score, self.best_epoch = value, trainer.current_epoch
            self.best_state = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)
