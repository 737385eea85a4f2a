"""CTM task losses and evaluation for mazes and QA-MNIST (arXiv 2505.05522; official `utils/losses.py` and
`tasks/mazes/analysis/run.py`).

Losses (registered, used through `SupervisedTask` with `loss: ctm_maze` / `loss: ctm_qamnist`):
- `ctm_maze`: cross-entropy per route step and tick, (B, L, T). The auto-curriculum masks each sample's route to
  its steps up to index p + lookahead - 1, where p is the longest correct prefix over all ticks (at least 1), i.e.
  the correct prefix, the first wrong step and a few beyond it (lookahead 5 as the official default). Per tick the
  masked mean over the route; then, as every CTM loss, the mean of that at the min-loss tick and at the
  most-certain tick. Scored logits: (B, 5, L) at the most-certain tick. Extras: `solve` (whole route right),
  `prefix` (mean correct leading steps) and `curriculum` (mean mask length).
- `ctm_qamnist`: the same min-loss / most-certain mean over the last `answer_ticks` ticks only.

Evaluation (command line: `python -m biozoo.train.ctm_eval maze-eval ...`):
- solve rate = the predicted route (most-certain tick) equals the target exactly, and mean correct prefix;
- generalisation by re-application (official `gen` analysis): walk the predicted route with `follow_route`
  (fault tolerance 2 as the official); if the goal is not reached, repaint the start at the last position and
  run the model again, up to R times. Tabulated against maze size.
- `save_maze_gif`: the predicted route per tick with the attention over the maze overlaid, as GIF and PNG.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biozoo.envs import mazes
from biozoo._core import BiozooError, ModelOutput, as_output

from .ctm import ctm_loss
from .losses import LossOutput, chosen_ticks, min_and_certain, register_loss

N_ACTIONS = 5


def unpack(output: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions (B, out, T), certainties (B, 2, T)) of a CTM result (or an official-style tuple), for the
    CTM-only evaluation tools below."""
    if isinstance(output, (tuple, list)):
        return output[0], output[1]
    return output.predictions, output.certainties


def most_certain_tick(certainties: torch.Tensor) -> torch.Tensor:
    return certainties[:, 1].argmax(-1)


# --- mazes -----------------------------------------------------------------------------------------------------

def route_logits(predictions: torch.Tensor) -> torch.Tensor:
    """(B, L * 5, T) -> (B, L, 5, T)."""
    return predictions.reshape(predictions.shape[0], -1, N_ACTIONS, predictions.shape[-1])


