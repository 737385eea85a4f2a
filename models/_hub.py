"""Portable checkpoints: `config.json` + `model.safetensors`, loaded strictly and never through pickle.

    model.save_pretrained("out/")            # any zoo model (PretrainedMixin)
    model = load_pretrained("out/")          # rebuilds from config.json, loads strictly, returns eval mode

Other on-disk formats (for example the official CTM checkpoints) plug in with `register_checkpoint_format`, so
that `load_pretrained` and `biozoo convert` accept them too. Torch pickles are only opened with
`weights_only=True`: a pickle that would run code is refused before anything runs.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
import tempfile
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ._registry import PretrainedCfg, create_model, get_builder, sha256_of
from .errors import BiozooError, CheckpointError, UnknownNameError, first_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "biozoo"
FORMAT_VERSION = 1
RECORD_NAME = "sha256.json"  # beside weights converted into the cache: the model name and sha256 written
# what a folder holding a portable model (or an adapter) has; a new save replaces all of them
MODEL_FILES = (WEIGHTS_NAME, "adapter.safetensors", "adapter_config.json", RECORD_NAME, CONFIG_NAME)
# stored dtypes a floating-point tensor of the model may load from (safetensors header names); others must match
HALF_FLOATS = {"F16", "BF16"}
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


class PretrainedMixin:
    """Gives an nn.Module `save_pretrained`, `from_pretrained` and `biozoo_config`.

    The constructor's keyword arguments are recorded when the object is created, so a model built directly
    (`MLP(64, 10)`) saves as well as one built by `create_model`. They must be JSON-serialisable.
    """

    registry_name: str | None = None

    def __new__(cls, *args: Any, **kwargs: Any):
        obj = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(obj, *args, **kwargs)
            bound.apply_defaults()
            init_kwargs = {k: v for k, v in bound.arguments.items() if k != "self"}
            for p in inspect.signature(cls.__init__).parameters.values():
                if p.kind is p.VAR_KEYWORD:
                    init_kwargs.update(init_kwargs.pop(p.name, {}))
        except TypeError:
            init_kwargs = None  # the constructor itself will raise the clearer error
        object.__setattr__(obj, "_init_kwargs", init_kwargs)
        return obj

    def biozoo_config(self) -> dict[str, Any]:
        """{"model": registered name, "kwargs": constructor arguments}: enough to rebuild this model."""
        config = self.__dict__.get("_biozoo_config")
        if config is not None:
            return config
        if self.registry_name is None or self._init_kwargs is None:
            raise CheckpointError(f"{type(self).__name__} is not a registered model, so it cannot be saved portably")
        return {"model": self.registry_name, "kwargs": self._init_kwargs}

    def save_pretrained(self, save_dir: str | Path, metadata: dict[str, Any] | None = None,
                        overwrite: bool = True) -> Path:
        return save_pretrained(self, save_dir, metadata, overwrite)

    @classmethod
    def from_pretrained(cls, path: str | Path, **overrides: Any) -> nn.Module:
        model = load_pretrained(path, **overrides)
        if not isinstance(model, cls):
            raise CheckpointError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def model_files(folder: str | Path) -> list[str]:
    """The model files (MODEL_FILES) that `folder` holds."""
    folder = Path(folder)
    return [name for name in MODEL_FILES if (folder / name).exists()] if folder.is_dir() else []


def publish(staging: Path, target: Path) -> Path:
    """Move the files written in `staging` into `target` (the whole folder by one rename when `target` does not
    exist). Model files of an earlier save that the new one lacks are removed; other files are kept. The weights
    move before config.json, so a config never describes weights that are not there yet."""
    if target.is_symlink() or target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} is not a folder to save a model into")
    if not target.exists():
        os.replace(staging, target)
        return target
    for name in model_files(target):
        if not (staging / name).exists():
            (target / name).unlink()
    names = sorted(p.name for p in staging.iterdir())
    for name in sorted(names, key=lambda n: n == CONFIG_NAME):
        os.replace(staging / name, target / name)
    return target


def save_pretrained(model: nn.Module, save_dir: str | Path, metadata: dict[str, Any] | None = None,
                    overwrite: bool = True) -> Path:
    """Write config.json and model.safetensors (tied or shared tensors are stored once) into `save_dir`.

    Both are written into a temporary folder beside it and then moved in, so a failed write (a full disk) leaves
    the folder as it was. With `overwrite=False` a folder that already holds a model is refused."""
    model = getattr(model, "module", model)  # unwrap DDP
    if not hasattr(model, "biozoo_config"):
        raise CheckpointError(f"{type(model).__name__} has no biozoo_config(); only zoo models save portably")
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **model.biozoo_config()}
    if metadata:
        config["metadata"] = metadata
    try:
        text = json.dumps(config, indent=2, sort_keys=False)
    except TypeError as e:
        raise CheckpointError(f"cannot save {config['model']}: a constructor argument is not JSON-serialisable ({e})") from None
    save_dir = Path(save_dir)
    held = model_files(save_dir)
    if held and not overwrite:
        raise CheckpointError(f"{save_dir} already holds a model ({', '.join(held)}); give another folder or "
                              "--overwrite to replace it")
    save_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.", suffix=".partial", dir=save_dir.parent))
    try:
        (staging / CONFIG_NAME).write_text(text + "\n")
        save_model(model, str(staging / WEIGHTS_NAME), metadata={"format": "pt", "biozoo_model": config["model"]})
        publish(staging, save_dir)
    except (OSError, SafetensorError) as e:
        free = shutil.disk_usage(save_dir.parent).free
        raise CheckpointError(f"could not write {save_dir} ({free / 2**20:.0f} MiB free on its disk): "
                              f"{first_line(e)[:160]}; nothing there was changed") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return save_dir


def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{key: (shape, dtype name)} from a safetensors header, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt?): {first_line(e)}") from None


def read_safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return {k: shape for k, (shape, _) in read_safetensors_header(path).items()}


def check_dtypes(model: nn.Module, dtypes: dict[str, str], source: Path | str) -> None:
    """Refuse stored dtypes that loading would silently cast: a floating-point tensor of the model loads from its
    own dtype or a half-precision float, every other tensor (integer, bool) from exactly its own dtype."""
    for key, tensor in model.state_dict().items():
        stored = dtypes.get(key)
        own = SAFETENSORS_DTYPES.get(tensor.dtype)
        if stored is None or own is None or stored == own or tensor.is_floating_point() and stored in HALF_FLOATS:
            continue
        raise CheckpointError(f"{source}: {key} is stored as {stored}, but the model's is {own} "
                              f"({tensor.dtype}); loading would cast it silently")


def _names(keys: Iterable[str], limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: Path | str) -> None:
    """Raise one CheckpointError naming mismatched shapes, missing and unexpected keys, if any."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [f"{k} {shapes[k]} vs model {expected[k]}" for k in shapes if k in expected and shapes[k] != expected[k]]
    if bad:
        raise CheckpointError(f"{source} does not match the model: shape mismatch for {_names(bad, 3)}")
    unexpected = set(shapes) - set(expected)
    if unexpected:
        raise CheckpointError(f"{source} does not match the model: unexpected keys {_names(unexpected)}")


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load model.safetensors (or a folder holding it) strictly into `model`."""
    path = Path(path)
    file = path / WEIGHTS_NAME if path.is_dir() else path
    if not file.exists():
        raise CheckpointError(f"no weights at {file}")
    if file.suffix != ".safetensors":
        raise CheckpointError(f"{file} is not a .safetensors file; convert it with `biozoo export` or `biozoo convert`")
    header = read_safetensors_header(file)
    check_state_dict(model, {k: shape for k, (shape, _) in header.items()}, file)
    check_dtypes(model, {k: dtype for k, (_, dtype) in header.items()}, file)
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"could not load {file}: {first_line(e)}") from None
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match the model: missing keys {_names(missing)}"
                              + (f"; unexpected keys {_names(unexpected)}" if unexpected else ""))
    return model


def model_from_config(config: dict[str, Any], source: Path | str, weights_file: Path | None = None,
                      **overrides: Any) -> nn.Module:
    """Build the model a config describes. With `weights_file` (a .safetensors file), the model is first built on
    the meta device and checked against the file's header, so a config asking for a huge model fails before any
    memory is allocated. Wrongly typed fields give one CheckpointError line."""
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CheckpointError(f"{source} is not a biozoo config (no \"format\": \"biozoo\" and \"model\" keys)")
    version, name, kwargs = config.get("format_version", 1), config["model"], config.get("kwargs") or {}
    if not isinstance(version, int) or not isinstance(name, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{source}: format_version must be an integer, model a string and kwargs a mapping "
                              f"(got {type(version).__name__}, {type(name).__name__}, {type(kwargs).__name__})")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{source} was written by a newer biozoo (format {version}); upgrade biozoo")
    try:
        get_builder(name)
    except UnknownNameError as e:
        raise CheckpointError(f"{source}: {e}") from None
    kwargs = {**kwargs, **overrides}

    def build() -> nn.Module:
        try:
            return create_model(name, **kwargs)
        except (TypeError, ValueError, AttributeError, KeyError, IndexError, OverflowError) as e:
            raise CheckpointError(f"{source}: its kwargs do not build {name}: {first_line(e)[:200]}") from None

    if weights_file is not None and weights_file.is_file():
        header = read_safetensors_header(weights_file)
        try:
            with torch.device("meta"):
                skeleton = build()
        except (BiozooError, RuntimeError, NotImplementedError):
            skeleton = None  # a builder that computes on its tensors (a TauGate traces a forward) cannot run on
            # meta: the real build below checks (and raises what the meta build raised, if it was the kwargs)
        if skeleton is not None:
            check_state_dict(skeleton, {k: shape for k, (shape, _) in header.items()}, weights_file)
            tied: dict[int, list[str]] = {}  # a tied tensor is stored once, under one of its names
            for key, tensor in skeleton.state_dict(keep_vars=True).items():
                tied.setdefault(id(tensor), []).append(key)
            missing = [k for keys in tied.values() if not any(k in header for k in keys) for k in keys]
            if missing:
                raise CheckpointError(f"{weights_file} does not match {source}: missing keys {_names(missing)}")
            check_dtypes(skeleton, {k: dtype for k, (_, dtype) in header.items()}, weights_file)
    return build()


# Other checkpoint formats --------------------------------------------------------------------------------------

@dataclass
class CheckpointFormat:
    name: str
    detect: Callable[[Path], bool]  # cheap test on a path (file or folder)
    load: Callable[[Path], nn.Module]  # returns a zoo model with its weights
    description: str = ""


_formats: dict[str, CheckpointFormat] = {}


def register_checkpoint_format(name: str, detect: Callable[[Path], bool], load: Callable[[Path], nn.Module],
                               description: str = "") -> None:
    if name in _formats:
        raise BiozooError(f"checkpoint format {name!r} is already registered")
    _formats[name] = CheckpointFormat(name, detect, load, description)


def list_checkpoint_formats() -> dict[str, CheckpointFormat]:
    return dict(_formats)


def convert_checkpoint(format_name: str, src: str | Path, out_dir: str | Path, overwrite: bool = True) -> Path:
    """Read a foreign checkpoint with the named format's loader and write it in the portable format."""
    from ._registry import suggest

    if format_name not in _formats:
        raise UnknownNameError(f"unknown checkpoint format {format_name!r}.{suggest(format_name, list(_formats))} "
                               f"Known: {', '.join(sorted(_formats)) or 'none'}")
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"no checkpoint at {src}")
    held = model_files(out_dir)
    if held and not overwrite:  # refused before the (possibly slow) conversion
        raise CheckpointError(f"{out_dir} already holds a model ({', '.join(held)}); give another folder or "
                              "--overwrite to replace it")
    return save_pretrained(_formats[format_name].load(src), out_dir, overwrite=overwrite)


