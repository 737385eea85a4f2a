"""Loaders for real recordings: NWB files, the official visnav .npy layout, and biozoo's own .npz (see
biozoo.envs.spikes)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from biozoo._core import BiozooError, DataNotFoundError

from .simulator import SpikeData, events_from_counts


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


__all__ = ["load_official", "load_nwb", "save_spikes", "load_spikes"]
