"""The ccRNN task suite (Pemberton et al., NeurIPS 2021; Boven et al., Nat. Commun. 2023) as DataModules.

Every sample is a sequence pair (x (T, F), y): per-step trajectories (T, 2) for the drawing tasks, a class label
for recognition. `dims` carries what the model and the ccRNN task need: input_size, output_size, seq_len,
objective ("regression" | "classification"), feedback_every (the teacher signal is given at steps
t = 0, n, 2n, ..., the paper's sparse external feedback) and, for classification, num_classes.

- `LineDrawingDataModule` (synthetic): a 1-d cue at t = 0 (one of 7 integers in [-3, 3], times 0.1), zeros
  after; draw the straight line from the origin to the cue's end point (the origin itself or one of 6 points on a
  radius-10 circle) over 10 steps. Feedback every 2nd step. 1,000 sequences, 20% for validation.
- `DigitDrawingDataModule`: from the digit image read row by row (or from its class given as a one-hot cue at
  t = 0), draw the digit's template trajectory in [0, 1]^2 (`target="digit"`) or a straight line to the class's
  point on a radius-10 circle (`target="line"`). The templates are our own polylines on a 3 x 3 grid, resampled
  at equal arc length.
- `SequentialDigitsDataModule`: classify a digit read `step_pixels` pixels per step in raster order (one row per
  step by default: 8 steps for scikit-learn's 8x8 digits, 28 on MNIST; `step_pixels=2` gives 32 steps on 8x8).

`source="digits"` (scikit-learn, offline, a 70/10/20 split drawn with `seed`, which also shuffles) or `"mnist"` (torchvision files under data_dir; a
clear DataNotFoundError when they are absent).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from biozoo._core import BiozooError, DataSpec

from .datamodules import BiozooDataModule, MNISTDataModule, load_digits_arrays, split_indices

Split = tuple[np.ndarray, np.ndarray]  # images (N, H, W) in [0, 1], labels (N,)


def line_endpoints(num_lines: int, radius: float = 10.0, with_origin: bool = True) -> np.ndarray:
    """End points (num_lines, 2): optionally the origin first, the others evenly spaced on a circle (sin, cos)."""
    on_circle = num_lines - 1 if with_origin else num_lines
    angles = np.linspace(0, 2 * np.pi, on_circle, endpoint=False)
    circle = radius * np.stack([np.sin(angles), np.cos(angles)], 1)
    return np.concatenate([np.zeros((1, 2)), circle]) if with_origin else circle


def straight_lines(endpoints: np.ndarray, seq_len: int) -> np.ndarray:
    """(N, seq_len, 2): constant-speed lines from the origin (t = 0) to each end point (last step)."""
    fraction = np.linspace(0.0, 1.0, seq_len)[None, :, None]
    return (fraction * endpoints[:, None, :]).astype(np.float32)


# waypoints of each digit's pen path on a 3 x 3 grid of [0, 1]^2 (x right, y up), drawn in one stroke
DIGIT_STROKES: dict[int, list[tuple[float, float]]] = {
    0: [(0.5, 1), (0, 0.75), (0, 0.25), (0.5, 0), (1, 0.25), (1, 0.75), (0.5, 1)],
    1: [(0.25, 0.75), (0.5, 1), (0.5, 0)],
    2: [(0, 0.75), (0.5, 1), (1, 0.75), (0, 0), (1, 0)],
    3: [(0, 1), (1, 1), (0.5, 0.5), (1, 0.25), (0.5, 0), (0, 0)],
    4: [(0.75, 0), (0.75, 1), (0, 0.5), (1, 0.5)],
    5: [(1, 1), (0, 1), (0, 0.5), (0.75, 0.5), (1, 0.25), (0.75, 0), (0, 0)],
    6: [(1, 1), (0, 0.5), (0, 0.25), (0.5, 0), (1, 0.25), (0.5, 0.5), (0, 0.25)],
    7: [(0, 1), (1, 1), (0.25, 0)],
    8: [(0.5, 0.5), (0, 0.75), (0.5, 1), (1, 0.75), (0.5, 0.5), (0, 0.25), (0.5, 0), (1, 0.25), (0.5, 0.5)],
    9: [(1, 0.75), (0.5, 0.5), (0, 0.75), (0.5, 1), (1, 0.75), (1, 0)],
}


def digit_template(digit: int, seq_len: int) -> np.ndarray:
    """(seq_len, 2): the digit's stroke resampled at equal arc length, first and last waypoints included."""
    points = np.asarray(DIGIT_STROKES[digit], dtype=np.float64)
    arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    where = np.linspace(0.0, arc[-1], seq_len)
    return np.stack([np.interp(where, arc, points[:, 0]), np.interp(where, arc, points[:, 1])], 1).astype(np.float32)


