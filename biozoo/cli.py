"""The `biozoo` command.

    biozoo fit -c configs/quickstart.yaml          # LightningCLI: fit / validate / test / predict
    biozoo fit -c configs/quickstart.yaml --ckpt_path last   # resume an interrupted run
    biozoo list [PATTERN]                          # models, pretrained tags, tasks, checkpoint formats
    biozoo export RUN_CKPT OUT_DIR                 # Lightning .ckpt -> config.json + model.safetensors
    biozoo convert FORMAT SRC OUT_DIR              # e.g. official CTM checkpoints -> biozoo format

Errors in the user's input (config keys, shapes, checkpoints, missing data) print one line and exit non-zero;
set BIOZOO_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

import lightning as L
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from biozoo.models.errors import BiozooError
from biozoo.train.callbacks import ExceptionCheckpoint, LearningCurvePlot, RunCheckpoint

TRAINER_DEFAULTS: dict[str, Any] = {
    "default_root_dir": "runs/default",
    "logger": {"class_path": "biozoo.train.CSVLogger"},
}


class BiozooCLI(LightningCLI):
    """LightningCLI with biozoo's defaults: any task (`model:`) and DataModule (`data:`) by class_path, the
    data's dimensions linked into the task, CSV logging and checkpoints under `trainer.default_root_dir`."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any):
        import biozoo.envs  # noqa: F401  (makes the DataModules and tasks resolvable by short name)
        import biozoo.train  # noqa: F401

        super().__init__(
            model_class=L.LightningModule, datamodule_class=L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            trainer_defaults=TRAINER_DEFAULTS, save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "prog": "biozoo"},
            args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # callbacks every run has, each configurable: --checkpoint.monitor val/acc --checkpoint.mode max ...
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExceptionCheckpoint, "exception_checkpoint")
        parser.add_lightning_class_args(LearningCurvePlot, "curve")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.link_arguments("data.dims", "model.init_args.data_dims", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir
        loggers = config.trainer.logger
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            init = getattr(logger, "init_args", None)
            if init is not None and "save_dir" in init and init.save_dir in (None, "."):
                init.save_dir = root


def _list(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    import biozoo
    from biozoo.envs import BiozooDataModule
    from biozoo.models import list_checkpoint_formats
    from biozoo.train import BiozooTask, list_losses

    parser = argparse.ArgumentParser(prog="biozoo list", description="List models, pretrained tags and tasks.")
    parser.add_argument("pattern", nargs="?", default=None, help="glob over model names, e.g. 'ctm*'")
    args = parser.parse_args(argv)
    console = Console()
    table = Table(title="models")
    table.add_column("model")
    table.add_column("pretrained tags (task: metrics)")
    pretrained = biozoo.list_pretrained()
    for name in biozoo.list_models(args.pattern):
        tags = [f"{key}  ({cfg.task}: " + ", ".join(f"{k}={v}" for k, v in cfg.metrics.items()) + ")"
                for key, cfg in pretrained.items() if key.split(".")[0] == name]
        table.add_row(name, "\n".join(tags))
    console.print(table)

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    if args.pattern is None:
        data = sorted({f"{c.__module__}.{c.__name__}" for c in subclasses(BiozooDataModule)
                       if c.dims is not BiozooDataModule.dims})  # skip abstract bases
        tasks = sorted({f"{c.__module__}.{c.__name__}" for c in subclasses(BiozooTask)})
        console.print("[bold]tasks[/bold] (model.class_path): " + ", ".join(tasks))
        console.print("[bold]data[/bold] (data.class_path): " + ", ".join(data))
        console.print("[bold]losses[/bold]: " + ", ".join(list_losses()))
        console.print("[bold]checkpoint formats[/bold] (biozoo convert): " + (", ".join(list_checkpoint_formats()) or "none"))
        try:
            import gymnasium as gym

            import biozoo.envs  # noqa: F401  (registers the environments)

            envs = sorted(k for k in gym.registry if k.startswith("biozoo/"))
            if envs:
                console.print("[bold]environments[/bold]: " + ", ".join(envs))
        except ImportError:
            pass
    return 0


def _export(argv: list[str]) -> int:
    from biozoo.models._hub import model_from_lightning_checkpoint, safe_torch_load, save_pretrained

    parser = argparse.ArgumentParser(prog="biozoo export",
                                     description="Turn a Lightning checkpoint into config.json + model.safetensors.")
    parser.add_argument("ckpt")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    ckpt = safe_torch_load(args.ckpt)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise BiozooError(f"{args.ckpt} is not a Lightning checkpoint (no state_dict)")
    model = model_from_lightning_checkpoint(ckpt, args.ckpt)
    out = save_pretrained(model, args.out_dir, metadata={"source": os.path.abspath(args.ckpt),
                                                        "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")})
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


def _convert(argv: list[str]) -> int:
    from biozoo.models import convert_checkpoint, list_checkpoint_formats

    parser = argparse.ArgumentParser(prog="biozoo convert",
                                     description="Convert a foreign checkpoint into config.json + model.safetensors.")
    parser.add_argument("format", help="one of: " + (", ".join(list_checkpoint_formats()) or "none"))
    parser.add_argument("src")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.format, args.src, args.out_dir)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


COMMANDS = {"list": _list, "export": _export, "convert": _convert}


def _one_line(error: BaseException) -> str:
    """The useful part of an error on one line (jsonargparse's union errors hide it inside a long dump)."""
    text = " ".join(str(error).split())
    problem = re.search(r"Parser key \"([^\"]+)\".*?Problem with given class_path '([^']+)': (.+?)(?: - Expected| Given value|$)", text)
    if problem:
        key, class_path, reason = problem.groups()
        return f"{key} ({class_path}): {reason.strip()}"
    return text


def main(argv: list[str] | None = None) -> None:
    words = sys.argv[1:] if argv is None else argv
    try:
        if words and words[0] in COMMANDS:
            sys.exit(COMMANDS[words[0]](words[1:]))
        BiozooCLI(args=argv)
    except (BiozooError, ArgumentError) as e:
        if os.environ.get("BIOZOO_DEBUG"):
            raise
        print(f"biozoo: error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # anything else still gets one line, with the way to see more
        if os.environ.get("BIOZOO_DEBUG"):
            raise
        print(f"biozoo: error: {type(e).__name__}: {' '.join(str(e).split())[:500]} "
              "(set BIOZOO_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
