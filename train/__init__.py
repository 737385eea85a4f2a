"""biozoo.train: the shared harness -- tasks (LightningModules), losses, callbacks and loggers.

Lazy: importing the package loads nothing (no Lightning); each name below loads its submodule on first access.
Losses register themselves when their module is imported, so any name that can look a loss up by name (the tasks,
`get_loss`, `list_losses`) first imports every loss-registering module. `import_all()` loads every submodule, for
code that finds classes by walking `__subclasses__` (the CLI's short class names).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

# public name -> submodule that defines it
_EXPORTS = {
    "ExceptionCheckpoint": "callbacks", "LearningCurvePlot": "callbacks", "RunCheckpoint": "callbacks",
    "CSVLogger": "loggers", "TensorBoardLogger": "loggers", "WandbLogger": "loggers",
    "LossOutput": "losses", "get_loss": "losses", "list_losses": "losses", "register_loss": "losses",
    "BiozooTask": "tasks", "SupervisedTask": "tasks", "build_model": "tasks",
    "PEFTTask": "taugate", "TemperatureAnneal": "taugate",  # TauGate and the PEFT baselines
    "Dendrites": "dendrites",  # the perforated-dendrites callback
    "ControlTask": "control",  # the control harness: any model as a policy, trained by PPO or ES
    "Policy": "policy", "as_policy": "policy", "evaluate": "policy", "PPO": "ppo",
    "CCRNNTask": "ccrnn",
    "CTMReport": "ctm",
    "Calibration": "calibration",
    "NeuroformerTask": "neuroformer",
    "profile": "profile",
}
# modules that call register_loss at import (ctm, ctm_ctc, ctm_maze, ctm_qamnist, neuroformer, and the built-ins)
_LOSS_MODULES = ("losses", "ctm", "ctm_tasks", "neuroformer")
_NO_LOSSES = ("callbacks", "loggers", "dendrites", "profile")  # names from these never resolve a loss
_SUBMODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

__all__ = ["BiozooTask", "ExceptionCheckpoint", "LearningCurvePlot", "LossOutput", "RunCheckpoint",
           "SupervisedTask", "CSVLogger", "TensorBoardLogger", "WandbLogger", "build_model", "get_loss", "list_losses",
           "register_loss", "import_all"]


def _import(module: str) -> ModuleType:
    return importlib.import_module(f".{module}", __name__)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        if _EXPORTS[name] not in _NO_LOSSES:
            for module in _LOSS_MODULES:
                _import(module)
        value = getattr(_import(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = _import(name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


def import_all() -> list[ModuleType]:
    """Import every submodule: every task, DataModule, callback and loss then exists (and is registered)."""
    return [_import(name) for name in _SUBMODULES]
