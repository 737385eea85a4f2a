"""Compare the three trainings of the cortico-cerebellar RNN on one task: ccRNN, truncated BPTT, full BPTT.

Every run goes through the real harness (`biozoo fit` with a config in configs/ccrnn/, only the training mode, the
seed and the run folder overridden), several in parallel processes. Prints final validation (and test) loss,
accuracy or the ataxia-like measures as mean +- std over seeds, and the fraction of the truncation gap that the
cerebellum closes, gap = (L_tbptt - L_ccrnn) / (L_tbptt - L_bptt) on the mean final validation loss. Writes
summary.json, learning_curves.png (mean validation curves) and, for drawing tasks, trajectories.png (seed 0's
drawings against the targets) into --out.

    python benchmarks/ccrnn.py --config configs/ccrnn/seqdigits.yaml --seeds 0 1 2
    python benchmarks/ccrnn.py --config configs/ccrnn/linedraw.yaml --seeds 0 1 2
    python benchmarks/ccrnn.py --smoke --out /tmp/ccrnn_smoke   # seconds (CI): seed 0, 1 epoch of 2 batches, in-process
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

TRAININGS = ("ccrnn", "tbptt", "bptt")


def run_one(config: str, training: str, seed: int, root: str, epochs: int | None, extra: list[str]) -> dict:
    """One `biozoo fit` in this process; returns final metrics, validation curves and example drawings."""
    import torch

    torch.set_num_threads(1)
    from biozoo.cli import BiozooCLI
    from biozoo.train.callbacks import read_metrics_csv

    args = ["-c", config, "--model.init_args.training", training, "--seed_everything", str(seed),
            "--data.init_args.seed", str(seed), "--trainer.default_root_dir", root,
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--curve.verbose", "false"]
    if epochs is not None:
        args += ["--trainer.max_epochs", str(epochs)]
    start = time.time()
    cli = BiozooCLI(args=args + extra, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.time() - start
    test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    series = read_metrics_csv(Path(cli.trainer.logger.log_dir) / "metrics.csv")
    curves = {k: v for k, v in series.items() if k.startswith("val/")}
    final = {k: v[-1][1] for k, v in curves.items()}
    result = {"training": training, "seed": seed, "seconds": seconds, "final": final, "curves": curves,
              "test": {k: float(v) for k, v in test.items()}, "parameters": cli.model.num_parameters()}
    task, dm = cli.model, cli.datamodule
    if task.objective == "regression":  # example drawings for the trajectory plot
        x, y = dm.examples()
        with torch.no_grad():
            drawn = task.model.eval()(x)
        result["drawings"] = {"drawn": drawn.tolist(), "target": y.tolist()}
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def summarise(results: list[dict]) -> dict:
    summary: dict = {}
    for training in TRAININGS:
        runs = [r for r in results if r["training"] == training]
        if not runs:
            continue
        entry = {"seeds": [r["seed"] for r in runs], "parameters": runs[0]["parameters"],
                 "seconds": mean_std([r["seconds"] for r in runs])}
        for key in runs[0]["final"]:
            entry[key] = mean_std([r["final"][key] for r in runs])
        for key in runs[0]["test"]:
            entry[key] = mean_std([r["test"][key] for r in runs])
        entry["val/loss per seed"] = [r["final"]["val/loss"] for r in runs]
        summary[training] = entry
    if all(t in summary for t in TRAININGS):
        lt, lc, lb = (summary[t]["val/loss"][0] for t in ("tbptt", "ccrnn", "bptt"))
        summary["gap_closed"] = (lt - lc) / (lt - lb) if lt != lb else math.nan
    return summary


def mean_curve(runs: list[dict], key: str) -> list[tuple[float, float]]:
    points = [dict(r["curves"].get(key, [])) for r in runs]
    steps = sorted(set.intersection(*(set(p) for p in points))) if points else []
    return [(s, float(np.mean([p[s] for p in points]))) for s in steps]


def plot(results: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from biozoo.train.callbacks import plot_learning_curves

    keys = [k for k in ("val/loss", "val/acc", "val/deviation", "val/jerk") if k in results[0]["curves"]]
    series = {f"{t}/{k.split('/')[1]}": mean_curve([r for r in results if r["training"] == t], k)
              for t in TRAININGS for k in keys if any(r["training"] == t for r in results)}
    paths = [plot_learning_curves(series, out / "learning_curves.png", title=f"{title}: mean validation curves")]
    drawn_runs = {r["training"]: r["drawings"] for r in results if r["seed"] == min(x["seed"] for x in results)
                  and "drawings" in r}
    if drawn_runs:
        fig, axes = plt.subplots(1, len(drawn_runs), figsize=(4.2 * len(drawn_runs), 4.2), squeeze=False)
        for ax, (training, d) in zip(axes[0], sorted(drawn_runs.items(), key=lambda kv: TRAININGS.index(kv[0]))):
            drawn, target = np.asarray(d["drawn"]), np.asarray(d["target"])
            for i in range(len(target)):
                color = plt.cm.tab10(i % 10)
                ax.plot(target[i, :, 0], target[i, :, 1], "--", color=color, alpha=0.5)
                ax.plot(drawn[i, :, 0], drawn[i, :, 1], "o-", color=color, ms=3)
            ax.set_title(f"{training} (dashed: target)")
            ax.set_aspect("equal")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{title}: drawings of seed {min(r['seed'] for r in results)}")
        fig.tight_layout()
        fig.savefig(out / "trajectories.png", dpi=110)
        plt.close(fig)
        paths.append(out / "trajectories.png")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ccrnn/seqdigits.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trainings", nargs="+", default=list(TRAININGS), choices=TRAININGS)
    parser.add_argument("--epochs", type=int, default=None, help="override trainer.max_epochs")
    parser.add_argument("--workers", type=int, default=2, help="processes (0: run in this one)")
    parser.add_argument("--out", default=None, help="default: runs/ccrnn_bench/<config name>")
    parser.add_argument("--smoke", action="store_true", help="seed 0, one epoch of 2 batches, in this process")
    parser.add_argument("extra", nargs="*", help="more CLI overrides for every run, after --")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.epochs, args.workers = [0], 1, 0
        args.extra += ["--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
                       "--trainer.limit_test_batches", "1"]
    name = Path(args.config).stem
    out = Path(args.out or f"runs/ccrnn_bench/{name}")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(args.config, t, s, str(out / t / f"seed{s}"), args.epochs, args.extra)
            for s in args.seeds for t in args.trainings]
    if args.workers == 0:
        results = [run_one(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(run_one, *zip(*jobs)))
    summary = summarise(results)
    (out / "summary.json").write_text(json.dumps({"config": args.config, "extra": args.extra, "summary": summary,
                                                  "runs": results}, indent=1) + "\n")
    print(f"\n{name}: final metrics, mean +- std over seeds {args.seeds}")
    for training in TRAININGS:
        if training not in summary:
            continue
        entry = summary[training]
        cells = [f"{k}={m:.4f}+-{s:.4f}" for k, v in entry.items() if isinstance(v, tuple) and k != "seconds"
                 for m, s in [v]]
        print(f"  {training:6s} params={entry['parameters']:7d} time/run={entry['seconds'][0]:5.0f}s  " + "  ".join(cells))
    if "gap_closed" in summary:
        print(f"  gap closed by the cerebellum (val/loss): {100 * summary['gap_closed']:.0f}%")
    for path in plot(results, out, name):
        print(f"  plot: {path}")
    print(f"  summary: {out / 'summary.json'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
