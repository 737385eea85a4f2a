"""`biozoo matrix`: every task config x every model config, whether it fits, and (with `--run`) a short training run.

A task is `configs/tasks/<task>.yaml` (data, task, trainer), a model `configs/models/<model>.yaml` (the model by
registered name and its kwargs); the pair is what `biozoo fit -c <task> -c <model>` runs. A pair fits when the
model can take the task's `DataSpec` (`kwargs_for_spec`, the same check the task makes when the CLI links them);
otherwise the reason is that check's one line.

    biozoo matrix                         # the fit table
    biozoo matrix --run --steps 2         # train every fitting pair for 2 steps on small generated data
    biozoo matrix --cost --tasks neurogym # with each fitting pair's parameters and MACs per sample (biozoo profile)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from biozoo._core import BiozooError, DataNotFoundError, DataSpec, configs_dir, first_line

CONFIGS = configs_dir()  # the packaged configs (the repo's configs/ in a source checkout)

# data sizes for a smoke run: every DataModule argument of these names is shrunk (the data stay generated)
SMALL_DATA = {"train_size": 64, "val_size": 32, "test_size": 32, "n_train": 32, "n_val": 16, "n_test": 16,
              "train_batches": 2, "val_batches": 1, "test_batches": 1, "num_train": 64, "num_test": 32,
              "duration_s": 60, "batch_size": 16, "num_workers": 0,
              "num_envs": 2, "rollouts_per_epoch": 2, "max_episode_steps": 16}  # control: short episodes
# a control task's own options for a smoke run: short rollouts, one evaluation episode, no report
SMALL_CONTROL = {"eval_episodes": 1, "report": False, "ppo": {"steps_per_env": 8, "epochs": 1, "minibatches": 1},
                 "es": {"population": 2}}


def task_configs(root: Path = CONFIGS) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "tasks").glob("*.yaml"))}


def model_configs(root: Path = CONFIGS) -> dict[str, Path]:
    return {p.stem: p for p in sorted((root / "models").glob("*.yaml"))}


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """b over a, recursively (how the two -c files combine for the keys read here)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read(*paths: Path) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for path in paths:
        config = merge(config, yaml.safe_load(Path(path).read_text()) or {})
    return config


def _class(class_path: str):
    import importlib

    module, name = class_path.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def data_init_args(task: Path, small: bool | dict[str, Any] = False) -> dict[str, Any]:
    """The task's DataModule arguments, with the `small` overrides (SMALL_DATA for True) it accepts."""
    import inspect

    data = read(task)["data"]
    args = dict(data.get("init_args") or {})
    if small:
        sizes = SMALL_DATA if small is True else small
        accepted = inspect.signature(_class(data["class_path"]).__init__).parameters
        args.update({k: v for k, v in sizes.items() if k in accepted})
    return args


@lru_cache(maxsize=None)
def task_spec(task: Path) -> DataSpec:
    """The task's DataSpec, from its DataModule built with the config's arguments (no data are loaded)."""
    data = read(task)["data"]
    return _class(data["class_path"])(**data_init_args(task, small=True)).spec


def model_entry(model: Path) -> tuple[str, dict[str, Any]]:
    init = read(model)["model"]["init_args"]
    return init["model"], dict(init.get("model_kwargs") or {})


def check_pair(task: Path, model: Path) -> str | None:
    """None when the model takes the task's data, else the one-line reason."""
    from biozoo.models import kwargs_for_spec

    name, kwargs = model_entry(model)
    try:
        kwargs_for_spec(name.split(".", 1)[0], task_spec(task), kwargs)
    except BiozooError as e:
        return first_line(e)
    return None


@dataclass
class PairResult:
    task: str
    model: str
    status: str  # "pass", "fail", "no fit", "no data"
    seconds: float = math.nan
    loss: float = math.nan
    metric: str = ""
    value: float = math.nan
    reason: str = ""
    shape: tuple[int, ...] = ()  # the scored logits' shape on one validation batch (supervised tasks)
    parameters: int = 0  # the cost columns: `biozoo.train.profile` of the model on a batch of the task's inputs
    macs: float = math.nan


