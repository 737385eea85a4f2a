"""The official SakanaAI CTM checkpoints (training checkpoint.pt and the Hugging Face folder) as biozoo models: the
"sakana-ctm" checkpoint format."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._hub import register_checkpoint_format, safe_torch_load
from ..errors import CheckpointError


# --- The official checkpoints ------------------------------------------------------------------------------------

OFFICIAL_ARG_NAMES = {"deep_memory": "deep_nlms", "do_normalisation": "do_layernorm_nlm"}
CTM_ARGS = ("iterations", "d_model", "d_input", "heads", "n_synch_out", "n_synch_action", "synapse_depth",
            "memory_length", "deep_nlms", "memory_hidden_dims", "do_layernorm_nlm", "backbone_type",
            "positional_embedding_type", "out_dims", "prediction_reshaper", "dropout", "dropout_nlm",
            "neuron_select_type", "n_random_pairing_self")


def kwargs_from_official_args(args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments from a training script's argparse flags (and the widths the state dict implies)."""
    args = {OFFICIAL_ARG_NAMES.get(k, k): v for k, v in args.items()}
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
    """A training-script checkpoint.pt: a torch zip whose pickle names model_state_dict and CTM parameters."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if not pickles:
            return False
        data = archive.read(pickles[0])
    return b"model_state_dict" in data and (b"start_activated_state" in data or b"start_hidden_state" in data)


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
        ckpt = safe_torch_load(path, allowed=[argparse.Namespace])
        if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt or "args" not in ckpt:
            raise CheckpointError(f"{path} has no model_state_dict and args: not an official CTM training checkpoint")
        args = vars(ckpt["args"]) if isinstance(ckpt["args"], argparse.Namespace) else dict(ckpt["args"])
        kind = args.get("model", args.get("model_type", "ctm"))
        if kind not in ("ctm", "lstm"):
            raise CheckpointError(f"{path} holds an official {kind!r} model; the CTM and its LSTM baseline convert")
        state_dict = ckpt["model_state_dict"]
    else:
        raise CheckpointError(f"{path} is neither an official CTM checkpoint.pt nor a config.json + model.safetensors folder")
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if "start_hidden_state" in state_dict:
        return build_from_official(lstm_kwargs_from_official_args(args, state_dict), state_dict, path, "ctm_lstm").eval()
    return build_from_official(kwargs_from_official_args(args, state_dict), state_dict, path).eval()


register_checkpoint_format("sakana-ctm", lambda p: is_official_checkpoint_file(p) or is_official_hf_folder(p),
                           load_official_checkpoint,
                           "official SakanaAI CTM: a training checkpoint.pt or a Hugging Face config.json + model.safetensors")


__all__ = ["OFFICIAL_ARG_NAMES", "CTM_ARGS", "kwargs_from_official_args", "lstm_kwargs_from_official_args", "build_from_official", "is_official_checkpoint_file", "is_official_hf_folder", "load_official_checkpoint"]
