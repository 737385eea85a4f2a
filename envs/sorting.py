"""Sorting for the CTM (arXiv 2505.05522, appendix; official `SortDataset`): x ~ N(0, 1)^N, target argsort(x).

The CTM reads the raw vector at every tick and emits one index (or the blank, class N) per tick; the CTC loss
(`loss: ctm_ctc`) aligns the ticks with the N-long target. Data are generated on the fly (see envs/parity.py).
"""

from __future__ import annotations

from typing import Any

import torch

from biozoo.models.errors import BiozooError

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
    def dims(self) -> dict[str, Any]:
        return {"seq_len": self.length, "input_shape": [self.length], "in_features": self.length,
                "d_input": self.length, "out_dims": self.length + 1, "num_classes": self.length + 1}

    def make(self, n: int, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return sorting_batch(n, self.length, generator)
