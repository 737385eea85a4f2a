"""NeuroGym's tasks across the zoo's online models at one step budget, with each model's cost beside it.

    python benchmarks/neurogym_tasks.py --steps 800 --out results        # one run at a time, appends results/neurogym.jsonl
    python benchmarks/neurogym_tasks.py --tasks GoNogo-v0 --models lstm cfc --steps 100

Each run is `biozoo fit -c configs/tasks/neurogym.yaml -c configs/models/<model>.yaml --data.init_args.task <id>`
for `--steps` optimiser steps (batch 16 windows of 100 steps, seed 0), then validated once on the 256 held-out
windows: `val/acc_decision` (steps whose label is not fixation, as NeuroGym scores) and `val/acc` (every step). The
cost columns are `biozoo.train.profile` on one batch of 8 windows (MACs per window of 100 steps). Runs already in
the .jsonl are skipped; `results/neurogym.md` is rewritten from it after every run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from biozoo.train.matrix import CONFIGS, quiet

TASKS = ("PerceptualDecisionMaking-v0", "GoNogo-v0", "DelayMatchSample-v0")
MODELS = ("lstm", "transformer", "lif_snn", "cfc", "ctm_online", "ltc")


def run(task: str, model: str, steps: int, root: Path) -> dict:
    from biozoo.train.cli import BiozooCLI
    from biozoo.train.profile import profile

    args = ["fit", "-c", str(CONFIGS / "tasks/neurogym.yaml"), "-c", str(CONFIGS / f"models/{model}.yaml"),
            f"--data.init_args.task={task}", f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={steps}",
            f"--trainer.default_root_dir={root}/{task}-{model}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu", "--trainer.callbacks=[]",
            "--curve.verbose=false"]
    start = time.perf_counter()
    with quiet():
        cli = BiozooCLI(args=args)
    seconds = time.perf_counter() - start
    m = cli.trainer.callback_metrics
    x = cli.datamodule.val_set.tensors[0][:8]
    cost = profile(cli.model.model, x)
    return {"task": task, "model": model, "steps": steps, "acc_decision": float(m["val/acc_decision"]),
            "acc": float(m["val/acc"]), "train_seconds": seconds, **cost}


def table(rows: list[dict]) -> str:
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)] + \
        sorted({r["task"] for r in rows} - set(TASKS))
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    by = {(r["task"], r["model"]): r for r in rows}
    head = "| model | " + " | ".join(f"{t} decision (all steps)" for t in tasks) + \
        " | parameters | MACs / window | activation sparsity | ms / window (CPU) |"
    lines = [head, "|---|" + "---|" * (len(tasks) + 4)]
    for m in models:
        cells = [f"{by[(t, m)]['acc_decision']:.3f} ({by[(t, m)]['acc']:.3f})" if (t, m) in by else "not run"
                 for t in tasks]
        any_row = next(by[(t, m)] for t in tasks if (t, m) in by)
        sparsity = any_row["activation_sparsity"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {any_row['parameters']:,} | {any_row['macs']:.3g} | "
                     f"{'-' if sparsity is None else f'{sparsity:.2f}'} | {1000 * any_row['seconds_per_sample']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--root", type=Path, default=Path("runs/bench_neurogym"))
    parser.add_argument("--smoke", action="store_true", help="2 steps of the LSTM on GoNogo (tests the code path)")
    args = parser.parse_args()
    if args.smoke:
        args.tasks, args.models, args.steps, args.root = ["GoNogo-v0"], ["lstm"], 2, args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "neurogym.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    torch.set_num_threads(1)
    for model in args.models:
        for task in args.tasks:
            if any(r["task"] == task and r["model"] == model and r["steps"] == args.steps for r in rows):
                continue
            row = run(task, model, args.steps, args.root)
            rows.append(row)
            with log.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{task} {model}: decision {row['acc_decision']:.3f}, all {row['acc']:.3f}, "
                  f"{row['train_seconds']:.0f} s", flush=True)
            (args.out / "neurogym.md").write_text(table([r for r in rows if r["steps"] == args.steps]) + "\n")


if __name__ == "__main__":
    main()
