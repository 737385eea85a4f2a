"""BiozooCLI: LightningCLI with biozoo's run layout.

Each invocation writes into a fresh `<trainer.default_root_dir>/version_N/` (see `biozoo.train.runs`): a fit
without `--ckpt_path` never reads or overwrites another run's files; `--ckpt_path last` resumes the newest
earlier checkpoint under the same root. Loggers without a `save_dir` write into the version folder, and
checkpoints are written atomically and read weights-only.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from biozoo._core import BiozooError, CheckpointError, resolve_config_args
from biozoo.envs.datamodules import linked_dims
from biozoo.models import safe_torch_load

from .callbacks import ExceptionCheckpoint, LearningCurvePlot, RestoreBest, RunCheckpoint
from .runs import (RESUME_ENV, RUN_DIR_ENV, AtomicCheckpointIO, distributed_run_dir, remove_orphan_temporaries,
                   reserve_run_dir, resolve_ckpt_path, resumable_checkpoints)

def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (SLURM, Docker, `timeout`) stops the run at once, wherever it is (a long rollout, an evaluation):
    Lightning's own handler only sets a flag that the loop reads between steps. The exception goes through the
    trainer's exception hooks, so ExceptionCheckpoint saves a resumable checkpoint; a second SIGTERM kills."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print("biozoo: SIGTERM received, stopping", file=sys.stderr, flush=True)
    raise SIGTERMException(128 + signum)


def _hidden_class_paths(value: Any) -> bool:
    """Whether a value read from a checkpoint names anything to import (a class_path anywhere inside)."""
    if isinstance(value, dict):
        return any(str(k) in ("class_path", "_class_path", "__class__") or _hidden_class_paths(v)
                   for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_hidden_class_paths(v) for v in value)
    return False


def _same_class(name: str, cls: type | None, configured: str) -> bool:
    """Whether the class path `name` (read from a checkpoint) is the configured class, without importing it."""
    if name == configured or cls is not None and name == f"{cls.__module__}.{cls.__qualname__}":
        return True
    module, _, attr = name.rpartition(".")
    return cls is not None and getattr(sys.modules.get(module), attr, None) is cls


def check_value_ranges(config: Any) -> None:
    """Values that would only fail once the trainer runs: a batch size below 1, a negative or non-finite
    learning rate. One line naming the key, before anything is built."""
    def walk(node: Any, key: str) -> None:
        items = node.items() if hasattr(node, "items") else []
        for name, value in items:
            path = f"{key}.{name}" if key else str(name)
            leaf = str(name).rsplit(".", 1)[-1]  # a Namespace's items() are flattened: "init_args.lr"
            if isinstance(value, bool):
                continue
            if leaf.endswith("batch_size") and isinstance(value, int) and value < 1:
                raise BiozooError(f"{path} must be at least 1, got {value}")
            if (leaf == "lr" or leaf.endswith("_lr")) and isinstance(value, (int, float)) \
                    and not (math.isfinite(value) and value >= 0):
                raise BiozooError(f"{path} must be a finite learning rate >= 0, got {value}")
            if hasattr(value, "items"):
                walk(value, path)

    for section in ("model", "data"):
        walk(config.get(section) or {}, section)


TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs/default",
    "logger": {"class_path": "biozoo.train.CSVLogger"},
}


class BiozooCLI(LightningCLI):
    """LightningCLI with biozoo's defaults: any task (`model:`) and DataModule (`data:`) by class_path, the
    data's dimensions linked into the task, CSV logging, and one fresh version folder per run (`run_dir`)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        import biozoo.envs
        import biozoo.train

        biozoo.envs.import_all()  # every DataModule and task class exists: resolvable by short name
        biozoo.train.import_all()

        self.argv = list(sys.argv[1:] if args is None else args)
        args = resolve_config_args(self.argv)  # -c configs/X.yaml: here, else among the packaged configs
        self.run_dir: Path | None = None
        self._reserved = False
        self._created: list[Path] = []
        saved_env = {key: os.environ.get(key) for key in (RUN_DIR_ENV, RESUME_ENV)}
        main_thread = threading.current_thread() is threading.main_thread()
        saved_sigterm = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
        try:
            super().__init__(
                model_class=L.LightningModule, datamodule_class=L.LightningDataModule,
                subclass_mode_model=True, subclass_mode_data=True,
                trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
                parser_kwargs={"exit_on_error": False, "prog": "biozoo"},
                args=args, run=run, **kwargs)
        except BaseException:
            self._remove_if_empty()
            raise
        finally:  # what rank 0 told the processes it launched must not leak into a later run in this process
            if main_thread:
                signal.signal(signal.SIGTERM, saved_sigterm if saved_sigterm is not None else signal.SIG_DFL)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # callbacks every run has, each configurable: --checkpoint.monitor val/acc --checkpoint.mode max ...
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExceptionCheckpoint, "exception_checkpoint")
        parser.add_lightning_class_args(RestoreBest, "best")
        parser.add_lightning_class_args(LearningCurvePlot, "curve")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # the DataModule's `.spec` is the one contract linked (envs.datamodules.linked_dims)
        parser.link_arguments("data", "model.init_args.data_dims", compute_fn=linked_dims, apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Resolve `last`, check the file, and take the task's hyper-parameters from it. Unlike LightningCLI's,
        nothing read from the checkpoint is imported or instantiated: the config names the task class, the
        checkpoint may only be of that class, and only plain values of the task's own arguments are taken."""
        subcommand = self.config.get("subcommand")
        if not subcommand or self.config[subcommand].get("ckpt_path") is None:
            return
        config = self.config[subcommand]
        root = Path(config.trainer.default_root_dir)
        asked = config.ckpt_path
        if distributed_run_dir(root, create=False) is not None and os.environ.get(RESUME_ENV):
            config.ckpt_path = os.environ[RESUME_ENV]  # a process rank 0 launched: rank 0 chose the file
        else:
            config.ckpt_path = resolve_ckpt_path(config.ckpt_path, root)
        if config.ckpt_path is None and subcommand != "fit":
            raise CheckpointError(f"nothing to {subcommand}: --ckpt_path {asked} found no checkpoint under {root} "
                                  "(train one with `biozoo fit` first, or give a checkpoint file)")
        path = config.ckpt_path
        if not path or not Path(path).is_file():
            return
        checkpoint = safe_torch_load(path)
        hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not isinstance(hparams, dict) or not hparams:
            return
        model = config.get("model")
        init_args = getattr(model, "init_args", None)
        configured = str(getattr(model, "class_path", "") or "")
        written_by = hparams.get("_class_path")
        if written_by is not None:
            module, _, attr = configured.rpartition(".")
            cls = getattr(sys.modules.get(module), attr, None)
            if not isinstance(written_by, str) or not _same_class(written_by, cls, configured):
                raise CheckpointError(f"{path} was written by {str(written_by)[:80]}, but the config's model is "
                                      f"{configured}: give the config it was trained with")
        if init_args is None:
            return
        for key, value in hparams.items():
            if key.startswith("_") or key == "data_dims" or key not in init_args:
                continue  # data_dims is linked from the data; unknown keys are not the task's arguments
            if _hidden_class_paths(value):
                raise CheckpointError(f"refused {path}: its hyper-parameter {key!r} names a class to import")
            init_args[key] = value

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_value_ranges(config)
        root = Path(config.trainer.default_root_dir)
        shared = distributed_run_dir(root)
        if shared is not None:  # a process of a distributed job: rank 0 (or the scheduler) chose the folder
            self.run_dir = shared
        else:
            for orphan in remove_orphan_temporaries(root):
                print(f"biozoo: removed {orphan}, left by a checkpoint write that was killed", flush=True)
            earlier = resumable_checkpoints(root) if self.subcommand == "fit" else []
            self._created = [p for p in [root, *root.parents] if not p.exists()]  # removed again if left empty
            self.run_dir, self._reserved = reserve_run_dir(root), True
            if config.get("ckpt_path"):
                print(f"biozoo: resuming from {config.ckpt_path}; this run writes into {self.run_dir}", flush=True)
            elif earlier:
                command = shlex.join(["biozoo", *self.argv, "--ckpt_path", "last"])
                print(f"biozoo: {root} already holds a run ({earlier[0].parent.parent.name}: {earlier[0].name}); "
                      f"starting a fresh one in {self.run_dir}. To continue it instead: {command}", flush=True)
            os.environ[RUN_DIR_ENV] = str(self.run_dir)
            os.environ[RESUME_ENV] = str(config.get("ckpt_path") or "")
        config.trainer.default_root_dir = str(self.run_dir)
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            if init is None or "save_dir" not in init or init.save_dir not in (None, "."):
                continue
            init.save_dir = str(self.run_dir)
            if "version" in init and init.version is None:
                init.version = ""  # the version folder is the run's own: no logs/version_N inside it
                if logger.class_path.endswith("CSVLogger"):
                    init.name = ""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:  # jsonargparse wraps a task's own error in a union-type error
            cause: BaseException | None = e
            while cause is not None and not isinstance(cause, BiozooError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None

    def _remove_if_empty(self) -> None:
        """A run that failed before it logged or saved anything (bad config, missing data) leaves no folder."""
        if self.run_dir is None or not self._reserved or not self.run_dir.is_dir():
            return
        if all(p.is_dir() or p.name in ("config.yaml", "hparams.yaml") for p in self.run_dir.rglob("*")):
            shutil.rmtree(self.run_dir, ignore_errors=True)
            for folder in self._created:  # innermost first
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # keep a user's own CheckpointIO
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer
