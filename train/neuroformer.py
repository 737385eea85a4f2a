"""Neuroformer training and evaluation (Antoniades et al., ICLR 2024; official neuroformer_train.py,
simulation.py, analysis.py, attention_vis.py).

- `neuroformer` loss: w_id CE(next ID) + w_dt CE(next dt) (PAD ignored, EOS a regular target) + w_clip InfoNCE
  + w_beh (MSE or CE of the behaviour head); defaults 0.45 / 0.30 / 0.25 / 1.0, the official weights.
- `NeuroformerTask`: pretraining, or few-shot behaviour fine-tuning from a pretrained checkpoint
  (`finetune_from`: a folder or a shipped tag; new heads start fresh, everything else must match).
  Logs train/loss, val/loss, val/id_loss, val/dt_loss, val/clip_loss, val/id_acc (the official per-batch
  "precision/recall/F1", which are micro averages and so equal accuracy), val/id_f1 (macro over neurons) and,
  when fine-tuning, val/behaviour_r and val/behaviour_r2 (or val/behaviour_acc).
- The evaluation harness (`evaluate`):
  * next-ID: teacher-forced top-1 precision / recall / F1 (micro and macro over neurons, EOS and PAD excluded),
    and, as in the official `compute_scores`, the set of neurons generated for each held-out window from its
    true past against the set that fired (precision = |both| / |generated|, recall = |both| / |fired|), for
    Neuroformer and for a Poisson GLM with coupling, history and a linear stimulus filter fit to the same data;
  * rates: each test trial generated window by window from the model's own past (top-p 0.95), per-neuron PSTH
    (trial-averaged counts in `psth_bin` bins), Pearson r per neuron against the real PSTH, averaged over
    neurons (official `calc_corr_psth`), with the GLM and a real-vs-real split-half ceiling alongside;
  * connectivity: attention from a query that predicts neuron i (its next-ID target) to the past tokens of
    neuron j, averaged over held-out windows and normalised by how much j is attended overall; AUROC against
    the simulator's adjacency (off-diagonal pairs), next to two references that read the spikes directly: the
    GLM's coupling weights and the one-bin cross-correlogram (`lagged_lift`);
  * behaviour: Pearson r and R^2 of the fine-tuned head on held-out windows, against ridge regression on the
    spike counts of the same windows (current + past) trained on the same few-shot windows;
  * a raster of real against generated spikes (`raster.png`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from torchmetrics import PearsonCorrCoef, R2Score
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from biozoo._core import CheckpointError, ModelOutput
from biozoo.models import BiozooError
from biozoo.models import create_model, get_pretrained_cfg, list_pretrained, pretrained_dir
from biozoo.models.neuroformer import Neuroformer, init_from_pretrained, record_attention

from .losses import LossOutput, register_loss
from .tasks import BiozooTask, build_model


@register_loss("neuroformer")
def neuroformer_loss(output: ModelOutput, target: dict[str, torch.Tensor] | None, id_weight: float = 0.45,
                     dt_weight: float = 0.30, clip_weight: float = 0.25, behaviour_weight: float = 1.0,
                     id_pad: int = -100, dt_pad: int = -100, **_: Any) -> LossOutput:
    """The weighted Neuroformer objective; logits = next-ID logits (B, C, T) for the metrics."""
    logits = output.logits
    if target is None:
        return LossOutput(logits.new_zeros(()), logits)
    extras = {"id_loss": F.cross_entropy(logits, target["id_target"], ignore_index=id_pad),
              "dt_loss": F.cross_entropy(output["dt_logits"].transpose(1, 2), target["dt_target"], ignore_index=dt_pad)}
    loss = id_weight * extras["id_loss"] + dt_weight * extras["dt_loss"]
    if "clip_loss" in output and clip_weight:
        extras["clip_loss"] = output["clip_loss"]
        loss = loss + clip_weight * extras["clip_loss"]
    if "behaviour" in output and "behaviour_target" in target:
        pred, y = output["behaviour"], target["behaviour_target"]
        extras["behaviour_loss"] = F.mse_loss(pred, y.float()) if y.dtype.is_floating_point else F.cross_entropy(pred, y)
        loss = loss + behaviour_weight * extras["behaviour_loss"]
    return LossOutput(loss, logits, extras)


def resolve_checkpoint(name_or_path: str) -> Path:
    """A folder / .safetensors path, or a shipped tag such as 'neuroformer.sim100'."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if "." in name_or_path and "/" not in name_or_path:
        model, tag = name_or_path.split(".", 1)
        return pretrained_dir(get_pretrained_cfg(model, tag))
    tags = ", ".join(k for k in list_pretrained() if k.startswith("neuroformer"))
    raise CheckpointError(f"no checkpoint at {name_or_path} (give a folder with config.json + model.safetensors, "
                          f"or a tag: {tags})")


