"""Spiking data for Neuroformer (Antoniades et al., ICLR 2024, arXiv 2311.00136): a simulator, loaders, the
tokeniser and a DataModule.

**Simulator** (`simulate`). The official repositories ship no simulator (their LIF outputs live on Google Drive
only), so this is our own: a discrete-time multivariate Hawkes process with a hub adjacency, driven by a movie
and modulated by a behavioural latent. For neuron i,

    lambda_i(t) = exp(beta_i z(t)) * (b_i + a_i * relu(s_i u_i(t))^2) + sum_j A[j, i] * g_j(t)
    g_j(t)      = sum_{spikes t_k of j, t_k < t} exp(-(t - t_k) / tau) / tau      (unit-area kernel)

- `u_i(t)` = <RF_i, frame(t)>, a Gaussian receptive field on smooth noise frames (blurred in space, low-pass
  in time with `movie_tau_s`), normalised to unit variance;
  `s_i` = +-1 (ON / OFF). The squared rectifier makes the drive non-linear in the pixels, as in V1.
- `z(t)`: an Ornstein-Uhlenbeck latent (time constant `behaviour_tau`), emitted as the behaviour ("speed") and
  multiplying each neuron's feed-forward rate by exp(beta_i z).
- `A[j, i]` (source row, target column) = the expected number of spikes that one spike of j adds to i. A
  fraction `hub_fraction` of neurons are hubs that project to a fraction `hub_p_connect` of all neurons; the
  others project with probability `p_connect`. A is rescaled so its spectral radius is at most
  `spectral_radius` (< 1 keeps the process stationary).
- Time steps of `dt` (2 ms); a step's spike is Bernoulli(min(1, lambda dt)) and its time is uniform in the step.
  The movie of `movie_s` seconds repeats (trials, like the V1AL repeats), so PSTHs can be averaged over trials.

**Loaders**: `load_nwb` (pynwb: the Units table, behaviour TimeSeries, an optional stimulus ImageSeries) and
`load_official` (the official visnav layout: `spikerates_dt_0.01.npy` (neurons x bins of counts),
`behavior_speed_dt_0.05.npy`, `phi_dt_0.05.npy`, `th_dt_0.05.npy`, `stimulus.npy`). Both return `SpikeData`.
The V1AL pickle (`Combo3_V1AL.pkl`) is not read: unpickling can run code.

**Tokenisation** (`SpikeTokenizer`, as in the official `NFDataloader`):
- A sample is the window `[t - window, t)` (current) with the window `[t - window - window_prev, t - window)`
  (past) before it, stepped by `window`, where t is the window's end (the official "Interval").
- Spikes are quantised to `resolution` (0.01 s): bin = floor(time / resolution); within a window events are
  ordered by bin, then by neuron ID (the official loader expands count arrays this way).
- ID tokens: neurons 0..N-1, then SOS = N, EOS = N+1, PAD = N+2. dt tokens: the bin offset from the start of
  the token's own window, 0..K with K = max(window, window_prev) / resolution, then SOS, EOS, PAD.
- Current sequence: [SOS] + the last `block_size - 2` events + [EOS], padded; dt sequence [0] + dts + [EOS].
  Inputs are the sequence minus its last token, targets the sequence shifted by one (GPT style). The past window
  is packed the same way with `prev_block_size`; the model only reads it through cross-attention.
- Frames: the `ceil(frame_window * frame_rate)` frames before the window's end (repeating the first frame at
  the start of the recording), standardised by the movie's mean and std; the model cuts them into patches.
- Behaviour: as an input, the samples inside the current window (official: 1 sample for 0.05 s at 20 Hz) with
  their offsets; as a target, the value at the window's last sample, continuous (regression) or binned into
  `behaviour_classes` quantile bins of the training data (classification).
Differences from the official loader: times are floored to the resolution, not rounded to the nearest bin (the
same for binned data; a spike at 0.047 s stays in the 0.04 bin); the split is by contiguous time (train, val,
test), so test windows never overlap training windows (official issue #6).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from biozoo.models.errors import BiozooError, DataNotFoundError
from biozoo.models.neuroformer import pack_tokens

from .datamodules import BiozooDataModule


@dataclass
class SpikeData:
    """Spikes (sorted by time) with whatever else a recording has.

    `adjacency[j, i]`: the ground-truth weight from neuron j to neuron i (simulations only). `frames` (F, H, W)
    are shown at `frame_rate`; with `frame_loop` the movie repeats every F frames (one trial). `behaviour` is
    (T_b, V) at `behaviour_rate`, one column per name in `behaviour_names`.
    """

    spike_times: np.ndarray
    spike_ids: np.ndarray
    n_neurons: int
    duration_s: float
    adjacency: np.ndarray | None = None
    frames: np.ndarray | None = None
    frame_rate: float = 20.0
    frame_loop: bool = False
    behaviour: np.ndarray | None = None
    behaviour_rate: float = 20.0
    behaviour_names: list[str] = field(default_factory=list)
    trial_s: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        order = np.argsort(self.spike_times, kind="stable")
        self.spike_times = np.asarray(self.spike_times, dtype=np.float64)[order]
        self.spike_ids = np.asarray(self.spike_ids, dtype=np.int64)[order]
        if self.spike_ids.size and (self.spike_ids.min() < 0 or self.spike_ids.max() >= self.n_neurons):
            raise BiozooError(f"spike ids must lie in [0, {self.n_neurons}), got {self.spike_ids.min()}..{self.spike_ids.max()}")

    def counts(self, bin_s: float, t0: float = 0.0, t1: float | None = None) -> np.ndarray:
        """Spike counts, (n_neurons, n_bins), in bins of `bin_s` from t0 to t1."""
        t1 = self.duration_s if t1 is None else t1
        n_bins = int(round((t1 - t0) / bin_s))
        keep = (self.spike_times >= t0) & (self.spike_times < t0 + n_bins * bin_s)
        bins = ((self.spike_times[keep] - t0) / bin_s).astype(np.int64).clip(0, n_bins - 1)
        out = np.zeros((self.n_neurons, n_bins), dtype=np.float32)
        np.add.at(out, (self.spike_ids[keep], bins), 1)
        return out

    def frame_at(self, t: np.ndarray) -> np.ndarray:
        """Index into `frames` of the frame shown at time(s) t."""
        idx = np.floor(np.asarray(t) * self.frame_rate + 1e-9).astype(np.int64)
        n = len(self.frames)
        return idx % n if self.frame_loop else idx.clip(0, n - 1)

    def behaviour_at(self, t: np.ndarray) -> np.ndarray:
        idx = np.floor(np.asarray(t) * self.behaviour_rate + 1e-9).astype(np.int64)
        return self.behaviour[idx.clip(0, len(self.behaviour) - 1)]


# Simulator ------------------------------------------------------------------------------------------------------

def hub_adjacency(n: int, rng: np.random.Generator, hub_fraction: float = 0.1, p_connect: float = 0.05,
                  hub_p_connect: float = 0.3, weight: float = 0.1, hub_weight: float = 0.1,
                  spectral_radius: float = 0.7) -> tuple[np.ndarray, np.ndarray]:
    """A directed adjacency (source row, target column, no self-loops) with hubs; returns (A, hub indices)."""
    n_hubs = int(round(hub_fraction * n))
    hubs = rng.choice(n, n_hubs, replace=False)
    prob = np.full((n, n), p_connect)
    prob[hubs] = hub_p_connect
    edges = rng.random((n, n)) < prob
    np.fill_diagonal(edges, False)
    strength = np.where(np.isin(np.arange(n), hubs)[:, None], hub_weight, weight)
    adjacency = edges * strength * rng.uniform(0.5, 1.5, (n, n))
    radius = np.abs(np.linalg.eigvals(adjacency)).max() if n > 1 else 0.0
    if radius > spectral_radius:
        adjacency *= spectral_radius / radius
    return adjacency, np.sort(hubs)


def smooth_movie(n_frames: int, shape: tuple[int, int], rng: np.random.Generator, sigma_px: float = 1.5,
                 tau_frames: float = 4.0) -> np.ndarray:
    """Spatially blurred, temporally low-pass white noise, standardised per pixel: (n_frames, H, W) float32."""
    h, w = shape
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :]
    gauss = np.exp(-2 * (np.pi * sigma_px) ** 2 * (fx ** 2 + fy ** 2))
    noise = np.fft.ifft2(np.fft.fft2(rng.standard_normal((n_frames, h, w))) * gauss).real
    alpha = math.exp(-1.0 / tau_frames)
    movie = np.empty_like(noise)
    state = noise[-1]  # warm start so the loop joins smoothly enough
    for k in range(n_frames):
        state = alpha * state + math.sqrt(1 - alpha ** 2) * noise[k]
        movie[k] = state
    movie = (movie - movie.mean(0)) / (movie.std(0) + 1e-8)
    return movie.astype(np.float32)


def receptive_fields(n: int, shape: tuple[int, int], rng: np.random.Generator, sigma_px: float = 1.5) -> np.ndarray:
    """Gaussian receptive fields at random centres, (n, H, W), unit norm."""
    h, w = shape
    cy, cx = rng.uniform(0, h - 1, n), rng.uniform(0, w - 1, n)
    yy, xx = np.mgrid[0:h, 0:w]
    rf = np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / (2 * sigma_px ** 2))
    return rf / np.linalg.norm(rf.reshape(n, -1), axis=1)[:, None, None]


def ou_process(n: int, tau_steps: float, rng: np.random.Generator) -> np.ndarray:
    alpha = math.exp(-1.0 / tau_steps)
    eps = rng.standard_normal(n) * math.sqrt(1 - alpha ** 2)
    z = np.empty(n)
    z[0] = rng.standard_normal()
    for k in range(1, n):
        z[k] = alpha * z[k - 1] + eps[k]
    return z


def simulate(n_neurons: int = 100, duration_s: float = 1200.0, seed: int = 0, *, dt: float = 0.002,
             tau: float = 0.01, hub_fraction: float = 0.1, p_connect: float = 0.05, hub_p_connect: float = 0.3,
             weight: float = 0.1, hub_weight: float = 0.1, spectral_radius: float = 0.5,
             base_rate: tuple[float, float] = (0.2, 0.6), stim_rate: tuple[float, float] = (2.0, 8.0),
             stimulus: bool = True, frame_shape: tuple[int, int] = (16, 16), frame_rate: float = 20.0,
             movie_s: float | None = 10.0, movie_tau_s: float = 0.5, behaviour: bool = True, behaviour_rate: float = 20.0,
             behaviour_tau: float = 2.0, behaviour_gain: float = 0.5) -> SpikeData:
    """Simulate the stimulus-driven Hawkes network described in the module docstring.

    Returns SpikeData with spike times and ids, the ground-truth `adjacency` (source row, target column),
    the movie `frames`, the `behaviour` ("speed", the OU latent) and `meta` (hubs, receptive fields, rates).
    Deterministic for a given seed. 20 minutes take about 15 s for 100 neurons and 70 s for 1000 on one busy core.
    """
    if n_neurons < 2 or duration_s <= 0 or dt <= 0:
        raise BiozooError(f"simulate needs n_neurons >= 2, duration_s > 0 and dt > 0, got {n_neurons}, {duration_s}, {dt}")
    rng = np.random.default_rng(seed)
    n = n_neurons
    adjacency, hubs = hub_adjacency(n, rng, hub_fraction, p_connect, hub_p_connect, weight, hub_weight, spectral_radius)
    base = rng.uniform(*base_rate, n)
    n_steps = int(round(duration_s / dt))

    # feed-forward drive per frame: (n_frames, n)
    if stimulus:
        n_movie = int(round((movie_s or duration_s) * frame_rate))
        movie = smooth_movie(n_movie, frame_shape, rng, tau_frames=movie_tau_s * frame_rate)
        rf = receptive_fields(n, frame_shape, rng)
        sign = rng.choice([-1.0, 1.0], n)
        u = np.einsum("fhw,nhw->fn", movie, rf)
        u = sign * u / (u.std(0) + 1e-8)
        drive = base + rng.uniform(*stim_rate, n) * np.maximum(u, 0.0) ** 2
    else:
        movie, rf, sign, n_movie = None, None, None, 1
        drive = base[None]
    steps_per_frame = 1.0 / (frame_rate * dt)

    if behaviour:
        n_beh = int(math.ceil(duration_s * behaviour_rate)) + 1
        z = ou_process(n_beh, behaviour_tau * behaviour_rate, rng)
        beta = rng.normal(0.0, behaviour_gain, n)
    else:
        z, beta = np.zeros(1), np.zeros(n)
    steps_per_beh = 1.0 / (behaviour_rate * dt)

    decay = math.exp(-dt / tau)
    kick = adjacency * (1 - decay)  # expected spikes per step that one spike adds to its targets, then decays
    recurrent = np.zeros(n)
    step_chunks, id_chunks = [], []
    chunk = 2000
    for c0 in range(0, n_steps, chunk):
        steps = np.arange(c0, min(c0 + chunk, n_steps))
        frame_idx = (steps / steps_per_frame).astype(np.int64) % n_movie if stimulus else np.zeros(len(steps), np.int64)
        beh_idx = (steps / steps_per_beh).astype(np.int64) if behaviour else np.zeros(len(steps), np.int64)
        ff = drive[frame_idx] * np.exp(beta[None] * z[beh_idx][:, None]) * dt  # feed-forward spikes per step
        threshold = rng.random((len(steps), n)) - ff  # spike when uniform < ff + recurrent
        for k in range(len(steps)):
            spiking = (threshold[k] < recurrent).nonzero()[0]
            recurrent *= decay
            if spiking.size:
                recurrent += kick[spiking].sum(0)
                step_chunks.append(np.full(spiking.size, c0 + k))
                id_chunks.append(spiking)
    steps = np.concatenate(step_chunks) if step_chunks else np.zeros(0, np.int64)
    ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, np.int64)
    times = (steps + rng.random(len(steps))) * dt
    meta = {"hubs": hubs, "receptive_fields": rf, "rf_sign": sign, "beta": beta, "base_rate": base,
            "mean_rate_hz": len(times) / (n * duration_s), "seed": seed, "dt": dt, "tau": tau}
    beh = (z[:int(math.ceil(duration_s * behaviour_rate))][:, None]).astype(np.float32) if behaviour else None
    return SpikeData(times, ids, n, float(duration_s), adjacency=adjacency.astype(np.float32), frames=movie,
                     frame_rate=frame_rate, frame_loop=stimulus and movie_s is not None, behaviour=beh,
                     behaviour_rate=behaviour_rate, behaviour_names=["speed"] if behaviour else [],
                     trial_s=movie_s if stimulus else None, meta=meta)


# Loaders ----------------------------------------------------------------------------------------------------------

def events_from_counts(counts: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """(N, T) counts -> (times, ids): per bin in time order, one event per spike, neurons ascending (official).
    Non-integer counts (deconvolved calcium) are rounded, as the official loader does."""
    counts = np.clip(np.rint(np.asarray(counts, dtype=np.float64)), 0, None).astype(np.int64)
    t_idx, n_idx = np.nonzero(counts.T)
    reps = counts.T[t_idx, n_idx]
    return np.repeat(t_idx * dt, reps), np.repeat(n_idx, reps)


def _dt_from_name(name: str) -> float | None:
    match = re.search(r"_dt_([0-9]*\.?[0-9]+)\.npy$", name)
    return float(match.group(1)) if match else None


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataNotFoundError(f"could not read {path} as a plain .npy array: {str(e).splitlines()[0]}") from None


def load_official(folder: str | Path, frame_rate: float = 20.0) -> SpikeData:
    """The official visnav layout (e.g. data/VisNav_VR_Expt/LateralVRDataset/NF_1.5/): `spikerates_dt_<dt>.npy`
    (neurons x bins of counts), behaviour `behavior_<name>_dt_<dt>.npy` or `<name>_dt_<dt>.npy` (phi, th), and
    `stimulus.npy` (frames x H x W at `frame_rate`). Behaviour variables are resampled to the first one's rate."""
    folder = Path(folder)
    spike_files = sorted(folder.glob("spikerates_dt_*.npy"))
    if not spike_files:
        raise DataNotFoundError(f"no spikerates_dt_<dt>.npy in {folder.resolve()} (the official Neuroformer layout; "
                                f"download it with the official repository's gdown links)")
    dt = _dt_from_name(spike_files[0].name)
    counts = _load_npy(spike_files[0])
    if counts.ndim != 2:
        raise BiozooError(f"{spike_files[0].name} must be (neurons, bins), got shape {counts.shape}")
    times, ids = events_from_counts(counts, dt)
    duration = counts.shape[1] * dt
    names, columns, rate = [], [], None
    for f in sorted(folder.glob("*_dt_*.npy")):
        if f in spike_files:
            continue
        var_dt = _dt_from_name(f.name)
        name = re.sub(r"^behavior_", "", f.name[: f.name.rindex("_dt_")])
        values = _load_npy(f).astype(np.float32).reshape(-1)
        rate = rate or 1.0 / var_dt
        grid = np.arange(int(math.floor(duration * rate + 1e-9))) / rate
        columns.append(values[np.clip((grid / var_dt + 1e-9).astype(np.int64), 0, len(values) - 1)])
        names.append(name)
    frames = None
    if (folder / "stimulus.npy").exists():
        frames = _load_npy(folder / "stimulus.npy").astype(np.float32)
        if frames.ndim != 3:
            raise BiozooError(f"stimulus.npy must be (frames, H, W), got shape {frames.shape}")
    return SpikeData(times, ids, counts.shape[0], duration, frames=frames, frame_rate=frame_rate,
                     behaviour=np.stack(columns, 1) if columns else None, behaviour_rate=rate or 20.0,
                     behaviour_names=names, meta={"source": str(folder), "dt": dt})


