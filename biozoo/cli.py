"""The `biozoo` command.

    biozoo fit -c configs/quickstart.yaml          # LightningCLI: fit / validate / test / predict
    biozoo fit -c configs/quickstart.yaml --ckpt_path last   # resume an interrupted run
    biozoo list [PATTERN]                          # models, pretrained tags, tasks, checkpoint formats
    biozoo export RUN_CKPT OUT_DIR                 # Lightning .ckpt -> config.json + model.safetensors
    biozoo convert FORMAT SRC OUT_DIR              # e.g. official CTM checkpoints -> biozoo format
    biozoo matrix [--run --steps N]                # every task x model pair: fits or why not (and a short run)
    biozoo configs [PATTERN]                       # the packaged configs (any `-c configs/...` finds them)

Errors in the user's input (config keys, shapes, checkpoints, missing data) print one line and exit non-zero;
set BIOZOO_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from biozoo._core import BiozooError, configs_dir


USAGE = """usage: biozoo COMMAND [ARGS]

commands:
  fit | validate | test | predict   train or evaluate (LightningCLI), e.g. biozoo fit -c configs/quickstart.yaml
  list [PATTERN]                    models, pretrained tags, tasks, data, losses, checkpoint formats, environments
  export RUN_CKPT OUT_DIR           a Lightning .ckpt -> config.json + model.safetensors
  convert FORMAT SRC OUT_DIR        a foreign checkpoint (e.g. an official CTM one) -> the same format
  matrix [--run --steps N]          which task x model config pairs fit (and a short run of each that does)
  profile -c TASK -c MODEL          what a model costs on a task's data: parameters, MACs, ticks, sparsity, time
  configs [PATTERN]                 the configs shipped with biozoo; `-c configs/X.yaml` finds them from any folder
  --version                         the installed version

