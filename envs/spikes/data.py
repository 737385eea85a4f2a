"""The spike tokeniser (the official NFDataloader's layout), the window datasets and `SpikesDataModule` (see
biozoo.envs.spikes)."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from biozoo._core import BiozooError, DataSpec, pack_tokens

from ..datamodules import BiozooDataModule
from .loaders import load_official, load_nwb, save_spikes, load_spikes
from .simulator import SpikeData, simulate


@dataclass
class SpikeTokenizer:
    """Neuron-ID and dt tokens (see the module docstring); times in seconds, windows in multiples of resolution."""

    n_neurons: int
    resolution: float = 0.01
    window: float = 0.05
    window_prev: float = 0.1
    block_size: int = 100
    prev_block_size: int = 150

    def __post_init__(self) -> None:
        self.window_bins = self._bins(self.window, "window")
        self.prev_bins = self._bins(self.window_prev, "window_prev")
        self.sos, self.eos, self.pad = self.n_neurons, self.n_neurons + 1, self.n_neurons + 2
        self.n_dt_values = max(self.window_bins, self.prev_bins) + 1
        self.dt_sos, self.dt_eos, self.dt_pad = self.n_dt_values, self.n_dt_values + 1, self.n_dt_values + 2

    def _bins(self, seconds: float, name: str) -> int:
        bins = seconds / self.resolution
        if bins < 1 or abs(bins - round(bins)) > 1e-6:
            raise BiozooError(f"{name} ({seconds} s) must be a positive multiple of the resolution ({self.resolution} s)")
        return int(round(bins))

    def to_bins(self, times: np.ndarray) -> np.ndarray:
        return np.floor(np.asarray(times) / self.resolution + 1e-9).astype(np.int64)

    def encode(self, ids: np.ndarray, bins: np.ndarray, start_bin: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Events (sorted by bin, then id) of one window starting at start_bin -> (id, dt) sequences of
        block_size + 1 tokens."""
        return pack_tokens(ids, np.asarray(bins) - start_bin, block_size, self.sos, self.eos, self.pad,
                           self.dt_eos, self.dt_pad)

    def decode(self, id_tokens: np.ndarray, dt_tokens: np.ndarray, start_time: float) -> tuple[np.ndarray, np.ndarray]:
        """Tokens -> (neuron ids, spike times at the start of their bins); special tokens are dropped."""
        id_tokens, dt_tokens = np.asarray(id_tokens), np.asarray(dt_tokens)
        keep = (id_tokens < self.n_neurons) & (dt_tokens < self.n_dt_values)
        return id_tokens[keep], start_time + dt_tokens[keep] * self.resolution

    @property
    def model_dims(self) -> dict[str, int]:
        return {"n_neurons": self.n_neurons, "window_bins": self.window_bins, "prev_bins": self.prev_bins,
                "block_size": self.block_size, "prev_block_size": self.prev_block_size}


