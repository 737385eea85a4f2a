"""biozoo.envs: data and environments -- DataModules for supervised tasks, gymnasium environments for control.

Importing the package only registers the gymnasium ids (`registration`); each name below loads its submodule on
first access (`biozoo.envs.DigitsDataModule`, `from biozoo.envs import mazes`). `import_all()` loads them all, for
code that finds classes by walking `__subclasses__` (the CLI's short class names).
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Any

from . import registration  # noqa: F401  (gymnasium ids; imports no environment code)

# public name -> submodule that defines it
_EXPORTS = {
    "BiozooDataModule": "datamodules", "CIFAR10DataModule": "datamodules", "DigitsDataModule": "datamodules",
    "MNISTDataModule": "datamodules", "TorchvisionDataModule": "datamodules", "image_spec": "datamodules", "spec_dims": "datamodules",
    "RotatedDigitsDataModule": "rotated", "RotatedMNISTDataModule": "rotated",  # TauGate brain modes
    "DigitDrawingDataModule": "ccrnn_tasks", "LineDrawingDataModule": "ccrnn_tasks",
    "SequentialDigitsDataModule": "ccrnn_tasks",
    "ImageNetDataModule": "imagenet", "MazeDataModule": "mazes", "ParityDataModule": "parity",
    "QAMNISTDataModule": "qamnist", "SortingDataModule": "sorting",  # CTM tasks
    "SpikesDataModule": "spikes",  # Neuroformer spike windows
    "NeuroGymDataModule": "neurogym", "NeuroGymEnv": "neurogym",  # NeuroGym's cognitive tasks
    "SwimmerEnv": "swimmer", "MaskVelocity": "classic",  # gymnasium environments
    "EnvDataModule": "control", "make_env": "control", "make_vec_env": "control",  # any env for the harness
}
_SUBMODULES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

__all__ = ["BiozooDataModule", "CIFAR10DataModule", "DigitsDataModule", "MNISTDataModule", "TorchvisionDataModule",
           "image_spec", "spec_dims", "import_all"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))


def import_all() -> list[ModuleType]:
    """Import every submodule (every DataModule and environment class then exists for `__subclasses__`)."""
    return [importlib.import_module(f".{name}", __name__) for name in _SUBMODULES]