def _series_times(series: Any) -> np.ndarray:
    n = len(series.data)
    if series.timestamps is not None:
        return np.asarray(series.timestamps[:], dtype=np.float64)
    return float(series.starting_time or 0.0) + np.arange(n) / float(series.rate)


def load_nwb(path: str | Path, behaviour_names: list[str] | None = None, behaviour_rate: float = 20.0,
             frame_rate: float | None = None) -> SpikeData:
    """A NWB file (e.g. from DANDI) through pynwb: spikes from the Units table, behaviour from the TimeSeries
    in the 'behavior' processing module (resampled to `behaviour_rate` by linear interpolation; all of them
    unless `behaviour_names` picks some), frames from the first ImageSeries in /stimulus, if any. Times are
    shifted so the recording starts at 0 (the shift is in `meta['t0']`)."""
    from pynwb import NWBHDF5IO, TimeSeries
    from pynwb.image import ImageSeries

    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(f"no NWB file at {path.resolve()}")
    with NWBHDF5IO(str(path), "r") as io:
        nwb = io.read()
        if nwb.units is None or len(nwb.units) == 0:
            raise BiozooError(f"{path.name} has no Units table (sorted spikes); Neuroformer needs spike times")
        per_unit = [np.asarray(nwb.units.get_unit_spike_times(i), dtype=np.float64) for i in range(len(nwb.units))]
        times = np.concatenate(per_unit)
        ids = np.concatenate([np.full(len(t), i) for i, t in enumerate(per_unit)])
        series = []
        for module_name, module in nwb.processing.items():
            if module_name.lower() not in ("behavior", "behaviour"):
                continue
            for iface in module.data_interfaces.values():
                inner = getattr(iface, "time_series", None) or getattr(iface, "spatial_series", None)
                series += list(inner.values()) if inner else ([iface] if isinstance(iface, TimeSeries) else [])
        beh_t = [_series_times(s) for s in series]
        t0 = math.floor(min([times.min()] + [t[0] for t in beh_t if len(t)]))
        t_end = max([times.max()] + [t[-1] for t in beh_t if len(t)]) - t0
        names, columns = [], []
        grid = np.arange(int(math.floor(t_end * behaviour_rate)) + 1) / behaviour_rate
        for s, st in zip(series, beh_t):
            data = np.asarray(s.data[:], dtype=np.float64).reshape(len(st), -1)
            for c in range(data.shape[1]):
                name = s.name if data.shape[1] == 1 else f"{s.name}_{c}"
                if behaviour_names is None or name in behaviour_names:
                    names.append(name)
                    columns.append(np.interp(grid, st - t0, data[:, c]).astype(np.float32))
        if behaviour_names is not None and set(behaviour_names) - set(names):
            raise BiozooError(f"{path.name}: no behaviour TimeSeries named {sorted(set(behaviour_names) - set(names))}; "
                              f"it has {names or 'none'}")
        frames, f_rate = None, frame_rate
        movies = [s for s in nwb.stimulus.values() if isinstance(s, ImageSeries) and s.data is not None]
        if movies:
            movie = movies[0]
            raw = np.asarray(movie.data[:], dtype=np.float32)
            ft = _series_times(movie) - t0
            f_rate = f_rate or (float(movie.rate) if movie.rate else 1.0 / float(np.median(np.diff(ft))))
            grid_f = np.arange(int(math.ceil(t_end * f_rate))) / f_rate
            frames = raw[np.clip(np.searchsorted(ft, grid_f, side="right") - 1, 0, len(raw) - 1)]
    return SpikeData(times - t0, ids, len(per_unit), float(t_end), frames=frames, frame_rate=f_rate or 20.0,
                     behaviour=np.stack(columns, 1) if columns else None, behaviour_rate=behaviour_rate,
                     behaviour_names=names, meta={"source": str(path), "t0": t0})


