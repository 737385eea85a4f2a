"""NCAP vs MLP learning to swim (data efficiency), body transfer, and MLP-PPO on gymnasium's Swimmer-v5.

    python benchmarks/swimmer_learning.py run --model ncap --seed 0 --steps 200000 --out runs/bench/ncap_s0.json
    python benchmarks/swimmer_learning.py run --model mlp --seed 0 --steps 200000 --out runs/bench/mlp_s0.json
    python benchmarks/swimmer_learning.py gym --steps 1000000 --out runs/bench/gym.json
    python benchmarks/swimmer_learning.py summary runs/bench/*.json      # or the GPU job's runs.json
    python benchmarks/swimmer_learning.py plot runs/bench/*.json --out swimmer_learning.png
    python benchmarks/swimmer_learning.py all --seeds 0 1 2 --steps 200000 --gym-steps 1000000 --jobs 8 --dir runs/bench
    python benchmarks/swimmer_learning.py run --smoke --out /tmp/ncap_smoke.json   # seconds (CI): one rollout

run: one PPO training on the 6-link `swim` task through ControlTask, with the hyper-parameters read from
configs/ncap/swim6_ppo.yaml (ncap) or configs/ncap/swim6_mlp_ppo.yaml (mlp: 64x64 tanh; mlp256: 256x256). Every
`eval_every` env steps the deterministic policy is scored on 5 fixed episodes; the curve is saved as JSON. For
ncap the final weights are then moved, without retraining, to 3, 9 and 12 links (transfer, 5 episodes each).
gym: configs/ncap/gym_swimmer_v5_mlp_ppo.yaml, mlp_policy with PPO on Swimmer-v5 with rl-baselines3-zoo's
setting (SB3 defaults, gamma 0.9999, obs normalisation, time feature; 1 env); deterministic return over 10 episodes.
summary: mean +- std over seeds at each budget (the last evaluation at or before it; returns of 1000), the best
evaluation of each run (what checkpoint selection by val/return keeps), transfer and gym results.
all: everything above as parallel processes (one core each), then the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

CONFIGS = {"ncap": "swim6_ppo.yaml", "mlp": "swim6_mlp_ppo.yaml", "mlp256": "swim6_mlp_ppo.yaml",
           "gym": "gym_swimmer_v5_mlp_ppo.yaml"}


class StopOnSignal:
    """SIGUSR2 (the `all` deadline) ends training after the current rollout, so the run still reports.
    (Not SIGTERM: Lightning's own SIGTERM handler aborts the fit.)"""

    def __init__(self):
        import lightning as L

        class Stop(L.Callback):
            requested = False

            def on_train_batch_end(self, trainer, *args) -> None:
                trainer.should_stop = trainer.should_stop or Stop.requested

        self.callback = Stop()
        signal.signal(signal.SIGUSR2, lambda *_: setattr(Stop, "requested", True))


def train(setting: str, seed: int, steps: int, eval_every: int, eval_episodes: int = 5, smoke: bool = False):
    """One run with the hyper-parameters of the setting's config (the same ones `biozoo fit -c` uses)."""
    import torch
    import yaml

    from biozoo.train.control import fit_policy

    torch.set_num_threads(1)
    config = yaml.safe_load((REPO / "configs" / "ncap" / CONFIGS[setting]).read_text())
    task = {k: v for k, v in config["model"]["init_args"].items()
            if k not in ("total_env_steps", "eval_episodes", "transfer_links")}
    if setting == "mlp256":
        task["model"] = "mlp_policy_256"
    data = config["data"]["init_args"]
    if smoke:  # one short rollout on one env, one evaluation episode
        data["num_envs"], task["ppo"]["steps_per_env"], eval_episodes = 1, 64, 1
        steps = eval_every = 64
    rollout = task["ppo"]["steps_per_env"] * data["num_envs"]
    start = time.time()
    fitted = fit_policy(env_id=data["env_id"], seed=seed, env_kwargs=data.get("env_kwargs"), num_envs=data["num_envs"],
                        rollouts_per_epoch=max(1, eval_every // rollout),
                        vectorization_mode=data.get("vectorization_mode", "sync"), total_env_steps=steps,
                        eval_episodes=eval_episodes, callbacks=[StopOnSignal().callback], **task)
    return fitted, time.time() - start


def cmd_run(args) -> dict:
    from biozoo.train.control import evaluate, transfer_returns

    task, seconds = train(args.model, args.seed, args.steps, args.eval_every, smoke=args.smoke)
    episodes = 1 if args.smoke else 5
    result = {"kind": "swim", "model": args.model, "seed": args.seed, "steps": task.env_steps, "seconds": seconds,
              "parameters": task.model.num_parameters(), "curve": task.history,
              "final": evaluate(task.model, "biozoo/Swimmer-v0", episodes, seed=20_000, n_links=6)}
    if args.model == "ncap":
        links = [3, 12] if args.smoke else [3, 6, 9, 12]
        result["transfer"] = {str(n): r for n, r in transfer_returns(task.model, "biozoo/Swimmer-v0", links,
                                                                      episodes=episodes, seed=10_000).items()}
        result["weights"] = {k: v.flatten().tolist() for k, v in task.model.effective_weights().items()}
    return result


def cmd_gym(args) -> dict:
    from biozoo.train.control import evaluate

    task, seconds = train("gym", args.seed, args.steps, args.eval_every, eval_episodes=3)
    return {"kind": "gym", "model": "mlp_policy", "seed": args.seed, "steps": task.env_steps, "seconds": seconds,
            "curve": task.history, "final": evaluate(task.model, "Swimmer-v5", 10, seed=20_000)}


def at_budget(curve: list, budget: int) -> float:
    """The last evaluation at or before `budget` env steps."""
    values = [r for s, r in curve if s <= budget * 1.02]
    return values[-1] if values else float("nan")


def cmd_summary(files: list[str]) -> str:
    runs = load_runs(files)
    lines = []
    swim = [r for r in runs if r["kind"] == "swim"]
    if swim:
        budgets = sorted({b for b in (0, 25_000, 50_000, 100_000, 200_000, 500_000, 1_000_000)
                          if any(r["steps"] >= b * 0.98 for r in swim)})
        lines.append("swim, 6 links, PPO: deterministic return (of 1000), mean +- std over seeds [n seeds]")
        lines.append("model      params  " + " ".join(f"{f'{b // 1000}k steps':<15}" for b in budgets)
                     + " best (val. pick)  final (5 held-out episodes)")
        for model in sorted({r["model"] for r in swim}):
            rs = [r for r in swim if r["model"] == model]
            cells = []
            for b in budgets:
                v = [at_budget(r["curve"], b) for r in rs if r["steps"] >= b * 0.98]
                cells.append(f"{np.mean(v):6.1f} +- {np.std(v):5.1f}" if v else " " * 15)
            final = [np.mean(r["final"]) for r in rs]
            best = [max(v for _, v in r["curve"]) for r in rs]
            lines.append(f"{model:<10} {rs[0]['parameters']:>6}  " + " ".join(cells)
                         + f" {np.mean(best):6.1f} +- {np.std(best):5.1f}  {np.mean(final):6.1f} +- {np.std(final):5.1f}"
                         + f" [{len(rs)}], {np.mean([r['seconds'] for r in rs]):.0f} s/run")
            lines.append(f"{'':<18}per seed: final " + ", ".join(f"{f:.1f}" for f in final)
                         + "; best " + ", ".join(f"{b:.1f}" for b in best))
        ncap = [r for r in swim if r.get("transfer")]
        if ncap:
            lines.append("transfer of the 6-link-trained NCAP (no retraining), mean over seeds of 5 episodes:")
            for n in sorted({int(k) for r in ncap for k in r["transfer"]}):
                v = [np.mean(r["transfer"][str(n)]) for r in ncap if str(n) in r["transfer"]]
                lines.append(f"  n_links={n:<3} {np.mean(v):6.1f} +- {np.std(v):5.1f}")
            for r in ncap:
                lines.append(f"  seed {r['seed']} weights: " + ", ".join(f"{k}={v[0]:.3f}" for k, v in r["weights"].items()))
    for r in runs:
        if r["kind"] == "gym":
            lines.append(f"Swimmer-v5 MLP-PPO gamma 0.9999, {r['steps']} steps, seed {r['seed']}: return "
                         f"{np.mean(r['final']):.1f} +- {np.std(r['final']):.1f} (10 episodes), {r['seconds']:.0f} s")
    return "\n".join(lines)


def load_runs(files: list[str]) -> list[dict]:
    """Per-run JSON files, or the merged runs.json of the GPU job ({name: run})."""
    runs = []
    for f in files:
        data = json.loads(Path(f).read_text())
        runs += list(data.values()) if "kind" not in data else [data]
    return runs


def cmd_plot(files: list[str], out: str) -> None:
    """Learning curves (mean +- std over seeds) of every swim model against environment steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swim = [r for r in load_runs(files) if r["kind"] == "swim"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({r["model"] for r in swim}):
        curves = [np.array(r["curve"]) for r in swim if r["model"] == model]
        n = min(len(c) for c in curves)
        steps = curves[0][:n, 0]
        values = np.stack([c[:n, 1] for c in curves])
        ax.plot(steps, values.mean(0), label=f"{model} ({len(curves)} seeds)")
        ax.fill_between(steps, values.mean(0) - values.std(0), values.mean(0) + values.std(0), alpha=0.25)
    ax.axhline(900, color="grey", ls=":", lw=1)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return (of 1000)")
    ax.set_title("swim, 6 links, PPO")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def cmd_all(args) -> None:
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    jobs = [me + ["gym", "--steps", str(args.gym_steps), "--out", str(out / "gym.json")]] if args.gym_steps else []
    jobs += [me + ["run", "--model", m, "--seed", str(s), "--steps", str(args.steps), "--eval-every",
                   str(args.eval_every), "--out", str(out / f"{m}_s{s}.json")] for s in args.seeds for m in args.models]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    running: list[subprocess.Popen] = []
    for job in jobs:
        while sum(p.poll() is None for p in running) >= args.jobs:
            time.sleep(0.5)
        running.append(subprocess.Popen(job, env=env, stdout=subprocess.DEVNULL, stderr=open(out / "errors.log", "a")))
    deadline = time.time() + args.deadline if args.deadline else float("inf")
    while any(p.poll() is None for p in running) and time.time() < deadline:
        time.sleep(0.5)
    late = [p for p in running if p.poll() is None]
    for p in late:  # past the deadline: SIGUSR2 ends training after the current rollout, then the run reports
        p.send_signal(signal.SIGUSR2)
        print(f"stopped at the deadline: {' '.join(p.args[2:])}", file=sys.stderr)
    for p in late:
        try:
            p.wait(timeout=args.grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    failed = [p.args for p in running if p.returncode != 0]
    if failed:
        print(f"{len(failed)} run(s) failed or were stopped, see {out / 'errors.log'}", file=sys.stderr)
    files = sorted(str(f) for f in out.glob("*.json"))
    print(cmd_summary(files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--model", choices=["ncap", "mlp", "mlp256"], default="ncap")
    gym = sub.add_parser("gym")
    for p in (run, gym):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
    run.add_argument("--steps", type=int, default=200_000)
    run.add_argument("--eval-every", type=int, default=20_480)
    run.add_argument("--smoke", action="store_true", help="one rollout of 64 steps, 1-episode evaluations")
    gym.add_argument("--steps", type=int, default=1_000_000)
    gym.add_argument("--eval-every", type=int, default=1_000_000)
    summary = sub.add_parser("summary")
    summary.add_argument("files", nargs="+")
    plot = sub.add_parser("plot")
    plot.add_argument("files", nargs="+")
    plot.add_argument("--out", default="swimmer_learning.png")
    everything = sub.add_parser("all")
    everything.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    everything.add_argument("--models", nargs="+", default=["ncap", "mlp"])
    everything.add_argument("--steps", type=int, default=200_000)
    everything.add_argument("--eval-every", type=int, default=20_480)
    everything.add_argument("--gym-steps", type=int, default=1_000_000)
    everything.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    everything.add_argument("--dir", default="runs/bench_swimmer")
    everything.add_argument("--deadline", type=float, default=None, help="seconds; then unfinished runs are stopped")
    everything.add_argument("--grace", type=float, default=30, help="seconds a stopped run has to report")
    args = parser.parse_args()
    if args.cmd == "summary":
        print(cmd_summary(args.files))
    elif args.cmd == "plot":
        cmd_plot(args.files, args.out)
    elif args.cmd == "all":
        cmd_all(args)
    else:
        result = cmd_run(args) if args.cmd == "run" else cmd_gym(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result) + "\n")
        print(cmd_summary([args.out]))


if __name__ == "__main__":
    main()