def load_image_splits(source: str, data_dir: str, download: bool, seed: int, val_fraction: float,
                      test_fraction: float) -> tuple[Split, Split, Split]:
    """(train, val, test) as (images (N, H, W) float32 in [0, 1], labels int64) from scikit-learn or MNIST."""
    if source == "digits":
        x, y = load_digits_arrays()
        x = x[:, 0]
        test, val, train = split_indices(len(y), (test_fraction, val_fraction), seed)
        return (x[train], y[train]), (x[val], y[val]), (x[test], y[test])
    if source == "mnist":
        mnist = MNISTDataModule(data_dir=data_dir, download=download)
        if download:
            mnist.prepare_data()
        arrays = []
        for train in (True, False):  # raw uint8 tensors of torchvision's MNIST, no per-item transform
            ds = mnist._open(train, download=False)
            arrays.append(((ds.data.numpy() / 255.0).astype(np.float32), ds.targets.numpy().astype(np.int64)))
        (x, y), test = arrays
        val, train = split_indices(len(y), (val_fraction,), seed)
        return (x[train], y[train]), (x[val], y[val]), test
    raise BiozooError(f"unknown image source {source!r}: use 'digits' (scikit-learn, offline) or 'mnist'")


class SequenceTaskDataModule(BiozooDataModule):
    """Shared by the ccRNN tasks: builds (x, y) tensors per split and reports the dims the ccRNN task reads."""

    objective = "regression"
    input_size: int
    output_size: int
    seq_len: int

    def __init__(self, data_dir: str = "data", download: bool = False, batch_size: int = 50, num_workers: int = 0,
                 seed: int = 0, val_fraction: float = 0.1, feedback_every: int = 1):
        super().__init__(data_dir, download, batch_size, num_workers, seed, val_fraction)
        if feedback_every < 1:
            raise BiozooError(f"feedback_every must be >= 1, got {feedback_every}")
        self.feedback_every = feedback_every

    @property
    def spec(self) -> DataSpec:
        """Sequences (T, F); a class at the end (recognition) or a (T, 2) trajectory (drawing: regression at every
        step). `extras` carry what the ccRNN task reads: the objective and the feedback interval."""
        extras = {"objective": self.objective, "feedback_every": self.feedback_every}
        if self.objective == "classification":
            return DataSpec("sequence", (self.seq_len, self.input_size), "classes", num_classes=self.output_size,
                            extras=extras)
        return DataSpec("sequence", (self.seq_len, self.input_size), "regression", target_dim=self.output_size,
                        positions=(self.seq_len,), extras=extras)

    def make_split(self, split: Any) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def splits(self) -> tuple[Any, Any, Any]:
        raise NotImplementedError

    def build_datasets(self):
        out = []
        for split in self.splits():
            x, y = self.make_split(split)
            out.append(TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)))
        return tuple(out)