def build_finetune_model(checkpoint: str, model_kwargs: dict[str, Any], data_dims: dict[str, Any]) -> Neuroformer:
    """The pretrained architecture plus the data's behaviour head; pretrained weights everywhere but the head."""
    folder = resolve_checkpoint(checkpoint)
    folder = folder if folder.is_dir() else folder.parent
    config = json.loads((folder / "config.json").read_text())
    head = {k: data_dims[k] for k in ("behaviour_head", "n_behaviour_out") if k in data_dims}
    model = create_model(config["model"], **{**config["kwargs"], **head, **model_kwargs})
    return init_from_pretrained(model, folder)


class NeuroformerTask(BiozooTask):
    """Pretrains a Neuroformer (generative + contrastive), or fine-tunes a behaviour head (`finetune_from`).

    Args:
        model / model_kwargs / data_dims: as SupervisedTask (the data's token and frame sizes are linked in).
        loss_kwargs: id_weight, dt_weight, clip_weight, behaviour_weight.
        finetune_from: a pretrained folder or tag ('neuroformer.sim100'); its architecture is kept, the data's
            behaviour head is added. freeze_backbone: train only the behaviour head.
    """

    def __init__(self, model: str = "neuroformer", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, loss_kwargs: dict[str, Any] | None = None,
                 finetune_from: str | None = None, freeze_backbone: bool = False, pretrained: bool | str = False,
                 checkpoint_path: str | None = None, lr: float = 1e-3, weight_decay: float = 0.01,
                 warmup_steps: int = 100, scheduler: str = "cosine", min_lr_ratio: float = 0.1):
        super().__init__(lr, weight_decay, warmup_steps, scheduler, min_lr_ratio)
        self.save_hyperparameters()
        if finetune_from:
            self.model = build_finetune_model(finetune_from, model_kwargs or {}, data_dims or {})
        else:
            self.model = build_model(model, model_kwargs, data_dims, pretrained, checkpoint_path)
        if freeze_backbone:
            for name, p in self.model.named_parameters():
                p.requires_grad = name.startswith("behaviour_head.")
        m = self.model
        self.loss_kwargs = {**(loss_kwargs or {}), "id_pad": m.pad, "dt_pad": m.dt_pad}
        self.metrics = torch.nn.ModuleDict({
            "id_acc": MulticlassAccuracy(m.id_vocab, average="micro", ignore_index=m.pad),
            "id_f1": MulticlassF1Score(m.id_vocab, average="macro", ignore_index=m.pad)})
        self.head = getattr(m, "behaviour_head_kind", "none")
        if self.head == "regression":
            self.metrics["behaviour_r"] = PearsonCorrCoef()
            self.metrics["behaviour_r2"] = R2Score()
        elif self.head == "classification":
            self.metrics["behaviour_acc"] = MulticlassAccuracy(m.behaviour_head.out_features, average="micro")

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.model(batch)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        out = self.model(batch)
        result = neuroformer_loss(out, batch, **self.loss_kwargs)
        n = len(batch["id"])
        self.log(f"{stage}/loss", result.loss, prog_bar=True, on_step=stage == "train", on_epoch=True, batch_size=n,
                 sync_dist=stage != "train")
        for name, value in result.extras.items():
            self.log(f"{stage}/{name}", value, on_step=False, on_epoch=True, batch_size=n, sync_dist=stage != "train")
        if stage != "train":
            self.score(out, batch, stage)
        return result.loss

    def score(self, out: dict[str, Any], batch: dict[str, torch.Tensor], stage: str) -> None:
        targets = batch["id_target"]
        neuron = targets < self.model.n_neurons  # EOS and PAD excluded
        if neuron.any():  # a batch of silent windows has no next-ID targets
            preds = out["id_logits"].argmax(-1)[neuron]
            for name in ("id_acc", "id_f1"):
                self.metrics[name](preds, targets[neuron])
                self.log(f"{stage}/{name}", self.metrics[name], on_step=False, on_epoch=True)
        if "behaviour" in out and "behaviour_target" in batch:
            pred, y = out["behaviour"], batch["behaviour_target"]
            if self.head == "regression":
                for name in ("behaviour_r", "behaviour_r2"):
                    self.metrics[name](pred[:, 0].float(), y[:, 0].float())
                    self.log(f"{stage}/{name}", self.metrics[name], on_step=False, on_epoch=True)
            else:
                self.metrics["behaviour_acc"](pred, y)
                self.log(f"{stage}/behaviour_acc", self.metrics["behaviour_acc"], on_step=False, on_epoch=True)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "test")