def safe_torch_load(path: str | Path, allowed: Iterable[type] = ()) -> Any:
    """torch.load with weights_only=True; a pickle that needs anything else is refused without running it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: it holds Python objects that unpickling would run or "
                              f"import ({first_line(e)[:160]}). Only weights-only checkpoints are accepted") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path} as a torch checkpoint (truncated or corrupt?): {first_line(e)}") from None


def model_from_lightning_checkpoint(ckpt: dict[str, Any], source: Path | str) -> nn.Module:
    """Rebuild the zoo model inside a biozoo Lightning checkpoint (the task stores its config there)."""
    config = ckpt.get("biozoo_model_config")
    if config is None:
        raise CheckpointError(f"{source} is a Lightning checkpoint without biozoo_model_config; was it written by biozoo?")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: biozoo_model_config is not a mapping")
    model = model_from_config({"format": FORMAT, **config}, source)
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    check_state_dict(model, {k: tuple(v.shape) for k, v in state.items()}, source)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"{source} does not match the model: missing keys {_names(result.missing_keys)}")
    return model


def load_pretrained(path: str | Path, **overrides: Any) -> nn.Module:
    """Load a model from a portable folder, a .safetensors file with config.json beside it, a biozoo Lightning
    .ckpt, or any registered foreign format. Always strict; returns the model in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    folder = path if path.is_dir() else path.parent
    config_file = folder / CONFIG_NAME
    config = None
    if config_file.exists() and (path.is_dir() or path.suffix == ".safetensors"):
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
    if isinstance(config, dict) and config.get("format") == FORMAT:
        weights = path if path.suffix == ".safetensors" else folder / WEIGHTS_NAME
        model = model_from_config(config, config_file, weights_file=weights, **overrides)
        load_weights(model, weights)
        return model.eval()
    for fmt in _formats.values():
        if fmt.detect(path):
            return fmt.load(path).eval()
    if path.is_file() and path.suffix in {".ckpt", ".pt", ".pth", ".bin"}:
        ckpt = safe_torch_load(path)
        if isinstance(ckpt, dict) and "state_dict" in ckpt:
            return model_from_lightning_checkpoint(ckpt, path).eval()
        raise CheckpointError(f"{path} is a torch file biozoo does not recognise; known formats: "
                              f"biozoo, {', '.join(_formats) or 'none'}")
    raise CheckpointError(f"{path} holds no {CONFIG_NAME} + {WEIGHTS_NAME} and matches no known checkpoint format")


