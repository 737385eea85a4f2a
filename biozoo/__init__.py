"""biozoo: a PyTorch + Lightning model zoo of biologically inspired architectures.

    import biozoo
    biozoo.list_models()
    model = biozoo.create_model("mlp", in_features=64, num_classes=10)
    model.save_pretrained("out/")
    again = biozoo.load_pretrained("out/")
    gymnasium.make("biozoo/Swimmer-v0")   # importing biozoo registers the environments
"""

from biozoo.models import (BiozooError, CheckpointError, PretrainedCfg, create_model, list_models, list_pretrained,
                           load_pretrained, register_model, register_pretrained, save_pretrained)
from biozoo.envs import registration as _registration  # noqa: F401  (gymnasium ids biozoo/...; no env code loaded)

__version__ = "0.1.0"

__all__ = [
    "BiozooError", "CheckpointError", "PretrainedCfg", "__version__", "create_model", "list_models",
    "list_pretrained", "load_pretrained", "register_model", "register_pretrained", "save_pretrained",
]
