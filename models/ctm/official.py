"""The official SakanaAI CTM checkpoints (training checkpoint.pt and the Hugging Face folder) as biozoo models: the
"sakana-ctm" checkpoint format."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._hub import register_checkpoint_format, safe_torch_load
from .._registry import PretrainedCfg, register_pretrained
from ..errors import CheckpointError


# --- The official checkpoints ------------------------------------------------------------------------------------

def official_pickle_globals() -> list:
    """What the official training scripts pickle besides tensors, and nothing more: their argparse flags
    (`argparse.Namespace`), `np.random.get_state()` (a uint32 array) and metric lists of numpy arrays and
    scalars. Given to `torch.load(weights_only=True)`; numpy 1.x files name `numpy.core`, numpy 2 `numpy._core`."""
    import argparse

    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    allowed: list = [argparse.Namespace, np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    allowed += [type(np.dtype(code)) for code in ("u4", "i4", "i8", "f4", "f8", "?")]  # numpy.dtypes.*DType
    return allowed


OFFICIAL_ARG_NAMES = {"deep_memory": "deep_nlms", "do_normalisation": "do_layernorm_nlm"}
CTM_ARGS = ("iterations", "d_model", "d_input", "heads", "n_synch_out", "n_synch_action", "synapse_depth",
            "memory_length", "deep_nlms", "memory_hidden_dims", "do_layernorm_nlm", "backbone_type",
            "positional_embedding_type", "out_dims", "prediction_reshaper", "dropout", "dropout_nlm",
            "neuron_select_type", "n_random_pairing_self")


def is_maze_args(args: dict[str, Any]) -> bool:
    return "maze_route_length" in args or "mazes" in str(args.get("data_root", "")) or "maze" in str(args.get("log_dir", ""))


def upgrade_legacy_args(args: dict[str, Any]) -> dict[str, Any]:
    """The released legacy forms, read the way the official analysis scripts read them
    (tasks/mazes/analysis/run.py, tasks/image_classification/analysis/run_imagenet_analysis.py): `resnet_type` +
    `resnet_feature_scales` name the backbone, missing neuron-selection flags mean first-last with no self pairs,
    and a maze model's outputs are `out_dims // 5` route steps of 5 actions."""
    args = dict(args)
    if "backbone_type" not in args and "resnet_type" in args:
        args["backbone_type"] = f"{args['resnet_type']}-{list(args.get('resnet_feature_scales') or [4])[-1]}"
    args.setdefault("neuron_select_type", "first-last")
    args.setdefault("n_random_pairing_self", 0)
    if is_maze_args(args) and "maze_route_length" not in args and args.get("out_dims"):
        args["maze_route_length"] = int(args["out_dims"]) // 5
    return args


def kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments from a training script's argparse flags (and the widths the state dict implies)."""
    args = {OFFICIAL_ARG_NAMES.get(k, k): v for k, v in upgrade_legacy_args(args).items()}
    if "prediction_reshaper" not in args:
        if args.get("parity_sequence_length"):
            args["prediction_reshaper"] = [int(args["parity_sequence_length"]), 2]
        elif args.get("maze_route_length"):
            args["prediction_reshaper"] = [int(args["maze_route_length"]), 5]
        else:
            args["prediction_reshaper"] = [-1]
    if args.get("N_to_sort"):  # the sort task's CTM: no attention, no action synchronisation, raw input
        args.update(heads=0, n_synch_action=0, backbone_type="none", positional_embedding_type="none",
                    d_input=int(args["out_dims"]) - 1)
    kwargs = {k: args[k] for k in CTM_ARGS if k in args}
    if is_maze_args(args):  # the maze scripts' --expand_range: [-1, 1] inputs, or [0, 1] (train_ctm.sh, legacy)
        kwargs["expand_range"] = bool(args.get("expand_range", False))
    if "initial_rgb.weight" in state_dict:
        kwargs["in_channels"] = int(state_dict["initial_rgb.weight"].shape[1])
    elif "backbone.layers.0.weight" in state_dict:
        kwargs["in_channels"] = int(state_dict["backbone.layers.0.weight"].shape[1])
    elif kwargs.get("backbone_type") == "none" and "kv_proj.0.weight" in state_dict:
        kwargs["in_channels"] = int(state_dict["kv_proj.0.weight"].shape[1])
    optional = ("prediction_reshaper", "dropout", "dropout_nlm", "neuron_select_type", "n_random_pairing_self")
    missing = [k for k in CTM_ARGS if k not in kwargs and k not in optional]  # the official defaults apply
    if missing:
        raise CheckpointError(f"the official CTM arguments lack {', '.join(missing)}")
    return kwargs


