"""biozoo.models: every architecture in the zoo, one file per family. Nothing here imports Lightning."""

from ._hub import (PretrainedMixin, convert_checkpoint, list_checkpoint_formats, load_pretrained, load_weights,
                   model_from_lightning_checkpoint, register_checkpoint_format, safe_torch_load, save_pretrained)
from ._registry import (PretrainedCfg, accepted_kwargs, create_model, get_builder, get_pretrained_cfg,
                        kwargs_for_spec, list_models, list_pretrained, model_class, pretrained_dir, register_model,
                        register_pretrained)
from .errors import BiozooError, CheckpointError, DataNotFoundError, ShapeError, UnknownNameError
from . import baselines  # noqa: F401  (registers mlp, lstm, resnet)
from . import ncap  # noqa: F401  (registers ncap, ncap_unshared, mlp_policy, mlp_policy_256)
from . import ccrnn  # noqa: F401  (registers ccrnn, ccrnn_linedraw, ccrnn_seqmnist)
from . import taugate  # noqa: F401  (registers the hidden taugate rebuilder)
from . import ctm  # noqa: F401  (registers ctm, ctm_lstm, ctm_parity, ctm_sort and the sakana-ctm format)
from . import ctm_variants  # noqa: F401  (registers ctm_qamnist, ctm_rl, ctm_rl_agent)
from . import ctm_online  # noqa: F401  (registers ctm_online)
from . import peers  # noqa: F401  (registers cfc, ltc, lif_snn: their libraries load when one is built)
from . import dendrites  # noqa: F401  (registers the hidden dendrites rebuilder)
from . import neuroformer  # noqa: F401  (registers neuroformer, neuroformer_official)
from . import weights  # noqa: F401  (registers the shipped pretrained checkpoints)

__all__ = [
    "BiozooError", "CheckpointError", "DataNotFoundError", "PretrainedCfg", "PretrainedMixin", "ShapeError",
    "UnknownNameError", "accepted_kwargs", "convert_checkpoint", "create_model", "get_builder", "get_pretrained_cfg",
    "kwargs_for_spec", "list_checkpoint_formats", "model_class", "model_from_lightning_checkpoint", "pretrained_dir",
    "list_models", "list_pretrained", "load_pretrained", "load_weights", "register_checkpoint_format",
    "register_model", "register_pretrained", "safe_torch_load", "save_pretrained",
]
