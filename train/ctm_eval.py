"""Command line for the CTM maze evaluation (the functions live in `biozoo.train.ctm_tasks`).

    python -m biozoo.train.ctm_eval maze-eval MODEL [--sizes 15 31] [--n 200] [--reapply 20] [--gif out/maze]

MODEL is a registered `name.tag` (e.g. ctm.maze15), an exported folder or a Lightning .ckpt. Prints the table of
solve rate against maze size (exact route, mean correct prefix, one-pass reach, re-application solve rate).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from biozoo.envs import mazes

from .ctm_tasks import evaluate_mazes, format_table, model_route_length, save_maze_gif


def load_model(spec: str) -> nn.Module:
    """A registered `name.tag`, a portable folder (config.json + model.safetensors), or a Lightning .ckpt."""
    from biozoo.models import create_model, load_pretrained
    from biozoo.models import model_from_lightning_checkpoint, safe_torch_load

    if spec.endswith(".ckpt"):
        return model_from_lightning_checkpoint(safe_torch_load(spec), spec)
    if Path(spec).exists():
        return load_pretrained(spec)
    return create_model(spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biozoo.train.ctm_eval")
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("maze-eval", help="solve rate vs maze size, with re-application on larger mazes")
    ev.add_argument("model", help="name.tag, an exported folder, or a Lightning .ckpt")
    ev.add_argument("--sizes", type=int, nargs="+", default=[15, 31])
    ev.add_argument("--n", type=int, default=200)
    ev.add_argument("--seed", type=int, default=123)
    ev.add_argument("--reapply", type=int, default=20)
    ev.add_argument("--fault-tolerance", type=int, default=2)
    ev.add_argument("--legacy-range", action="store_true", help="inputs in [0, 1] instead of [-1, 1]")
    ev.add_argument("--gif", default=None, help="write <path>.gif/.png of one maze of the first size")
    ev.add_argument("--json", default=None, help="also write the rows as JSON")
    ev.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model = load_model(args.model).to(args.device)
    rows = [evaluate_mazes(model, s, args.n, args.seed, None, args.reapply, args.fault_tolerance,
                           not args.legacy_range) for s in args.sizes]
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.gif:
        image, _ = mazes.generate_maze(args.sizes[0], mazes.maze_seed(args.seed, 0), model_route_length(model))
        print("wrote", *save_maze_gif(model, image, args.gif, not args.legacy_range))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
