"""Start-up time of the light `biozoo` commands against `python -c "import torch"`.

    python benchmarks/cli_startup.py [--repeats 7] [--json out.json]
    python benchmarks/cli_startup.py --smoke     # each command once, no warm-up round (CI; no figures)

Each command runs in a fresh subprocess (output discarded), the commands interleaved round by round so that load
on the machine hits them alike; the table gives each one's median wall time and its ratio to the torch import.
The target (issue 15): `biozoo list`, `biozoo --help` and `biozoo convert --help` within 1.5x of importing torch.
`biozoo` is the installed console script next to this Python, or `python -m biozoo` when there is none.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = 1.5


def biozoo_command() -> list[str]:
    script = Path(sys.executable).with_name("biozoo")
    if script.exists():
        return [str(script)]
    found = shutil.which("biozoo")
    return [found] if found else [sys.executable, "-m", "biozoo"]


def commands() -> dict[str, list[str]]:
    biozoo = biozoo_command()
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "biozoo list": [*biozoo, "list"],
        "biozoo --help": [*biozoo, "--help"],
        "biozoo convert --help": [*biozoo, "convert", "--help"],
        'python -c "import biozoo"': [sys.executable, "-c", "import biozoo"],
    }


def time_once(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr[-1000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="each command once, no warm-up: checks the code")
    args = parser.parse_args(argv)
    cmds = commands()
    if args.smoke:
        args.repeats = 1
    for argv_ in [] if args.smoke else cmds.values():  # warm the file cache; not timed
        time_once(argv_)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.repeats):
        for name, argv_ in cmds.items():
            times[name].append(time_once(argv_))
    medians = {name: statistics.median(t) for name, t in times.items()}
    base = medians['python -c "import torch"']
    print(f"median of {args.repeats} runs each, interleaved; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print(f"{'command':<28} {'seconds':>8} {'x torch':>8}")
    for name, seconds in medians.items():
        print(f"{name:<28} {seconds:8.2f} {seconds / base:8.2f}")
    worst = max(medians[name] / base for name in ("biozoo list", "biozoo --help", "biozoo convert --help"))
    print(f"slowest light command: {worst:.2f}x torch (target <= {TARGET}x): {'met' if worst <= TARGET else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"repeats": args.repeats, "seconds": times, "median": medians,
                                               "ratio": {n: s / base for n, s in medians.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
