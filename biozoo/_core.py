"""The contract every part of biozoo shares: errors, `DataSpec` (what a task's data is), `ModelOutput` (what every
model's forward returns) and where the configs are. `models/`, `envs/` and `train/` import this module and nothing
else of the face.

    spec = DataSpec("image", (1, 8, 8), "classes", num_classes=10)
    spec.in_features, spec.sequence_shape, spec.out_dims     # 64, (8, 8), 10
    out = model(x)                                           # a ModelOutput
    out.logits                                               # (B, C, *positions)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# --- errors -------------------------------------------------------------------------------------------------------


class BiozooError(Exception):
    """Base class: a user error with a one-line explanation. The CLI prints it without a traceback."""


class UnknownNameError(BiozooError, KeyError):
    """An unknown model, pretrained tag, loss, converter or task name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(BiozooError):
    """A checkpoint that is missing, corrupt, unsafe, or does not match the model."""


class ShapeError(BiozooError, ValueError):
    """An input tensor whose shape the model cannot take."""


class SpecError(BiozooError, ValueError):
    """A model that cannot take a task's data, found when the two are linked (before any forward)."""


class DataNotFoundError(BiozooError, FileNotFoundError):
    """A dataset that is not on disk and could not be downloaded."""


def check_shape(name: str, x, expected: str, ok: bool) -> None:
    """Raise a ShapeError naming the model, the expected layout and the shape it got."""
    if not ok:
        raise ShapeError(f"{name} expects input of shape {expected}, got {tuple(x.shape)}")


def suggest(name: str, choices: list[str]) -> str:
    """' Did you mean: a, b?' for the closest names, or ''."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    """Raise an UnknownNameError naming the closest and all known choices when `value` is not one of them."""
    choices = list(choices)
    if value not in choices:
        raise UnknownNameError(f"unknown {what} {value!r}.{suggest(str(value), choices)} Known: {', '.join(choices)}")


def first_line(error: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message (its type name if it has none), optionally after the type name."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text.splitlines()[0]}" if with_type else text.splitlines()[0]


# --- DataSpec -----------------------------------------------------------------------------------------------------

INPUT_KINDS = ("image", "sequence", "features", "tokens", "observation")
TARGET_KINDS = ("classes", "regression", "discrete_actions", "continuous_actions", "next_token")
INPUT_WORDS = {"image": "image inputs", "sequence": "sequences", "features": "flat features",
               "tokens": "token streams", "observation": "observation vectors"}
INPUT_LAYOUT = {"image": "(C, H, W)", "sequence": "(L, F)", "features": "(F,)", "tokens": "(tokens)",
                "observation": "(F,)"}
TARGET_WORDS = {"classes": "classes", "regression": "regression targets", "discrete_actions": "discrete actions",
                "continuous_actions": "continuous actions", "next_token": "next tokens"}


@dataclass(frozen=True)
class DataSpec:
    """What a task's samples are: the one description every DataModule and control env exposes (`.spec`).

    input: image (C, H, W), sequence (L,) or (L, F), features (F,), tokens (a dict of token streams), observation (F,).
    target: classes (`num_classes`, optionally at `positions`, e.g. parity's (L,) or a maze route's (100,)),
        regression (`target_dim` per position), discrete_actions (`num_classes` actions), continuous_actions
        (`target_dim` in [action_low, action_high]) or next_token.
    time_axis: the input axis that is time, if any (0 for sequences). `extras`: task-specific builder arguments
        (a QA-MNIST's ticks per digit, a swimmer's links, a spike tokeniser's vocabularies).
    online: the answer at step t must come from input steps <= t (NeuroGym's trials: an agent sees step t before it
        answers at t); a model that cannot be causal refuses such a task when linked. Offline tasks (CTM parity)
        may read the whole sequence.
    """

    input: str
    shape: tuple[int, ...]
    target: str
    num_classes: int | None = None
    positions: tuple[int, ...] = ()
    target_dim: int | None = None
    action_low: float | None = None
    action_high: float | None = None
    time_axis: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    online: bool = False

    def __post_init__(self) -> None:
        check_choice("input kind", self.input, INPUT_KINDS)
        check_choice("target kind", self.target, TARGET_KINDS)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if self.input == "sequence" and self.time_axis is None:
            object.__setattr__(self, "time_axis", 0)
        if self.online and (self.input != "sequence" or self.positions != self.shape[:1]):
            raise BiozooError("an online DataSpec is a sequence (L, F) with a target at each of its L steps")

    # the numbers builders take
    @property
    def in_features(self) -> int:
        return math.prod(self.shape)

    @property
    def in_channels(self) -> int | None:
        return self.shape[0] if self.input == "image" else None

    @property
    def sequence_shape(self) -> tuple[int, int] | None:
        """(L, F) as a recurrent model reads it: a (L,) sequence as (L, 1), an image as rows (H, C * W)."""
        if self.input == "sequence":
            return (self.shape[0], math.prod(self.shape[1:]) if len(self.shape) > 1 else 1)
        if self.input == "image":
            return (self.shape[1], self.shape[0] * self.shape[2])
        return None

    @property
    def classes(self) -> int:
        """Output units per position: classes, actions, or regression dimensions."""
        return int(self.num_classes if self.num_classes is not None else (self.target_dim or 1))

    @property
    def out_dims(self) -> int:
        return self.classes * math.prod(self.positions)

    @property
    def prediction_reshaper(self) -> list[int] | None:
        """The CTM's official reshaper: flat outputs are position-major, [*positions, classes]."""
        return [*self.positions, self.classes] if self.positions else None

    def describe_input(self) -> str:
        if self.input == "tokens":
            return f"{INPUT_WORDS['tokens']} ({self.extras.get('stream', 'tokens')})"
        return f"{'online ' if self.online else ''}{INPUT_WORDS[self.input]} {self.shape}"

    def describe_target(self) -> str:
        where = f" at {self.positions} positions" if self.positions else ""
        n = self.num_classes if self.num_classes is not None else self.target_dim
        return f"{TARGET_WORDS[self.target]} ({n}){where}"

    def builder_kwargs(self) -> dict[str, Any]:
        """Every dimension name a builder may take, derived from the spec (plus the task's extras)."""
        kw: dict[str, Any] = {"input_shape": list(self.shape), "in_features": self.in_features,
                              "num_classes": self.classes, "out_dims": self.out_dims}
        if self.in_channels is not None:
            kw["in_channels"] = self.in_channels
        if self.sequence_shape is not None:
            kw["seq_len"], kw["input_size"] = self.sequence_shape
        if self.positions:
            kw["prediction_reshaper"] = self.prediction_reshaper
            kw["positions"] = list(self.positions)
        return {**kw, **self.extras}

    def to_dict(self) -> dict[str, Any]:
        """Primitives only (it is saved in checkpoints' hyper-parameters and read weights-only)."""
        d = asdict(self)
        d["shape"], d["positions"] = list(self.shape), list(self.positions)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DataSpec":
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - names)
        if unknown:
            raise BiozooError(f"unknown DataSpec field(s) {unknown}.{suggest(unknown[0], sorted(names))}")
        return cls(**d)