Help on one command: biozoo fit --help, biozoo convert --help, ...
Errors print one line; BIOZOO_DEBUG=1 (or --debug) shows the traceback."""

CATALOG_PACKAGES = ("biozoo.envs", "biozoo.train")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("biozoo")
    except PackageNotFoundError:
        import biozoo

        return biozoo.__version__


def _package_sources(package: str) -> list[tuple[str, Path]]:
    """(module name, file) of every module in the package and its subpackages, found without importing them."""
    spec = importlib.util.find_spec(package)  # finds the folder without running the package's __init__
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for folder in map(Path, spec.submodule_search_locations):
        for path in sorted(folder.rglob("*.py")):
            parts = [*path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join([package, *parts]), path))
    return out


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Subscript):  # Generic[T]
        node = node.value
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def static_catalog(packages: tuple[str, ...] = CATALOG_PACKAGES) -> dict[str, list[str]]:
    """Tasks, DataModules and losses, read from the packages' source with `ast` (nothing is imported).

    Rules: a module-level class is a task if it subclasses BiozooTask, and a DataModule if it subclasses
    BiozooDataModule, directly or through other module-level classes of these packages (bases matched by bare name,
    the same module's class first); the base classes themselves are left out, and so is every DataModule that
    neither it nor any of those in-package ancestors defines `spec` (or `dims`) for (abstract bases, as at runtime, where such a
    class's `spec` is BiozooDataModule's). Losses: the string literal passed to `register_loss(...)` anywhere.
    Entries read "module.Class", as `c.__module__ + "." + c.__name__` gives at runtime."""
    classes: dict[str, dict[str, Any]] = {}  # "module.Class" -> bases, defines dims
    by_name: dict[str, list[str]] = {}
    losses: set[str] = set()
    for package in packages:
        for module, path in _package_sources(package):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    described = ("spec", "dims")
                    dims = any(isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in described
                               or isinstance(item, ast.Assign) and any(getattr(t, "id", "") in described
                                                                       for t in item.targets)
                               or isinstance(item, ast.AnnAssign) and getattr(item.target, "id", "") in described
                               for item in node.body)
                    key = f"{module}.{node.name}"
                    classes[key] = {"module": module, "bases": [_base_name(b) for b in node.bases], "dims": dims}
                    by_name.setdefault(node.name, []).append(key)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Call) and _base_name(node.func) == "register_loss" and node.args
                        and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    losses.add(node.args[0].value)

    def resolve(name: str, module: str) -> str | None:
        keys = by_name.get(name, [])
        return f"{module}.{name}" if f"{module}.{name}" in keys else (keys[0] if keys else None)

    def ancestors(key: str, seen: set[str]) -> set[str]:
        for base in classes[key]["bases"]:
            parent = resolve(base, classes[key]["module"])
            if parent is not None and parent not in seen:
                seen.add(parent)
                ancestors(parent, seen)
        return seen

    lineage = {key: ancestors(key, set()) for key in classes}

    def subclasses(root: str) -> list[tuple[str, set[str]]]:
        return [(key, up) for key, up in lineage.items() if any(k.rsplit(".", 1)[1] == root for k in up)]

    tasks = sorted(key for key, _ in subclasses("BiozooTask"))
    data = sorted(key for key, up in subclasses("BiozooDataModule")
                  if classes[key]["dims"] or any(classes[k]["dims"] for k in up if not k.endswith(".BiozooDataModule")))
    return {"tasks": tasks, "data": data, "losses": sorted(losses)}


def _list(argv: list[str]) -> int:
    """Everything from biozoo.models, a static read of the harness's source and gymnasium's registry: no Lightning."""
    from rich.console import Console
    from rich.table import Table

    import biozoo
    from biozoo.models import list_checkpoint_formats
    from biozoo.models._registry import default_tag

    parser = argparse.ArgumentParser(prog="biozoo list", description="List models, pretrained tags and tasks.")
    parser.add_argument("pattern", nargs="?", default=None, help="glob over model names, e.g. 'ctm*'")
    args = parser.parse_args(argv)
    console = Console()
    table = Table(title="models")
    table.add_column("model")
    table.add_column("pretrained tags (task: metrics)")
    pretrained = biozoo.list_pretrained()
    for name in biozoo.list_models(args.pattern):
        default = default_tag(name)
        tags = [f"{key}{' (default)' if cfg.tag == default else ''}  ({cfg.task}: "
                + ", ".join(f"{k}={v}" for k, v in cfg.metrics.items()) + ")"
                for key, cfg in pretrained.items() if key.split(".")[0] == name]
        table.add_row(name, "\n".join(tags))
    console.print(table)

    if args.pattern is None:
        import gymnasium as gym  # biozoo's ids are registered by `import biozoo`

        catalog = static_catalog()
        console.print("[bold]tasks[/bold] (model.class_path): " + ", ".join(catalog["tasks"]))
        console.print("[bold]data[/bold] (data.class_path): " + ", ".join(catalog["data"]))
        console.print("[bold]losses[/bold]: " + ", ".join(catalog["losses"]))
        console.print("[bold]checkpoint formats[/bold] (biozoo convert): " + (", ".join(list_checkpoint_formats()) or "none"))
        envs = sorted(k for k in gym.registry if k.startswith("biozoo/"))
        console.print("[bold]environments[/bold] (gymnasium.make): " + (", ".join(envs) or "none"))
    return 0


def _export(argv: list[str]) -> int:
    from biozoo.models import model_from_lightning_checkpoint, safe_torch_load, save_pretrained
    from biozoo.models._hub import model_files

    parser = argparse.ArgumentParser(prog="biozoo export",
                                     description="Turn a Lightning checkpoint into config.json + model.safetensors.")
    parser.add_argument("ckpt")
    parser.add_argument("out_dir")
    parser.add_argument("--overwrite", action="store_true", help="replace the model a folder already holds")
    args = parser.parse_args(argv)
    held = model_files(args.out_dir)
    if held and not args.overwrite:
        raise BiozooError(f"{args.out_dir} already holds a model ({', '.join(held)}); give another folder or "
                          "--overwrite to replace it")
    ckpt = safe_torch_load(args.ckpt)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise BiozooError(f"{args.ckpt} is not a Lightning checkpoint (no state_dict)")
    model = model_from_lightning_checkpoint(ckpt, args.ckpt)
    out = save_pretrained(model, args.out_dir, overwrite=args.overwrite, metadata={"source": os.path.abspath(args.ckpt),
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
    parser.add_argument("--overwrite", action="store_true", help="replace the model a folder already holds")
    args = parser.parse_args(argv)
    out = convert_checkpoint(args.format, args.src, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}")
    return 0


def _matrix(argv: list[str]) -> int:
    from biozoo.train.matrix import main as matrix_main

    return matrix_main(argv)


def _profile(argv: list[str]) -> int:
    from biozoo.train.profile import main as profile_main

    return profile_main(argv)


def _configs(argv: list[str]) -> int:
    import fnmatch

    parser = argparse.ArgumentParser(prog="biozoo configs",
                                     description="List the configs shipped with biozoo (use them as -c configs/NAME).")
    parser.add_argument("pattern", nargs="?", default=None, help="glob over the names, e.g. 'ctm/*'")
    args = parser.parse_args(argv)
    root = configs_dir()
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.yaml"))
    names = [n for n in names if args.pattern is None or fnmatch.fnmatch(n, args.pattern)]
    if not names:
        raise BiozooError(f"no configs{' match ' + repr(args.pattern) if args.pattern else ''} under {root}")
    print(f"# {len(names)} configs in {root}; use them as: biozoo fit -c configs/NAME")
    print("\n".join(f"configs/{n}" for n in names))
    return 0


COMMANDS = {"list": _list, "export": _export, "convert": _convert, "matrix": _matrix, "configs": _configs,
            "profile": _profile}


def _one_line(error: BaseException) -> str:
    """The useful part of an error on one line (jsonargparse's union errors hide it inside a long dump)."""
    text = " ".join(str(error).split())
    problem = re.search(r"Parser key \"([^\"]+)\".*?Problem with given class_path '([^']+)': (.+?)(?: - Expected| Given value|$)", text)
    if problem:
        key, class_path, reason = problem.groups()
        return f"{key} ({class_path}): {reason.strip()}"
    union = re.search(r"Does not validate against any of the Union subtypes.*?Errors: - (.+?)(?: - Expected a |$)", text)
    if union:  # the first subtype's error is the real cause; the others only say "not None", "not a str", ...
        return union.group(1).strip()
    return text


def _is_user_error(error: BaseException) -> bool:
    """BiozooError or a jsonargparse ArgumentError (checked by name, so the light commands never import it)."""
    argument_error = getattr(sys.modules.get("jsonargparse"), "ArgumentError", None)
    if isinstance(error, BiozooError) or (argument_error is not None and isinstance(error, argument_error)):
        return True
    return "Does not validate against any of the Union subtypes" in str(error)


def main(argv: list[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in words or bool(os.environ.get("BIOZOO_DEBUG"))
    words = [w for w in words if w != "--debug"]
    if not words or words[0] in ("-h", "--help"):  # answered here: LightningCLI's own help imports all of Lightning
        print(USAGE, file=sys.stdout if words else sys.stderr)
        sys.exit(0 if words else 2)
    if words[0] in ("--version", "-V"):
        print(f"biozoo {version()}")
        sys.exit(0)
    try:
        if words and words[0] in COMMANDS:
            sys.exit(COMMANDS[words[0]](words[1:]))
        from biozoo.train.cli import BiozooCLI

        if argv is None:  # as typed (Lightning relaunches sys.argv for DDP), without our own --debug
            sys.argv[1:] = words
            if debug:
                os.environ["BIOZOO_DEBUG"] = "1"
        BiozooCLI(args=None if argv is None else words)
    except Exception as e:
        if debug:
            raise
        if _is_user_error(e):
            print(f"biozoo: error: {_one_line(e)}", file=sys.stderr)
            sys.exit(2)
        # anything else still gets one line, with the way to see more
        print(f"biozoo: error: {type(e).__name__}: {' '.join(str(e).split())[:500]} "
              "(set BIOZOO_DEBUG=1 or add --debug for the traceback)", file=sys.stderr)
        sys.exit(1)


def __getattr__(name: str) -> Any:
    if name == "BiozooCLI":  # the LightningCLI subclass lives with the harness; imported on demand
        from biozoo.train.cli import BiozooCLI

        return BiozooCLI
    raise AttributeError(name)


if __name__ == "__main__":
    main()
