"""biozoo.train: the shared harness -- tasks (LightningModules), losses, callbacks and loggers."""

from .callbacks import ExceptionCheckpoint, LearningCurvePlot, RunCheckpoint
from .loggers import CSVLogger, TensorBoardLogger, WandbLogger
from .losses import LossOutput, get_loss, list_losses, register_loss
from .tasks import BiozooTask, SupervisedTask, build_model

__all__ = ["BiozooTask", "ExceptionCheckpoint", "LearningCurvePlot", "LossOutput", "RunCheckpoint",
           "SupervisedTask", "CSVLogger", "TensorBoardLogger", "WandbLogger", "build_model", "get_loss", "list_losses", "register_loss"]
