"""NCAP navigation on biozoo/SwimmerNavigate-v0 (dm_control's swimmer target task, 6 links): returns of plain
swimming NCAP, the hard-coded navigator, the trained navigator and a PPO-trained MLP on the same episodes, how
often each reaches the target, B-neuron co-activation (the only case where the contralateral weight acts), and a
plot of head paths with their targets.

    python benchmarks/ncap_navigate.py --episodes 50 --detail 10 --mlp runs/mlp_navigate_export \
        --table results/ncap_navigate.md --plot results/ncap_navigate.png

Episode i starts from reset seed 20000 + i (the cards' held-out seeds); policies act greedily (the mean torque).
Returns come from `biozoo.train.evaluate` (vector envs); reaching, co-activation and the plotted paths from a
step-by-step loop over the first `--detail` episodes (the same episodes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import biozoo.envs  # noqa: F401
import numpy as np
import torch
from biozoo.envs.control import env_spec, make_env
from biozoo.models import create_model, load_pretrained
from biozoo.train.policy import as_policy, evaluate, to_env, to_tensor

ENV = "biozoo/SwimmerNavigate-v0"


def bneurons(model: torch.nn.Module, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    if hasattr(model, "circuit_obs"):
        return model.circuit.bneurons(model.circuit_obs(obs))
    return model.bneurons(obs) if hasattr(model, "bneurons") else None


@torch.no_grad()
def episode(model: torch.nn.Module, seed: int, n_links: int = 6, steps: int | None = None) -> dict[str, Any]:
    env = make_env(ENV, max_episode_steps=steps, n_links=n_links)
    actor = as_policy(model, env_spec(env, ENV, {"n_links": n_links}), critic=False).eval()
    obs, _ = env.reset(seed=seed)
    target = env.unwrapped.model.geom("target").pos[:2].copy()
    rewards, head, dist, both, active = [], [], [], 0, 0
    done = False
    while not done:
        x = to_tensor(obs, "cpu")[None]
        b = bneurons(model, x)
        if b is not None:
            both += int(((b[0] > 0) & (b[1] > 0)).sum())
            active += int(((b[0] > 0) | (b[1] > 0)).sum())
        obs, reward, terminated, truncated, info = env.step(to_env(actor.greedy(actor(x).logits), env.action_space)[0])
        rewards.append(reward)
        head.append(env.unwrapped.data.qpos[:2].copy())
        dist.append(info["target_distance"])
        done = terminated or truncated
    env.close()
    return {"return": float(np.sum(rewards)), "reached": bool(min(dist) <= 0.1), "head": np.array(head),
            "target": target, "coactive": both, "active": active}


def policies(trained: str | None, mlp: str | None) -> dict[str, torch.nn.Module]:
    out = {"ncap, plain swimming (untrained)": create_model("ncap", n_links=6),
           "ncap.swim6, plain swimming (trained to swim)": create_model("ncap.swim6"),
           "ncap_navigator, hard-coded": create_model("ncap_navigator", n_links=6, task="hardcoded"),
           "ncap_navigator, learned at its start": create_model("ncap_navigator", n_links=6, task="learned",
                                                                 task_init="hardcoded")}
    if trained:
        out[f"ncap_navigator, trained ({trained})"] = (create_model(trained) if not Path(trained).exists()
                                                       else load_pretrained(trained))
    if mlp:
        out[f"mlp_policy 64x64, PPO ({mlp})"] = load_pretrained(mlp)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--seed", type=int, default=20000)
    ap.add_argument("--detail", type=int, default=10, help="episodes of the step-by-step loop")
    ap.add_argument("--trained", default="ncap_navigator.reach6", help="a tag or an exported folder")
    ap.add_argument("--mlp", default=None, help="an exported mlp_policy folder trained on the navigate task")
    ap.add_argument("--table", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--plot-episodes", type=int, default=4)
    ap.add_argument("--smoke", action="store_true", help="one 20-step episode per policy (tests the code path)")
    args = ap.parse_args()
    steps = None
    if args.smoke:
        args.episodes, args.detail, args.plot_episodes, steps = 1, 1, 1, 20
    torch.set_num_threads(1)
    rows, paths = [], {}
    for name, model in policies(args.trained, args.mlp).items():
        extra = {} if steps is None else {"max_episode_steps": steps}
        rets = np.array(evaluate(model, ENV, args.episodes, seed=args.seed, n_links=6, **extra))
        eps = [episode(model, args.seed + i, steps=steps) for i in range(args.detail)]
        active = sum(e["active"] for e in eps)
        coact = sum(e["coactive"] for e in eps) / active if active else float("nan")
        weights = {k: round(float(v.mean()), 3) for k, v in getattr(model, "effective_weights", dict)().items()}
        rows.append({"policy": name, "return": float(rets.mean()), "sem": float(rets.std() / np.sqrt(len(rets))),
                     "median": float(np.median(rets)), "reached": float(np.mean([e["reached"] for e in eps])),
                     "coactive": coact, "weights": weights})
        paths[name] = eps[:args.plot_episodes]
        print(json.dumps(rows[-1]), flush=True)
    lines = [(f"NCAP navigation, biozoo/SwimmerNavigate-v0 (6 links), {args.episodes} episodes (reset seeds "
              f"{args.seed}..{args.seed + args.episodes - 1}), greedy actions; return of 1000."), "",
             (f"| policy | return (mean ± s.e.m.) | median | reached the target (first {args.detail}) | "
              f"B-neuron co-activation (first {args.detail}) |"),
             "|---|---|---|---|---|"]
    for r in rows:
        co = "-" if np.isnan(r["coactive"]) else f"{100 * r['coactive']:.1f}%"
        lines.append(f"| {r['policy']} | {r['return']:.1f} ± {r['sem']:.1f} | {r['median']:.1f} | "
                     f"{100 * r['reached']:.0f}% | {co} |")
    lines += ["", ("Co-activation: share of active (step, joint) B-neuron pairs where dorsal and ventral fire "
                   "together (only then does muscle_contra change a torque)."), "",
              "Effective weights: " + "; ".join(f"{r['policy']}: {r['weights']}" for r in rows if r["weights"])]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.table:
        Path(args.table).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        plot(paths, args.plot)


def plot(paths: dict[str, list[dict[str, Any]]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in paths if "learned at its start" not in n and "untrained" not in n]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4.2), sharex=True, sharey=True)
    for ax, name in zip(np.atleast_1d(axes), names):
        for i, e in enumerate(paths[name]):
            color = f"C{i}"
            ax.plot(e["head"][:, 0], e["head"][:, 1], color=color, lw=1.1)
            ax.plot(*e["head"][0], "o", color=color, ms=4)
            ax.add_patch(plt.Circle(e["target"], 0.1, color=color, alpha=0.35))
            ax.plot(*e["target"], "x", color=color, ms=6)
        ax.set_title(name.split(" (")[0] if "trained (" in name or "PPO (" in name else name, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-2.3, 2.3)
        ax.set_ylim(-2.3, 2.3)
        ax.grid(alpha=0.3)
        ax.set_xlabel("x (m)")
    np.atleast_1d(axes)[0].set_ylabel("y (m)")
    fig.suptitle("head paths over 30 s (dot: start; disc: target, radius 0.1 m); same 4 episodes per panel",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