def lstm_kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The official LSTM baseline's arguments (its layer count from the state dict)."""
    ctm = kwargs_from_official_args({**args, "n_synch_out": 0, "n_synch_action": 0, "synapse_depth": 1,
                                     "memory_length": 1, "deep_nlms": False, "memory_hidden_dims": 1,
                                     "do_layernorm_nlm": False, "neuron_select_type": "random-pairing",
                                     "n_random_pairing_self": 0}, state_dict)
    names = ("iterations", "d_model", "d_input", "heads", "backbone_type", "positional_embedding_type", "out_dims",
             "prediction_reshaper", "dropout", "in_channels")
    kwargs = {k: ctm[k] for k in names if k in ctm}
    kwargs["num_layers"] = int(state_dict["start_hidden_state"].shape[0])
    return kwargs


def qamnist_kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """tasks/qamnist/utils.py prepare_model: digits and question parts are each shown for
    `q_num_repeats_per_input` ticks, then `q_num_answer_steps` ticks answer."""
    args = {OFFICIAL_ARG_NAMES.get(k, k): v for k, v in args.items()}
    names = ("iterations", "d_model", "d_input", "heads", "n_synch_out", "n_synch_action", "synapse_depth",
             "memory_length", "deep_nlms", "memory_hidden_dims", "do_layernorm_nlm", "out_dims", "dropout",
             "neuron_select_type", "n_random_pairing_self")
    kwargs = {k: args[k] for k in names if k in args}
    kwargs.update(iterations_per_digit=int(args["q_num_repeats_per_input"]),
                  iterations_per_question_part=int(args["q_num_repeats_per_input"]),
                  iterations_for_answering=int(args["q_num_answer_steps"]))
    return kwargs


def rl_kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """tasks/rl/train.py's Agent around ContinuousThoughtMachineRL: sizes from the flags, the observation and
    action sizes (a MiniGrid agent's view size) from the state dict."""
    if args.get("neuron_select_type", "first-last") != "first-last":
        raise CheckpointError(f"official RL checkpoint with neuron_select_type {args['neuron_select_type']!r}: "
                              f"the official ContinuousThoughtMachineRL supports first-last only")
    if not args.get("continuous_state_trace", True):
        raise CheckpointError("official RL checkpoint trained with --no-continuous_state_trace (the state restarts "
                              "every env step); biozoo's ctm_rl_agent carries it, as the scripts' default does")
    args = {OFFICIAL_ARG_NAMES.get(k, k): v for k, v in args.items()}
    names = ("iterations", "d_model", "d_input", "n_synch_out", "synapse_depth", "memory_length", "deep_nlms",
             "memory_hidden_dims", "do_layernorm_nlm", "dropout")
    kwargs = {k: args[k] for k in names if k in args}
    kwargs.update(num_actions=int(state_dict["actor.4.weight"].shape[0]),
                  head_hidden=int(state_dict["actor.0.weight"].shape[0]))
    cells = state_dict.get("recurrent_model.backbone.position_embedding.weight")
    if cells is not None:  # MiniGrid: the navigation-backbone on a square symbolic view
        kwargs.update(backbone_type="navigation-backbone", grid_size=math.isqrt(int(cells.shape[0])))
    else:
        kwargs.update(obs_dim=int(state_dict["recurrent_model.backbone.input_projector.1.weight"].shape[1]))
    return kwargs


