"""The model registry: builders by name, pretrained weights by tag (timm/torchvision style).

    @register_model
    def mlp(in_features: int = 64, num_classes: int = 10, ...) -> MLP: ...

    create_model("mlp", in_features=64, num_classes=10)
    create_model("ctm", pretrained="parity16")          # or create_model("ctm.parity16")
    list_models("ctm*", pretrained=True)                # ["ctm.parity16", ...]
"""

from __future__ import annotations

import fnmatch
import hashlib
import inspect
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from biozoo._core import TARGET_WORDS, DataSpec, SpecError, spec_mismatch

from .errors import BiozooError, CheckpointError, UnknownNameError, suggest

WEIGHTS_DIR = Path(__file__).parent / "weights"

_builders: dict[str, Callable[..., nn.Module]] = {}
_pretrained: dict[str, dict[str, "PretrainedCfg"]] = {}
_hidden: set[str] = set()


@dataclass
class PretrainedCfg:
    """Where a set of pretrained weights comes from and how good it is."""

    tag: str
    task: str
    metrics: dict[str, float]
    file: str | None = None  # a folder under models/weights/ holding config.json + model.safetensors
    url: str | None = None  # where the original weights are published, if anywhere
    sha256: str | None = None  # of model.safetensors
    config: str | None = None  # the training config (path relative to the repo root)
    command: str | None = None  # the exact command that trained it
    license: str = "Apache-2.0"
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    default: bool = False  # the tag `create_model(name, pretrained=True)` loads (one per model; timm's default cfg)
    # Weights published elsewhere, fetched on first use: file name -> URL (http(s), or file:// for a local copy),
    # the sha256 of each where known, the registered checkpoint format they are in (`convert`), which download
    # (or, inside a zip archive, which member glob) holds the checkpoint, and constructor arguments the original
    # files do not record. Converted once into <cache>/<model>.<tag>/ as config.json + model.safetensors.
    files: dict[str, str] = field(default_factory=dict)
    files_sha256: dict[str, str] = field(default_factory=dict)
    convert: str | None = None
    source: str = "."  # a download, "." for the download folder (HF layout), or "archive.zip!member glob"
    kwargs: dict[str, Any] = field(default_factory=dict)
    model: str = ""  # set by register_pretrained

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def register_model(fn: Callable | None = None, *, name: str | None = None, hidden: bool = False):
    """Register a builder function or an nn.Module class under `name` (default: its __name__ in lower case).

    Registering a class also tells its save_pretrained which name to write. `hidden` keeps internal builders
    (wrappers rebuilt from checkpoints) out of `list_models`.
    """

    def wrap(builder):
        key = name or builder.__name__.lower()
        if key in _builders:
            raise BiozooError(f"model name {key!r} is already registered (by {_builders[key].__module__})")
        _builders[key] = builder
        if hidden:
            _hidden.add(key)
        if inspect.isclass(builder) and "registry_name" not in builder.__dict__:
            builder.registry_name = key
        return builder

    return wrap(fn) if fn is not None else wrap


def register_pretrained(model_name: str, cfg: PretrainedCfg) -> None:
    tags = _pretrained.setdefault(model_name, {})
    if cfg.tag in tags:
        raise BiozooError(f"pretrained tag {model_name}.{cfg.tag} is already registered")
    other = default_tag(model_name) if cfg.default else None
    if other is not None and tags[other].default:
        raise BiozooError(f"{model_name} already has a default pretrained tag ({other}); {cfg.tag} cannot be one too")
    cfg.model = model_name
    tags[cfg.tag] = cfg


def default_tag(name: str) -> str | None:
    """The tag `pretrained=True` means: the one registered with `default=True`, else a model's only tag."""
    tags = _pretrained.get(name, {})
    chosen = [t for t, c in tags.items() if c.default]
    return chosen[0] if chosen else next(iter(tags)) if len(tags) == 1 else None


def is_model(name: str) -> bool:
    return name.split(".", 1)[0] in _builders


def get_builder(name: str) -> Callable[..., nn.Module]:
    if name not in _builders:
        raise UnknownNameError(f"unknown model {name!r}.{suggest(name, sorted(_builders))} "
                               "See biozoo.list_models() or `biozoo list`.")
    return _builders[name]


def get_pretrained_cfg(name: str, tag: str) -> PretrainedCfg:
    get_builder(name)
    tags = _pretrained.get(name, {})
    if tag not in tags:
        known = ", ".join(sorted(tags)) or "none"
        raise UnknownNameError(f"model {name!r} has no pretrained tag {tag!r} (known: {known}).{suggest(tag, list(tags))}")
    return tags[tag]