class LineDrawingDataModule(SequenceTaskDataModule):
    """Draw one of `num_lines` straight lines over `seq_len` steps from a cue given at t = 0 (synthetic)."""

    def __init__(self, num_lines: int = 7, seq_len: int = 10, radius: float = 10.0, cue_scale: float = 0.1,
                 num_train: int = 1000, num_test: int = 1000, val_fraction: float = 0.2, input_noise: float = 0.0,
                 feedback_every: int = 2, batch_size: int = 50, seed: int = 0, data_seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed, val_fraction=val_fraction, feedback_every=feedback_every)
        if num_lines < 2 or seq_len < 2:
            raise BiozooError(f"line drawing needs num_lines >= 2 and seq_len >= 2, got {num_lines}, {seq_len}")
        self.num_lines, self.seq_len, self.radius, self.cue_scale = num_lines, seq_len, radius, cue_scale
        self.num_train, self.num_test, self.input_noise, self.data_seed = num_train, num_test, input_noise, data_seed
        self.input_size, self.output_size = 1, 2
        self.lines = straight_lines(line_endpoints(num_lines, radius), seq_len)  # (num_lines, T, 2)
        self.cues = np.arange(num_lines) - num_lines // 2  # integers, 0 = stay at the origin
        # cue 0 -> the origin (line 0); the other cues in increasing order -> the circle points
        self.line_of_cue = np.empty(num_lines, int)
        self.line_of_cue[np.argsort(self.cues != 0, kind="stable")] = np.arange(num_lines)

    def splits(self):
        n_val = int(round(self.val_fraction * self.num_train))
        return [("train", self.num_train - n_val), ("val", n_val), ("test", self.num_test)]

    def make_split(self, split):
        name, n = split
        rng = np.random.default_rng([self.data_seed, ["train", "val", "test"].index(name)])
        which = rng.integers(0, self.num_lines, n)
        x = np.zeros((n, self.seq_len, 1), np.float32)
        x[:, 0, 0] = self.cue_scale * self.cues[which]
        if self.input_noise > 0:
            x[:, 1:] += self.input_noise * rng.standard_normal((n, self.seq_len - 1, 1)).astype(np.float32)
        return x, self.lines[self.line_of_cue[which]]

    def examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One input per cue (num_lines, T, 1) and its target line (num_lines, T, 2), for plots."""
        x = np.zeros((self.num_lines, self.seq_len, 1), np.float32)
        x[:, 0, 0] = self.cue_scale * self.cues
        return torch.from_numpy(x), torch.from_numpy(self.lines[self.line_of_cue])


class ImageSequenceDataModule(SequenceTaskDataModule):
    """A ccRNN task over digit images (scikit-learn 8x8 or MNIST 28x28), read in raster order."""

    def __init__(self, source: str = "digits", data_dir: str = "data", download: bool = False, batch_size: int = 50,
                 num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 feedback_every: int = 1, step_pixels: int | None = None):
        super().__init__(data_dir, download, batch_size, num_workers, seed, val_fraction, feedback_every)
        if source not in ("digits", "mnist"):
            raise BiozooError(f"unknown image source {source!r}: use 'digits' (scikit-learn, offline) or 'mnist'")
        self.source, self.test_fraction = source, test_fraction
        side = 8 if source == "digits" else 28
        self.step_pixels = step_pixels or side
        if (side * side) % self.step_pixels:
            raise BiozooError(f"step_pixels={self.step_pixels} does not divide the {side}x{side} image")
        self.image_steps = side * side // self.step_pixels

    def splits(self):
        return load_image_splits(self.source, str(self.data_dir), self.download, self.seed, self.val_fraction,
                                 self.test_fraction)

    def pixel_sequence(self, images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), self.image_steps, self.step_pixels)


class SequentialDigitsDataModule(ImageSequenceDataModule):
    """Classify a digit read `step_pixels` pixels per step (default one row: 8 steps on 8x8, 28 on MNIST)."""

    objective = "classification"

    def __init__(self, source: str = "digits", step_pixels: int | None = None, data_dir: str = "data",
                 download: bool = False, batch_size: int = 50, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2):
        super().__init__(source, data_dir, download, batch_size, num_workers, seed, val_fraction, test_fraction,
                         1, step_pixels)
        self.input_size, self.output_size, self.seq_len = self.step_pixels, 10, self.image_steps

    def make_split(self, split: Split):
        images, labels = split
        return self.pixel_sequence(images), labels


class DigitDrawingDataModule(ImageSequenceDataModule):
    """Draw a trajectory for a digit given row by row (`cue="image"`) or as its class at t = 0 (`cue="class"`).

    `target="digit"`: the class's template stroke in [0, 1]^2; `target="line"`: a straight line to the class's
    point on a radius-10 circle (the paper's seqMNIST line drawing). With `cue="class"` the sequence lasts
    `seq_len` steps (default: as many as the image has rows).
    """

    def __init__(self, source: str = "digits", cue: str = "image", target: str = "digit", seq_len: int | None = None,
                 step_pixels: int | None = None, feedback_every: int = 1, data_dir: str = "data",
                 download: bool = False, batch_size: int = 50, num_workers: int = 0, seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2):
        super().__init__(source, data_dir, download, batch_size, num_workers, seed, val_fraction, test_fraction,
                         feedback_every, step_pixels)
        if cue not in ("image", "class") or target not in ("digit", "line"):
            raise BiozooError(f"digit drawing takes cue 'image' | 'class' and target 'digit' | 'line', "
                              f"got {cue!r}, {target!r}")
        if cue == "image" and seq_len not in (None, self.image_steps):
            raise BiozooError(f"with cue='image' the sequence has {self.image_steps} steps; leave seq_len unset")
        self.cue, self.target = cue, target
        self.seq_len = seq_len or self.image_steps
        self.input_size = self.step_pixels if cue == "image" else 10
        self.output_size = 2
        if target == "digit":
            self.templates = np.stack([digit_template(d, self.seq_len) for d in range(10)])
        else:
            self.templates = straight_lines(line_endpoints(10, 10.0, with_origin=False), self.seq_len)

    def make_split(self, split: Split):
        images, labels = split
        if self.cue == "image":
            x = self.pixel_sequence(images)
        else:
            x = np.zeros((len(labels), self.seq_len, 10), np.float32)
            x[np.arange(len(labels)), 0, labels] = 1.0
        return x, self.templates[labels]

    def examples(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first validation sample of each class: inputs (10, T, F) and targets (10, T, 2), for plots."""
        images, labels = self.splits()[1]
        first = [int(np.flatnonzero(labels == c)[0]) for c in range(10) if (labels == c).any()]
        x, y = self.make_split((images[first], labels[first]))
        return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y)
