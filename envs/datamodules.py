"""DataModules for the supervised tasks.

`BiozooDataModule` holds what every dataset shares (data_dir, download, batch_size, num_workers, seed) and
describes its data with one `DataSpec` (`.spec`); `.dims` (what the CLI links into the task) is that spec with
the builder arguments derived from it. Subclasses only give their spec and build their datasets.

- `DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits (offline, 1,797 images).
- `MNISTDataModule`, `CIFAR10DataModule`: torchvision's real loaders and downloads. When the files are absent
  and cannot be downloaded, one error says where to put them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from biozoo._core import BiozooError, DataNotFoundError, DataSpec


def image_spec(channels: int, height: int, width: int, num_classes: int) -> DataSpec:
    return DataSpec("image", (channels, height, width), "classes", num_classes=num_classes)


def spec_dims(spec: DataSpec) -> dict[str, Any]:
    """What the CLI links into a task (`data.dims` -> `model.init_args.data_dims`): the spec itself (primitives)
    and the builder arguments derived from it (in_features, in_channels, input_size, out_dims, ...)."""
    return {**spec.builder_kwargs(), "spec": spec.to_dict()}


def linked_dims(datamodule: Any) -> dict[str, Any]:
    """What the CLI links from any DataModule: its `.spec` (the one contract), as `spec_dims`. A DataModule without
    a DataSpec `.spec` is refused here, in one line, rather than failing later on a shape."""
    spec = getattr(datamodule, "spec", None)
    if not isinstance(spec, DataSpec):
        raise BiozooError(f"{type(datamodule).__name__} has no `.spec`: a DataModule tells models what its data are "
                          "with a biozoo DataSpec (`spec` property), e.g. DataSpec('sequence', (L, F), 'classes', "
                          "num_classes=C)")
    return spec_dims(spec)


def split_indices(n: int, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split range(n) into consecutive chunks of a seeded permutation (the last chunk takes the rest)."""
    order = np.random.default_rng(seed).permutation(n)
    cuts = np.cumsum([int(round(f * n)) for f in fractions])
    return np.split(order, cuts)


class BiozooDataModule(L.LightningDataModule):
    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, val_fraction: float = 0.1):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.download, self.batch_size, self.num_workers = download, batch_size, num_workers
        self.seed, self.val_fraction = seed, val_fraction
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    @property
    def spec(self) -> DataSpec:
        raise NotImplementedError

    @property
    def dims(self) -> dict[str, Any]:
        return spec_dims(self.spec)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_datasets()

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        trainer = self.trainer
        sampler = None
        if not shuffle and trainer is not None and trainer.world_size > 1:
            # every evaluation sample exactly once across ranks (Lightning's default sampler pads with repeats)
            sampler = UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          generator=generator, sampler=sampler, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 images in [0, 1], shape (1797, 1, 8, 8), and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32)[:, None], digits.target.astype(np.int64)


class DigitsDataModule(BiozooDataModule):
    """8x8 digits, split 70/10/20 (train/val/test) by a seeded permutation (the seed also shuffles batches)."""

    def __init__(self, batch_size: int = 64, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, split_seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, val_fraction=val_fraction)
        self.test_fraction, self.split_seed = test_fraction, split_seed

    @property
    def spec(self) -> DataSpec:
        return image_spec(1, 8, 8, 10)

    def build_datasets(self):
        x, y = load_digits_arrays()
        test, val, train = split_indices(len(y), (self.test_fraction, self.val_fraction), self.split_seed)
        make = lambda idx: TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx]))  # noqa: E731
        return make(train), make(val), make(test)


class TorchvisionDataModule(BiozooDataModule):
    """A torchvision dataset with a train/val split of its training set and its own test set."""

    dataset_name = ""
    where = ""  # the files torchvision looks for, relative to data_dir

    def make_dataset(self, train: bool, download: bool, transform):
        raise NotImplementedError

    def transform(self, train: bool):
        raise NotImplementedError

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._open(train, download=True)

    def _open(self, train: bool, download: bool):
        try:
            return self.make_dataset(train, download, self.transform(train))
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found", URLError, ...
            how = "download failed" if download else "not found"
            raise DataNotFoundError(
                f"{self.dataset_name} {how} under {self.data_dir.resolve()}: put the files at "
                f"{(self.data_dir / self.where).resolve()} or run with --data.download true on a machine with "
                f"internet ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def build_datasets(self):
        full, test = self._open(True, False), self._open(False, False)
        val_idx, train_idx = split_indices(len(full), (self.val_fraction,), self.seed)
        # validation must not be augmented: a second view of the training files with the test transform
        plain = self.make_dataset(True, False, self.transform(False))
        return Subset(full, train_idx.tolist()), Subset(plain, val_idx.tolist()), test


class MNISTDataModule(TorchvisionDataModule):
    dataset_name = "MNIST"
    where = "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte"

    @property
    def spec(self) -> DataSpec:
        return image_spec(1, 28, 28, 10)

    def transform(self, train: bool):
        from torchvision import transforms as T

        return T.Compose([T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])

    def make_dataset(self, train: bool, download: bool, transform):
        from torchvision.datasets import MNIST

        return MNIST(str(self.data_dir), train=train, download=download, transform=transform)


class CIFAR10DataModule(TorchvisionDataModule):
    dataset_name = "CIFAR-10"
    where = "cifar-10-batches-py/{data_batch_1..5,test_batch}"

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 128,
                 num_workers: int = 2, seed: int = 0, val_fraction: float = 0.1, augment: bool = True):
        super().__init__(data_dir, download, batch_size, num_workers, seed, val_fraction)
        self.augment = augment

    @property
    def spec(self) -> DataSpec:
        return image_spec(3, 32, 32, 10)

    def transform(self, train: bool):
        from torchvision import transforms as T

        norm = [T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]
        if train and self.augment:
            return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] + norm)
        return T.Compose(norm)

    def make_dataset(self, train: bool, download: bool, transform):
        from torchvision.datasets import CIFAR10

        return CIFAR10(str(self.data_dir), train=train, download=download, transform=transform)
