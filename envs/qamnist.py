"""QA-MNIST: question answering over a sequence of handwritten digits (CTM paper, arXiv 2505.05522, section 7).

One sample, following the official `QAMNISTDataset` / `QAMNISTSampler`:
1. `n_digits` digit images are shown one after another, each for `repeats` ticks.
2. The question follows as embeddings, each part shown for `repeats` ticks: an index (which of the shown digits
   to start from), then `n_operations` pairs (operator, index). Operators are encoded -1 = '+', -2 = '-', the
   encoding the official operator embedding takes (`embedding(-x - 1)`).
3. `answer_ticks` ticks with no input; the answer is read there: the running value (x op d) mod 10, reduced
   after every operation, so 10 classes.

The number of digits and of operations is drawn once per batch from [n - delta, n + delta) -- the official
sampler uses `np.random.randint(lo, hi)`, whose upper bound is exclusive, so n + delta itself never occurs; we
follow the code. Digits come from MNIST (resized to 32, normalised with its mean and std) when its files are
under `data_dir`, otherwise from scikit-learn's 8x8 digits (offline; `image_size` resizes them).

A batch is `((digits, question), answer)`: digits (B, n_digits * repeats, 1, H, W) float, question
(B, repeats * (1 + 2 * n_operations)) int64 (indices >= 0, operators < 0), answer (B,) int64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from biozoo._core import BiozooError, DataSpec

from .datamodules import BiozooDataModule, load_digits_arrays, split_indices

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
PLUS, MINUS = -1, -2
MODULO = 10


def make_question(labels: np.ndarray, n_operations: int, repeats: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Questions and answers for a batch of digit labels (B, n_digits): question tokens (B, Lq) and answers (B,)."""
    b, n_digits = labels.shape
    rows = np.arange(b)
    index = rng.integers(n_digits, size=b)
    value = labels[rows, index] % MODULO
    parts = [index]
    for _ in range(n_operations):
        op = -(rng.integers(2, size=b) + 1)  # -1 plus, -2 minus
        index = rng.integers(n_digits, size=b)
        digit = labels[rows, index]
        value = np.where(op == PLUS, value + digit, value - digit) % MODULO
        parts += [op, index]
    question = np.repeat(np.stack(parts, 1), repeats, axis=1)
    return question.astype(np.int64), value.astype(np.int64)


def question_text(question: torch.Tensor | np.ndarray, labels, repeats: int) -> str:
    """'(d0 + d2 - d1) mod 10' for one sample's question tokens (one token per part), with the digit labels."""
    tokens = np.asarray(question)[::repeats]
    words = [str(int(labels[tokens[0]]))]
    for op, index in zip(tokens[1::2], tokens[2::2]):
        words += ["+" if op == PLUS else "-", str(int(labels[index]))]
    return "(" + " ".join(words) + f") mod {MODULO}"


class QAMNISTBatches(Dataset):
    """Each item is a whole batch (the digit and operation counts are per batch, as the official sampler draws).

    `fixed=True` (validation, test) draws item i from a generator seeded by (seed, i), so the set never changes;
    otherwise each access draws fresh questions from torch's global generator (seeded by `seed_everything`).
    """

    def __init__(self, images: torch.Tensor, labels: np.ndarray, n_batches: int, batch_size: int, num_digits: int = 3,
                 num_digits_delta: int = 2, num_operations: int = 3, num_operations_delta: int = 2,
                 repeats: int = 1, fixed: bool = False, seed: int = 0):
        for name, n, delta in (("num_digits", num_digits, num_digits_delta),
                               ("num_operations", num_operations, num_operations_delta)):
            if n - delta < 1:
                raise BiozooError(f"{name} - delta must be >= 1, got {n} - {delta}")
        self.images, self.labels = images, labels
        self.n_batches, self.batch_size, self.repeats = n_batches, batch_size, repeats
        self.digit_range = (num_digits - num_digits_delta, num_digits + num_digits_delta)
        self.op_range = (num_operations - num_operations_delta, num_operations + num_operations_delta)
        self.fixed, self.seed = fixed, seed

    def __len__(self) -> int:
        return self.n_batches

    @staticmethod
    def _count(rng: np.random.Generator, lo: int, hi: int) -> int:
        return lo if lo == hi else int(rng.integers(lo, hi))  # upper bound exclusive, as np.random.randint

    def __getitem__(self, i: int):
        seed = [self.seed, i] if self.fixed else int(torch.randint(2**62, ()).item())
        rng = np.random.default_rng(seed)
        n_digits, n_ops = self._count(rng, *self.digit_range), self._count(rng, *self.op_range)
        picks = rng.integers(len(self.labels), size=(self.batch_size, n_digits))
        question, answer = make_question(self.labels[picks], n_ops, self.repeats, rng)
        digits = self.images[torch.from_numpy(picks)].repeat_interleave(self.repeats, dim=1)
        return (digits, torch.from_numpy(question)), torch.from_numpy(answer)


