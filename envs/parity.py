"""Parity and sorting, the CTM's algorithmic tasks (arXiv 2505.05522, sections 4.3 and appendix), generated on
the fly.

- Parity: x in {-1, +1}^L; the target at position i is the parity of the number of -1s in x[:i+1] (the official
  `ParityDataset`). Scored per position (B, L) with 2 classes.
- Sorting (`envs/sorting.py`): x ~ N(0, 1)^N, the target is argsort(x), read out over the ticks with CTC.

Training samples are fresh every epoch (drawn from torch's global RNG, which `seed_everything` seeds);
validation and test sets are fixed by `seed`, so runs compare on the same held-out data.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.data import Dataset

from biozoo._core import BiozooError, DataSpec

from .datamodules import BiozooDataModule


def parity_batch(n: int, seq_len: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n, L) of +-1 floats, cumulative parity of the -1s (n, L) as int64)."""
    x = 2 * torch.randint(0, 2, (n, seq_len), generator=generator) - 1
    return x.float(), ((x == -1).long().cumsum(1) % 2)


class GeneratedDataset(Dataset):
    """`length` samples from `make(n, generator)`: fixed (drawn once from `seed`) or fresh at every access."""

    def __init__(self, make: Callable[[int, torch.Generator | None], tuple[torch.Tensor, torch.Tensor]],
                 length: int, seed: int | None = None):
        self.make, self.length = make, length
        self.fixed = None if seed is None else make(length, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fixed is not None:
            return self.fixed[0][idx], self.fixed[1][idx]
        x, y = self.make(1, None)
        return x[0], y[0]


class GeneratedDataModule(BiozooDataModule):
    """Train samples drawn fresh (`train_size` per epoch); val and test fixed by `seed`."""

    def __init__(self, batch_size: int = 64, train_size: int = 12800, val_size: int = 1024, test_size: int = 10000,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if min(train_size, val_size, test_size) < 1:
            raise BiozooError("train_size, val_size and test_size must be positive")
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size

    def make(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def build_datasets(self):
        return (GeneratedDataset(self.make, self.train_size), GeneratedDataset(self.make, self.val_size, self.seed + 1),
                GeneratedDataset(self.make, self.test_size, self.seed + 2))


class ParityDataModule(GeneratedDataModule):
    """Parity of length `seq_len` (16 and 64 in the paper's settings)."""

    def __init__(self, seq_len: int = 16, batch_size: int = 64, train_size: int = 12800, val_size: int = 1024,
                 test_size: int = 10000, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, train_size, val_size, test_size, num_workers, seed)
        if seq_len < 1:
            raise BiozooError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len

    @property
    def spec(self) -> DataSpec:
        """+-1 sequences (L,), a parity class at every position (the CTM reads them through its parity embedding)."""
        return DataSpec("sequence", (self.seq_len,), "classes", num_classes=2, positions=(self.seq_len,),
                        extras={"binary_tokens": True})

    def make(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return parity_batch(n, self.seq_len, generator)
