"""2D mazes for the Continuous Thought Machine's maze task (Darlow et al. 2025, arXiv 2505.05522, section 5).

The task: given an RGB image of a maze (walls black, free cells white, start red, goal green), output the route
from start to goal as a sequence of actions 0-3 = up / down / left / right (one pixel each), padded with 4 = wait
to a fixed `route_length`. The official repository trains on pre-generated PNGs and has no generator; this module
adds one, plus a reader for the official image folders.

- `generate_maze(size, seed, route_length)`: a perfect maze (a spanning tree of the cell grid, so the route is
  unique) carved by a randomised depth-first search rooted at the start cell. Cells sit on odd pixel coordinates,
  walls on even ones, so any odd `size` >= 5 works. With `route_length` the goal is drawn among the cells whose
  route fits in it, so the padded target is the complete route (the official data instead truncates long
  routes; `load_maze_folder` keeps that behaviour for the official PNGs).
- `load_maze_folder(root, route_length)`: the official `{small,medium,large}/{train,test}` folders of PNGs in which
  the solution is drawn in blue (0, 0, 255). The route is traced from the red pixel along blue pixels to the
  green one (checking up, down, left, right in that order, as the official reader does), truncated or padded to
  `route_length`, and the blue pixels are then whitened so the model never sees the path.
- `augment_maze`: rotations by +-90 degrees and horizontal / vertical flips (each with probability `p`, as the
  official `MazeImageFolder`), with the actions relabelled by transforming their direction vectors.
- `follow_route`: the official solve check (invalid moves are skipped and counted as faults; solved when the
  walk reaches the goal within the fault tolerance).
- `MazeDataModule`: generated mazes (optionally cached on disk as .npz) or the official folders. Inputs are
  float images (3, H, W) in [-1, 1] (`expand_range`, the official default) or [0, 1] (legacy checkpoints).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from biozoo._core import BiozooError, DataNotFoundError, DataSpec, ShapeError

from .datamodules import BiozooDataModule, split_indices

UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
ACTION_NAMES = ("up", "down", "left", "right", "wait")
MOVES = np.array([(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)])  # (d_row, d_col) per action
WALL, FREE = (0, 0, 0), (255, 255, 255)
START, GOAL, PATH = (255, 0, 0), (0, 255, 0), (0, 0, 255)
OFFICIAL_SIZES = {"small": 39, "medium": 39, "large": 99, "extralarge": 99}


# --- generation ---------------------------------------------------------------------------------------------

def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or size < 5 or size % 2 == 0:
        raise ShapeError(f"maze size must be an odd integer >= 5 (cells on odd pixels, walls on even), got {size!r}")


@functools.lru_cache(maxsize=16)
def _cell_neighbours(n: int) -> tuple[tuple[int, ...], ...]:
    """For an n x n cell grid, the flat indices of each cell's 4-neighbours."""
    out = []
    for c in range(n * n):
        r, k = divmod(c, n)
        out.append(tuple(m for m, ok in ((c - n, r > 0), (c + n, r < n - 1), (c - 1, k > 0), (c + 1, k < n - 1)) if ok))
    return tuple(out)


@functools.lru_cache(maxsize=16)
def _blank(size: int) -> np.ndarray:
    img = np.zeros((size, size, 3), np.uint8)
    img[1::2, 1::2] = FREE
    return img


