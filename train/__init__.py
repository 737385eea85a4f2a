"""biozoo.train: the shared harness -- tasks (LightningModules), losses, callbacks and loggers."""

from .callbacks import ExceptionCheckpoint, LearningCurvePlot, RunCheckpoint
from .loggers import CSVLogger, TensorBoardLogger, WandbLogger
from .losses import LossOutput, get_loss, list_losses, register_loss
from .tasks import BiozooTask, SupervisedTask, build_model
from .taugate import PEFTTask, TemperatureAnneal  # noqa: F401  (TauGate and the PEFT baselines)
from .dendrites import Dendrites  # noqa: F401  (the perforated-dendrites callback)
from .control import ControlTask, EnvDataModule, evaluate  # noqa: F401  (control harness: PPO / ES)
from .ccrnn import CCRNNTask  # noqa: F401
from . import ctm  # noqa: F401  (registers the ctm and ctm_ctc losses)
from . import ctm_rl, ctm_tasks  # noqa: F401  (ctm_maze / ctm_qamnist losses; RecurrentPPOTask, masked control envs)
from .neuroformer import NeuroformerTask  # noqa: F401  (registers the neuroformer loss)

__all__ = ["BiozooTask", "ExceptionCheckpoint", "LearningCurvePlot", "LossOutput", "RunCheckpoint",
           "SupervisedTask", "CSVLogger", "TensorBoardLogger", "WandbLogger", "build_model", "get_loss", "list_losses", "register_loss"]
