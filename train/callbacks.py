"""Default callbacks of every biozoo run.

- `RunCheckpoint`: ModelCheckpoint with `save_last`, writing to `<default_root_dir>/checkpoints`; the CLI points
  `default_root_dir` at the run's own version folder, so no two runs share checkpoints.
- `ExceptionCheckpoint`: on Ctrl-C or a crash during training, saves the exact state mid-epoch into the same
  folder. It is used only when resuming is asked for (`--ckpt_path last`); unlike Lightning's
  OnExceptionCheckpoint it does not make a plain `fit` resume, and it writes nothing before the first step.
- `RestoreBest`: at the end of fit, loads the best checkpoint's weights (by the checkpoint's monitored metric) into
  the task, so the model a run leaves behind is its best; the one keep-the-best mechanism of every task.
- `LearningCurvePlot`: at the end of fit, plots the logged metrics to `learning_curve.png` beside
  `metrics.csv` and prints where the checkpoint, metrics and plot are.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from biozoo._core import CheckpointError


def run_checkpoint_dir(trainer: L.Trainer) -> str:
    return os.path.join(trainer.default_root_dir, "checkpoints")


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, dirpath: str | None = None, filename: str = "epoch{epoch:03d}-step{step}",
                 monitor: str | None = "val/loss", mode: str = "min", save_top_k: int = 1, save_last: bool = True,
                 every_n_train_steps: int | None = None, every_n_epochs: int | None = None,
                 save_on_train_epoch_end: bool | None = None):
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode, save_top_k=save_top_k,
                         save_last=save_last, every_n_train_steps=every_n_train_steps,
                         every_n_epochs=every_n_epochs, auto_insert_metric_name=False,
                         save_on_train_epoch_end=save_on_train_epoch_end)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = run_checkpoint_dir(trainer)
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed run writes into a new version folder, where Lightning would forget the best score and let the
        resumed run's first checkpoint become "best". The best of the whole resume chain is kept instead: its
        score and files (still in the earlier version folders) are restored when the monitor and mode match."""
        with warnings.catch_warnings():  # "dirpath has changed ... won't be reloaded": handled below
            warnings.filterwarnings("ignore", message=".*dirpath has changed.*")
            super().load_state_dict(state_dict)
        same = state_dict.get("monitor") == self.monitor and state_dict.get("mode", self.mode) == self.mode
        best = state_dict.get("best_model_path") or ""
        if not same or self.monitor is None or state_dict.get("best_model_score") is None or not Path(best).is_file():
            return
        self.best_model_score = state_dict["best_model_score"]
        self.best_k_models = {k: v for k, v in (state_dict.get("best_k_models") or {}).items() if Path(k).is_file()}
        self.best_k_models.setdefault(best, self.best_model_score)
        worst = max if self.mode == "min" else min
        self.kth_best_model_path = worst(self.best_k_models, key=lambda k: float(self.best_k_models[k]))
        self.kth_value = self.best_k_models[self.kth_best_model_path]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mode": self.mode}

    def _find_last_checkpoints(self, trainer: L.Trainer) -> set[str]:
        if self.dirpath is None:
            self.dirpath = run_checkpoint_dir(trainer)
        return super()._find_last_checkpoints(trainer)

    # Lightning only refreshes last.ckpt when a top-k checkpoint was written at the same step, so a run whose
    # monitored metric stops improving would resume from a stale state. We refresh it after every save point.
    def _refresh_last(self, trainer: L.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        if due and self.monitor is not None and self.monitor not in self._monitor_candidates(trainer):
            # before the first validation the top-k save is deferred; keep last.ckpt current meanwhile, without
            # marking the step as saved so the deferred top-k save still happens at validation end
            saved_step = self._last_global_step_saved
            self._refresh_last(trainer)
            self._last_global_step_saved = saved_step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)


class ExceptionCheckpoint(L.Callback):
    """Saves `<dirpath>/on_exception.ckpt` (default: the run's checkpoints folder) when training is interrupted."""

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "on_exception"):
        self.dirpath, self.filename = dirpath, filename

    def ckpt_path(self, trainer: L.Trainer) -> str:
        return os.path.join(self.dirpath or run_checkpoint_dir(trainer), self.filename + self.FILE_EXTENSION)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != TrainerFn.FITTING or trainer.global_step == 0:
            return  # nothing learnt yet (e.g. missing data at setup): nothing worth keeping
        if isinstance(exception, CheckpointError):  # writing failed (a full disk): another write would too
            return
        path = self.ckpt_path(trainer)
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            print(f"biozoo: interrupted at step {trainer.global_step}; saved {path} (continue with --ckpt_path last)",
                  flush=True)


class RestoreBest(L.Callback):
    """Loads the weights of the checkpoint callback's best checkpoint into the task at the end of fit (read through
    the strategy's CheckpointIO: weights-only). A Dendrites callback keeps the best of its cycles itself (the
    architecture changes from cycle to cycle), so with one present this does nothing."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.restored: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        path = getattr(trainer.checkpoint_callback, "best_model_path", "") or ""
        if not self.enabled or not path or not Path(path).is_file() or trainer.interrupted:
            return
        if any(type(cb).__name__ == "Dendrites" for cb in trainer.callbacks):
            return
        checkpoint = trainer.strategy.checkpoint_io.load_checkpoint(path)
        pl_module.load_state_dict(checkpoint["state_dict"])
        self.restored = path


def read_metrics_csv(path: str | Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} from a Lightning CSVLogger metrics.csv."""
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with open(path) as f:
        for row in csv.DictReader(f):
            step = float(row.get("step") or 0)
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series[key].append((step, float(value)))
    return dict(series)


def plot_learning_curves(series: dict[str, list[tuple[float, float]]], out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(list)  # one panel per metric kind: loss, acc, ...
    for name in sorted(series):
        if name.endswith("_step") or name.startswith("lr"):
            continue
        kind = name.split("/")[-1].removesuffix("_epoch")
        groups[kind].append(name)
    n = max(1, len(groups))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, (kind, names) in zip(axes.flat, sorted(groups.items())):
        for name in names:
            steps, values = zip(*series[name])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=name.removesuffix("_epoch"))
        ax.set_xlabel("step")
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


class LearningCurvePlot(L.Callback):
    """Writes learning_curve.png next to metrics.csv at the end of fit and prints where the outputs are."""

    def __init__(self, filename: str = "learning_curve.png", verbose: bool = True):
        self.filename, self.verbose = filename, verbose
        self.plot_path: Path | None = None

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        csv_logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        lines = []
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "best_model_path", ""):
            lines.append(f"checkpoint (best): {ckpt.best_model_path}")
        if ckpt is not None and getattr(ckpt, "last_model_path", ""):
            lines.append(f"checkpoint (last): {ckpt.last_model_path}")
        if csv_logger is not None:
            csv_logger.save()
            metrics = Path(csv_logger.log_dir) / "metrics.csv"
            if metrics.exists():
                self.plot_path = plot_learning_curves(read_metrics_csv(metrics), metrics.parent / self.filename,
                                                      title=type(pl_module.model).__name__
                                                      if hasattr(pl_module, "model") else "")
                lines += [f"metrics: {metrics}", f"learning curve: {self.plot_path}"]
        for key in ("val/acc", "val/return", "val/loss"):
            value = trainer.callback_metrics.get(key)
            if value is not None and math.isfinite(float(value)):
                lines.append(f"final {key}: {float(value):.4f}")
        if self.verbose and lines:
            print("\n".join(["", "biozoo run outputs:"] + [f"  {line}" for line in lines]), flush=True)