# Weights published elsewhere -----------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where downloaded weights go: $BIOZOO_CACHE, else ~/.cache/biozoo."""
    return Path(os.environ.get("BIOZOO_CACHE") or Path.home() / ".cache" / "biozoo")


def download(url: str, target: Path) -> Path:
    """`url` (http(s) or file://) to `target`, through a temporary file so that an interrupted download leaves
    nothing behind."""
    from torch.hub import download_url_to_file

    target.parent.mkdir(parents=True, exist_ok=True)
    download_url_to_file(url, str(target), progress=False)
    return target


def _checkpoint_in(path: Path, member: str, name: str) -> Path:
    """The checkpoint among the downloads: `path` itself, or the `member` glob inside a zip archive (one that is
    not itself a torch file), extracted next to it."""
    if path.is_dir() or not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if any(n.endswith("/data.pkl") for n in names) and not any(n.endswith(".pt") for n in names):
            return path  # a torch zip checkpoint
        out = path.with_suffix("")
        if not out.is_dir():
            archive.extractall(out)  # zipfile keeps every member inside `out`
    found = sorted(p for p in out.glob(member) if p.is_file())
    if len(found) != 1:
        listed = ", ".join(str(p.relative_to(out)) for p in found[:5]) or "none"
        raise CheckpointError(f"{name}: {path.name} holds {len(found)} files matching {member!r} ({listed}); "
                              f"convert the one you want with `biozoo convert`")
    return found[0]


