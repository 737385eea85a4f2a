"""Logger choices. CSV is the default; TensorBoard and W&B are selected in YAML, e.g.

    trainer:
      logger:
        - class_path: biozoo.train.WandbLogger   # offline automatically when no W&B account is set up
          init_args: {project: biozoo}

Loggers whose `save_dir` is left out write into the run's own version folder (the CLI fills it in): CSV files
directly in it, TensorBoard into `tensorboard/`, W&B into `wandb/`.
"""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as _LightningTensorBoardLogger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSVLogger. Left out, `save_dir` is the run's version folder (filled in by the CLI, which then
    writes metrics.csv directly into it); given, Lightning's `save_dir/name/version_N` layout applies."""

    def __init__(self, save_dir: str | None = None, name: str = "logs", version: int | str | None = None,
                 flush_logs_every_n_steps: int = 50):
        super().__init__(save_dir or ".", name=name, version=version, flush_logs_every_n_steps=flush_logs_every_n_steps)


class TensorBoardLogger(_LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger; `save_dir` defaults to the run's version folder (filled in by the CLI)."""

    def __init__(self, save_dir: str | None = None, name: str = "tensorboard", version: int | str | None = None,
                 **kwargs: Any):
        super().__init__(save_dir or ".", name=name, version=version, **kwargs)


def wandb_account_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


WANDB_DIRS = {"WANDB_CACHE_DIR": "cache", "WANDB_CONFIG_DIR": "config", "WANDB_DATA_DIR": "data",
              "WANDB_ARTIFACT_DIR": "artifacts"}
_set_here: dict[str, str] = {}


def run_local_wandb_dirs(save_dir: str) -> None:
    """Point W&B's cache, config, data and artifact folders (else under ~/.cache, ~/.config) into
    `save_dir/wandb/`, so a run writes nothing outside its folder. A folder the user set in the environment wins."""
    for var, sub in WANDB_DIRS.items():
        if os.environ.get(var) in (None, _set_here.get(var)):
            _set_here[var] = os.environ[var] = os.path.join(os.path.abspath(save_dir), "wandb", sub)


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger that runs offline (files under save_dir/wandb, sync later with `wandb sync`)
    when no account is configured or WANDB_MODE=offline, instead of prompting for a login. W&B's own cache and
    config folders go under save_dir/wandb too (`run_local_wandb_dirs`)."""

    def __init__(self, name: str | None = None, save_dir: str | None = None, project: str = "biozoo",
                 offline: bool | None = None, log_model: bool = False, **kwargs: Any):
        save_dir = save_dir or "."
        run_local_wandb_dirs(save_dir)
        if offline is None:
            offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun") or not wandb_account_configured()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(name=name, save_dir=save_dir, project=project, offline=offline,
                         log_model=False if offline else log_model, **kwargs)
