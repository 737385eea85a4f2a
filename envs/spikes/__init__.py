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

One small package: `simulator` (SpikeData, simulate), `loaders` (NWB, official, npz) and `data` (SpikeTokenizer,
the window datasets, SpikesDataModule).
"""

from .data import *  # noqa: F401,F403
from .data import __all__ as _data
from .loaders import *  # noqa: F401,F403
from .loaders import __all__ as _loaders
from .simulator import *  # noqa: F401,F403
from .simulator import __all__ as _simulator

__all__ = [*_simulator, *_loaders, *_data]