def resolve_source(source: str, data_dir: Path) -> str:
    """'mnist' or 'digits': `auto` takes MNIST when its files are under data_dir."""
    if source not in ("auto", "mnist", "digits"):
        raise BiozooError(f"QA-MNIST source must be 'auto', 'mnist' or 'digits', got {source!r}")
    if source == "auto":
        raw = data_dir / "MNIST" / "raw"
        return "mnist" if any(raw.glob("train-images-idx3-ubyte*")) else "digits"
    return source


def load_digit_images(source: str, data_dir: str | Path, image_size: int | None
                      ) -> tuple[tuple[torch.Tensor, np.ndarray], tuple[torch.Tensor, np.ndarray], str]:
    """(train, test) digit images (N, 1, S, S) normalised like MNIST, with labels, and the source used."""
    root = Path(data_dir)
    if resolve_source(source, root) == "mnist":
        from torchvision.datasets import MNIST

        from biozoo._core import DataNotFoundError

        sets = []
        for train in (True, False):
            try:
                ds = MNIST(str(root), train=train, download=False)
            except RuntimeError as e:
                raise DataNotFoundError(f"MNIST not found under {root.resolve()} ({e}); use source: digits "
                                        "for the offline scikit-learn digits") from None
            x = ds.data.float().div(255)[:, None]
            sets.append((x, ds.targets.numpy().astype(np.int64)))
        size, used = image_size or 32, "mnist"
    else:
        x, y = load_digits_arrays()
        test_idx, train_idx = split_indices(len(y), (0.2,), 0)
        x = torch.from_numpy(x)
        sets = [(x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])]
        size, used = image_size or 8, "digits"
    out = []
    for x, y in sets:
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        out.append(((x - MNIST_MEAN) / MNIST_STD, y))
    return out[0], out[1], used


class QAMNISTDataModule(BiozooDataModule):
    """QA-MNIST batches. The official scripts: 3 +- 2 digits, 3 +- 2 operations, repeats = answer ticks = 1 or 10."""

    def __init__(self, data_dir: str = "data", source: str = "auto", image_size: int | None = None,
                 num_digits: int = 3, num_digits_delta: int = 2, num_operations: int = 3,
                 num_operations_delta: int = 2, repeats: int = 1, answer_ticks: int = 1,
                 train_batches: int = 500, val_batches: int = 10, test_batches: int = 20, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1):
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         val_fraction=val_fraction)
        self.source, self.image_size = source, image_size
        self.task = dict(num_digits=num_digits, num_digits_delta=num_digits_delta, num_operations=num_operations,
                         num_operations_delta=num_operations_delta, repeats=repeats)
        self.answer_ticks = answer_ticks
        self.n_batches = (train_batches, val_batches, test_batches)
        self.used_source: str | None = None

    @property
    def spec(self) -> DataSpec:
        """A token stream of digit images (1, H, W) then question tokens (stream "qamnist"), one answer class."""
        size = self.image_size or (32 if resolve_source(self.source, self.data_dir) == "mnist" else 8)
        r = self.task["repeats"]
        return DataSpec("tokens", (1, size, size), "classes", num_classes=MODULO,
                        extras={"stream": "qamnist", "in_channels": 1, "iterations_per_digit": r,
                                "iterations_per_question_part": r, "iterations_for_answering": self.answer_ticks})

    def build_datasets(self):
        (x, y), (x_test, y_test), self.used_source = load_digit_images(self.source, self.data_dir, self.image_size)
        val_idx, train_idx = split_indices(len(y), (self.val_fraction,), self.seed)  # validation digits held out
        make = lambda x, y, n, fixed, k: QAMNISTBatches(x, y, n, self.batch_size, fixed=fixed,  # noqa: E731
                                                        seed=self.seed + k, **self.task)
        return (make(x[train_idx], y[train_idx], self.n_batches[0], False, 0),
                make(x[val_idx], y[val_idx], self.n_batches[1], True, 1),
                make(x_test, y_test, self.n_batches[2], True, 2))

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        # items are whole batches already
        return DataLoader(dataset, batch_size=None, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