def run_pair(task: Path, model: Path, steps: int = 2, root: Path | None = None, extra: list[str] | None = None,
             data: dict[str, Any] | None = None, val_batches: int | None = None) -> PairResult:
    """Fit the pair for `steps` training steps and validate once on `val_batches` batches (default: `steps`), on
    small generated data (`data`: DataModule arguments to shrink, default SMALL_DATA), in this process, through the
    same CLI as `biozoo fit`; returns the final training loss and the validation metric."""
    from biozoo.train.cli import BiozooCLI

    result = PairResult(task.stem, model.stem, "no fit", reason=check_pair(task, model) or "")
    if result.reason:
        return result
    sizes = SMALL_DATA if data is None else data
    small = [f"--data.init_args.{k}={v}" for k, v in data_init_args(task, small=sizes).items() if k in sizes]
    if data is None:
        small += control_overrides(task)
    with tempfile.TemporaryDirectory() as tmp:
        if is_control(task):  # a step is one rollout (PPO, however many optimiser steps it takes) or generation (ES)
            budget = [f"--data.init_args.rollouts_per_epoch={steps}", "--trainer.max_epochs=1",
                      "--trainer.max_steps=-1", "--trainer.check_val_every_n_epoch=1"]
        else:
            budget = [f"--trainer.max_steps={steps}", "--trainer.max_epochs=-1",
                      f"--trainer.limit_val_batches={val_batches or steps}",
                      f"--trainer.val_check_interval={steps}", "--trainer.check_val_every_n_epoch=null"]
        args = ["fit", "-c", str(task), "-c", str(model), *small, *budget,
                f"--trainer.default_root_dir={root or tmp}/{task.stem}-{model.stem}",
                "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
                "--trainer.callbacks=[]", "--curve.verbose=false", *(extra or [])]
        start = time.perf_counter()
        try:
            with quiet():
                cli = BiozooCLI(args=args)
        except DataNotFoundError as e:
            result.status, result.reason = "no data", first_line(e)
            return result
        except Exception as e:  # noqa: BLE001 -- reported per pair, the table goes on
            result.status, result.reason = "fail", first_line(e, with_type=True)[:200]
            return result
        result.seconds = time.perf_counter() - start
    from biozoo.train.tasks import SupervisedTask

    example = None
    if isinstance(cli.model, SupervisedTask):
        x, y = next(iter(cli.datamodule.val_dataloader()))
        with torch.no_grad():
            result.shape = tuple(cli.model.loss_fn(cli.model.model(x), y, **cli.model.loss_kwargs).logits.shape)
        example = x
    elif task_spec(task).input == "observation":
        example = torch.randn(2, *task_spec(task).shape)
    add_cost(result, cli.model.model, example)
    metrics = cli.trainer.callback_metrics
    loss = metrics.get("train/loss_epoch", metrics.get("train/loss_step", metrics.get("train/loss")))
    result.loss = float(loss) if loss is not None else math.nan
    for key in ("val/acc", "val/solve", "val/sequence_acc", "val/return", "val/mse", "val/loss"):
        if key in metrics:
            result.metric, result.value = key, float(metrics[key])
            break
    ok = math.isfinite(result.loss) or (result.metric and math.isfinite(result.value))
    result.status = "pass" if ok else "fail"
    if not ok:
        result.reason = "no finite loss was logged"
    return result


def add_cost(result: PairResult, model: torch.nn.Module, example: Any) -> None:
    """The pair's cost columns: parameters, and MACs per sample where an example input is at hand."""
    from .profile import profile

    result.parameters = sum(p.numel() for p in model.parameters())
    if isinstance(example, torch.Tensor):
        try:
            result.macs = profile(model, example[:8], repeats=1)["macs"]
        except Exception:  # noqa: BLE001 -- a cost that cannot be counted stays NaN; the row goes on
            pass


def is_control(task: Path) -> bool:
    """A task config trained by ControlTask (PPO or ES on an env) rather than on batches of data."""
    return read(task)["model"]["class_path"].endswith("ControlTask")


def control_overrides(task: Path) -> list[str]:
    """SMALL_CONTROL as CLI arguments for a ControlTask config (its ppo / es dicts merged, not replaced)."""
    import json

    if not is_control(task):
        return []
    model = read(task)["model"]
    init = model.get("init_args") or {}
    out = []
    for key, value in SMALL_CONTROL.items():
        if isinstance(value, dict):
            value = {**(init.get(key) or {}), **value}
        out.append(f"--model.init_args.{key}={json.dumps(value)}")
    return out


