"""The zoo side by side: every fitting task x model config pair trained on the same small budget.

    python benchmarks/matrix.py --steps 200 --out results           # about 40 min on 2 CPU cores
    python benchmarks/matrix.py --steps 20 --tasks digits parity16   # a quick look
    python benchmarks/matrix.py --tasks cartpole acrobot swimmer_ppo swimmer_es --control-steps 20 --merge
    python benchmarks/matrix.py --smoke --out /tmp/matrix_smoke      # seconds (CI): digits x mlp, lstm, 2 steps

Each pair is `biozoo fit -c configs/tasks/<task>.yaml -c configs/models/<model>.yaml` for `--steps` optimiser
steps on the task's generated (or shipped) data, shrunk to BUDGET_DATA where the DataModule takes those
arguments, then validated once on `--val-batches` batches; a control task instead runs `--control-steps`
rollouts (PPO) or generations (ES) and scores 10 greedy episodes. Writes `<out>/matrix.csv` (every pair, with
the reason a pair does not fit), `<out>/matrix.md` (metric per task x model) and `<out>/matrix.png` (the heatmap:
per task, the metric scaled to that task's best so rows compare; grey = does not fit). This budget ranks
early learning speed, not what each model reaches: the papers' results need their own configs and budgets.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

import torch

from biozoo.train.matrix import PairResult, check_pair, is_control, model_configs, run_pair, task_configs

# data per task for the benchmark: enough to learn something in a few hundred steps, quick to generate
BUDGET_DATA = {"train_size": 8192, "val_size": 512, "test_size": 32, "n_train": 2000, "n_val": 128, "n_test": 16,
               "train_batches": 400, "val_batches": 8, "test_batches": 1, "num_train": 1000, "num_test": 32,
               "duration_s": 600, "num_workers": 0}
CONTROL_EXTRA = ["--model.init_args.eval_episodes=10", "--model.init_args.report=false"]  # val/return: 10 greedy episodes
LOWER_IS_BETTER = ("val/mse", "val/loss")


def heatmap(rows: list[PairResult], tasks: list[str], models: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.full((len(tasks), len(models)), np.nan)
    text = [["" for _ in models] for _ in tasks]
    for r in rows:
        if r.status != "pass" or not math.isfinite(r.value):
            if r.status == "fail":
                text[tasks.index(r.task)][models.index(r.model)] = "fail"
            continue
        i, j = tasks.index(r.task), models.index(r.model)
        grid[i, j] = r.value
        text[i][j] = f"{r.value:.2f}"
    scaled = np.full_like(grid, np.nan)
    for i in range(len(tasks)):  # per row: 1 = the task's best model, 0 = its worst
        row = grid[i]
        if np.isfinite(row).any():
            lo, hi = np.nanmin(row), np.nanmax(row)
            metric = next((r.metric for r in rows if r.task == tasks[i] and r.metric), "")
            s = (row - lo) / (hi - lo) if hi > lo else np.ones_like(row)
            scaled[i] = 1 - s if metric in LOWER_IS_BETTER else s
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(models), 1.0 + 0.45 * len(tasks)))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("#dddddd")
    ax.imshow(np.ma.masked_invalid(scaled), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(tasks)):
        for j in range(len(models)):
            ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                    color="black" if not np.isfinite(scaled[i, j]) or scaled[i, j] > 0.5 else "white")
    metrics = {t: next((r.metric for r in rows if r.task == t and r.metric), "") for t in tasks}
    ax.set_yticks(range(len(tasks)), [f"{t} ({metrics[t].split('/')[-1]})" for t in tasks], fontsize=8)
    ax.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=8)
    ax.set_title("biozoo matrix: validation metric per task x model (colour: rank within the task)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--val-batches", type=int, default=8)
    parser.add_argument("--control-steps", type=int, default=30,
                        help="rollouts (PPO) or generations (ES) per pair on the control tasks")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing <out>/matrix.csv for the pairs not run now")
    parser.add_argument("--smoke", action="store_true",
                        help="2 steps on the tests' small data, digits x mlp and lstm unless --tasks/--models")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.val_batches, args.control_steps = 2, 1, 1
        args.tasks, args.models = args.tasks or ["digits"], args.models or ["mlp", "lstm"]
    tasks = {k: v for k, v in task_configs().items() if args.tasks is None or k in args.tasks}
    models = {k: v for k, v in model_configs().items() if args.models is None or k in args.models}
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows: list[PairResult] = []
    start = time.perf_counter()
    for t, tp in tasks.items():
        for m, mp in models.items():
            reason = check_pair(tp, mp)
            row = PairResult(t, m, "no fit", reason=reason) if reason else \
                run_pair(tp, mp, args.control_steps if is_control(tp) else args.steps,
                         data=None if args.smoke else BUDGET_DATA,
                         val_batches=args.val_batches, extra=CONTROL_EXTRA if is_control(tp) else None)
            rows.append(row)
            if row.status != "no fit":
                print(f"{t:16s} {m:22s} {row.status:8s} {row.seconds:7.1f}s loss {row.loss:8.4f} "
                      f"{row.metric} {row.value:.4f} {row.reason}", flush=True)
    if args.merge and (args.out / "matrix.csv").is_file():
        done = {(r.task, r.model) for r in rows}
        with open(args.out / "matrix.csv", newline="") as f:
            for old in csv.DictReader(f):
                if (old["task"], old["model"]) not in done:
                    rows.append(PairResult(old["task"], old["model"], old["status"], float(old["seconds"]),
                                           float(old["final_train_loss"]), old["metric"], float(old["value"]),
                                           old["reason"], parameters=int(old.get("parameters") or 0),
                                           macs=float(old.get("macs_per_sample") or "nan")))
        every = task_configs()
        tasks = {t: every[t] for t in sorted({r.task for r in rows}) if t in every}
        models = {m: p for m, p in model_configs().items() if any(r.model == m for r in rows)}
        order = {(t, m): i for i, (t, m) in enumerate((t, m) for t in tasks for m in models)}
        rows.sort(key=lambda r: order.get((r.task, r.model), len(order)))
    with open(args.out / "matrix.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "model", "status", "seconds", "final_train_loss", "metric", "value", "reason",
                         "parameters", "macs_per_sample"])
        for r in rows:
            writer.writerow([r.task, r.model, r.status, f"{r.seconds:.2f}", f"{r.loss:.5f}", r.metric,
                             f"{r.value:.5f}", r.reason, r.parameters, f"{r.macs:.6g}"])
    names = [m for m in models if any(r.model == m and r.status != "no fit" for r in rows)]
    lines = ["| task (metric) | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        metric = next((r.metric for r in rows if r.task == t and r.metric), "")
        cells = []
        for m in names:
            r = next(r for r in rows if r.task == t and r.model == m)
            cells.append(f"{r.value:.3f}" if r.status == "pass" and math.isfinite(r.value) else
                         {"no fit": "-", "no data": "no data"}.get(r.status, r.status))
        lines.append(f"| {t} ({metric.split('/')[-1] or '-'}) | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    cost = ["| task: parameters / MACs per sample | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        cells = []
        for m in names:
            r = next(r for r in rows if r.task == t and r.model == m)
            cells.append(f"{r.parameters / 1e3:.1f}k / {r.macs:.3g}" if r.parameters and math.isfinite(r.macs)
                         else "-")
        cost.append(f"| {t} | " + " | ".join(cells) + " |")
    (args.out / "matrix.md").write_text(f"{args.steps} steps per pair, validated on {args.val_batches} batches; control "
                                        f"tasks: {args.control_steps} rollouts or generations, 10 greedy episodes.\n\n"
                                        + table + "\n\nCost (`biozoo.train.profile`: parameters, multiply-accumulates "
                                        "per sample counted by torch's FLOP counter):\n\n" + "\n".join(cost) + "\n")
    heatmap(rows, list(tasks), names, args.out / "matrix.png")
    print(table)
    fits = [r for r in rows if r.status != "no fit"]
    print(f"\n{len(fits)} fitting pairs of {len(rows)}; {sum(r.status == 'pass' for r in fits)} passed; "
          f"{time.perf_counter() - start:.0f} s; wrote {args.out / 'matrix.csv'}, matrix.md, matrix.png")
    return 0 if all(r.status != "fail" for r in fits) else 1


if __name__ == "__main__":
    sys.exit(main())
