"""`Dendrites`: a Lightning callback that grows perforated dendrites in cycles (Brenner & Itti 2025, arXiv 2501.18018).

    biozoo fit -c configs/dendrites/digits_mlp_gd.yaml
    biozoo fit -c configs/quickstart.yaml --trainer.callbacks+=biozoo.train.Dendrites \\
        --trainer.callbacks.mode=perforated --trainer.callbacks.patience=10

Any task whose network is `self.model` works (SupervisedTask and every BiozooTask); perforated mode also needs the
loss, taken from `loss_fn`/`loss_kwargs` (SupervisedTask) or a `dendrite_loss(batch)` method. The cycle:

1. the neurons train until the monitored validation metric plateaus: `patience` validations without an
   improvement larger than both `threshold_rel * |reference|` and `threshold_abs`, the reference being the score
   at the last such improvement (the official switch rule, with the running average of `history_lookback = 1`);
2. the best model so far is restored and one dendrite per neuron is added to every wrapped layer. `perforated`:
   the candidates are first trained for the cascade-correlation objective, then frozen;
3. the optimizer (and its schedule) is rebuilt through `trainer.strategy.setup_optimizers`, so the new parameters
   train;
4. repeat until `max_cycles` dendrite sets, or until a dendrite cycle's best does not beat the best from before
   it by the thresholds (after `max_tries` fresh attempts; such a cycle's models are discarded).

The best model is the best validation score of any kept cycle. At the end it is restored (its dendrite count
included) and written to
`<checkpoints>/dendrites-best.ckpt` (`biozoo export` turns it into a portable folder). Every validation logs
`dendrites/count` and `dendrites/params`; every cycle logs `dendrites/cycle_best` and `dendrites/cycle_params`,
and at the end `dendrites.csv` and `dendrites.png` (best metric against parameter count, one point per cycle)
are written beside the logs. All state lives in this object (saved in checkpoints, so `--ckpt_path last`
resumes a run, dendrites included): two runs in one process do not interact.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from biozoo.models.dendrites import (ACTIVATIONS, MODES, add_dendrite_set, add_dendrites, check_choice,
                                     check_dendrites_used, dendrite_counts, dendrite_layers, freeze_candidates,
                                     set_dendrite_counts, train_candidates)
from biozoo._core import BiozooError


def plot_cycles(history: list[dict[str, Any]], out: str | Path, monitor: str) -> Path:
    """The monitored metric (best of each cycle) against the parameter count, one point per cycle."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    kept = [h for h in history if h["kept"]]
    ax.plot([h["params"] for h in kept], [h["best"] for h in kept], "o-", label="kept cycles")
    dropped = [h for h in history if not h["kept"]]
    if dropped:
        ax.plot([h["params"] for h in dropped], [h["best"] for h in dropped], "x", color="C3",
                label="cycles that did not improve")
    for h in history:
        ax.annotate(f"{h['dendrites']}d", (h["params"], h["best"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"best {monitor}")
    ax.set_title("dendrite cycles")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


class Dendrites(L.Callback):
    """Grow dendrites on `pl_module.model` in cycles; keep the best model by validation.

    Args:
        mode: "gd" (dendrites and neurons train jointly, the open-source behaviour) or "perforated" (candidates
            trained for correlation with the neurons' error, then frozen; the paper's method).
        monitor / monitor_mode: the validation metric and whether higher ("max") or lower ("min") is better.
        patience: validations without improvement that end a cycle (official n_epochs_to_switch).
        threshold_rel / threshold_abs: an improvement must exceed both (official improvement_threshold, _raw).
        max_cycles: the most dendrite sets to add (official max_dendrites).
        max_tries: attempts with fresh dendrites before a cycle that does not improve ends training
            (official max_dendrite_tries).
        include / exclude / activation / init_scale: passed to `add_dendrites`; the model must not be wrapped
            already with other settings.
        candidate_epochs / candidate_lr / candidate_patience: perforated mode's correlation training (passes over
            the training data, Adam learning rate, epochs without 1% relative improvement before stopping).
        plot: write dendrites.png at the end (one figure per run, not per epoch).
        verbose: print a line per cycle.
    """

    def __init__(self, mode: str = "gd", monitor: str = "val/acc", monitor_mode: str = "max", patience: int = 10,
                 threshold_rel: float = 1e-3, threshold_abs: float = 1e-5, max_cycles: int = 3, max_tries: int = 1,
                 include: list[str] | None = None, exclude: list[str] | None = None, activation: str = "sigmoid",
                 init_scale: float = 0.01, candidate_epochs: int = 10, candidate_lr: float = 5e-3,
                 candidate_patience: int = 2, plot: bool = True, verbose: bool = True):
        check_choice("Dendrites mode", mode, MODES)
        check_choice("Dendrites monitor_mode", monitor_mode, ("max", "min"))
        check_choice("Dendrites activation", activation, ACTIVATIONS)
        for name, value, low in (("patience", patience, 1), ("max_cycles", max_cycles, 0),
                                 ("max_tries", max_tries, 1), ("candidate_epochs", candidate_epochs, 1),
                                 ("candidate_patience", candidate_patience, 1)):
            if not isinstance(value, int) or value < low:
                raise BiozooError(f"Dendrites {name} must be an integer >= {low}, got {value!r}")
        if threshold_rel < 0 or threshold_abs < 0 or candidate_lr <= 0 or init_scale <= 0:
            raise BiozooError("Dendrites thresholds must be >= 0 and candidate_lr, init_scale > 0")
        self.mode, self.monitor, self.monitor_mode = mode, monitor, monitor_mode
        self.patience, self.threshold_rel, self.threshold_abs = patience, threshold_rel, threshold_abs
        self.max_cycles, self.max_tries = max_cycles, max_tries
        self.include, self.exclude, self.activation, self.init_scale = include, exclude, activation, init_scale
        self.candidate_epochs, self.candidate_lr = candidate_epochs, candidate_lr
        self.candidate_patience = candidate_patience
        self.plot, self.verbose = plot, verbose
        # run state (saved in checkpoints)
        self.best: float | None = None  # the best score so far, and the model that scored it
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_counts: dict[str, int] | None = None
        self.reference: float | None = None  # the score at the last improvement larger than the thresholds
        self.anchor: dict[str, Any] | None = None  # best / best_state / best_counts when this cycle's dendrites came
        self.since_improvement = self.epochs_in_cycle = self.tries = 0
        self.cycle_best: float | None = None
        self.history: list[dict[str, Any]] = []  # one row per finished cycle
        self.finished = False
        self.outputs: dict[str, str] = {}
        self._plateau = False
        self._check_use = False  # after a growth: check on the next batch that every layer's dendrites ran
        self._strict_loading: bool | None = None

    @property
    def state_key(self) -> str:
        return f"Dendrites[mode={self.mode}, monitor={self.monitor}]"

    # helpers ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _model(pl_module: L.LightningModule) -> torch.nn.Module:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise BiozooError(f"Dendrites needs the task's network as `self.model`; "
                              f"{type(pl_module).__name__} has none")
        return model

    def _improves(self, score: float, reference: float | None, thresholds: bool = True) -> bool:
        """Better than `reference`; with `thresholds`, by more than both thresholds."""
        if reference is None:
            return True
        gain = score - reference if self.monitor_mode == "max" else reference - score
        if not thresholds:
            return gain > 0
        return gain > self.threshold_rel * abs(reference) and gain > self.threshold_abs

    def _drop_cycle(self) -> None:
        """Forget this cycle's results: the best model is again the one from before its dendrites."""
        self.best, self.best_state, self.best_counts = (self.anchor[k] for k in ("best", "state", "counts"))
        self.reference = self.best

    def _cycle_improved(self, model: torch.nn.Module) -> bool:
        return self._count(model) == 0 or self.anchor is None or (
            self.cycle_best is not None and self._improves(self.cycle_best, self.anchor["best"]))

    def _count(self, model: torch.nn.Module) -> int:
        return max(dendrite_counts(model).values())

    def _loss_fn(self, pl_module: L.LightningModule) -> Callable[[Any], torch.Tensor]:
        if hasattr(pl_module, "dendrite_loss"):
            return pl_module.dendrite_loss
        if hasattr(pl_module, "loss_fn"):
            kwargs = getattr(pl_module, "loss_kwargs", {}) or {}
            return lambda batch: pl_module.loss_fn(pl_module.model(batch[0]), batch[1], **kwargs).loss
        raise BiozooError(f"Dendrites(mode='perforated') needs the task's loss: {type(pl_module).__name__} has neither "
                          "loss_fn (as SupervisedTask) nor a dendrite_loss(batch) method")

    def _restore_best(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            set_dendrite_counts(model, self.best_counts)
            model.load_state_dict(self.best_state)

    # hooks -----------------------------------------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = self._model(pl_module)
        if not dendrite_layers(model):
            add_dendrites(model, self.mode, self.include, self.exclude, self.activation, self.init_scale)
        else:
            spec = model._dendrite_spec
            ours = {"mode": self.mode, "activation": self.activation, "init_scale": self.init_scale}
            theirs = {k: spec[k] for k in ours}
            if ours != theirs or self.include is not None or self.exclude is not None:
                raise BiozooError(f"the model already has dendrites with {theirs}; the Dendrites callback asks for "
                                  f"{ours}" + (" and include/exclude" if self.include or self.exclude else "")
                                  + ": build the task's model without dendrites or match the settings")
        if self.mode == "perforated":
            self._loss_fn(pl_module)
        if trainer.world_size > 1:
            raise BiozooError("Dendrites runs on one device: growing a model after DDP has wrapped it would need the "
                              "wrapper rebuilt, which Lightning does not do mid-fit")
        # a resumed checkpoint may hold more dendrites than the fresh model: on_load_checkpoint rebuilds them and
        # loads the weights strictly itself, so Lightning's own (earlier) load must tolerate the extra keys
        if self._strict_loading is None:
            self._strict_loading = pl_module.strict_loading
            pl_module.strict_loading = False

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        config = checkpoint.get("biozoo_model_config") or {}
        if config.get("model") == "dendrites":
            set_dendrite_counts(self._model(pl_module), config["kwargs"]["layers"])
        strict = True if self._strict_loading is None else self._strict_loading
        pl_module.load_state_dict(checkpoint["state_dict"], strict=strict)
        self._release_strict_loading(pl_module)

    def _release_strict_loading(self, pl_module: L.LightningModule) -> None:
        if self._strict_loading is not None:
            pl_module.strict_loading = self._strict_loading
            self._strict_loading = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._release_strict_loading(pl_module)

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    def state_dict(self) -> dict[str, Any]:
        keys = ("best", "best_state", "best_counts", "reference", "anchor", "since_improvement", "epochs_in_cycle",
                "tries", "cycle_best", "history", "finished")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for k, v in state_dict.items():
            setattr(self, k, v)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.finished or trainer.state.fn != TrainerFn.FITTING:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            known = ", ".join(sorted(k for k in trainer.callback_metrics if "/" in k)) or "none"
            raise BiozooError(f"Dendrites monitors {self.monitor!r}, which the task does not log (logged: {known})")
        score = float(value)
        if not math.isfinite(score):
            return
        model = self._model(pl_module)
        self.epochs_in_cycle += 1
        if self.cycle_best is None or self._improves(score, self.cycle_best, thresholds=False):
            self.cycle_best = score
        if self._improves(score, self.best, thresholds=False):
            self.best = score
            with torch.inference_mode(False):  # validation runs in inference mode; the copy must be a normal tensor
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_counts = dendrite_counts(model)
        if self._improves(score, self.reference):
            self.reference, self.since_improvement = score, 0
        else:
            self.since_improvement += 1
        self._plateau = self.since_improvement >= self.patience and self.epochs_in_cycle >= self.patience

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._check_use:
            self._check_use = False
            check_dendrites_used(self._model(pl_module))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._model(pl_module)
        params = sum(p.numel() for p in model.parameters())
        pl_module.log("dendrites/count", float(self._count(model)), on_epoch=True)
        pl_module.log("dendrites/params", float(params), on_epoch=True)
        if not self._plateau or self.finished:
            return
        self._plateau = False
        count = self._count(model)
        kept = self._cycle_improved(model)
        self._close_cycle(model, kept)
        pl_module.log("dendrites/cycle_best", float(self.history[-1]["best"]), on_epoch=True)
        pl_module.log("dendrites/cycle_params", float(params), on_epoch=True)
        if not kept:
            self._drop_cycle()
            self.tries += 1
            if self.tries >= self.max_tries:
                return self._stop(trainer, f"the cycle with {count} dendrite(s) did not improve {self.monitor}")
            count -= 1  # retry the same count with fresh dendrites
        elif count >= self.max_cycles:
            return self._stop(trainer, f"reached max_cycles={self.max_cycles}")
        else:
            self.tries = 0
        self._grow(trainer, pl_module, model, count + 1)

    def _close_cycle(self, model: torch.nn.Module, kept: bool) -> None:
        self.history.append({"cycle": len(self.history), "dendrites": self._count(model),
                             "params": sum(p.numel() for p in model.parameters()),
                             "best": self.cycle_best, "epochs": self.epochs_in_cycle, "kept": kept})
        if self.verbose:
            h = self.history[-1]
            print(f"dendrites: cycle {h['cycle']} ({h['dendrites']} dendrite(s), {h['params']:,} parameters): best "
                  f"{self.monitor} {h['best']:.4f} after {h['epochs']} validations"
                  + ("" if kept else " -- no improvement"), flush=True)

    def _grow(self, trainer: L.Trainer, pl_module: L.LightningModule, model: torch.nn.Module, target: int) -> None:
        self._restore_best(model)
        self.anchor = {"best": self.best, "state": self.best_state, "counts": self.best_counts}
        while self._count(model) < target:
            add_dendrite_set(model)
            if self.mode == "perforated":
                loader = trainer.train_dataloader
                if not isinstance(loader, DataLoader):
                    raise BiozooError("Dendrites(mode='perforated') supports one training DataLoader, got "
                                      f"{type(loader).__name__}")

                def batches():
                    return (pl_module.transfer_batch_to_device(b, pl_module.device, 0) for b in loader)

                scores = train_candidates(model, batches, self._loss_fn(pl_module), self.candidate_epochs,
                                          self.candidate_lr, self.candidate_patience)
                freeze_candidates(model)
                if self.verbose:
                    print(f"dendrites: candidates trained for {len(scores)} epoch(s), mean |correlation| "
                          f"{scores[0]:.3f} -> {scores[-1]:.3f}", flush=True)
        trainer.strategy.setup_optimizers(trainer)  # the new parameters join the optimizer, the schedule restarts
        self._check_use = True
        self.epochs_in_cycle = self.since_improvement = 0
        self.cycle_best = None

    def _stop(self, trainer: L.Trainer, reason: str) -> None:
        trainer.should_stop = True
        self.finished = True
        if self.verbose:
            print(f"dendrites: stopping: {reason}", flush=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = self._model(pl_module)
        if not self.finished and self.epochs_in_cycle:  # max_epochs ended a cycle early
            kept = self._cycle_improved(model)
            self._close_cycle(model, kept)
            if not kept:
                self._drop_cycle()
            self.epochs_in_cycle = 0
        self.finished = True
        self._restore_best(model)
        if not trainer.is_global_zero:
            return
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.history:
            with open(out_dir / "dendrites.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.history[0]))
                writer.writeheader()
                writer.writerows(self.history)
            self.outputs["csv"] = str(out_dir / "dendrites.csv")
            if self.plot:
                self.outputs["plot"] = str(plot_cycles(self.history, out_dir / "dendrites.png", self.monitor))
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            path = os.path.join(ckpt.dirpath, "dendrites-best.ckpt")
            trainer.save_checkpoint(path, weights_only=False)
            self.outputs["checkpoint"] = path
        if self.verbose:
            counts = sorted(set(dendrite_counts(model).values()))
            print(f"dendrites: kept the best model by {self.monitor} ({self.best}), {counts[-1]} dendrite(s), "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters; "
                  + ", ".join(f"{k}: {v}" for k, v in self.outputs.items()), flush=True)