def _carve(n: int, start: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """Randomised depth-first search from `start`: the parent of every cell in the spanning tree and its depth."""
    neighbours = _cell_neighbours(n)
    parent = [-1] * (n * n)
    depth = [0] * (n * n)
    visited = bytearray(n * n)
    visited[start] = 1
    stack = [start]
    rand = rng.random
    while stack:
        c = stack[-1]
        options = [m for m in neighbours[c] if not visited[m]]
        if not options:
            stack.pop()
            continue
        m = options[int(rand() * len(options))]
        visited[m] = 1
        parent[m] = c
        depth[m] = depth[c] + 1
        stack.append(m)
    return parent, depth


def generate_maze(size: int, seed: int, route_length: int | None = None) -> tuple[np.ndarray, list[int]]:
    """A perfect `size` x `size` maze and its route, deterministic in `seed`.

    Returns (image, route): image is (size, size, 3) uint8 with the official colours; route lists the actions
    from start to goal, padded with 4 (wait) to `route_length` when given (the goal is then chosen so the route
    fits). Without `route_length` the goal may be any other cell and the route has its natural length.
    """
    _check_size(size)
    n = (size - 1) // 2
    rng = random.Random(seed)
    start = int(rng.random() * n * n)
    parent, depth = _carve(n, start, rng)
    if route_length is None:
        candidates = [c for c in range(n * n) if c != start]
    else:
        if route_length < 2:
            raise BiozooError(f"route_length must be >= 2 (one cell is two pixel steps), got {route_length}")
        candidates = [c for c in range(n * n) if 0 < 2 * depth[c] <= route_length]
    goal = candidates[int(rng.random() * len(candidates))]

    img = _blank(size).copy()
    child = np.flatnonzero(np.asarray(parent) >= 0)
    par = np.asarray(parent)[child]
    img[child // n + par // n + 1, child % n + par % n + 1] = FREE  # the wall pixel between child and parent
    img[2 * (start // n) + 1, 2 * (start % n) + 1] = START
    img[2 * (goal // n) + 1, 2 * (goal % n) + 1] = GOAL

    cells = [goal]
    while cells[-1] != start:
        cells.append(parent[cells[-1]])
    route: list[int] = []
    for a, b in zip(cells[:0:-1], cells[-2::-1]):  # consecutive cells from start to goal
        step = UP if b == a - n else DOWN if b == a + n else LEFT if b == a - 1 else RIGHT
        route += [step, step]
    if route_length is not None:
        route += [WAIT] * (route_length - len(route))
    return img, route


def maze_seed(seed: int, index: int) -> int:
    """The seed of maze `index` in a set drawn with `seed` (disjoint sets for disjoint seeds)."""
    return (int(seed) << 32) + int(index)


def generate_mazes(size: int, n: int, seed: int = 0, route_length: int = 50,
                   cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`n` mazes as arrays: images (n, size, size, 3) uint8 and routes (n, route_length) int64.

    With `cache_dir` the arrays are stored as one .npz per (size, n, seed, route_length) and reused.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"mazes_s{size}_n{n}_seed{seed}_r{route_length}.npz"
        if path.exists():
            with np.load(path) as f:
                return f["images"], f["routes"]
    images = np.empty((n, size, size, 3), np.uint8)
    routes = np.empty((n, route_length), np.int64)
    for i in range(n):
        images[i], route = generate_maze(size, maze_seed(seed, i), route_length)
        routes[i] = route
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, images=images, routes=routes)
        tmp.replace(path)
    return images, routes


# --- reading and checking routes -----------------------------------------------------------------------------

def _find(image: np.ndarray, colour: tuple[int, int, int]) -> tuple[int, int] | None:
    hits = np.argwhere((image == colour).all(-1))
    return (int(hits[0, 0]), int(hits[0, 1])) if len(hits) else None


def find_start(image: np.ndarray) -> tuple[int, int] | None:
    return _find(image, START)


def find_goal(image: np.ndarray) -> tuple[int, int] | None:
    return _find(image, GOAL)


def route_from_path(image: np.ndarray, route_length: int) -> list[int]:
    """Trace the blue solution path from the red start to the green goal: the actions, truncated or padded."""
    start, goal = find_start(image), find_goal(image)
    if start is None or goal is None:
        raise BiozooError("maze image has no red start or no green goal pixel")
    h, w = image.shape[:2]
    onward = (image == PATH).all(-1) | (image == GOAL).all(-1)
    route: list[int] = []
    pos = start
    while pos != goal and len(route) < route_length:
        onward[pos] = False  # never step back
        for action in (UP, DOWN, LEFT, RIGHT):
            r, c = pos[0] + MOVES[action][0], pos[1] + MOVES[action][1]
            if 0 <= r < h and 0 <= c < w and onward[r, c]:
                route.append(action)
                pos = (int(r), int(c))
                break
        else:
            raise BiozooError(f"the blue path breaks off at pixel {pos} before reaching the goal")
    return route + [WAIT] * (route_length - len(route))


def solve_maze(image: np.ndarray, start: tuple[int, int] | None = None) -> list[int]:
    """The shortest route (actions) from `start` (default: the red pixel) to the goal over non-wall pixels, by BFS."""
    start = start or find_start(image)
    goal = find_goal(image)
    if start is None or goal is None:
        raise BiozooError("maze image has no red start or no green goal pixel")
    h, w = image.shape[:2]
    came = np.full((h, w), -1, np.int8)  # the action that first reached each pixel
    open_ = ~(image == WALL).all(-1)
    open_[start] = False
    frontier = [start]
    while frontier and came[goal] < 0:
        nxt = []
        for r, c in frontier:
            for action in (UP, DOWN, LEFT, RIGHT):
                nr, nc = r + MOVES[action][0], c + MOVES[action][1]
                if 0 <= nr < h and 0 <= nc < w and open_[nr, nc]:
                    open_[nr, nc] = False
                    came[nr, nc] = action
                    nxt.append((int(nr), int(nc)))
        frontier = nxt
    if came[goal] < 0:
        raise BiozooError("the goal cannot be reached from the start")
    route, pos = [], goal
    while pos != start:
        action = int(came[pos])
        route.append(action)
        pos = (pos[0] - MOVES[action][0], pos[1] - MOVES[action][1])
    return route[::-1]


def hide_path(image: np.ndarray) -> np.ndarray:
    """A copy with the blue solution pixels turned white."""
    out = image.copy()
    out[(image == PATH).all(-1)] = FREE
    return out


def follow_route(image: np.ndarray, route, fault_tolerance: int = 0, valid_only: bool = True
                 ) -> tuple[bool, tuple[int, int]]:
    """Walk `route` from the start; return (reached the goal, last position).

    A move into a wall or off the image is a fault; with `valid_only` it is skipped. The walk stops once the
    faults exceed `fault_tolerance` (the official generalisation analysis uses 2).
    """
    pos, goal = find_start(image), find_goal(image)
    if pos is None:
        return False, (-1, -1)
    h, w = image.shape[:2]
    wall = (image == WALL).all(-1)
    faults = 0
    for action in route:
        action = int(action)
        if action == WAIT:
            continue
        r, c = pos[0] + MOVES[action][0], pos[1] + MOVES[action][1]
        if not (0 <= r < h and 0 <= c < w) or wall[r, c]:
            faults += 1
            if faults > fault_tolerance:
                break
            if valid_only:
                continue
        pos = (int(r), int(c))
        if pos == goal:
            return True, pos
    return False, pos


def draw_route(image: np.ndarray, route, colour: tuple[int, int, int] = PATH) -> np.ndarray:
    """A copy of the maze with the cells that `route` visits (valid moves only) painted in `colour`."""
    out = image.copy()
    pos = find_start(image)
    if pos is None:
        return out
    h, w = image.shape[:2]
    wall = (image == WALL).all(-1)
    for action in route:
        r, c = pos[0] + MOVES[int(action)][0], pos[1] + MOVES[int(action)][1]
        if 0 <= r < h and 0 <= c < w and not wall[r, c]:
            pos = (int(r), int(c))
            if tuple(out[pos]) not in (START, GOAL):
                out[pos] = colour
    return out


# --- augmentation ----------------------------------------------------------------------------------------------

def _relabel(transform) -> np.ndarray:
    """Action -> action under a map of direction vectors (wait stays wait)."""
    table = []
    for d in MOVES:
        moved = transform(d)
        table.append(int(np.flatnonzero((MOVES == moved).all(1))[0]))
    return np.array(table)


# np.rot90(k=1) sends pixel (r, c) to (W-1-c, r), so a step (dr, dc) becomes (-dc, dr)
ROT_CCW = _relabel(lambda d: (-d[1], d[0]))
ROT_CW = _relabel(lambda d: (d[1], -d[0]))
FLIP_LR = _relabel(lambda d: (d[0], -d[1]))
FLIP_UD = _relabel(lambda d: (-d[0], d[1]))


def transform_maze(image: np.ndarray, route: np.ndarray, rotate: int = 0, flip_lr: bool = False,
                   flip_ud: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by `rotate` * 90 degrees counter-clockwise (-1, 0 or 1), then flip; the route is relabelled."""
    route = np.asarray(route)
    if rotate:
        image = np.rot90(image, k=rotate, axes=(0, 1))
        route = (ROT_CCW if rotate == 1 else ROT_CW)[route]
    if flip_lr:
        image, route = image[:, ::-1], FLIP_LR[route]
    if flip_ud:
        image, route = image[::-1], FLIP_UD[route]
    return np.ascontiguousarray(image), route


def augment_maze(image: np.ndarray, route: np.ndarray, p: float = 0.5,
                 generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The official augmentation: with probability p each, a +-90 degree rotation, a left-right and an up-down flip."""
    u = torch.rand(4, generator=generator).tolist()
    rotate = (1 if u[1] < 0.5 else -1) if u[0] < p else 0
    return transform_maze(image, route, rotate, u[2] < p, u[3] < p)


# --- datasets --------------------------------------------------------------------------------------------------

def to_input(images: np.ndarray, expand_range: bool = True) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float (..., 3, H, W) in [-1, 1] (or [0, 1] with expand_range=False)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255).movedim(-1, -3)
    return x * 2 - 1 if expand_range else x


class MazeDataset(Dataset):
    """Mazes held as uint8 arrays; returns (image (3, H, W) float, route (L,) int64), augmented if asked."""

    def __init__(self, images: np.ndarray, routes: np.ndarray, augment: bool = False, augment_p: float = 0.5,
                 expand_range: bool = True):
        self.images, self.routes = images, routes
        self.augment, self.augment_p, self.expand_range = augment, augment_p, expand_range

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, route = self.images[index], self.routes[index]
        if self.augment:
            image, route = augment_maze(image, route, self.augment_p)
        return to_input(image, self.expand_range), torch.as_tensor(route, dtype=torch.long)


def load_maze_folder(root: str | Path, route_length: int, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every PNG under `root` (any depth, sorted by path): images with the path hidden, and traced routes."""
    from PIL import Image

    root = Path(root)
    files = sorted(root.rglob("*.png"))
    if not files:
        raise DataNotFoundError(f"no maze PNGs under {root.resolve()}: put the official maze folders "
                                "({small,medium,large}/{train,test}/...) there, or use generated mazes")
    files = files[:limit] if limit else files
    images, routes = [], []
    for f in files:
        with Image.open(f) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        routes.append(route_from_path(image, route_length))
        images.append(hide_path(image))
    if len({im.shape for im in images}) > 1:
        raise ShapeError(f"maze PNGs under {root} have different sizes: {sorted({im.shape for im in images})}")
    return np.stack(images), np.asarray(routes, dtype=np.int64)


def maze_spec(size: int, route_length: int) -> DataSpec:
    """An RGB maze image, one of 5 moves at each of the route's `route_length` steps."""
    return DataSpec("image", (3, size, size), "classes", num_classes=len(ACTION_NAMES), positions=(route_length,),
                    extras={"route_length": route_length})


class MazeDataModule(BiozooDataModule):
    """Mazes for the CTM: generated (`dataset: generated`) or the official folders (`small`, `medium`, `large`).

    Generated: `n_train` / `n_val` / `n_test` mazes of `size` with disjoint seeds (seed, seed+1, seed+2), cached
    under `cache_dir` if given. Official: `data_dir/<dataset>/{train,test}`; validation is split off train.
    """

    def __init__(self, dataset: str = "generated", size: int = 15, route_length: int = 50, n_train: int = 10000,
                 n_val: int = 500, n_test: int = 1000, data_dir: str = "data/mazes", cache_dir: str | None = None,
                 augment: bool = True, augment_p: float = 0.5, expand_range: bool = True, batch_size: int = 64,
                 num_workers: int = 0, seed: int = 0, val_fraction: float = 0.1, limit: int | None = None):
        super().__init__(data_dir=data_dir, batch_size=batch_size, num_workers=num_workers, seed=seed,
                         val_fraction=val_fraction)
        if dataset != "generated" and dataset not in OFFICIAL_SIZES:
            raise BiozooError(f"maze dataset must be 'generated' or one of {sorted(OFFICIAL_SIZES)}, got {dataset!r}")
        if dataset == "generated":
            _check_size(size)
        self.dataset, self.size, self.route_length = dataset, size, route_length
        self.n_train, self.n_val, self.n_test = n_train, n_val, n_test
        self.cache_dir, self.limit = cache_dir, limit
        self.augment, self.augment_p, self.expand_range = augment, augment_p, expand_range

    @property
    def image_size(self) -> int:
        if self.dataset == "generated":
            return self.size
        from PIL import Image

        first = next((self.data_dir / self.dataset / "train").rglob("*.png"), None)
        if first is None:
            return OFFICIAL_SIZES[self.dataset]
        with Image.open(first) as im:
            return im.size[1]

    @property
    def spec(self) -> DataSpec:
        return maze_spec(self.image_size, self.route_length)

    def build_datasets(self):
        make = lambda arrays, augment: MazeDataset(*arrays, augment=augment and self.augment,  # noqa: E731
                                                   augment_p=self.augment_p, expand_range=self.expand_range)
        if self.dataset == "generated":
            sets = [generate_mazes(self.size, n, self.seed + k, self.route_length, self.cache_dir)
                    for k, n in enumerate((self.n_train, self.n_val, self.n_test))]
            return make(sets[0], True), make(sets[1], False), make(sets[2], False)
        root = self.data_dir / self.dataset
        images, routes = load_maze_folder(root / "train", self.route_length, self.limit)
        val_idx, train_idx = split_indices(len(images), (self.val_fraction,), self.seed)
        test = load_maze_folder(root / "test", self.route_length, self.limit)
        return make((images[train_idx], routes[train_idx]), True), make((images[val_idx], routes[val_idx]), False), \
            make(test, False)
