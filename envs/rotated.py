"""Digits at two orientations: the "brain modes" data of the TauGate experiments (Ghasemlou 2026, arXiv 2602.11726).

The rotated mode is a fixed +45 degree rotation (bilinear interpolation, fill 0, counter-clockwise as torchvision
rotates) of the same images, for train, validation and test alike. `rotated_fraction` picks the mode mixture of
the train and validation splits: 0 upright, 1 rotated, 0.5 a 50/50 mixture. With `mixture: subset` a seeded
subset of the images is rotated, so every image appears once; with `mixture: both` every image appears twice,
upright and rotated (a 50/50 mixture of twice the size; rotated_fraction is then ignored). The test split follows
`test_rotated_fraction` (default: the same mixture), and `split(stage, fraction)` returns any split at any
mixture, e.g. upright and rotated test sets of the same images.

- `RotatedDigitsDataModule`: scikit-learn 8x8 digits (offline), the same 70/10/20 split as `DigitsDataModule`.
- `RotatedMNISTDataModule`: the same on MNIST 28x28 through torchvision's loader (files under data_dir).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from biozoo._core import check_choice

from .datamodules import DigitsDataModule, MNISTDataModule, load_digits_arrays, split_indices

STAGES = ("train", "val", "test")
MIXTURES = ("subset", "both")


def rotate_images(x: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate (N, C, H, W) or (C, H, W) images by `angle` degrees about the centre, bilinear, fill 0."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    return rotate(x, angle, interpolation=InterpolationMode.BILINEAR, fill=0.0)


def rotated_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which of n samples are rotated: a seeded subset of round(fraction * n)."""
    if not 0.0 <= fraction <= 1.0:
        from biozoo._core import BiozooError

        raise BiozooError(f"rotated_fraction must lie in [0, 1], got {fraction}")
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:int(round(fraction * n))]] = True
    return mask


class RotatedView(Dataset):
    """Rotates the images of `dataset` whose index is marked in `mask`; labels pass unchanged."""

    def __init__(self, dataset: Dataset, mask: np.ndarray, angle: float):
        self.dataset, self.mask, self.angle = dataset, mask, angle

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.dataset[i]
        return (rotate_images(x, self.angle) if self.mask[i] else x), y


class RotationMixin:
    """Shared by both DataModules: the mixture settings and `split(stage, fraction)`."""

    angle: float
    rotated_fraction: float
    test_rotated_fraction: float | None
    mix_seed: int
    mixture: str

    def set_rotation(self, angle: float, rotated_fraction: float, test_rotated_fraction: float | None,
                     mix_seed: int, mixture: str) -> None:
        check_choice("mixture", mixture, MIXTURES)
        rotated_mask(0, rotated_fraction, 0)  # validates the fraction
        self.angle, self.rotated_fraction, self.test_rotated_fraction = angle, rotated_fraction, test_rotated_fraction
        self.mix_seed, self.mixture = mix_seed, mixture

    def fraction_for(self, stage: str) -> float:
        if stage == "test" and self.test_rotated_fraction is not None:
            return self.test_rotated_fraction
        return self.rotated_fraction

    def mask_for(self, stage: str, n: int, fraction: float) -> np.ndarray:
        return rotated_mask(n, fraction, self.mix_seed + STAGES.index(stage))

    def build_datasets(self):
        return tuple(self.split(stage, self.fraction_for(stage),
                                self.mixture if stage != "test" or self.test_rotated_fraction is None else "subset")
                     for stage in STAGES)

    def split(self, stage: str, rotated_fraction: float, mixture: str = "subset") -> Dataset:
        """Split `stage` with `rotated_fraction` of its images rotated ("subset"), or each image twice ("both")."""
        if mixture == "both":
            return ConcatDataset([self.oriented(stage, 0.0), self.oriented(stage, 1.0)])
        return self.oriented(stage, rotated_fraction)

    def oriented(self, stage: str, rotated_fraction: float) -> Dataset:
        raise NotImplementedError


class RotatedDigitsDataModule(RotationMixin, DigitsDataModule):
    """8x8 digits, upright / rotated by `angle` / mixed. The images are rotated once, up front."""

    def __init__(self, angle: float = 45.0, rotated_fraction: float = 1.0, test_rotated_fraction: float | None = None,
                 mixture: str = "subset", mix_seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                 seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, val_fraction=val_fraction,
                         test_fraction=test_fraction, split_seed=split_seed)
        self.save_hyperparameters()
        self.set_rotation(angle, rotated_fraction, test_rotated_fraction, mix_seed, mixture)
        self._arrays: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def oriented(self, stage: str, rotated_fraction: float) -> TensorDataset:
        if self._arrays is None:
            x, y = load_digits_arrays()
            x = torch.from_numpy(x)
            self._arrays = x, rotate_images(x, self.angle), torch.from_numpy(y)
        upright, rotated, y = self._arrays
        test, val, train = split_indices(len(y), (self.test_fraction, self.val_fraction), self.split_seed)
        idx = torch.from_numpy({"train": train, "val": val, "test": test}[stage])
        mask = torch.from_numpy(self.mask_for(stage, len(idx), rotated_fraction))[:, None, None, None]
        return TensorDataset(torch.where(mask, rotated[idx], upright[idx]), y[idx])


class RotatedMNISTDataModule(RotationMixin, MNISTDataModule):
    """MNIST (torchvision files under data_dir), upright / rotated by `angle` / mixed; the images are rotated
    after ToTensor and before normalisation, so the background stays at the normalised zero level."""

    def __init__(self, angle: float = 45.0, rotated_fraction: float = 1.0, test_rotated_fraction: float | None = None,
                 mixture: str = "subset", mix_seed: int = 0, data_dir: str = "data", download: bool = False,
                 batch_size: int = 128, num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1):
        super().__init__(data_dir, download, batch_size, num_workers, seed, val_fraction)
        self.save_hyperparameters()
        self.set_rotation(angle, rotated_fraction, test_rotated_fraction, mix_seed, mixture)

    def transform(self, train: bool):
        from torchvision import transforms as T

        return T.ToTensor()  # normalised in split(), after the rotation

    def oriented(self, stage: str, rotated_fraction: float) -> Dataset:
        full = self._open(stage != "test", False)
        if stage == "test":
            data: Dataset = full
        else:
            val_idx, train_idx = split_indices(len(full), (self.val_fraction,), self.seed)
            data = Subset(full, (train_idx if stage == "train" else val_idx).tolist())
        return NormalisedView(RotatedView(data, self.mask_for(stage, len(data), rotated_fraction), self.angle))


class NormalisedView(Dataset):
    """MNIST's usual normalisation, applied after the rotation."""

    mean, std = 0.1307, 0.3081

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Any]:
        x, y = self.dataset[i]
        return (x - self.mean) / self.std, y
