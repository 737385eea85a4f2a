"""biozoo.envs: data and environments -- DataModules for supervised tasks, gymnasium environments for control."""

from .datamodules import (BiozooDataModule, CIFAR10DataModule, DigitsDataModule, MNISTDataModule,
                          TorchvisionDataModule, image_dims)

__all__ = ["BiozooDataModule", "CIFAR10DataModule", "DigitsDataModule", "MNISTDataModule", "TorchvisionDataModule",
           "image_dims"]