# Evaluation harness -----------------------------------------------------------------------------------------------

def _stack(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    from biozoo.envs.spikes import collate_windows

    return collate_windows(items, pad_id)


def window_batches(dataset: Dataset, pad_id: int, batch_size: int = 64,
                   max_windows: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The first `max_windows` windows of `dataset` (all by default), in order, as padded batches."""
    idx = np.arange(len(dataset))[:max_windows]
    for s in range(0, len(idx), batch_size):
        yield _stack([dataset[int(i)] for i in idx[s:s + batch_size]], pad_id)


def set_scores(true_sets: list[set[int]], pred_sets: list[set[int]]) -> dict[str, float]:
    """Per-window precision / recall / F1 of generated vs real neuron sets, averaged over windows in which
    either fired (official analysis.compute_scores with the standard set definitions)."""
    p, r, f = [], [], []
    for true, pred in zip(true_sets, pred_sets):
        if not true and not pred:
            continue
        tp = len(true & pred)
        prec = tp / len(pred) if pred else 0.0
        rec = tp / len(true) if true else 0.0
        p.append(prec)
        r.append(rec)
        f.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return {"precision": float(np.mean(p)), "recall": float(np.mean(r)), "f1": float(np.mean(f))}


@torch.no_grad()
def teacher_forced_scores(model: Neuroformer, dataset: Dataset, batch_size: int = 64,
                          max_windows: int | None = None) -> dict[str, float]:
    """Top-1 next-ID precision / recall / F1 under teacher forcing: micro (= accuracy, what the official code
    logs) and macro over neurons that occur as targets. EOS and PAD targets are excluded."""
    model.eval()
    n = model.n_neurons
    tp, fp, fn = np.zeros(model.id_vocab), np.zeros(model.id_vocab), np.zeros(model.id_vocab)
    for batch in window_batches(dataset, model.pad, batch_size, max_windows):
        logits = model(batch)["id_logits"]
        target = batch["id_target"]
        keep = target < n
        pred, true = logits.argmax(-1)[keep].numpy(), target[keep].numpy()
        hit = pred == true
        np.add.at(tp, true[hit], 1)
        np.add.at(fp, pred[~hit], 1)
        np.add.at(fn, true[~hit], 1)
    tp, fp, fn = tp[:n], fp[:n], fn[:n]
    support = (tp + fn) > 0
    prec = np.divide(tp, tp + fp, out=np.zeros(n), where=(tp + fp) > 0)
    rec = np.divide(tp, tp + fn, out=np.zeros(n), where=(tp + fn) > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros(n), where=(prec + rec) > 0)
    micro = tp.sum() / max(1.0, (tp + fn).sum())
    return {"micro_f1": float(micro), "macro_precision": float(prec[support].mean()),
            "macro_recall": float(rec[support].mean()), "macro_f1": float(f1[support].mean())}


@torch.no_grad()
def generate_true_past(model: Neuroformer, dataset: Dataset, windows: np.ndarray, seed: int = 0,
                       batch_size: int = 128, top_p: float = 0.95) -> list[set[int]]:
    """For each window, sample the current window from its real past (official --true_past); neuron sets."""
    g = torch.Generator().manual_seed(seed)
    sets = []
    for s in range(0, len(windows), batch_size):
        items = [dataset[int(i)] for i in windows[s:s + batch_size]]
        batch = _stack(items, model.pad)
        out = model.generate(batch, n_windows=1, top_p=top_p, generator=g)
        sets += [set(ids.tolist()) for ids, _ in out["spikes"]]
    return sets


def true_sets(dataset: Any, windows: np.ndarray) -> list[set[int]]:
    out = []
    for i in windows:
        end = int(dataset.end_bins[i])
        ids, _ = dataset.events(end - dataset.tok.window_bins, end)
        out.append(set(ids.tolist()))
    return out


@torch.no_grad()
def generate_trials(model: Neuroformer, data: Any, tokenizer: Any, starts: list[float], duration: float,
                    seed: int = 0, top_p: float = 0.95, frame_window: float = 0.15,
                    behaviour: str = "input") -> list[tuple[np.ndarray, np.ndarray]]:
    """Free-running generation of each trial [start, start + duration) from the real past before it, with the
    real frames and behaviour; returns per trial (ids, times relative to its start)."""
    from biozoo.envs.spikes import SpikeWindows

    n_windows = int(round(duration / tokenizer.window))
    start_bins = [tokenizer.to_bins(s + 1e-9) for s in starts]
    ends = np.array([[b + (w + 1) * tokenizer.window_bins for w in range(n_windows)] for b in start_bins])
    use_frames = model.video_encoder is not None
    beh = behaviour if model.behaviour_mlp is not None else "none"
    ds = SpikeWindows(data, tokenizer, ends.reshape(-1), frame_window, use_frames, beh)
    context = lambda w: _stack([ds[int(r * n_windows + w)] for r in range(len(starts))], model.pad)  # noqa: E731
    out = model.generate(context(0), n_windows=n_windows, context_fn=context, top_p=top_p,
                         generator=torch.Generator().manual_seed(seed))
    return [(ids, bins * tokenizer.resolution) for ids, bins in out["spikes"]]


def psth(trials: list[tuple[np.ndarray, np.ndarray]], n_neurons: int, duration: float, bin_s: float) -> np.ndarray:
    """Trial-averaged counts (n_neurons, n_bins)."""
    n_bins = int(round(duration / bin_s))
    out = np.zeros((n_neurons, n_bins))
    for ids, times in trials:
        b = np.floor(times / bin_s + 1e-9).astype(np.int64)
        keep = (b >= 0) & (b < n_bins)
        np.add.at(out, (ids[keep], b[keep]), 1)
    return out / max(1, len(trials))


def rate_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r per neuron between two (n_neurons, n_bins) rate arrays (NaN where either is constant)."""
    a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    den = np.sqrt((a ** 2).sum(1) * (b ** 2).sum(1))
    return np.divide((a * b).sum(1), den, out=np.full(len(a), np.nan), where=den > 0)


def real_trials(data: Any, starts: list[float], duration: float) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for s in starts:
        keep = (data.spike_times >= s) & (data.spike_times < s + duration)
        out.append((data.spike_ids[keep], data.spike_times[keep] - s))
    return out


READOUTS = ("raw", "rollout", "grad")


def fused_heads(att: torch.Tensor) -> torch.Tensor:
    """(B, H, T, S) -> (B, T, S) as the official rollout fuses heads: the max over heads."""
    return att.max(1).values


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020) of square self-attention maps, first layer first: the product of
    (A + I) / 2, rows renormalised, as the official `rollout_attentions` (which skips the first layer)."""
    eye = torch.eye(maps[0].shape[-1], dtype=maps[0].dtype)
    result = eye.expand_as(maps[0])
    for a in maps:
        a = (a + eye) / 2
        result = (a / a.sum(-1, keepdim=True)) @ result
    return result


def window_attention(model: Neuroformer, batch: dict[str, torch.Tensor], layers: str, readout: str) -> torch.Tensor:
    """(B, T, S) attention from each current position t (whose next ID is the target) to each key s: the past
    tokens ('history') or the earlier current tokens ('decoder'), read in one of READOUTS:
    - 'raw': the layers' attention, mean over heads and layers;
    - 'rollout': for 'decoder', the rollout of the state-encoder and decoder self-attention; for 'history', the
      cross-attention (heads fused by max, mean over layers) carried through the decoder's rollout, the path a past
      token takes to the output at t (the official multiplies cross-attention maps elementwise instead);
    - 'grad': gradient rollout, attention weighted by its gradient with respect to the predicted ID, the official
      `interpret`: sum over positions of the target ID's logit, backward, then (dlogit/dA).clamp(0) * A, mean over
      heads, summed over the layers."""
    own = list(model.history_blocks) if layers == "history" else list(model.decoder)
    square = [*model.state_encoder, *model.decoder]
    blocks = own + (square if readout == "rollout" else [])
    with record_attention(list(dict.fromkeys(blocks))):
        if readout == "grad":
            with torch.enable_grad():
                out = model(batch)
                target = batch["id_target"].clamp_max(model.id_vocab - 1)
                picked = out["id_logits"].gather(-1, target.unsqueeze(-1)).squeeze(-1)
                picked = picked.masked_fill(batch["id_target"] == model.pad, 0.0)
                picked.sum().backward()
            att = sum((blk.attn.attention.grad.clamp_min(0) * blk.attn.attention).mean(1) for blk in own)
            model.zero_grad(set_to_none=True)
            return att.detach().double()
        with torch.no_grad():
            model(batch)
        if readout == "raw":
            return torch.stack([blk.attn.attention.mean(1) for blk in own]).mean(0).double()
        if layers == "decoder":
            return rollout([fused_heads(blk.attn.attention).double() for blk in square])
        cross = torch.stack([fused_heads(blk.attn.attention) for blk in own]).mean(0).double()
        return rollout([fused_heads(blk.attn.attention).double() for blk in model.decoder]) @ cross


def attention_connectivity(model: Neuroformer, dataset: Dataset, batch_size: int = 64,
                           max_windows: int | None = None, layers: str = "history",
                           uniform: bool = False, readout: str = "raw", normalise: bool = False) -> np.ndarray:
    """(n_neurons, n_neurons) score for j -> i (source row j, target column i), accumulated the official way
    (attention_vis.get_att_neurons, `attention_scores[target, keys] += score`): the attention that queries
    predicting neuron i pay to tokens of neuron j ('history': the past window; 'decoder': the current window),
    read by `window_attention` (`readout`) and summed over windows. `normalise` divides it by the number of i
    targets and by the average score that tokens of j receive (not official).

    `uniform=True` replaces the attention by equal weights on every key the layer may attend to: the same readout
    with no model in it (what an untrained model gives), i.e. how often j's tokens precede i's. Attention at a
    query is computed before the next neuron is known, so this co-occurrence is the part of the score that any
    model inherits from the data; the model's contribution is the difference. 'grad' conditions on the target."""
    if readout not in READOUTS:
        raise BiozooError(f"unknown attention readout {readout!r}; one of {', '.join(READOUTS)}")
    model.eval()
    n = model.n_neurons
    total, rows = torch.zeros(n + 3, n + 3, dtype=torch.float64), torch.zeros(n + 3, dtype=torch.float64)
    for batch in window_batches(dataset, model.pad, batch_size, max_windows):
        keys = batch["id_prev"] if layers == "history" else batch["id"]
        if uniform:
            t = batch["id"].shape[1]
            allowed = ((keys != model.pad)[:, None, :].expand(-1, t, -1) if layers == "history"
                       else model.causal[:t, :t].expand(len(keys), -1, -1)).double()
            att = allowed / allowed.sum(-1, keepdim=True)
        else:
            att = window_attention(model, batch, layers, readout)
        q = F.one_hot(batch["id_target"], n + 3).double()  # (B, T, V)
        k = F.one_hot(keys, n + 3).double()  # (B, S, V)
        total += torch.einsum("bti,bts,bsj->ij", q, att, k)
        rows += q.sum((0, 1))
    if not normalise:
        return total[:n, :n].t().numpy()  # [j, i]
    per_target = (total / rows.clamp_min(1)[:, None])[:n, :n]  # [i, j]: mean attention of i-queries to j
    score = per_target / per_target.mean(0, keepdim=True).clamp_min(1e-12)
    return score.t().numpy()  # [j, i]


def direction_auroc(score: np.ndarray, adjacency: np.ndarray, sources: np.ndarray | None = None) -> dict[str, float]:
    """Whether `score` [j, i] tells an edge's direction: over the one-way edges j -> i (from `sources`, e.g. the
    hubs, if given), AUROC of score[j, i] (true direction) against score[i, j] (reversed), and the fraction of
    edges whose true direction scores higher (0.5 = chance for both)."""
    from sklearn.metrics import roc_auc_score

    one_way = (adjacency > 0) & (adjacency.T <= 0)
    if sources is not None:
        keep = np.zeros(len(adjacency), dtype=bool)
        keep[np.asarray(sources, dtype=int)] = True
        one_way &= keep[:, None]
    j, i = np.nonzero(one_way)
    true, reverse = score[j, i], score[i, j]
    labels = np.r_[np.ones(len(true)), np.zeros(len(reverse))]
    return {"auroc": float(roc_auc_score(labels, np.r_[true, reverse])), "paired": float(np.mean(true > reverse)),
            "edges": int(len(true))}


def lagged_lift(data: Any, t0: float, t1: float, resolution: float = 0.01) -> np.ndarray:
    """(N, N) [j, i]: how much more often i spikes in the bin after a spike of j than on average (the
    cross-correlogram at one bin): what the spikes alone say about connectivity, a reference for attention."""
    counts = data.counts(resolution, t0, t1)
    follow = counts[:, :-1] @ counts[:, 1:].T
    return follow / np.outer(counts[:, :-1].sum(1), counts[:, 1:].mean(1)).clip(1e-12)


def connectivity_auroc(score: np.ndarray, adjacency: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    off = ~np.eye(len(adjacency), dtype=bool)
    return float(roc_auc_score((adjacency[off] > 0).astype(int), score[off]))


def plot_raster(real: tuple[np.ndarray, np.ndarray], generated: tuple[np.ndarray, np.ndarray], path: str | Path,
                seconds: float = 3.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True, sharey=True)
    for ax, (ids, times), title in zip(axes, (real, generated), ("real (held out)", "generated (own past)")):
        keep = times < seconds
        ax.scatter(times[keep], ids[keep], s=2, c="k", marker="|")
        ax.set_title(title)
        ax.set_ylabel("neuron")
    axes[-1].set_xlabel("time in trial (s)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


class PoissonGLM:
    """The GLM baseline: per neuron and bin of `resolution`, log rate = b + history/coupling filters on every
    neuron's counts in lag groups (1, 2, 3-4, 5-8, 9-16 bins) + a linear filter on the current frame's pixels
    + the behaviour; fit by L-BFGS on the Poisson likelihood with an L2 penalty."""

    lags = ((1, 1), (2, 2), (3, 4), (5, 8), (9, 16))

    def __init__(self, data: Any, resolution: float, l2: float = 1e-4, behaviour: bool = True):
        self.data, self.res, self.l2 = data, resolution, l2
        self.n = data.n_neurons
        self.use_frames = data.frames is not None
        self.use_beh = behaviour and data.behaviour is not None
        if self.use_frames:
            f = data.frames.reshape(len(data.frames), -1)
            self.pixels = (f - f.mean()) / (f.std() + 1e-8)
        self.history = self.lags[-1][1]

    def covariates(self, bins: np.ndarray) -> np.ndarray:
        """Stimulus and behaviour features of absolute bins: (..., P)."""
        t = bins * self.res
        parts = []
        if self.use_frames:
            parts.append(self.pixels[self.data.frame_at(t + 1e-9)])
        if self.use_beh:
            parts.append(self.data.behaviour_at(t + 1e-9))
        return np.concatenate(parts, -1).astype(np.float32) if parts else np.zeros(bins.shape + (0,), np.float32)

    def history_features(self, hist: torch.Tensor) -> torch.Tensor:
        """hist (..., H, N) counts of the last H bins, oldest first -> (..., len(lags) * N)."""
        return torch.cat([hist[..., hist.shape[-2] - b:hist.shape[-2] - a + 1, :].sum(-2) for a, b in self.lags], -1)

    def fit(self, t0: float, t1: float, iters: int = 40) -> "PoissonGLM":
        counts = torch.from_numpy(self.data.counts(self.res, t0, t1).T.copy())  # (T, N)
        csum = torch.cat([torch.zeros(1, self.n), counts.cumsum(0)])
        t = torch.arange(self.history, len(counts))
        hist = torch.cat([csum[t - a + 1] - csum[t - b] for a, b in self.lags], -1)  # (T', lags * N)
        cov = torch.from_numpy(self.covariates(np.arange(len(counts))[self.history:] + int(round(t0 / self.res))))
        x = torch.cat([hist, cov], -1)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        x = (x - self.mu) / self.sd
        y = counts[self.history:]
        self.w = torch.zeros(x.shape[1], self.n, requires_grad=True)
        self.b = torch.log(y.mean(0) + 1e-4).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([self.w, self.b], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            eta = x @ self.w + self.b
            loss = (eta.exp() - y * eta).mean() + self.l2 * (self.w ** 2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()
        return self

    def rates(self, hist: torch.Tensor, bins: np.ndarray) -> torch.Tensor:
        x = torch.cat([self.history_features(hist), torch.from_numpy(self.covariates(bins))], -1)
        return ((x - self.mu) / self.sd @ self.w + self.b).clamp(max=0.0).exp()  # <= 1 spike per bin: free GLM runs can explode

    def coupling(self) -> np.ndarray:
        """(N, N) [j, i]: the fitted weight of j's counts 1-2 bins back on i's log rate (a connectivity score)."""
        return (self.w[:self.n] + self.w[self.n:2 * self.n]).numpy()

    def simulate(self, start_bins: np.ndarray, n_bins: int, seed: int = 0) -> np.ndarray:
        """Sample n_bins from each start bin, with the real history before it; (B, n_bins, N) counts."""
        g = torch.Generator().manual_seed(seed)
        starts = np.asarray(start_bins)
        real = [self.data.counts(self.res, (s - self.history) * self.res, s * self.res).T for s in starts]
        hist = torch.from_numpy(np.stack(real))  # (B, H, N)
        out = []
        for k in range(n_bins):
            counts = torch.poisson(self.rates(hist, starts + k), generator=g)
            out.append(counts)
            hist = torch.cat([hist[:, 1:], counts[:, None]], 1)
        return torch.stack(out, 1).numpy()


def counts_features(dataset: Any, windows: np.ndarray) -> np.ndarray:
    """Spike counts per neuron in each window's current and past parts: (n_windows, 2 N), for ridge."""
    n = dataset.data.n_neurons
    out = np.zeros((len(windows), 2 * n), np.float32)
    for r, i in enumerate(windows):
        end = int(dataset.end_bins[i])
        start = end - dataset.tok.window_bins
        cur, _ = dataset.events(start, end)
        past, _ = dataset.events(start - dataset.tok.prev_bins, start)
        np.add.at(out[r], cur, 1)
        np.add.at(out[r], n + past, 1)
    return out


class GLMDecoder:
    """The GLM behaviour baseline: a Poisson encoding model per neuron, log E[count_k] = a_k + b_k y (scikit-learn's
    PoissonRegressor on the labelled windows), inverted on new windows by the maximum a posteriori y under a
    Gaussian prior fitted to the labels (a grid over +-4 prior standard deviations)."""

    def __init__(self, alpha: float = 1e-2, grid: int = 401):
        self.alpha, self.grid = alpha, grid

    def fit(self, counts: np.ndarray, y: np.ndarray) -> "GLMDecoder":
        from sklearn.linear_model import PoissonRegressor

        self.mu, self.sd = float(y.mean()), float(y.std() + 1e-8)
        z = ((y - self.mu) / self.sd)[:, None]
        self.a, self.b = np.zeros(counts.shape[1]), np.zeros(counts.shape[1])
        for k in range(counts.shape[1]):
            if counts[:, k].sum() > 0:
                reg = PoissonRegressor(alpha=self.alpha, max_iter=300).fit(z, counts[:, k])
                self.a[k], self.b[k] = reg.intercept_, reg.coef_[0]
            else:
                self.a[k] = -10.0
        return self

    def predict(self, counts: np.ndarray) -> np.ndarray:
        z = np.linspace(-4, 4, self.grid)
        eta = self.a[None, :] + self.b[None, :] * z[:, None]  # (G, K)
        log_post = counts @ eta.T - np.exp(eta).sum(1)[None] - 0.5 * z[None] ** 2  # (W, G)
        return self.mu + self.sd * z[log_post.argmax(1)]


@torch.no_grad()
def pooled_features(model: Neuroformer, dataset: Dataset, batch_size: int = 128) -> np.ndarray:
    """The model's pooled last hidden state of each window (what its behaviour head reads): (n_windows, d)."""
    model.eval()
    return np.concatenate([model(batch)["pooled"].numpy() for batch in window_batches(dataset, model.pad, batch_size)])


@torch.no_grad()
def behaviour_predictions(model: Neuroformer, dataset: Dataset, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    preds, targets = [], []
    for batch in window_batches(dataset, model.pad, batch_size):
        preds.append(model(batch)["behaviour"][:, 0].numpy())
        targets.append(batch["behaviour_target"][:, 0].numpy())
    return np.concatenate(preds), np.concatenate(targets)


def regression_scores(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    r = float(np.corrcoef(pred, true)[0, 1])
    r2 = float(1 - ((true - pred) ** 2).sum() / ((true - true.mean()) ** 2).sum())
    return {"r": r, "r2": r2}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