def correct_prefix(routes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Leading steps right, per sample (routes and targets (B, L, ...) broadcast on the trailing dims)."""
    return (routes == targets).long().cumprod(1).sum(1)


def maze_loss(predictions: torch.Tensor, certainties: torch.Tensor, targets: torch.Tensor, lookahead: int = 5,
              use_most_certain: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official maze loss with auto-curriculum; returns (loss, most-certain tick, curriculum length) per sample.

    predictions (B, L, 5, T), certainties (B, 2, T), targets (B, L).
    """
    b, length, _, ticks = predictions.shape
    per_step = F.cross_entropy(predictions.transpose(1, 2), targets[:, :, None].expand(b, length, ticks),
                               reduction="none")  # (B, L, T)
    prefix = correct_prefix(predictions.argmax(2), targets[:, :, None])  # (B, T)
    upto = prefix.clamp(min=1).amax(1) - 1 + lookahead  # official: last correct index (>= 0) + lookahead
    mask = (torch.arange(length, device=targets.device)[None] < upto[:, None]).to(per_step.dtype)  # (B, L)
    per_tick = (per_step * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True)  # (B, T)
    chosen = chosen_ticks(certainties, use_most_certain)
    return min_and_certain(per_tick, chosen), chosen, upto


@register_loss("ctm_maze")
def ctm_maze_loss(output: ModelOutput, target: torch.Tensor | None, lookahead: int = 5, use_most_certain: bool = True,
                  **_: Any) -> LossOutput:
    """The maze loss on per-tick route logits (B, 5, L, T); a model without ticks is one tick (the curriculum
    still masks the route beyond the first mistake + lookahead)."""
    ticks_logits, certainties = as_output(output).per_tick()
    if ticks_logits.dim() != 4 or ticks_logits.shape[1] != N_ACTIONS:
        raise BiozooError(f"ctm_maze needs route logits (B, {N_ACTIONS}, L, T), got {tuple(ticks_logits.shape)}")
    logits = ticks_logits.transpose(1, 2)  # (B, L, 5, T)
    rows = torch.arange(logits.shape[0], device=logits.device)
    if target is None:
        return LossOutput(logits.new_zeros(()), logits[rows, ..., most_certain_tick(certainties)].transpose(1, 2))
    loss, chosen, upto = maze_loss(logits, certainties, target, lookahead, use_most_certain)
    scored = logits[rows, ..., chosen]  # (B, L, 5)
    routes = scored.argmax(-1)
    extras = {"solve": (routes == target).all(1).float().mean(),
              "prefix": correct_prefix(routes, target).float().mean(),
              "curriculum": upto.float().mean()}
    return LossOutput(loss, scored.transpose(1, 2), extras)


def model_expand_range(model: nn.Module, expand_range: bool | None = None) -> bool:
    """The maze input range to feed `model`: `expand_range` if given, else the one it was trained on."""
    return bool(getattr(model, "expand_range", True)) if expand_range is None else expand_range


@torch.no_grad()
def predict_routes(model: nn.Module, images: np.ndarray, expand_range: bool | None = None, batch_size: int = 64
                   ) -> np.ndarray:
    """Routes (N, L) at the most-certain tick for uint8 maze images (N, H, W, 3). `expand_range` None: the input
    range the model records (`model.expand_range`; legacy official maze checkpoints read [0, 1])."""
    expand_range = model_expand_range(model, expand_range)
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = mazes.to_input(images[i:i + batch_size], expand_range).to(device)
        predictions, certainties = unpack(model(x))
        logits = route_logits(predictions)
        rows = torch.arange(len(x), device=device)
        out.append(logits[rows, ..., most_certain_tick(certainties)].argmax(-1).cpu().numpy())
    return np.concatenate(out)


def move_start(image: np.ndarray, position: tuple[int, int]) -> np.ndarray:
    """A copy with the red start repainted at `position` (the old start becomes a free cell)."""
    out = image.copy()
    old = mazes.find_start(image)
    if old is not None:
        out[old] = mazes.FREE
    out[position] = mazes.START
    return out


def solve_by_reapplication(model: nn.Module, images: np.ndarray, max_reapplications: int = 20,
                           fault_tolerance: int = 2, expand_range: bool | None = None, batch_size: int = 64
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Official generalisation protocol; returns (solved (N,) bool, applications used (N,) int).

    Each round the unsolved mazes go through the model; a walk that reaches the goal solves the maze, otherwise the
    start is moved to where the walk ended. A maze whose walk stays put is given up (the next input would be the
    same, so would the output).
    """
    current = images.copy()
    solved = np.zeros(len(images), bool)
    used = np.zeros(len(images), np.int64)
    active = np.arange(len(images))
    for _ in range(max_reapplications):
        if not len(active):
            break
        routes = predict_routes(model, current[active], expand_range, batch_size)
        still = []
        for i, route in zip(active, routes):
            used[i] += 1
            reached, end = mazes.follow_route(current[i], route, fault_tolerance, valid_only=True)
            if reached:
                solved[i] = True
            elif end != mazes.find_start(current[i]) and end != (-1, -1):
                current[i] = move_start(current[i], end)
                still.append(i)
        active = np.asarray(still, dtype=np.int64)
    return solved, used


def evaluate_mazes(model: nn.Module, size: int, n: int = 200, seed: int = 123, route_length: int | None = None,
                   max_reapplications: int = 20, fault_tolerance: int = 2, expand_range: bool | None = None,
                   batch_size: int = 64) -> dict[str, float]:
    """Solve rates on `n` fresh generated mazes of `size`.

    `route_length`: the model's route length (read from the model if None). When every route fits (mazes
    generated with that length) the exact-match solve rate and mean correct prefix are reported too; the
    re-application rate uses mazes with goals anywhere (route_length=None) when `size` is larger than what fits.
    """
    length = route_length or model_route_length(model)
    images, routes = mazes.generate_mazes(size, n, seed, length)
    predicted = predict_routes(model, images, expand_range, batch_size)
    result = {"size": size, "n": n, "route_length": length,
              "solve_exact": float((predicted == routes).all(1).mean()),
              "prefix": float(correct_prefix(torch.from_numpy(predicted), torch.from_numpy(routes)).float().mean()),
              "reach_1": float(np.mean([mazes.follow_route(im, r, 0)[0] for im, r in zip(images, predicted)]))}
    far = np.stack([mazes.generate_maze(size, mazes.maze_seed(seed + 1, i))[0] for i in range(n)])
    solved, used = solve_by_reapplication(model, far, max_reapplications, fault_tolerance, expand_range, batch_size)
    result.update({"reapply_solve": float(solved.mean()), "reapply_mean_applications":
                   float(used[solved].mean()) if solved.any() else math.nan, "max_reapplications": max_reapplications})
    return result


def model_route_length(model: nn.Module) -> int:
    out_dims = getattr(model, "out_dims", None)
    if not out_dims or out_dims % N_ACTIONS:
        raise BiozooError("cannot tell the model's route length (out_dims is not a multiple of 5); pass route_length")
    return out_dims // N_ACTIONS


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of `evaluate_mazes` results."""
    head = ("| size | solve (exact route) | mean correct prefix | reaches goal, 1 pass | "
            "solve by re-application, goal anywhere (R) |")
    lines = [head, "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {r['solve_exact']:.3f} | {r['prefix']:.1f} / {r['route_length']} "
                     f"| {r['reach_1']:.3f} | {r['reapply_solve']:.3f} (R={r['max_reapplications']}) |")
    return "\n".join(lines)


# --- visualisation ---------------------------------------------------------------------------------------------

def _overlay(frame: np.ndarray, attention: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Blend the top-20% attention (upsampled to the maze) over an RGB float frame, as the official viz does."""
    h, w = frame.shape[:2]
    a = torch.from_numpy(attention)[None, None].float()
    a = F.interpolate(a, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    if a.max() > a.min():
        a = (a - a.min()) / (a.max() - a.min())
        a[a < np.percentile(a, 80)] = 0
        frame = frame * (1 - a[..., None]) + 0.8 * a[..., None] * colour[None, None]
    return np.clip(frame, 0, 1)


@torch.no_grad()
def maze_frames(model: nn.Module, image: np.ndarray, expand_range: bool | None = None, scale: int = 8) -> list[np.ndarray]:
    """One uint8 frame per tick: the route predicted at that tick drawn on the maze, attention overlaid."""
    import matplotlib

    model.eval()
    device = next(model.parameters()).device
    out = model(mazes.to_input(image[None], model_expand_range(model, expand_range)).to(device), track=True)
    logits = route_logits(unpack(out)[0])[0]  # (L, 5, T)
    attention = tracked_attention(out)  # (T, h, w) or None
    cmap = matplotlib.colormaps["viridis"]
    frames = []
    ticks = logits.shape[-1]
    for t in range(ticks):
        frame = mazes.draw_route(image, logits[..., t].argmax(-1).cpu().numpy()).astype(np.float32) / 255
        if attention is not None:
            frame = _overlay(frame, attention[t], np.asarray(cmap(t / max(1, ticks - 1))[:3]))
        frames.append(np.kron((frame * 255).astype(np.uint8), np.ones((scale, scale, 1), np.uint8)))
    return frames


def tracked_attention(out: Any) -> np.ndarray | None:
    """Per-tick attention of the first sample over the backbone's feature map, heads averaged: (T, h, w)."""
    attn, shape = getattr(out, "attention", None), getattr(out, "token_shape", None)
    if attn is None or shape is None or len(shape) != 2:
        return None
    attn = attn[:, 0].detach().float().cpu()  # (T, heads, 1, tokens)
    return attn.reshape(attn.shape[0], -1, attn.shape[-1]).mean(1).reshape(-1, *shape).numpy()


def save_maze_gif(model: nn.Module, image: np.ndarray, path: str | Path, expand_range: bool | None = None,
                  fps: int = 10) -> tuple[Path, Path]:
    """Write `<path>.gif` (one frame per tick) and `<path>.png` (the most-certain tick). Returns both paths."""
    from PIL import Image

    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = maze_frames(model, image, expand_range)
    images = [Image.fromarray(f) for f in frames]
    gif, png = path.with_suffix(".gif"), path.with_suffix(".png")
    images[0].save(gif, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    with torch.no_grad():
        x = mazes.to_input(image[None], model_expand_range(model, expand_range))
        certainties = unpack(model(x.to(next(model.parameters()).device)))[1]
    images[int(most_certain_tick(certainties)[0])].save(png)
    return gif, png


# --- QA-MNIST --------------------------------------------------------------------------------------------------

@register_loss("ctm_qamnist")
def ctm_qamnist_loss(output: ModelOutput, target: torch.Tensor | None, answer_ticks: int | None = None,
                     use_most_certain: bool = True, **_: Any) -> LossOutput:
    """The official QA-MNIST loss: the `ctm` loss over the last `answer_ticks` ticks only (read from the result's
    `answer_ticks` when not given)."""
    output = as_output(output)
    ticks_logits, certainties = output.per_tick()
    k = answer_ticks or getattr(output, "answer_ticks", None) or ticks_logits.shape[-1]
    return ctm_loss(ModelOutput(output.logits, ticks_logits[..., -k:], certainties[..., -k:]), target,
                    use_most_certain)
