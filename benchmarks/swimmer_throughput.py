"""Environment throughput of the 6-link swimmer: environment steps per second.

    python benchmarks/swimmer_throughput.py [--steps 3000] [--rounds 5] [--dm-control-path DIR]
    python benchmarks/swimmer_throughput.py --smoke      # seconds (CI): 80 steps, 1 round

Rows (random actions drawn beforehand; 1 thread; median of interleaved rounds):
- biozoo/Swimmer-v0, one env, the bare SwimmerEnv.step (physics + observation + reward);
- the same through gym.make (TimeLimit, order and passive env checkers) and with the harness's time feature;
- 8 envs in a gymnasium SyncVectorEnv and in an AsyncVectorEnv (8 worker processes), counting env steps;
- gymnasium's Swimmer-v5 (3 links, 4 physics steps of 0.01 s per control step), for context;
- dm_control's suite swimmer6 (the same body; its standard target task), when dm_control imports, timed in a
  subprocess in rounds interleaved with our bare SwimmerEnv under the same mujoco. `--dm-control-path` is
  prepended to its PYTHONPATH: dm_control 1.0.50 fails with mujoco 4, so it can live in its own folder with
  its own mujoco (pip install --target DIR dm_control==1.0.50 "mujoco<4").
The ratio biozoo / dm_control (single env, both bare env.step) is the issue's target: >= 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

DM_TIMER = """
import json, sys, time, numpy as np
import mujoco
from dm_control import suite
from biozoo.envs.swimmer import SwimmerEnv
steps, rounds = int(sys.argv[1]), int(sys.argv[2])
dm = suite.load("swimmer", "swimmer6", task_kwargs={"random": 0})
ours = SwimmerEnv(6)
actions = np.random.default_rng(0).uniform(-1, 1, (steps, 5))
rates = {"dm_control": [], "biozoo": []}
for _ in range(rounds):  # interleaved, same process, same mujoco
    dm.reset()
    start = time.perf_counter()
    for a in actions:
        if dm.step(a).last():
            dm.reset()
    rates["dm_control"].append(steps / (time.perf_counter() - start))
    ours.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        ours.step(a)
    rates["biozoo"].append(steps / (time.perf_counter() - start))
print(json.dumps({"rates": rates, "mujoco": mujoco.__version__}))
"""


def time_env(step, reset, actions: np.ndarray, batch: int = 1) -> float:
    reset()
    start = time.perf_counter()
    for a in actions:
        step(a)
    return len(actions) * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dm-control-path", default=None)
    parser.add_argument("--smoke", action="store_true", help="80 steps, one round: checks the code, no figures")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.rounds = 80, 1

    # biozoo.train (torch, torchvision) before mujoco: under MUJOCO_GL=osmesa, importing triton after mujoco has
    # loaded OSMesa segfaults
    from biozoo.train.control import make_env
    import biozoo.envs  # noqa: F401
    from biozoo.envs.swimmer import SwimmerEnv
    import gymnasium as gym
    import mujoco
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    single = rng.uniform(-1, 1, (args.steps, 5)).astype(np.float32)
    batched = rng.uniform(-1, 1, (args.steps // 8, 8, 5)).astype(np.float32)
    gym_actions = rng.uniform(-1, 1, (args.steps, 2)).astype(np.float32)

    def autoreset(env):
        def step(a):
            if env.step(a)[3]:
                env.reset()
        return step

    bare = SwimmerEnv(6)
    wrapped = gym.make("biozoo/Swimmer-v0", n_links=6)
    timed = make_env("biozoo/Swimmer-v0", n_links=6)
    sync = gym.make_vec("biozoo/Swimmer-v0", 8, vectorization_mode="sync", n_links=6)
    asyn = gym.make_vec("biozoo/Swimmer-v0", 8, vectorization_mode="async", n_links=6)
    v5 = gym.make("Swimmer-v5")
    rows = {
        "biozoo/Swimmer-v0, 1 env (SwimmerEnv.step)": (bare.step, lambda: bare.reset(seed=0), single, 1),
        "biozoo/Swimmer-v0, 1 env via gym.make": (autoreset(wrapped), lambda: wrapped.reset(seed=0), single, 1),
        "  + time feature (as the harness runs it)": (autoreset(timed), lambda: timed.reset(seed=0), single, 1),
        "biozoo/Swimmer-v0, 8 envs SyncVectorEnv": (sync.step, lambda: sync.reset(seed=0), batched, 8),
        "biozoo/Swimmer-v0, 8 envs AsyncVectorEnv": (asyn.step, lambda: asyn.reset(seed=0), batched, 8),
        "gymnasium Swimmer-v5, 1 env (3 links)": (autoreset(v5), lambda: v5.reset(seed=0), gym_actions, 1),
    }
    rates: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (step, reset, actions, batch) in rows.items():
            rates[name].append(time_env(step, reset, actions, batch))
    for env in (wrapped, timed, sync, asyn, v5):
        env.close()

    dm = None
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "disable")}
    if args.dm_control_path:
        env["PYTHONPATH"] = os.pathsep.join([args.dm_control_path, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", DM_TIMER, str(args.steps), str(args.rounds)], capture_output=True,
                          text=True, env=env)
    if proc.returncode == 0:
        dm = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        dm_note = f"dm_control not available ({(proc.stderr.strip().splitlines() or ['?'])[-1][:150]})"

    print(f"mujoco {mujoco.__version__}, {args.steps} steps x {args.rounds} rounds, median env steps/s:")
    for name, values in rates.items():
        print(f"  {name:<48} {statistics.median(values):>9.0f}")
    base = statistics.median(rates["biozoo/Swimmer-v0, 1 env (SwimmerEnv.step)"])
    if dm:
        ours, theirs = statistics.median(dm["rates"]["biozoo"]), statistics.median(dm["rates"]["dm_control"])
        print(f"dm_control comparison (one process, interleaved rounds, mujoco {dm['mujoco']}):")
        print(f"  {'biozoo SwimmerEnv, 6 links, 1 env':<48} {ours:>9.0f}")
        print(f"  {'dm_control suite swimmer6, 1 env':<48} {theirs:>9.0f}")
        print(f"ratio biozoo / dm_control (1 env): {ours / theirs:.2f}x (target >= 1)")
    else:
        print(f"  {dm_note}")
    print(f"ratio 8 sync vector envs / 1 env: {statistics.median(rates['biozoo/Swimmer-v0, 8 envs SyncVectorEnv']) / base:.2f}x; "
          f"8 async / 1 env: {statistics.median(rates['biozoo/Swimmer-v0, 8 envs AsyncVectorEnv']) / base:.2f}x")


if __name__ == "__main__":
    main()
