"""BiozooCLI: LightningCLI with biozoo's run layout.

Each invocation writes into a fresh `<trainer.default_root_dir>/version_N/` (see `biozoo.train.runs`): a fit
without `--ckpt_path` never reads or overwrites another run's files; `--ckpt_path last` resumes the newest
earlier checkpoint under the same root. Loggers without a `save_dir` write into the version folder, and
checkpoints are written atomically and read weights-only.
"""

from __future__ import annotations

import os
import shlex
import pickle
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from biozoo._core import BiozooError, CheckpointError, first_line
from biozoo.envs.datamodules import linked_dims

from .callbacks import ExceptionCheckpoint, LearningCurvePlot, RestoreBest, RunCheckpoint
from .runs import (RESUME_ENV, RUN_DIR_ENV, AtomicCheckpointIO, distributed_run_dir, reserve_run_dir,
                   resolve_ckpt_path, resumable_checkpoints)

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
        self.run_dir: Path | None = None
        self._reserved = False
        self._created: list[Path] = []
        saved_env = {key: os.environ.get(key) for key in (RUN_DIR_ENV, RESUME_ENV)}
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
        # resolve `last` and check the file before Lightning reads the checkpoint's hyper-parameters from it
        subcommand = self.config.get("subcommand")
        if subcommand and self.config[subcommand].get("ckpt_path") is not None:
            config = self.config[subcommand]
            root = Path(config.trainer.default_root_dir)
            if distributed_run_dir(root, create=False) is not None and os.environ.get(RESUME_ENV):
                config.ckpt_path = os.environ[RESUME_ENV]  # a process rank 0 launched: rank 0 chose the file
            else:
                config.ckpt_path = resolve_ckpt_path(config.ckpt_path, root)
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"refused to load {self.config[subcommand].ckpt_path}: it holds Python objects "
                                  f"that unpickling would run or import ({first_line(e)[:160]})") from None

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = Path(config.trainer.default_root_dir)
        shared = distributed_run_dir(root)
        if shared is not None:  # a process of a distributed job: rank 0 (or the scheduler) chose the folder
            self.run_dir = shared
        else:
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
