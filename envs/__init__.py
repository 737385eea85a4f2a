"""biozoo.envs: data and environments -- DataModules for supervised tasks, gymnasium environments for control."""

from .datamodules import (BiozooDataModule, CIFAR10DataModule, DigitsDataModule, MNISTDataModule,
                          TorchvisionDataModule, image_dims)
from .rotated import RotatedDigitsDataModule, RotatedMNISTDataModule  # noqa: F401  (TauGate brain modes)
from .ccrnn_tasks import DigitDrawingDataModule, LineDrawingDataModule, SequentialDigitsDataModule  # noqa: F401
from . import mazes, qamnist  # noqa: F401  (CTM maze and QA-MNIST DataModules)
from . import imagenet, parity, sorting  # noqa: F401  (CTM parity, sorting and ImageNet DataModules)
from . import swimmer  # noqa: F401  (registers the gymnasium env biozoo/Swimmer-v0)
from .spikes import SpikesDataModule  # noqa: F401  (Neuroformer spike windows)

__all__ = ["BiozooDataModule", "CIFAR10DataModule", "DigitsDataModule", "MNISTDataModule", "TorchvisionDataModule",
           "image_dims"]