def _no_links(*paths: Path) -> None:
    for path in paths:
        if path.is_symlink():
            raise CheckpointError(f"{path} is a symbolic link; the weights cache follows none (remove it)")


def check_cached(folder: Path, cfg: PretrainedCfg) -> None:
    """A cache folder must hold the tag's model (by name) with the weights' sha256 the tag publishes, or else
    the one recorded when they were converted; anything else is refused with the folder to delete."""
    name = f"{cfg.model}.{cfg.tag}"
    _no_links(folder, folder / CONFIG_NAME, folder / WEIGHTS_NAME, folder / RECORD_NAME)
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
        record = json.loads((folder / RECORD_NAME).read_text()) if (folder / RECORD_NAME).is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder} is not a valid cache of {name} ({first_line(e)}); delete it to fetch "
                              "again") from None
    held = config.get("model") if isinstance(config, dict) else None
    if held != cfg.model:
        raise CheckpointError(f"{folder} holds a {held!r} model, not {cfg.model!r} ({name}); delete it to fetch again")
    want = cfg.sha256 or (record.get(WEIGHTS_NAME) if isinstance(record, dict) else None)
    if not want:
        raise CheckpointError(f"{folder} has no record of the weights converted there ({RECORD_NAME}); delete it "
                              "to fetch again")
    if sha256_of(folder / WEIGHTS_NAME) != want:
        raise CheckpointError(f"{folder / WEIGHTS_NAME} does not match the sha256 of {name}; delete {folder} to "
                              "fetch again")