def build_from_official(kwargs: dict[str, Any], state_dict: dict[str, torch.Tensor], source: Path,
                        model_name: str = "ctm") -> nn.Module:
    from .._hub import check_state_dict
    from .._registry import create_model

    model = create_model(model_name, **kwargs)
    check_state_dict(model, {k: tuple(v.shape) for k, v in state_dict.items()}, source)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source} does not match the CTM: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def is_official_checkpoint_file(path: Path) -> bool:
    """A training-script checkpoint.pt: a torch zip whose pickle names (model_)state_dict and CTM parameters."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            return False
        data = archive.read(pickles[0])
    lightning = b"pytorch-lightning_version" in data or b"biozoo_model_config" in data  # biozoo's own .ckpt
    ctm = any(name in data for name in (b"start_activated_state", b"start_hidden_state", b"start_activated_trace"))
    return ctm and (b"model_state_dict" in data or (b"state_dict" in data and not lightning))


def is_official_hf_folder(path: Path) -> bool:
    """The Hugging Face layout: config.json with the constructor arguments (no biozoo "format") + model.safetensors."""
    folder = path if path.is_dir() else path.parent
    config = folder / "config.json"
    if not (config.is_file() and (folder / "model.safetensors").is_file()):
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, OSError):
        return False
    return isinstance(data, dict) and "format" not in data and {"d_model", "iterations", "memory_length"} <= set(data)


def load_official_checkpoint(path: str | Path) -> nn.Module:
    """An official CTM checkpoint (either layout; training checkpoints of the LSTM baseline too) as a biozoo model
    with the same weights, in eval mode."""
    import argparse

    from safetensors.torch import load_file

    path = Path(path)
    if is_official_hf_folder(path):
        folder = path if path.is_dir() else path.parent
        args = json.loads((folder / "config.json").read_text())
        state_dict = load_file(str(folder / "model.safetensors"))
    elif is_official_checkpoint_file(path):
        ckpt = safe_torch_load(path, allowed=official_pickle_globals())
        key = "model_state_dict" if isinstance(ckpt, dict) and "model_state_dict" in ckpt else "state_dict"
        if not isinstance(ckpt, dict) or key not in ckpt or "args" not in ckpt:
            raise CheckpointError(f"{path} has no model_state_dict (or legacy state_dict) and args: not an official "
                                  f"CTM training checkpoint")
        args = vars(ckpt["args"]) if isinstance(ckpt["args"], argparse.Namespace) else dict(ckpt["args"])
        kind = args.get("model", args.get("model_type", "ctm"))
        if kind not in ("ctm", "lstm"):
            raise CheckpointError(f"{path} holds an official {kind!r} model; the CTM and its LSTM baseline convert")
        state_dict = ckpt[key]
    else:
        raise CheckpointError(f"{path} is neither an official CTM checkpoint.pt nor a config.json + model.safetensors folder")
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if any(k.startswith("recurrent_model.") for k in state_dict):  # tasks/rl/train.py's Agent
        if "recurrent_model.start_hidden_state" in state_dict or args.get("model_type") == "lstm":
            raise CheckpointError(f"{path} holds the official RL LSTM baseline; biozoo converts the RL CTM agent only")
        return build_from_official(rl_kwargs_from_official_args(args, state_dict), state_dict, path,
                                   "ctm_rl_agent").eval()
    if "q_num_repeats_per_input" in args:
        if "start_hidden_state" in state_dict:
            raise CheckpointError(f"{path} holds the official QA-MNIST LSTM baseline; biozoo converts the QA-MNIST CTM")
        return build_from_official(qamnist_kwargs_from_official_args(args, state_dict), state_dict, path,
                                   "ctm_qamnist").eval()
    if "start_hidden_state" in state_dict:
        return build_from_official(lstm_kwargs_from_official_args(args, state_dict), state_dict, path, "ctm_lstm").eval()
    return build_from_official(kwargs_from_official_args(args, state_dict), state_dict, path).eval()


# --- The official weights by name --------------------------------------------------------------------------------
# `create_model("ctm", pretrained="sakana.maze_large")` downloads these once and converts them into the cache
# (biozoo.models._hub.fetch_pretrained). Their sha256 are not published: the converted weights' sha256 is recorded
# in the cache folder and checked on every use.

def hf_files(repo: str) -> dict[str, str]:
    return {name: f"https://huggingface.co/{repo}/resolve/main/{name}" for name in ("config.json", "model.safetensors")}


def drive_file(file_id: str) -> str:
    return f"https://drive.usercontent.google.com/download?id={file_id}&export=download&confirm=t"


OFFICIAL_WEIGHTS = [
    PretrainedCfg(tag="sakana.imagenet", task="ImageNet-1K, resnet152-4, 50 ticks (the paper's model)",
                  metrics={}, url="https://huggingface.co/SakanaAI/ctm-imagenet", files=hf_files("SakanaAI/ctm-imagenet"),
                  convert="sakana-ctm", notes="official weights (HF); the report gives 72.47% top-1 (not measured here)"),
    PretrainedCfg(tag="sakana.maze_large", task="mazes, route length 100 (the paper's maze model)", metrics={},
                  url="https://huggingface.co/SakanaAI/ctm-maze-large", files=hf_files("SakanaAI/ctm-maze-large"),
                  convert="sakana-ctm", kwargs={"expand_range": False},
                  notes="official weights (HF); inputs in [0, 1], as the official maze analysis reads them "
                        "(--legacy_scaling, its default)"),
    PretrainedCfg(tag="sakana.imagenet_drive", task="ImageNet-1K (tasks/image_classification/README.md link)",
                  metrics={}, url="https://drive.google.com/file/d/1Lr_3RZU9X9SS8lBhAhECBiSZDKfKhDkJ",
                  files={"checkpoint.pt": drive_file("1Lr_3RZU9X9SS8lBhAhECBiSZDKfKhDkJ")}, convert="sakana-ctm",
                  source="checkpoint.pt", notes="official training checkpoint (Google Drive)"),
    PretrainedCfg(tag="sakana.mazes_drive", task="mazes (tasks/mazes/analysis/README.md link, an archive)",
                  metrics={}, url="https://drive.google.com/file/d/1vGiMaQCxzKVT68SipxDCW0W5n5jjEQnC",
                  files={"mazes.zip": drive_file("1vGiMaQCxzKVT68SipxDCW0W5n5jjEQnC")}, convert="sakana-ctm",
                  source="mazes.zip!**/*.pt", notes="official legacy maze checkpoint (Google Drive zip): "
                                                    "state_dict + resnet_type form, inputs in [0, 1]"),
]
for _cfg in OFFICIAL_WEIGHTS:
    register_pretrained("ctm", _cfg)


register_checkpoint_format("sakana-ctm", lambda p: is_official_checkpoint_file(p) or is_official_hf_folder(p),
                           load_official_checkpoint,
                           "official SakanaAI CTM: a training checkpoint.pt or a Hugging Face config.json + model.safetensors")


__all__ = ["OFFICIAL_WEIGHTS", "OFFICIAL_ARG_NAMES", "CTM_ARGS", "official_pickle_globals", "upgrade_legacy_args",
           "qamnist_kwargs_from_official_args", "rl_kwargs_from_official_args", "kwargs_from_official_args", "lstm_kwargs_from_official_args", "build_from_official", "is_official_checkpoint_file", "is_official_hf_folder", "load_official_checkpoint"]
