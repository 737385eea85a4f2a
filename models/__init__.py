"""biozoo.models: every architecture in the zoo, one file per family. Nothing here imports Lightning."""

from ._hub import (PretrainedMixin, convert_checkpoint, list_checkpoint_formats, load_pretrained, load_weights,
                   register_checkpoint_format, safe_torch_load, save_pretrained)
from ._registry import (PretrainedCfg, create_model, get_pretrained_cfg, list_models, list_pretrained,
                        register_model, register_pretrained)
from .errors import BiozooError, CheckpointError, DataNotFoundError, ShapeError, UnknownNameError
from . import baselines  # noqa: F401  (registers mlp, lstm, resnet)
from . import weights  # noqa: F401  (registers the shipped pretrained checkpoints)

__all__ = [
    "BiozooError", "CheckpointError", "DataNotFoundError", "PretrainedCfg", "PretrainedMixin", "ShapeError",
    "UnknownNameError", "convert_checkpoint", "create_model", "get_pretrained_cfg", "list_checkpoint_formats",
    "list_models", "list_pretrained", "load_pretrained", "load_weights", "register_checkpoint_format",
    "register_model", "register_pretrained", "safe_torch_load", "save_pretrained",
]