def fetch_pretrained(cfg: PretrainedCfg) -> Path:
    """Download a registered tag's files (once), check their sha256 where known, convert them with the tag's
    checkpoint format into <cache>/<model>.<tag>/ (config.json + model.safetensors + sha256.json, the record of
    what was converted), and return that folder. A cached folder is checked (model name, sha256) on every use;
    no symbolic link in the cache is followed. Without a network, one line says where to put each file by hand."""
    name = f"{cfg.model}.{cfg.tag}"
    folder = cache_dir() / name
    raw = folder / "download"
    _no_links(folder, raw)
    if (folder / CONFIG_NAME).is_file() and (folder / WEIGHTS_NAME).is_file():
        check_cached(folder, cfg)
        return folder
    for filename, url in cfg.files.items():
        target = raw / filename
        _no_links(target)
        if not target.is_file():
            try:
                download(url, target)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise CheckpointError(f"could not download {name} from {url} ({first_line(e)[:120]}); put the "
                                      f"file at {target} and try again") from None
        want = cfg.files_sha256.get(filename)
        if want and sha256_of(target) != want:
            target.unlink()
            raise CheckpointError(f"{url} did not match the registered sha256 of {name} ({filename}); removed it")
    if cfg.convert is None:
        raise CheckpointError(f"{name} names no checkpoint format to convert its files from")
    source, _, member = cfg.source.partition("!")  # "archive.zip!glob" names a member of a zip
    model = _formats[cfg.convert].load(_checkpoint_in(raw / source, member or "**/*.pt", name))
    held = getattr(model, "biozoo_config", lambda: {})().get("model")
    if held != cfg.model:
        raise CheckpointError(f"{name}: its files converted into a {held!r} model, not {cfg.model!r}")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=folder.parent))  # a fresh name
    try:
        save_pretrained(model, staging / "model", metadata={"source": cfg.url or next(iter(cfg.files.values())),
                                                            "tag": name})
        staged = staging / "model"
        if cfg.kwargs:  # what the original files do not record (e.g. the legacy maze input range)
            config = json.loads((staged / CONFIG_NAME).read_text())
            config["kwargs"].update(cfg.kwargs)
            (staged / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        record = {"model": cfg.model, WEIGHTS_NAME: sha256_of(staged / WEIGHTS_NAME)}
        (staged / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
        publish(staged, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    check_cached(folder, cfg)
    return folder