def list_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered model names matching a glob `pattern`; with `pretrained=True`, `name.tag` for each weight set."""
    if pretrained:
        names = [f"{n}.{t}" for n in sorted(_pretrained) for t in sorted(_pretrained[n])]
    else:
        names = sorted(n for n in _builders if n not in _hidden)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def list_pretrained() -> dict[str, PretrainedCfg]:
    return {f"{n}.{t}": cfg for n, tags in _pretrained.items() for t, cfg in tags.items()}


def bound_kwargs(builder: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's keyword arguments with defaults filled in: what rebuilds this exact model later."""
    target = builder.__init__ if inspect.isclass(builder) else builder
    sig = inspect.signature(target)
    params = [p for p in sig.parameters.values() if p.name != "self"]
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params)
    unknown = [k for k in kwargs if k not in sig.parameters and not accepts_any]
    if unknown:
        names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        hint = suggest(unknown[0], names)
        raise BiozooError(f"{getattr(builder, '__name__', builder)} got unknown argument(s) {unknown}.{hint}")
    out = {p.name: p.default for p in params
           if p.default is not p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    out.update(kwargs)
    return out


def accepted_kwargs(builder: Callable, candidates: dict[str, Any]) -> dict[str, Any]:
    """The subset of `candidates` that the builder takes as named arguments (used to link data dims)."""
    target = builder.__init__ if inspect.isclass(builder) else builder
    names = inspect.signature(target).parameters
    return {k: v for k, v in candidates.items() if k in names}


def model_class(builder: Callable) -> type | None:
    """The nn.Module class a builder makes: the builder itself, or its return annotation."""
    if inspect.isclass(builder):
        return builder
    try:
        hint = typing.get_type_hints(builder).get("return")
    except Exception:  # an annotation that does not resolve: no class to read
        return None
    return hint if inspect.isclass(hint) else None


def kwargs_for_spec(name: str, spec: DataSpec, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The builder's arguments for a task's data: derived from the spec by the model's `spec_kwargs`, the explicit
    `kwargs` merged in by it. Raises a one-line SpecError when the model cannot take the data (`reads`, the input
    kinds it takes, `streams` for token inputs, and `predicts`, the target kinds; `online = True` for a model that
    answers step t from steps <= t, the only kind an online task links). A builder function declares these itself
    (`ctm_parity.reads = ...`) or inherits them from the class it returns."""
    builder = get_builder(name)
    cls = model_class(builder)
    declared = lambda attr, default=None: getattr(builder, attr, getattr(cls, attr, default))  # noqa: E731
    reads, streams = declared("reads"), declared("streams")
    if reads is not None and spec.input not in reads:
        raise spec_mismatch(name, spec, reads, streams)
    stream = spec.extras.get("stream")
    if spec.input == "tokens" and streams is not None and stream not in streams:
        raise SpecError(f"{name} cannot take {spec.describe_input()}: it reads token streams ({', '.join(streams)})")
    predicts = declared("predicts", ("classes", "regression", "discrete_actions", "continuous_actions"))
    if not predicts:
        raise SpecError(f"{name} cannot predict {spec.describe_target()}: it is a core without a readout")
    if spec.target not in predicts:
        raise SpecError(f"{name} cannot predict {spec.describe_target()}: it predicts "
                        f"{' or '.join(TARGET_WORDS[p] for p in predicts)}")
    if spec.online and not declared("online", False):
        raise SpecError(f"{name} cannot take {spec.describe_input()}: it reads the whole sequence, so its answer at "
                        "step t would see later steps (an online task answers from steps <= t)")
    explicit = dict(kwargs or {})
    fit = declared("spec_kwargs")
    if fit is None:
        return {**accepted_kwargs(builder, spec.builder_kwargs()), **explicit}
    derived = {**spec.builder_kwargs(), **fit(spec, explicit)}  # the model merges the explicit arguments
    out = accepted_kwargs(builder, derived)  # a builder function (ctm_parity, resnet8) takes a subset
    out.update({k: derived[k] for k in explicit if k in derived})  # unknown ones are reported at build time
    return out


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pretrained_dir(cfg: PretrainedCfg) -> Path:
    """The folder holding the weights: shipped under models/weights/, or downloaded and converted into the cache."""
    if cfg.file is None and cfg.files:
        from ._hub import fetch_pretrained

        return fetch_pretrained(cfg)
    if cfg.file is None:
        raise CheckpointError(f"pretrained tag {cfg.tag!r} ships no local file; download it from {cfg.url}")
    path = Path(cfg.file)
    return path if path.is_absolute() else WEIGHTS_DIR / path


def create_model(name: str, pretrained: bool | str = False, checkpoint_path: str | Path | None = None,
                 **overrides: Any) -> nn.Module:
    """Build a registered model.

    `pretrained`: False, True (the model's default tag, `biozoo list` marks it) or a tag (one published elsewhere
    is downloaded once into the cache, $BIOZOO_CACHE or ~/.cache/biozoo, and converted); `name.tag` works too.
    `checkpoint_path` loads weights (a folder or a .safetensors file) strictly into the freshly built model.
    """
    from ._hub import load_pretrained, load_weights  # the hub imports this module

    if "." in name:
        name, tag = name.split(".", 1)
        pretrained = tag
    builder = get_builder(name)
    if pretrained:
        tags = _pretrained.get(name, {})
        if pretrained is True:
            if not tags:
                raise UnknownNameError(f"model {name!r} has no pretrained weights; build it with pretrained=False")
            pretrained = default_tag(name)
            if pretrained is None:
                raise UnknownNameError(f"model {name!r} names no default pretrained tag; pick one of "
                                       f"{', '.join(sorted(tags))}")
        cfg = get_pretrained_cfg(name, str(pretrained))
        folder = pretrained_dir(cfg)
        if cfg.sha256 and sha256_of(folder / "model.safetensors") != cfg.sha256:
            raise CheckpointError(f"{folder / 'model.safetensors'} does not match the registered sha256 of {name}.{cfg.tag}")
        model = load_pretrained(folder, **overrides)
        held = model.biozoo_config().get("model") if hasattr(model, "biozoo_config") else type(model).__name__
        if held != name:
            raise CheckpointError(f"{folder} holds a {held!r} model, not {name!r} ({name}.{cfg.tag})")
        model.pretrained_cfg = cfg
        return model
    kwargs = bound_kwargs(builder, overrides)
    model = builder(**kwargs)
    model._biozoo_config = {"model": name, "kwargs": kwargs}
    if checkpoint_path is not None:
        load_weights(model, checkpoint_path)
    return model
