"""Maze generator speed: 10,000 mazes of 39x39 on one core (target: under 30 s).

    python benchmarks/ctm_mazes.py [--n 10000] [--size 39]
    python benchmarks/ctm_mazes.py --smoke      # 50 mazes of 15x15 (CI; no figures)

Prints the wall time, mazes per second, the ratio to the 30 s budget, and as a same-process baseline the time of
a plain breadth-first solve of each maze (what any route recovery costs) so the generator's cost can be read
relative to it. Also times a cached reload (`generate_mazes(..., cache_dir=...)`).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import deque

import numpy as np
import torch

from biozoo.envs.mazes import FREE, GOAL, START, generate_maze, generate_mazes, maze_seed


def bfs_length(image: np.ndarray) -> int:
    """Shortest path length from start to goal over non-wall pixels (the baseline workload)."""
    free = (image != 0).any(-1)
    start = tuple(np.argwhere((image == START).all(-1))[0])
    goal = tuple(np.argwhere((image == GOAL).all(-1))[0])
    h, w = free.shape
    dist = {start: 0}
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            return dist[goal]
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < h and 0 <= nc < w and free[nr, nc] and (nr, nc) not in dist:
                dist[(nr, nc)] = dist[(r, c)] + 1
                queue.append((nr, nc))
    return -1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--size", type=int, default=39)
    parser.add_argument("--route-length", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="50 mazes of 15x15, routes of 20: checks the code")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.size, args.route_length = 50, 15, 20
    torch.set_num_threads(1)
    assert FREE == (255, 255, 255)

    t0 = time.perf_counter()
    images, routes = generate_mazes(args.size, args.n, seed=0, route_length=args.route_length)
    gen = time.perf_counter() - t0

    m = min(args.n, 1000)
    t0 = time.perf_counter()
    for i in range(m):
        bfs_length(images[i])
    bfs = (time.perf_counter() - t0) * args.n / m

    t0 = time.perf_counter()
    for i in range(m):
        generate_maze(args.size, maze_seed(0, i), None)
    free_goal = (time.perf_counter() - t0) * args.n / m

    with tempfile.TemporaryDirectory() as tmp:
        generate_mazes(args.size, args.n, 0, args.route_length, cache_dir=tmp)
        t0 = time.perf_counter()
        generate_mazes(args.size, args.n, 0, args.route_length, cache_dir=tmp)
        cached = time.perf_counter() - t0

    print(f"generate {args.n} mazes {args.size}x{args.size} (route {args.route_length}): {gen:.2f} s "
          f"({args.n / gen:.0f}/s), {gen / 30:.2f}x the 30 s budget")
    print(f"  goal anywhere (no route_length): {free_goal:.2f} s (extrapolated from {m})")
    print(f"  baseline, BFS solve of each maze: {bfs:.2f} s (extrapolated from {m}); generator/BFS = {gen / bfs:.2f}")
    print(f"  cached reload from .npz: {cached:.3f} s ({gen / cached:.0f}x faster than generating)")


if __name__ == "__main__":
    main()