def save_spikes(data: SpikeData, path: str | Path) -> Path:
    """SpikeData as a plain .npz (no pickles); `load_spikes` reads it back."""
    arrays = {"spike_times": data.spike_times, "spike_ids": data.spike_ids,
              "scalars": np.array([data.n_neurons, data.duration_s, data.frame_rate, float(data.frame_loop),
                                   data.behaviour_rate, data.trial_s or 0.0]),
              "behaviour_names": np.array(data.behaviour_names, dtype=str)}
    for name in ("adjacency", "frames", "behaviour"):
        if getattr(data, name) is not None:
            arrays[name] = getattr(data, name)
    for key, value in data.meta.items():
        if isinstance(value, (np.ndarray, int, float)) and not isinstance(value, bool):
            arrays[f"meta_{key}"] = np.asarray(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_spikes(path: str | Path) -> SpikeData:
    with np.load(path, allow_pickle=False) as z:
        n, duration, frame_rate, loop, beh_rate, trial_s = z["scalars"].tolist()
        get = lambda k: z[k] if k in z.files else None  # noqa: E731
        meta = {k[5:]: z[k] for k in z.files if k.startswith("meta_")}
        return SpikeData(z["spike_times"], z["spike_ids"], int(n), duration, adjacency=get("adjacency"),
                         frames=get("frames"), frame_rate=frame_rate, frame_loop=bool(loop), behaviour=get("behaviour"),
                         behaviour_rate=beh_rate, behaviour_names=[str(s) for s in z["behaviour_names"]],
                         trial_s=trial_s or None, meta=meta)


# Tokeniser and windows --------------------------------------------------------------------------------------------

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
    def dims(self) -> dict[str, Any]:
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