class SpikeWindows(Dataset):
    """Token samples for the windows ending at `end_bins` (see the module docstring for the layout).

    behaviour: 'input' (the window's samples are model inputs), 'target' (the value at the window's end is the
    target of a behaviour head; `behaviour_edges` bins it for classification) or 'none'.
    """

    def __init__(self, data: SpikeData, tokenizer: SpikeTokenizer, end_bins: np.ndarray, frame_window: float = 0.15,
                 use_frames: bool = True, behaviour: str = "input", behaviour_var: int = 0,
                 behaviour_edges: np.ndarray | None = None):
        if behaviour not in ("input", "target", "none"):
            raise BiozooError(f"behaviour must be 'input', 'target' or 'none', got {behaviour!r}")
        if behaviour != "none" and data.behaviour is None:
            raise BiozooError("behaviour='%s' but the data has no behaviour; use behaviour='none'" % behaviour)
        self.data, self.tok, self.end_bins = data, tokenizer, np.asarray(end_bins, dtype=np.int64)
        bins = tokenizer.to_bins(data.spike_times)
        order = np.lexsort((data.spike_ids, bins))
        self.bins, self.ids = bins[order], data.spike_ids[order]
        self.use_frames = use_frames and data.frames is not None
        if self.use_frames:
            self.n_frames = max(1, int(math.ceil(frame_window * data.frame_rate - 1e-9)))
            self.frame_mean, self.frame_std = float(data.frames.mean()), float(data.frames.std()) + 1e-8
        self.behaviour, self.behaviour_var, self.behaviour_edges = behaviour, behaviour_var, behaviour_edges
        self.behaviour_len = max(1, int(round(tokenizer.window * data.behaviour_rate))) if data.behaviour is not None else 0

    def __len__(self) -> int:
        return len(self.end_bins)

    def lengths(self) -> np.ndarray:
        """Events in each sample's current window (what sets its padded length)."""
        lo = np.searchsorted(self.bins, self.end_bins - self.tok.window_bins, side="left")
        return np.searchsorted(self.bins, self.end_bins, side="left") - lo

    def events(self, start_bin: int, end_bin: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.searchsorted(self.bins, [start_bin, end_bin], side="left")
        return self.ids[lo:hi], self.bins[lo:hi]

    def frames_before(self, end_time: float) -> np.ndarray:
        last = int(self.data.frame_at(end_time - 1e-6))
        idx = np.arange(last - self.n_frames + 1, last + 1)
        idx = idx % len(self.data.frames) if self.data.frame_loop else idx.clip(0, len(self.data.frames) - 1)
        return (self.data.frames[idx] - self.frame_mean) / self.frame_std

    def behaviour_samples(self, start_bin: int, end_bin: int) -> tuple[np.ndarray, np.ndarray]:
        rate, res = self.data.behaviour_rate, self.tok.resolution
        last = int(math.floor(end_bin * res * rate - 1e-6))
        idx = np.arange(last - self.behaviour_len + 1, last + 1).clip(0, len(self.data.behaviour) - 1)
        offsets = np.clip(np.floor(idx / rate / res + 1e-6) - start_bin, 0, self.tok.window_bins - 1)
        return self.data.behaviour[idx], offsets.astype(np.int64)

    def behaviour_target(self, end_bin: int) -> torch.Tensor:
        values, _ = self.behaviour_samples(end_bin - self.tok.window_bins, end_bin)
        value = float(values[-1, self.behaviour_var])
        if self.behaviour_edges is not None:
            return torch.tensor(int(np.searchsorted(self.behaviour_edges, value, side="right")))
        return torch.tensor([value], dtype=torch.float32)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        tok, end = self.tok, int(self.end_bins[i])
        start = end - tok.window_bins
        id_seq, dt_seq = tok.encode(*self.events(start, end), start, tok.block_size)
        id_prev, dt_prev = tok.encode(*self.events(start - tok.prev_bins, start), start - tok.prev_bins,
                                      tok.prev_block_size)
        item = {"id": torch.from_numpy(id_seq[:-1]), "dt": torch.from_numpy(dt_seq[:-1]),
                "id_target": torch.from_numpy(id_seq[1:]), "dt_target": torch.from_numpy(dt_seq[1:]),
                "id_prev": torch.from_numpy(id_prev[:-1]), "dt_prev": torch.from_numpy(dt_prev[:-1]),
                "t_end": torch.tensor(end * tok.resolution, dtype=torch.float64)}
        if self.use_frames:
            item["frames"] = torch.from_numpy(self.frames_before(end * tok.resolution).astype(np.float32))
        if self.behaviour == "input":
            values, offsets = self.behaviour_samples(start, end)
            item["behaviour"] = torch.from_numpy(values.astype(np.float32))
            item["behaviour_dt"] = torch.from_numpy(offsets)
        elif self.behaviour == "target":
            item["behaviour_target"] = self.behaviour_target(end)
        return item


class LengthBuckets(torch.utils.data.Sampler):
    """Batches of windows with similar token counts, so little of a batch is padding. With `shuffle`, each
    pass shuffles, sorts chunks of 50 batches by length, and shuffles the batch order (seed + pass number)."""

    def __init__(self, lengths: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
        self.lengths, self.batch_size, self.shuffle, self.seed, self.passes = np.asarray(lengths), batch_size, shuffle, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        rng = np.random.default_rng(self.seed + self.passes)
        self.passes += 1
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        chunk = self.batch_size * (50 if self.shuffle else len(order))
        batches = []
        for c in range(0, len(order), chunk):
            part = order[c:c + chunk]
            part = part[np.argsort(self.lengths[part], kind="stable")]
            batches += [part[i:i + self.batch_size].tolist() for i in range(0, len(part), self.batch_size)]
        for i in (rng.permutation(len(batches)) if self.shuffle else range(len(batches))):
            yield batches[i]


def trim_padding(batch: dict[str, torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    """Cut the PAD columns that every row has at the end of the current and past sequences (exact: the
    causal mask and the past-PAD mask mean they change nothing; most windows are far below the cap)."""
    for keys, ref in ((("id", "dt", "id_target", "dt_target"), "id_target"), (("id_prev", "dt_prev"), "id_prev")):
        if ref in batch:
            used = (batch[ref] != pad_id).any(0).nonzero()
            length = int(used.max()) + 1 if len(used) else 1
            for k in keys:
                batch[k] = batch[k][:, :length]
    return batch


def collate_windows(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    return trim_padding(torch.utils.data.default_collate(items), pad_id)


def window_ends(tokenizer: SpikeTokenizer, t0: float, t1: float) -> np.ndarray:
    """End bins of the windows whose current part lies in [t0, t1) and whose past starts at >= 0."""
    first = max(tokenizer.to_bins(t0 + 1e-9) + tokenizer.window_bins, tokenizer.window_bins + tokenizer.prev_bins)
    last = tokenizer.to_bins(t1 + 1e-9)
    return np.arange(first, last + 1, tokenizer.window_bins)


# DataModule -------------------------------------------------------------------------------------------------------

class SpikesDataModule(BiozooDataModule):
    """Spike windows for Neuroformer, from the simulator, a NWB file or the official layout.

    source: 'simulate' (cached as .npz under data_dir), 'nwb' (path to a .nwb file), 'official' (path to the
    folder) or 'npz' (a file written by `save_spikes`). The recording is split by time into train / val / test
    (the last `test_fraction`, whole trials where the data have them). `finetune_fraction` keeps a seeded
    random subset of the training windows (few-shot fine-tuning; the official finetune set is 1%).
    behaviour: 'input', 'target' (regression, or classification into `behaviour_classes` quantile bins of the
    training data) or 'none'.
    """

    def __init__(self, source: str = "simulate", path: str | None = None, data_dir: str = "data",
                 n_neurons: int = 100, duration_s: float = 1200.0, sim_seed: int = 0,
                 sim_kwargs: dict[str, Any] | None = None, resolution: float = 0.01, window: float = 0.05,
                 window_prev: float = 0.1, block_size: int = 100, prev_block_size: int = 150,
                 frame_window: float = 0.15, use_frames: bool = True, behaviour: str = "input",
                 behaviour_var: str | None = None, behaviour_classes: int = 0, val_fraction: float = 0.1,
                 test_fraction: float = 0.2, finetune_fraction: float | None = None, batch_size: int = 32,
                 num_workers: int = 0, seed: int = 0):
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         val_fraction=val_fraction)
        if source not in ("simulate", "nwb", "official", "npz"):
            raise BiozooError(f"source must be 'simulate', 'nwb', 'official' or 'npz', got {source!r}")
        if source != "simulate" and not path:
            raise BiozooError(f"source={source!r} needs a path")
        self.source, self.path = source, path
        self.sim = {"n_neurons": n_neurons, "duration_s": duration_s, "seed": sim_seed, **(sim_kwargs or {})}
        self.tokenizer_kwargs = {"resolution": resolution, "window": window, "window_prev": window_prev,
                                 "block_size": block_size, "prev_block_size": prev_block_size}
        self.frame_window, self.use_frames = frame_window, use_frames
        self.behaviour_mode, self.behaviour_var_name, self.behaviour_classes = behaviour, behaviour_var, behaviour_classes
        self.test_fraction, self.finetune_fraction = test_fraction, finetune_fraction
        self._data: SpikeData | None = None
        self.behaviour_edges: np.ndarray | None = None

    @property
    def data(self) -> SpikeData:
        if self._data is None:
            self._data = self.load()
        return self._data

    def load(self) -> SpikeData:
        if self.source == "nwb":
            return load_nwb(self.path)
        if self.source == "official":
            return load_official(self.path)
        if self.source == "npz":
            return load_spikes(self.path)
        bound = inspect.signature(simulate).bind(**self.sim)
        bound.apply_defaults()  # every parameter, so a changed default never reuses a stale cache
        key = hashlib.sha1(json.dumps(bound.arguments, sort_keys=True, default=str).encode()).hexdigest()[:16]
        cache = self.data_dir / "spikes" / f"sim_n{self.sim['n_neurons']}_{key}.npz"
        if cache.exists():
            return load_spikes(cache)
        data = simulate(**self.sim)
        save_spikes(data, cache)
        return data

    @property
    def tokenizer(self) -> SpikeTokenizer:
        return SpikeTokenizer(self.data.n_neurons, **self.tokenizer_kwargs)

    @property
    def behaviour_var(self) -> int:
        names = self.data.behaviour_names
        if self.behaviour_var_name is None:
            return 0
        if self.behaviour_var_name not in names:
            raise BiozooError(f"behaviour_var {self.behaviour_var_name!r} is not in the data's behaviour {names}")
        return names.index(self.behaviour_var_name)

    @property
    def splits(self) -> dict[str, tuple[float, float]]:
        """(start, end) seconds of train / val / test; boundaries on whole trials when the data have them."""
        total = self.data.duration_s
        unit = self.data.trial_s or self.tokenizer.window
        n_units = int(math.floor(total / unit + 1e-9))
        n_test = max(1, int(round(self.test_fraction * n_units)))
        n_val = int(round(self.val_fraction * n_units))
        a, b = (n_units - n_test - n_val) * unit, (n_units - n_test) * unit
        return {"train": (0.0, a), "val": (a, b), "test": (b, n_units * unit)}

    @property
    def spec(self) -> DataSpec:
        """Spike token windows (stream "spikes": ids and dts, past window, optional frames and behaviour); the
        target is the next token. `extras` carry the tokeniser's and the modalities' sizes the Neuroformer takes."""
        return DataSpec("tokens", (self.tokenizer.block_size,), "next_token", num_classes=self.tokenizer.n_neurons,
                        extras={"stream": "spikes", **self.model_dims})

    @property
    def model_dims(self) -> dict[str, Any]:
        data, use_frames = self.data, self.use_frames and self.data.frames is not None
        n_frames = max(1, int(math.ceil(self.frame_window * data.frame_rate - 1e-9)))
        n_beh = data.behaviour.shape[1] if data.behaviour is not None and self.behaviour_mode == "input" else 0
        head = "none" if self.behaviour_mode != "target" else ("classification" if self.behaviour_classes else "regression")
        return {**self.tokenizer.model_dims,
                "frame_shape": [n_frames, *data.frames.shape[1:]] if use_frames else None,
                "n_behaviour": n_beh, "behaviour_len": max(1, int(round(self.tokenizer.window * data.behaviour_rate))),
                "behaviour_head": head, "n_behaviour_out": self.behaviour_classes or 1}

    def windows(self, split: str, behaviour: str | None = None) -> SpikeWindows:
        tok = self.tokenizer
        ends = window_ends(tok, *self.splits[split])
        return SpikeWindows(self.data, tok, ends, self.frame_window, self.use_frames, behaviour or self.behaviour_mode,
                            self.behaviour_var, self.behaviour_edges)

    def build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        if self.behaviour_mode == "target" and self.behaviour_classes:
            a, b = self.splits["train"]
            values = self.data.behaviour[int(a * self.data.behaviour_rate):int(b * self.data.behaviour_rate), self.behaviour_var]
            self.behaviour_edges = np.quantile(values, np.linspace(0, 1, self.behaviour_classes + 1)[1:-1])
        train = self.windows("train")
        if self.finetune_fraction:
            n = max(1, int(round(self.finetune_fraction * len(train))))
            pick = np.sort(np.random.default_rng(self.seed).choice(len(train), n, replace=False))
            train = Subset(train, pick.tolist())
        return train, self.windows("val"), self.windows("test")

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        lengths = base.lengths()[dataset.indices] if isinstance(dataset, Subset) else base.lengths()
        return DataLoader(dataset, batch_sampler=LengthBuckets(lengths, self.batch_size, shuffle, self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=partial(collate_windows, pad_id=self.data.n_neurons + 2))


__all__ = ["SpikeTokenizer", "SpikeWindows", "LengthBuckets", "trim_padding", "collate_windows", "window_ends", "SpikesDataModule"]