def spec_mismatch(model: str, spec: DataSpec, reads: Iterable[str], streams: Iterable[str] | None = None) -> SpecError:
    """The one-line refusal: 'ccrnn cannot take image inputs (3, 32, 32): it reads sequences (L, F)'."""
    layout = lambda r: f"({', '.join(streams)})" if r == "tokens" and streams else INPUT_LAYOUT[r]  # noqa: E731
    what = " or ".join(f"{INPUT_WORDS[r]} {layout(r)}" for r in reads)
    return SpecError(f"{model} cannot take {spec.describe_input()}: it reads {what}")


# --- ModelOutput --------------------------------------------------------------------------------------------------


class ModelOutput:
    """What every model's forward returns.

    logits: (B, C, *positions), what losses and metrics score (a CTM's at its most certain tick).
    ticks_logits: (B, C, *positions, T) per internal tick, with certainties (B, 2, T) = [normalised entropy, 1 - it]
        and ticks_used (B,) when a model halts early; None for models without ticks.
    value: a policy's critic value (B,); state: the recurrent state to pass to the next call (policies);
    extras: anything else by name (also `out["name"]`).
    """

    ticks_logits: torch.Tensor | None = None  # class-level defaults, for subclasses that compute fields lazily
    ticks_used: torch.Tensor | None = None
    value: torch.Tensor | None = None
    state: Any = None
    extras: dict[str, Any] = {}

    def __init__(self, logits: torch.Tensor, ticks_logits: torch.Tensor | None = None,
                 certainties: torch.Tensor | None = None, ticks_used: torch.Tensor | None = None,
                 value: torch.Tensor | None = None, state: Any = None, extras: dict[str, Any] | None = None):
        self.logits, self.ticks_logits, self.certainties = logits, ticks_logits, certainties
        self.ticks_used, self.value, self.state = ticks_used, value, state
        self.extras = dict(extras or {})

    def __getitem__(self, name: str) -> Any:
        return self.extras[name]

    def __contains__(self, name: str) -> bool:
        return name in self.extras

    def __repr__(self) -> str:
        shape = lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else t  # noqa: E731
        parts = [f"logits={shape(self.logits)}"]
        if self.ticks_logits is not None:
            parts.append(f"ticks_logits={shape(self.ticks_logits)}")
        if self.extras:
            parts.append(f"extras={sorted(self.extras)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def per_tick(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ticks_logits (B, C, *P, T), certainties (B, 2, T)); a model without ticks reads as one tick whose
        certainty is 1 - normalised entropy of its logits, so tick losses keep their single-tick meaning."""
        if self.ticks_logits is not None and self.certainties is not None:
            return self.ticks_logits, self.certainties
        return self.logits.unsqueeze(-1), certainty(self.logits).unsqueeze(-1)


def certainty(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2): [normalised entropy, 1 - it] of (B, C, *positions) logits, averaged over positions (the CTM's)."""
    p = logits.float().log_softmax(1)
    entropy = -(p.exp() * p).sum(1) / math.log(max(2, logits.shape[1]))
    entropy = entropy.flatten(1).mean(1) if entropy.dim() > 1 else entropy
    return torch.stack([entropy, 1 - entropy], 1).to(logits.dtype)


def classes_first(flat: torch.Tensor, classes: int, positions: tuple[int, ...] | list[int]) -> torch.Tensor:
    """Position-major flat outputs (B, P * C, ...) -> (B, C, *positions, ...) (the CTM's official layout)."""
    if not positions:
        return flat
    b, rest = flat.shape[0], flat.shape[2:]
    x = flat.reshape(b, *positions, classes, *rest)
    return x.movedim(1 + len(positions), 1)


def as_output(x: Any) -> ModelOutput:
    """A ModelOutput from a model's result (a bare Tensor from a user's own nn.Module is read as its logits)."""
    if isinstance(x, ModelOutput):
        return x
    if isinstance(x, torch.Tensor):
        return ModelOutput(x)
    raise BiozooError(f"a model returned {type(x).__name__}; biozoo models return a ModelOutput (or a Tensor of logits)")



# --- recurrent state across calls (policies carry it across env steps) ----------------------------------------


def is_recurrent(model: torch.nn.Module) -> bool:
    """A recurrent model has `initial_state(batch_size, device)` and takes `forward(x, state=...)`, returning the
    next state in `ModelOutput.state`. A state is a tensor or a tuple of tensors, each with the batch on dim 0."""
    return callable(getattr(model, "initial_state", None))


def reset_state(state: Any, initial: Any, done: torch.Tensor) -> Any:
    """The state with the rows where `done` (B,) is true replaced by the initial state's rows."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        mask = done.to(torch.bool).view(-1, *([1] * (state.dim() - 1)))
        return torch.where(mask, initial, state)
    return type(state)(reset_state(s, i, done) for s, i in zip(state, initial))


def map_state(fn: Any, state: Any) -> Any:
    """`fn` applied to every tensor of a state (a tensor, a tuple of tensors, or None)."""
    if state is None or isinstance(state, torch.Tensor):
        return None if state is None else fn(state)
    return type(state)(map_state(fn, s) for s in state)


def detach_state(state: Any) -> Any:
    return map_state(torch.Tensor.detach, state)


# --- the spike token layout (the data side packs windows; generation re-packs its own samples) ----------------


def pack_tokens(ids: np.ndarray, dts: np.ndarray, block_size: int, sos: int, eos: int, pad: int,
                dt_eos: int, dt_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The official sequence layout: [SOS] + the last block_size - 2 events + [EOS], padded to block_size + 1
    tokens; dts [0] + dts + [EOS]. Inputs are [:-1], targets [1:]."""
    keep = block_size - 2
    ids, dts = np.asarray(ids, np.int64)[-keep:], np.asarray(dts, np.int64)[-keep:]
    n_pad = block_size + 1 - (len(ids) + 2)
    id_seq = np.concatenate([[sos], ids, [eos], np.full(n_pad, pad)]).astype(np.int64)
    dt_seq = np.concatenate([[0], dts, [dt_eos], np.full(n_pad, dt_pad)]).astype(np.int64)
    return id_seq, dt_seq


# --- configs ------------------------------------------------------------------------------------------------------

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def configs_dir() -> Path:
    """The configs shipped with biozoo: `biozoo/configs` in an installed wheel, the repo's top-level `configs/`
    in a source checkout (an editable install)."""
    packaged = Path(__file__).resolve().parent / "configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def find_config(value: str) -> str:
    """A `-c` value as a file to read: the path itself where it exists (relative to the working folder), else the
    packaged config of that name (`configs/quickstart.yaml` or `quickstart.yaml`). An empty file, one that is not
    a YAML mapping, or a path found nowhere raises a one-line BiozooError naming it. Inline YAML passes through."""
    import yaml

    path = Path(value)
    if not path.exists():
        if path.suffix not in CONFIG_SUFFIXES:
            return value  # jsonargparse also takes a YAML string after -c
        parts = path.parts[1:] if path.parts[:1] == ("configs",) else path.parts
        packaged = configs_dir().joinpath(*parts) if parts and not path.is_absolute() else None
        if packaged is None or not packaged.is_file():
            raise BiozooError(f"config file {value} not found in {Path.cwd()} nor among the packaged configs "
                              "(`biozoo configs` lists them)")
        path = packaged
    if path.is_dir():
        raise BiozooError(f"config {value} is a folder, not a YAML file")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise BiozooError(f"config {value} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
    if content is None:
        raise BiozooError(f"config {value} is empty: a config is a YAML mapping (trainer:, model:, data:, ...)")
    if not isinstance(content, dict):
        raise BiozooError(f"config {value} is not a YAML mapping (it holds a {type(content).__name__})")
    return str(path)


def resolve_config_args(words: list[str]) -> list[str]:
    """Every `-c X` / `--config X` / `--config=X` with X resolved by `find_config`."""
    out, expect = [], False
    for word in words:
        if expect:
            out.append(find_config(word))
        elif word.startswith("--config="):
            out.append("--config=" + find_config(word.split("=", 1)[1]))
        else:
            out.append(word)
        expect = not expect and word in ("-c", "--config")
    return out
