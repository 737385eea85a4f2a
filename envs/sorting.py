"""Sorting for the CTM (arXiv 2505.05522, appendix; official `SortDataset`): x ~ N(0, 1)^N, target argsort(x).

The CTM reads the raw vector at every tick and emits one index (or the blank, class N) per tick; the CTC loss
(`loss: ctm_ctc`) aligns the ticks with the N-long target. Data are generated on the fly (see envs/parity.py).
"""

from __future__ import annotations


import torch

from biozoo._core import BiozooError, DataSpec

from .parity import GeneratedDataModule


def sorting_batch(n: int, length: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, length, generator=generator)
    return x, torch.argsort(x, dim=1)


class SortingDataModule(GeneratedDataModule):
    """Sort N = `length` values (30 in the paper). dims give the CTM d_input N and N + 1 outputs (the blank last)."""

    def __init__(self, length: int = 30, batch_size: int = 32, train_size: int = 6400, val_size: int = 1024,
                 test_size: int = 4096, num_workers: int = 0, seed: int = 0):
        super().__init__(batch_size, train_size, val_size, test_size, num_workers, seed)
        if length < 2:
            raise BiozooError(f"length must be at least 2, got {length}")
        self.length = length

    @property
    def spec(self) -> DataSpec:
        """N values (flat features), the argsort index (N + 1 classes, the last the CTC blank) at N positions. A
        tick model emits one index per tick (CTC, `out_dims` N + 1); a model without ticks predicts each position."""
        return DataSpec("features", (self.length,), "classes", num_classes=self.length + 1, positions=(self.length,),
                        extras={"out_dims": self.length + 1, "prediction_reshaper": [-1], "d_input": self.length,
                                "min_ticks": self.length})

    def make(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return sorting_batch(n, self.length, generator)