@contextlib.contextmanager
def quiet():
    """Lightning's banners and warnings off for the short runs (the table is the output)."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fit_table(root: Path = CONFIGS) -> list[PairResult]:
    return [PairResult(t, m, "fits" if (reason := check_pair(tp, mp)) is None else "no fit", reason=reason or "")
            for t, tp in task_configs(root).items() for m, mp in model_configs(root).items()]


def cost_cells(r: PairResult) -> str:
    macs = f"{r.macs:.3g}" if math.isfinite(r.macs) else "-"
    return f"{r.parameters:,} | {macs}" if r.parameters else "- | -"


def format_rows(rows: list[PairResult], run: bool, cost: bool = False) -> str:
    cost = cost or run
    lines = ["| task | model | " + ("result | seconds | final loss | metric |" if run else "fits |")
             + (" parameters | MACs / sample |" if cost else "") + " reason |",
             "|---|---|" + ("---|---|---|---|" if run else "---|") + ("---|---|" if cost else "") + "---|"]
    for r in rows:
        extra = f" {cost_cells(r)} |" if cost else ""
        if run:
            value = f"{r.metric}={r.value:.3f}" if r.metric else ""
            lines.append(f"| {r.task} | {r.model} | {r.status} | {r.seconds:.1f} | {r.loss:.4f} | {value} |{extra} "
                         f"{r.reason} |")
        else:
            lines.append(f"| {r.task} | {r.model} | {'yes' if r.status == 'fits' else 'no'} |{extra} {r.reason} |")
    return "\n".join(lines)


def pair_cost(task: Path, model: Path, result: PairResult) -> None:
    """Fill a fitting pair's cost columns without training (`biozoo matrix --cost`)."""
    from .profile import profile_pair

    try:
        p = profile_pair(task, model, batch_size=2, repeats=1)
    except Exception:  # noqa: BLE001 -- e.g. data that are not on disk; the table goes on
        return
    result.parameters, result.macs = p["parameters"], p["macs"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="biozoo matrix", description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=Path, default=CONFIGS, help="folder holding tasks/ and models/")
    parser.add_argument("--run", action="store_true", help="train every fitting pair for --steps steps")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tasks", nargs="*", default=None, help="only these task configs (by name)")
    parser.add_argument("--models", nargs="*", default=None, help="only these model configs (by name)")
    parser.add_argument("--cost", action="store_true", help="add parameters and MACs per sample (biozoo profile)")
    args = parser.parse_args(argv)
    tasks, models = task_configs(args.configs), model_configs(args.configs)
    if not tasks or not models:
        raise BiozooError(f"no task or model configs under {args.configs} (it needs tasks/*.yaml and models/*.yaml)")
    for picked, known, what in ((args.tasks, tasks, "task"), (args.models, models, "model")):
        unknown = sorted(set(picked or []) - set(known))
        if unknown:
            raise BiozooError(f"unknown {what} config(s) {unknown}; known: {', '.join(known)}")
    tasks = {k: v for k, v in tasks.items() if args.tasks is None or k in args.tasks}
    models = {k: v for k, v in models.items() if args.models is None or k in args.models}
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for t, tp in tasks.items():
        for m, mp in models.items():
            if args.run:
                row = run_pair(tp, mp, args.steps)
            else:
                reason = check_pair(tp, mp)
                row = PairResult(t, m, "fits" if reason is None else "no fit", reason=reason or "")
                if args.cost and reason is None:
                    pair_cost(tp, mp, row)
            rows.append(row)
            if args.run:
                print(format_rows([row], True).splitlines()[-1], flush=True)
    if not args.run:
        print(format_rows(rows, False, args.cost))
    fits = sum(r.status in ("fits", "pass", "fail") for r in rows)
    passed = sum(r.status == "pass" for r in rows)
    print(f"\n{fits} of {len(rows)} pairs fit" + (f"; {passed} passed {args.steps} steps" if args.run else ""))
    return 0 if not args.run or all(r.status != "fail" for r in rows) else 1
