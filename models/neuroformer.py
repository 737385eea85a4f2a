"""Neuroformer: multimodal, multitask generative pretraining on spikes (Antoniades et al., ICLR 2024,
arXiv 2311.00136), following the official code (a-antoniades/Neuroformer, neuroformer/model_neuroformer.py).

Each spike is two tokens, a neuron ID and a time offset dt inside its window (see `biozoo.envs.spikes`). With
e = tok_emb(id) + pos_emb[position] + sincos(dt) for the current window and the same (own position embedding)
for the past window, the model runs, in the official order:

1. `state_encoder`: causal self-attention blocks over the current tokens (official FeatureEncoder);
   `stimulus_encoder`: self-attention blocks over frame patches (Conv3d with kernel = stride = patch, LayerNorm,
   ReLU; the embedding of the first current token is prepended as the frames' SOS).
2. cross-attention blocks, queries from the current stream: `history_blocks` -> past-window tokens,
   `stimulus_blocks` -> frame features, `behaviour_blocks` -> behaviour tokens;
3. `decoder`: causal self-attention blocks; 4. heads `head_id`, `head_dt` (no bias).

Block (pre-LN, official): x = x + Attn(LN1(x), kv, kv); x = x + MLP(LN2(x)); x = LN_f(x), where kv is the raw
other stream (or the raw x for self-attention) and MLP = Linear(d, 4d), GELU, Linear(4d, d), Dropout.

Contrastive alignment (CLIP-like InfoNCE, trained jointly): 'id' = mean of the last hidden states over the
non-PAD tokens, 'frames' = mean of the encoded frame tokens, 'behaviour' = mean of the behaviour tokens, all
through one shared Linear(d, clip_dim); for each pair of modalities (a, b) with unit-norm features
    L_ab = mean_i [ -s_ii / T + log sum_j exp(s_ij / T) ],   s_ij = <a_i, b_j>,  T = clip_temp (0.5),
averaged over the pairs (official default, one-directional; `clip_symmetric=True` gives (L_ab + L_ba) / 2).
The total loss (train/neuroformer.py) is 0.45 CE_id + 0.30 CE_dt + 0.25 L_clip by default: the official
3/5 (1 - 1/n), 2/5 (1 - 1/n), 1/n with n = 4.

Behaviour heads (fine-tuning): Linear(d, 1 or n_classes) on the mean hidden state, MSE or cross-entropy; the
target is the behaviour's value at the end of the current window.

Generation (`generate`): window by window, token by token until EOS, with top-p sampling of the ID head
(over neurons and EOS) and then of the dt head (over the current window's offsets). After a window, its
spikes join the past, so later windows see the model's own generated past (official `true_past=False`).
`use_cache=True` encodes the window's context (past tokens, frames, behaviour) and projects its cross-attention
keys and values once per window, and keeps each self-attention layer's keys and values, so each token costs one
position per layer (`decode_step` -> `Block.step`); `use_cache=False` re-runs the whole model, context included,
per token as the official code does. Both give the same logits, hence the same tokens for the same generator.
At batch 1 a cached token is a chain of matrix-vector products that read every weight once (37 MB at the official
size), which bounds its speed-up over recomputing (matrix-matrix products on the prefix) on a CPU; generating many
trials as batch rows shares each weight read among them.

Differences from the official code (all deliberate, each a documented bug or a missing piece there):
- Frame patches get a learned position embedding (`frame_pos_emb`); the official code computes a 3-D sincos
  encoding but, by a bug, never adds it, which leaves the attention blind to where a patch is.
- Behaviour values are embedded by Linear(1, d), GELU, Linear(d, d) plus a learned per-variable embedding and
  sincos(dt): the official ProjectNorm starts with LayerNorm over one feature, which maps every value to the
  same vector.
- Cross-attention to the past ignores PAD keys (the official attends to them); the CLIP 'id' feature and the
  behaviour head average non-PAD positions only (the official averages all).
- KV-cached generation is new (the official re-runs the full model for every token).
An official checkpoint converts exactly (`load_official_neuroformer`, `biozoo convert neuroformer-official SRC
OUT`) through constructor switches: the official choices above (`frame_pos_emb=False`, `mask_past_pad=False`,
`pool_pad=True`) and parts the official configs build: `temporal_embedding='learned'` (its LearntTemporalEmbedding,
an MLP of the dt token value, separate for the current and past windows; the configs select it because `wave_emb`,
the switch to sincos, is a class attribute of NeuroformerConfig that the YAML configs loaded as namespaces never
carry), a frame conv whose stride differs from its kernel (`patch_stride`; V1AL: kernel [3, 8, 8], stride
[3, 4, 4]) taking any frame size, and the linear patch encoder (`frame_encoder='linear'`, its conv_layer: false).
The official behaviour inputs (ProjectNorm) are not among them.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biozoo._core import ModelOutput, pack_tokens

from ._fused import is_plain
from ._hub import PretrainedMixin, check_state_dict, first_line, register_checkpoint_format, safe_torch_load
from ._registry import register_model
from .errors import BiozooError, CheckpointError, check_shape

BEHAVIOUR_HEADS = ("none", "regression", "classification")
TEMPORAL_EMBEDDINGS = ("sincos", "learned")
FRAME_ENCODERS = ("conv", "linear")


def sincos(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The official TemporalEmbedding: sin/cos of a value (here the dt token) at geometric frequencies."""
    freqs = torch.exp(torch.arange(0, dim, 2, device=values.device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    angles = values.float().unsqueeze(-1) * freqs
    return torch.stack([angles.sin(), angles.cos()], -1).flatten(-2)


def contrastive_loss(features: dict[str, torch.Tensor], temperature: float = 0.5,
                     symmetric: bool = False) -> torch.Tensor:
    """InfoNCE between every pair of modalities (matching rows are positives), averaged over pairs."""
    names = list(features)
    z = {k: F.normalize(v, dim=-1) for k, v in features.items()}
    labels = torch.arange(len(z[names[0]]), device=z[names[0]].device)
    losses = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            logits = z[names[a]] @ z[names[b]].t() / temperature
            loss = F.cross_entropy(logits, labels)
            if symmetric:
                loss = 0.5 * (loss + F.cross_entropy(logits.t(), labels))
            losses.append(loss)
    return torch.stack(losses).mean()


def sample_top_p(logits: torch.Tensor, top_p: float, temperature: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Nucleus sampling: keep the most probable tokens whose mass reaches top_p, sample among them. (B, V) -> (B,)"""
    probs = F.softmax(logits.float() / max(temperature, 1e-8), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class KVCache:
    """Keys and values of one self-attention layer, preallocated for a window, and the layer's `Block.step_weights`
    (taken once per window)."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.k = torch.empty(batch, heads, length, head_dim, device=device, dtype=dtype)
        self.v = torch.empty_like(self.k)
        self.n = 0
        self.weights = weights

    @classmethod
    def for_block(cls, block: "Block", batch: int, length: int) -> "KVCache":
        a, w = block.attn, block.attn.key.weight
        return cls(batch, a.n_head, length, w.shape[0] // a.n_head, w.device, w.dtype, block.step_weights())

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        self.k[:, :, self.n:self.n + t] = k
        self.v[:, :, self.n:self.n + t] = v
        self.n += t
        return self.k[:, :, :self.n], self.v[:, :, :self.n]


class Attention(nn.Module):
    """Multi-head attention with separate query/key/value projections (queries and keys may differ in source)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        if n_embd % n_head:
            raise BiozooError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.query, self.key, self.value = (nn.Linear(n_embd, n_embd) for _ in range(3))
        self.proj = nn.Linear(n_embd, n_embd)
        self.attn_drop, self.resid_drop = nn.Dropout(dropout), nn.Dropout(dropout)
        self.keep_attention = False
        self.attention: torch.Tensor | None = None

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.key(x)), self.heads(self.value(x))

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q = self.heads(self.query(x))
        if self.keep_attention:  # the explicit path, to read the weights
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.shape[-1])
            if mask is not None:  # True = may attend
                att = att.masked_fill(~mask, float("-inf"))
            att = att.softmax(-1)
            if torch.is_grad_enabled() and att.requires_grad:  # a gradient readout (gradient rollout) reads att.grad
                att.retain_grad()
                self.attention = att
            else:
                self.attention = att.detach()
            y = self.attn_drop(att) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        b, _, t, _ = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, -1)))


class Block(nn.Module):
    """Pre-LN block with an output LayerNorm; keys/values from `kv` (cross) or from the raw input (self)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd, n_head, dropout)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        k, v = self.attn.kv(x) if kv is None else kv
        x = x + self.attn(self.ln1(x), k, v, mask)
        x = x + self.mlp(self.ln2(x))
        return self.ln_f(x)

    def step_is_exact(self) -> bool:
        """True while every projection `step` reads is a plain nn.Linear without hooks (not a LoRA layer or one
        carrying dendrites, which `step` would skip)."""
        a, (fc1, _, fc2, _) = self.attn, self.mlp
        return all(is_plain(m) for m in (a.query, a.key, a.value, a.proj, fc1, fc2))

    def step_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(bias, weight) of every projection that `step` multiplies, the weight transposed to (in, out) and
        contiguous, key and value fused: at batch 1 the CPU's `addmm` streams that layout about twice as fast as
        it reads F.linear's (out, in) one (benchmarks/neuroformer_speed.py). Taken once per generated window."""
        a, (fc1, _, fc2, _) = self.attn, self.mlp
        t = lambda lin: (lin.bias, lin.weight.t().contiguous())  # noqa: E731
        return {"q": t(a.query), "proj": t(a.proj), "fc1": t(fc1), "fc2": t(fc2),
                "kv": (torch.cat([a.key.bias, a.value.bias]),
                       torch.cat([a.key.weight, a.value.weight]).t().contiguous())}

    def step(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None = None,
             bias: torch.Tensor | None = None, cache: KVCache | None = None,
             weights: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """`forward` for one new position (B, 1, d) in eval mode, as direct functional calls (at batch 1 the
        per-call overhead is as large as the arithmetic) on `weights` (`step_weights`, else the cache's):
        self-attention keys/values from the fused projection, appended to `cache`; cross-attention keys/values
        `kv` precomputed for the window, with `bias` (0 / -inf) on masked keys; explicit attention, since one query
        needs no fused kernel."""
        w = weights or (cache.weights if cache is not None else self.step_weights())
        n_head = self.attn.n_head
        b, _, d = x.shape
        x = x.view(b, d)
        if kv is None:  # with one position, (B, 2d) -> (B, 2H, 1, hd) is a view
            kv_new = torch.addmm(w["kv"][0], x, w["kv"][1]).view(b, 2 * n_head, 1, d // n_head)
            k, v = cache.append(*kv_new.chunk(2, 1))
        else:
            k, v = kv
        h = F.layer_norm(x, (d,), self.ln1.weight, self.ln1.bias, self.ln1.eps)
        bh, n = b * n_head, k.shape[2]  # heads into the batch of one bmm (the cache's slices merge as views)
        q = torch.addmm(w["q"][0], h, w["q"][1]).view(bh, 1, d // n_head) * k.shape[-1] ** -0.5
        att = torch.bmm(q, k.reshape(bh, n, -1).transpose(1, 2))
        if bias is not None:
            att = (att.view(b, n_head, 1, n) + bias).view(bh, 1, n)
        x = x + torch.addmm(w["proj"][0], torch.bmm(att.softmax(-1), v.reshape(bh, n, -1)).view(b, d), w["proj"][1])
        h = F.layer_norm(x, (d,), self.ln2.weight, self.ln2.bias, self.ln2.eps)
        x = x + torch.addmm(w["fc2"][0], F.gelu(torch.addmm(w["fc1"][0], h, w["fc1"][1])), w["fc2"][1])
        return F.layer_norm(x, (d,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps).view(b, 1, d)


@register_model(name="neuroformer")
class Neuroformer(PretrainedMixin, nn.Module):
    """Neuroformer over spike tokens, optionally with frames and behaviour; see the module docstring.

    Args:
        n_neurons: ID vocabulary = n_neurons + SOS, EOS, PAD.
        window_bins / prev_bins: the current / past window in resolution units (dt vocabulary =
            max(window_bins, prev_bins) + 1 offsets + SOS, EOS, PAD).
        block_size / prev_block_size: tokens per current / past window (inputs, after the shift).
        n_state_layers: causal self-attention layers, both before (state encoder) and after (decoder) the
            cross-attention; n_history_layers / n_stimulus_layers / n_behaviour_layers: cross-attention layers
            to the past, the frames (also the frame self-attention layers) and the behaviour.
        frame_shape: [n_frames, H, W] of a window's stimulus, or None; a size may be None (any size, as the
            official conv takes) when frame_pos_emb is False. patch_size: the Conv3d kernel; patch_stride: its
            stride (default = patch_size; the official V1AL config uses kernel [3, 8, 8], stride [3, 4, 4]).
            frame_encoder: 'conv' (Conv3d, LayerNorm, ReLU) or 'linear' (the official conv_layer: false variant:
            Linear over each frame's p x p patches, ReLU; patch_size [1, p, p]).
        temporal_embedding: 'sincos' (TemporalEmbedding of the dt token) or 'learned' (the official
            LearntTemporalEmbedding, Linear(1, d/2), GELU, Linear(d/2, d), one for the current and one for the
            past window: what the official YAML configs build, see `neuroformer_official_kwargs`).
        mask_past_pad: cross-attention to the past ignores its PAD keys (False: attend to them, as the official).
        pool_pad: the pooled state that the CLIP 'id' feature and the behaviour head read averages every position,
            PAD included, as the official x.mean(dim=1) (False: the window's tokens only).
        n_behaviour / behaviour_len: behaviour input variables and samples per window (0: no behaviour input).
        behaviour_head: 'none', 'regression' (n_behaviour_out values) or 'classification' (n_behaviour_out classes).
        clip: contrastive alignment between the ID stream and the other modalities; clip_dim defaults to n_embd.
    """

    reads, streams, predicts = ("tokens",), ("spikes",), ("next_token",)

    def __init__(self, n_neurons: int = 100, window_bins: int = 5, prev_bins: int = 10, block_size: int = 100,
                 prev_block_size: int = 150, n_embd: int = 128, n_head: int = 4, n_state_layers: int = 1,
                 n_history_layers: int = 1, n_stimulus_layers: int = 1, n_behaviour_layers: int = 1,
                 frame_shape: list[int] | None = None, patch_size: list[int] = (3, 4, 4),
                 patch_stride: list[int] | None = None, frame_encoder: str = "conv", frame_pos_emb: bool = True,
                 n_behaviour: int = 0, behaviour_len: int = 1, behaviour_head: str = "none",
                 n_behaviour_out: int = 1, clip: bool = True,
                 clip_dim: int | None = None, clip_temp: float = 0.5, clip_symmetric: bool = False,
                 dropout: float = 0.2, temporal_embedding: str = "sincos", mask_past_pad: bool = True,
                 pool_pad: bool = False):
        super().__init__()
        if temporal_embedding not in TEMPORAL_EMBEDDINGS:
            raise BiozooError(f"temporal_embedding must be one of {TEMPORAL_EMBEDDINGS}, got {temporal_embedding!r}")
        if behaviour_head not in BEHAVIOUR_HEADS:
            raise BiozooError(f"behaviour_head must be one of {BEHAVIOUR_HEADS}, got {behaviour_head!r}")
        self.n_neurons, self.window_bins, self.prev_bins = n_neurons, window_bins, prev_bins
        self.block_size, self.prev_block_size, self.n_embd = block_size, prev_block_size, n_embd
        self.sos, self.eos, self.pad = n_neurons, n_neurons + 1, n_neurons + 2
        self.id_vocab = n_neurons + 3
        self.n_dt_values = max(window_bins, prev_bins) + 1
        self.dt_sos, self.dt_eos, self.dt_pad = self.n_dt_values, self.n_dt_values + 1, self.n_dt_values + 2
        self.dt_vocab = self.n_dt_values + 3
        self.behaviour_head_kind, self.clip_temp, self.clip_symmetric = behaviour_head, clip_temp, clip_symmetric
        blocks = lambda n: nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n))  # noqa: E731

        self.tok_emb = nn.Embedding(self.id_vocab, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(1, block_size, n_embd))
        self.pos_emb_prev = nn.Parameter(torch.zeros(1, prev_block_size, n_embd))
        self.drop = nn.Dropout(dropout)
        self.mask_past_pad, self.pool_pad = mask_past_pad, pool_pad
        if temporal_embedding == "learned":
            learned = lambda: nn.Sequential(nn.Linear(1, n_embd // 2), nn.GELU(), nn.Linear(n_embd // 2, n_embd))  # noqa: E731
            self.temp_emb, self.temp_emb_prev = learned(), learned()
        else:
            self.temp_emb = self.temp_emb_prev = None

        self.frame_shape = list(frame_shape) if frame_shape else None
        self.video_encoder = None
        if self.frame_shape and n_stimulus_layers > 0:
            if frame_encoder not in FRAME_ENCODERS:
                raise BiozooError(f"frame_encoder must be one of {FRAME_ENCODERS}, got {frame_encoder!r}")
            if frame_encoder == "linear" and (patch_size[0] != 1 or patch_size[1] != patch_size[2] or patch_stride):
                raise BiozooError(f"the linear frame encoder takes square patches of single frames, patch_size "
                                  f"[1, p, p] and no stride, got {list(patch_size)}")
            stride = list(patch_stride or patch_size)
            if None in self.frame_shape and frame_pos_emb:
                raise BiozooError("frame_shape needs every size when frame_pos_emb is True (one position per patch)")
            if patch_stride is None and any(n is not None and n % k for n, k in zip(self.frame_shape, patch_size)):
                raise BiozooError(f"frame_shape {self.frame_shape} must be divisible by patch_size {list(patch_size)}")
            grid = [None if n is None else (n - k) // s + 1 for n, k, s in zip(self.frame_shape, patch_size, stride)]
            if any(g is not None and g < 1 for g in grid):
                raise BiozooError(f"frame_shape {self.frame_shape} is smaller than patch_size {list(patch_size)}")
            self.n_patches = math.prod(grid) if None not in grid else None
            if frame_encoder == "conv":
                self.video_encoder = nn.Conv3d(1, n_embd, tuple(patch_size), tuple(stride))
                self.frame_norm = nn.LayerNorm(n_embd)
            else:  # the official to_patch_embedding: each frame's p x p patches, Linear, ReLU (no norm)
                self.video_encoder = nn.Linear(patch_size[1] * patch_size[2], n_embd)
            self.frame_pos = nn.Parameter(torch.zeros(1, self.n_patches, n_embd)) if frame_pos_emb else None
        self.stimulus_encoder = blocks(n_stimulus_layers if self.video_encoder is not None else 0)

        self.n_behaviour, self.behaviour_len = n_behaviour, behaviour_len
        if n_behaviour > 0 and n_behaviour_layers > 0:
            self.behaviour_mlp = nn.Sequential(nn.Linear(1, n_embd), nn.GELU(), nn.Linear(n_embd, n_embd))
            self.behaviour_var = nn.Parameter(torch.zeros(1, n_behaviour, n_embd))
        else:
            self.behaviour_mlp = None

        self.state_encoder = blocks(n_state_layers)
        self.history_blocks = blocks(n_history_layers)
        self.stimulus_blocks = blocks(len(self.stimulus_encoder))
        self.behaviour_blocks = blocks(n_behaviour_layers if self.behaviour_mlp is not None else 0)
        self.decoder = blocks(n_state_layers)
        self.head_id = nn.Linear(n_embd, self.id_vocab, bias=False)
        self.head_dt = nn.Linear(n_embd, self.dt_vocab, bias=False)
        self.clip_proj = nn.Linear(n_embd, clip_dim or n_embd, bias=False) if clip else None
        self.behaviour_head = nn.Linear(n_embd, n_behaviour_out) if behaviour_head != "none" else None
        self.register_buffer("causal", torch.ones(block_size, block_size, dtype=torch.bool).tril(), persistent=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    # inputs -> embeddings -----------------------------------------------------------------------------------------

    def embed(self, ids: torch.Tensor, dts: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = ids.shape[1]
        if offset + t > self.block_size:
            raise BiozooError(f"neuroformer: {offset + t} current tokens exceed block_size {self.block_size}")
        return self.drop(self.tok_emb(ids) + self.pos_emb[:, offset:offset + t] + self.temporal(dts))

    def temporal(self, dts: torch.Tensor, past: bool = False) -> torch.Tensor:
        """The temporal embedding of dt tokens: sincos, or the official learned MLP of the token value."""
        if self.temp_emb is None:
            return sincos(dts, self.n_embd)
        return (self.temp_emb_prev if past else self.temp_emb)(dts.float().unsqueeze(-1))

    def encode_context(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Everything the current window cross-attends to: past tokens, frame features, behaviour tokens."""
        id_prev, dt_prev = batch["id_prev"], batch["dt_prev"]
        check_shape("neuroformer", id_prev, f"id_prev (B, <= {self.prev_block_size})",
                    id_prev.dim() == 2 and id_prev.shape[1] <= self.prev_block_size)
        tp = id_prev.shape[1]
        prev = self.drop(self.tok_emb(id_prev) + self.pos_emb_prev[:, :tp] + self.temporal(dt_prev, past=True))
        prev_mask = (id_prev != self.pad) if self.mask_past_pad else torch.ones_like(id_prev, dtype=torch.bool)
        ctx: dict[str, Any] = {"prev": prev, "prev_mask": prev_mask[:, None, None, :]}
        if self.video_encoder is not None and batch.get("frames") is not None:
            frames = batch["frames"]
            fits = frames.dim() == 4 and all(n is None or m == n for m, n in zip(frames.shape[1:], self.frame_shape))
            want = ", ".join("?" if n is None else str(n) for n in self.frame_shape)
            check_shape("neuroformer", frames, f"frames (B, {want})", fits)
            if isinstance(self.video_encoder, nn.Linear):
                b, f, h, w = frames.shape
                p = math.isqrt(self.video_encoder.in_features)
                check_shape("neuroformer", frames, f"frames (B, T, H, W) with H and W divisible by {p}",
                            h % p == 0 and w % p == 0)
                patches = frames.float().view(b, f, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5)
                feats = F.relu(self.video_encoder(patches.reshape(b, -1, p * p)))
            else:
                feats = self.video_encoder(frames.unsqueeze(1).float())  # (B, d, f, h, w)
                feats = F.relu(self.frame_norm(feats.flatten(2).transpose(1, 2)))
            if self.frame_pos is not None:
                feats = feats + self.frame_pos
            sos = self.embed(id_prev.new_full((len(id_prev), 1), self.sos), id_prev.new_zeros((len(id_prev), 1)))
            feats = self.drop(torch.cat([sos, feats], 1))
            for blk in self.stimulus_encoder:
                feats = blk(feats)
            ctx["frames"] = feats
        if self.behaviour_mlp is not None and batch.get("behaviour") is not None:
            beh = batch["behaviour"].float()  # (B, L, V)
            check_shape("neuroformer", beh, f"behaviour (B, L, {self.n_behaviour})", beh.dim() == 3 and beh.shape[-1] == self.n_behaviour)
            emb = self.behaviour_mlp(beh.unsqueeze(-1)) + self.behaviour_var.unsqueeze(1)  # (B, L, V, d)
            emb = emb + sincos(batch["behaviour_dt"], self.n_embd).unsqueeze(2)
            ctx["behaviour"] = self.drop(emb.flatten(1, 2))
        return ctx

    def context_kv(self, ctx: dict[str, Any], for_step: bool = False
                   ) -> list[tuple[Block, tuple[torch.Tensor, torch.Tensor], torch.Tensor | None]]:
        """(block, projected keys/values, mask) for every cross-attention layer, computed once per window. With
        `for_step` (the form `Block.step` takes) the past's PAD mask is a bias (0 or -inf), the keys/values are
        made contiguous once here, since each token's attention would otherwise copy the strided head views, and
        each entry adds the block's `step_weights`."""
        mask = ctx["prev_mask"]
        if for_step:
            mask = torch.zeros(mask.shape, dtype=ctx["prev"].dtype, device=mask.device).masked_fill(~mask, -math.inf)
        layers = [(blk, blk.attn.kv(ctx["prev"]), mask) for blk in self.history_blocks]
        if "frames" in ctx:
            layers += [(blk, blk.attn.kv(ctx["frames"]), None) for blk in self.stimulus_blocks]
        if "behaviour" in ctx:
            layers += [(blk, blk.attn.kv(ctx["behaviour"]), None) for blk in self.behaviour_blocks]
        if for_step:
            layers = [(blk, (k.contiguous(), v.contiguous()), m, blk.step_weights()) for blk, (k, v), m in layers]
        return layers

    def new_caches(self, batch: int, length: int) -> list[KVCache]:
        """Empty caches for every self-attention layer (state encoder, then decoder)."""
        return [KVCache.for_block(blk, batch, length) for blk in [*self.state_encoder, *self.decoder]]

    def decode_step(self, ids: torch.Tensor, dts: torch.Tensor, offset: int, cross: list,
                    caches: list[KVCache]) -> torch.Tensor:
        """The last hidden state (B, d) for one new token at `offset`, reading earlier tokens from `caches`
        (`new_caches`) and the window's context from `cross` (`context_kv(..., for_step=True)`): one position per
        layer, the generation path of `use_cache=True`."""
        x = self.embed(ids, dts, offset)
        n_enc = len(self.state_encoder)
        for i, blk in enumerate(self.state_encoder):
            x = blk.step(x, cache=caches[i])
        for blk, kv, bias, weights in cross:
            x = blk.step(x, kv=kv, bias=bias, weights=weights)
        for i, blk in enumerate(self.decoder):
            x = blk.step(x, cache=caches[n_enc + i])
        return x[:, -1]

    def trunk(self, x: torch.Tensor, cross: list, mask: torch.Tensor | None) -> torch.Tensor:
        for blk in self.state_encoder:
            x = blk(x, mask=mask)
        for blk, kv, kv_mask in cross:
            x = blk(x, kv=kv, mask=kv_mask)
        for blk in self.decoder:
            x = blk(x, mask=mask)
        return x

    # training forward ----------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput:
        """`.logits` (B, id_vocab, T): the next ID at every position; extras (also `out[name]`): `id_logits`
        (B, T, V), `dt_logits`, `hidden`, `pooled` (what the CLIP 'id' feature and the behaviour head read), the
        CLIP features `clip` and `clip_loss`, and `behaviour`."""
        ids, dts = batch["id"], batch["dt"]
        check_shape("neuroformer", ids, f"id (B, <= {self.block_size}) token ids < {self.id_vocab}",
                    ids.dim() == 2 and ids.shape[1] <= self.block_size and int(ids.max()) < self.id_vocab)
        ctx = self.encode_context(batch)
        x = self.embed(ids, dts)
        t = ids.shape[1]
        x = self.trunk(x, self.context_kv(ctx), self.causal[:t, :t])
        out: dict[str, Any] = {"id_logits": self.head_id(x), "dt_logits": self.head_dt(x), "hidden": x}
        valid = (ids != self.pad).unsqueeze(-1).float() if not self.pool_pad else torch.ones_like(x[..., :1])
        pooled = out["pooled"] = (x * valid).sum(1) / valid.sum(1).clamp_min(1.0)
        if self.clip_proj is not None:
            feats = {"id": pooled}
            for name in ("frames", "behaviour"):
                if name in ctx:
                    feats[name] = ctx[name].mean(1)
            out["clip"] = {k: self.clip_proj(v) for k, v in feats.items()}
            if len(feats) > 1:
                out["clip_loss"] = contrastive_loss(out["clip"], self.clip_temp, self.clip_symmetric)
        if self.behaviour_head is not None:
            out["behaviour"] = self.behaviour_head(pooled)
        return ModelOutput(out["id_logits"].transpose(1, 2), extras=out)

    # generation --------------------------------------------------------------------------------------------------

    def _sample(self, h: torch.Tensor, top_p: float, temperature: float, generator: torch.Generator | None,
                ignore_eos: bool) -> tuple[torch.Tensor, torch.Tensor]:
        id_logits = self.head_id(h).float()
        banned = [self.sos, self.pad] + ([self.eos] if ignore_eos else [])
        id_logits[:, banned] = float("-inf")
        new_id = sample_top_p(id_logits, top_p, temperature, generator)
        dt_logits = self.head_dt(h).float()
        dt_logits[:, self.window_bins:] = float("-inf")  # a current spike's offset lies inside the window
        new_dt = sample_top_p(dt_logits, top_p, temperature, generator)
        new_dt = torch.where(new_id == self.eos, torch.full_like(new_dt, self.dt_eos), new_dt)
        return new_id, new_dt

    def _past_tokens(self, spikes: list[tuple[np.ndarray, np.ndarray]], start: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack the spikes (ids, bins) falling in [start - prev_bins, start) as past-window tokens."""
        ids, dts = [], []
        for sid, sbin in spikes:
            keep = (sbin >= start - self.prev_bins) & (sbin < start)
            i, d = pack_tokens(sid[keep], sbin[keep] - (start - self.prev_bins), self.prev_block_size, self.sos,
                               self.eos, self.pad, self.dt_eos, self.dt_pad)
            ids.append(i[:-1])
            dts.append(d[:-1])
        return torch.from_numpy(np.stack(ids)).to(device), torch.from_numpy(np.stack(dts)).to(device)

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], n_windows: int = 1,
                 context_fn: Callable[[int], dict[str, torch.Tensor]] | None = None, top_p: float = 0.95,
                 temperature: float = 1.0, use_cache: bool = True, generator: torch.Generator | None = None,
                 max_tokens: int | None = None, ignore_eos: bool = False, true_past: bool = False) -> dict[str, Any]:
        """Sample `n_windows` consecutive windows for each row of `batch`.

        `batch` holds the first window's context: `id_prev`/`dt_prev` (its real past) and, if the model uses
        them, `frames`, `behaviour`, `behaviour_dt`. `context_fn(w)` returns window w's frames/behaviour (and
        its real past when `true_past`); otherwise the past is rebuilt from the generated spikes. Returns
        {"ids", "dts"}: per window (B, L) tokens (EOS, then EOS padding, after a window ends), and "spikes": per
        row, (neuron ids, bins from the start of window 0). One cached row on a CPU runs on one thread (restored
        after). A model whose projections are replaced or hooked (LoRA, dendrites) generates without the cache,
        whose fused step reads the plain weights.
        """
        use_cache = use_cache and all(blk.step_is_exact() for blk in self.modules() if isinstance(blk, Block))
        b = len(batch["id_prev"])
        threads = torch.get_num_threads()
        if use_cache and b == 1 and batch["id_prev"].device.type == "cpu":
            # one cached token is ~150 tiny ops: on a CPU, waking other threads for each costs more than it saves
            # (1.1-1.2x faster on one thread; benchmarks/neuroformer_speed.py)
            torch.set_num_threads(1)
        try:
            return self._generate(batch, n_windows, context_fn, top_p, temperature, use_cache, generator, max_tokens,
                                  ignore_eos, true_past)
        finally:
            torch.set_num_threads(threads)

    def _generate(self, batch: dict[str, torch.Tensor], n_windows: int, context_fn: Callable | None, top_p: float,
                  temperature: float, use_cache: bool, generator: torch.Generator | None, max_tokens: int | None,
                  ignore_eos: bool, true_past: bool) -> dict[str, Any]:
        was_training = self.training
        self.eval()
        device = batch["id_prev"].device
        b = len(batch["id_prev"])
        max_tokens = min(max_tokens or self.block_size - 1, self.block_size - 1)
        pid, pdt = batch["id_prev"].cpu().numpy(), batch["dt_prev"].cpu().numpy()
        spikes = []
        for r in range(b):
            real = pid[r] < self.n_neurons
            spikes.append((pid[r][real], pdt[r][real] - self.prev_bins))
        out_ids, out_dts = [], []
        inputs = dict(batch)
        for w in range(n_windows):
            if w > 0:
                inputs = dict(context_fn(w)) if context_fn is not None else dict(inputs)
                if not true_past:
                    inputs["id_prev"], inputs["dt_prev"] = self._past_tokens(spikes, w * self.window_bins, device)
            ids = torch.full((b, 1), self.sos, dtype=torch.long, device=device)
            dts = torch.zeros((b, 1), dtype=torch.long, device=device)
            done = torch.zeros(b, dtype=torch.bool, device=device)
            if use_cache:  # the context's keys/values once per window; per token, one position per layer
                cross = self.context_kv(self.encode_context(inputs), for_step=True)
                caches = self.new_caches(b, max_tokens)
            for t in range(max_tokens):
                if use_cache:
                    h = self.decode_step(ids[:, -1:], dts[:, -1:], t, cross, caches)
                else:
                    h = self.forward({**inputs, "id": ids, "dt": dts})["hidden"][:, -1]
                new_id, new_dt = self._sample(h, top_p, temperature, generator, ignore_eos)
                new_id = torch.where(done, torch.full_like(new_id, self.eos), new_id)
                new_dt = torch.where(done, torch.full_like(new_dt, self.dt_eos), new_dt)
                done |= new_id == self.eos
                ids, dts = torch.cat([ids, new_id[:, None]], 1), torch.cat([dts, new_dt[:, None]], 1)
                if bool(done.all()):
                    break
            ids, dts = ids[:, 1:], dts[:, 1:]
            out_ids.append(ids)
            out_dts.append(dts)
            ids_np, dts_np = ids.cpu().numpy(), dts.cpu().numpy()
            for r in range(b):
                real = ids_np[r] < self.n_neurons
                sid, sbin = spikes[r]
                order = np.lexsort((ids_np[r][real], dts_np[r][real]))  # by bin, then neuron
                spikes[r] = (np.concatenate([sid, ids_np[r][real][order]]),
                             np.concatenate([sbin, dts_np[r][real][order] + w * self.window_bins]))
        spikes = [(sid[sbin >= 0], sbin[sbin >= 0]) for sid, sbin in spikes]
        self.train(was_training)
        return {"ids": out_ids, "dts": out_dts, "spikes": spikes}


@contextmanager
def record_attention(blocks: list[Block]) -> Iterator[list[Block]]:
    """Keep the attention weights of `blocks` (in `block.attn.attention`) while inside the context."""
    for blk in blocks:
        blk.attn.keep_attention = True
    try:
        yield blocks
    finally:
        for blk in blocks:
            blk.attn.keep_attention = False
            blk.attn.attention = None


def init_from_pretrained(model: Neuroformer, path: str | Path, new_prefixes: tuple[str, ...] = ("behaviour_head.",)) -> Neuroformer:
    """Load a pretrained checkpoint into a model that adds new heads (few-shot fine-tuning): every tensor must
    match except those under `new_prefixes`, which start fresh (the official `--resume` with strict=False)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"could not read pretrained weights {file}: {first_line(e)}") from None
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own and not k.startswith(new_prefixes)]
    missing = [k for k in own if k not in state and not k.startswith(new_prefixes)]
    if bad or unexpected or missing:
        raise CheckpointError(f"{file} does not fit this model: shape mismatch {bad[:3]}, unexpected {unexpected[:3]}, "
                              f"missing {missing[:3]}")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


# builders ----------------------------------------------------------------------------------------------------------

@register_model
def neuroformer_official(n_neurons: int = 100, window_bins: int = 5, prev_bins: int = 5, block_size: int = 100,
                         prev_block_size: int = 300, **kwargs: Any) -> Neuroformer:
    """The size of the official uni-modal model: n_embd 256, 8 heads, 4 layers per stage, no stimulus or
    behaviour layers, a 300-token past window (about 9.7M parameters for 100 neurons)."""
    return Neuroformer(n_neurons, window_bins, prev_bins, block_size, prev_block_size,
                       **{"n_embd": 256, "n_head": 8, "n_state_layers": 4, "n_history_layers": 4,
                          "n_stimulus_layers": 0, "n_behaviour_layers": 0, "clip": False, **kwargs})


# official checkpoints ----------------------------------------------------------------------------------------------
# The folder the official Trainer.save_checkpoint writes: model.pt (a state dict; or _epoch_<loss>.pt) next to
# mconf.yaml (the model config plus id_vocab_size), tconf.yaml and tokenizer.pkl (pickles of official classes,
# never opened here: the vocabulary sizes come from the weights, and its ID order is the sorted neuron ids).

OFFICIAL_RENAMES = (
    ("feature_encoder.neural_state_blocks.", "state_encoder."),
    ("feature_encoder.frame_state_blocks.", "stimulus_encoder."),
    ("neural_visual_transformer.neural_state_history_blocks.", "history_blocks."),
    ("neural_visual_transformer.neural_state_stimulus_blocks.", "stimulus_blocks."),
    ("neural_visual_transformer.neural_state_blocks.", "decoder."),
    ("video_encoder.conv_block.0.", "video_encoder."),
    ("video_encoder.conv_block.2.", "frame_norm."),
    ("video_encoder.to_patch_embedding.1.", "video_encoder."),
    ("temp_emb.temp_emb.", "temp_emb."),
    ("temp_emb_prev.temp_emb.", "temp_emb_prev."),
    ("clip.proj.", "clip_proj."),
)
# buffers and parameters the official forward never uses: causal masks, the sincos tables (recomputed), the 3-D
# frame encoding (never added, a bug) and MultimodalTransformer.ln_f (built, never called)
OFFICIAL_UNUSED = ("feature_encoder.mask", "neural_visual_transformer.mask", "neural_visual_transformer.ln_f.",
                   "frame_3d_emb.", "temp_emb.div_term", "temp_emb.pe", "temp_emb_prev.div_term", "temp_emb_prev.pe")
OFFICIAL_UNSUPPORTED = {
    "modality_embeddings.": "behaviour inputs (ProjectNorm modality embeddings)",
    "neural_visual_transformer.modalities_blocks.": "behaviour cross-attention blocks",
    "modality_projection_heads.": "behaviour prediction heads",
    "video_encoder.backbone.": "the R3D-18 frame backbone (resnet_backbone: true)",
    "gru.": "the GRU baseline", "mlp.": "the MLP baseline",
}


def official_folder(path: Path) -> tuple[Path, Path] | None:
    """(mconf.yaml, weights .pt) of an official checkpoint folder or weights file, or None."""
    folder = path if path.is_dir() else path.parent
    mconf = folder / "mconf.yaml"
    if not mconf.is_file():
        return None
    if path.is_file():
        return (mconf, path) if path.suffix == ".pt" else None
    weights = folder / "model.pt"
    if not weights.is_file():
        epochs = sorted(folder.glob("_epoch_*.pt"))
        if len(epochs) != 1:
            return None
        weights = epochs[0]
    return mconf, weights


def count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)})


def neuroformer_official_kwargs(mconf: dict[str, Any], state: dict[str, torch.Tensor],
                                source: Path | str = "") -> dict[str, Any]:
    """`Neuroformer` arguments that rebuild the official model of an official mconf.yaml and its state dict."""
    for prefix, what in OFFICIAL_UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in state):
            raise CheckpointError(f"{source}: the official model uses {what}, which biozoo does not convert")
    try:
        n_embd, n_head, dt = int(mconf["n_embd"]), int(mconf["n_head"]), float(mconf["resolution"]["dt"])
        window_bins = round(float(mconf["window"]["curr"]) / dt)
        prev_bins = round(float(mconf["window"]["prev"]) / dt)
        id_vocab, dt_vocab = state["tok_emb.weight"].shape[0], state["head_dt.weight"].shape[0]
        block_size, prev_block_size = state["pos_emb"].shape[1], state["pos_emb_prev"].shape[1]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: not an official Neuroformer config and state dict (missing {e})") from None
    if dt_vocab != max(window_bins, prev_bins) + 4:
        raise CheckpointError(f"{source}: head_dt has {dt_vocab} outputs, but windows of {window_bins} and {prev_bins} "
                              f"bins give {max(window_bins, prev_bins) + 4}")
    n_state = count_layers(state, "feature_encoder.neural_state_blocks.")
    if count_layers(state, "neural_visual_transformer.neural_state_blocks.") != n_state:
        raise CheckpointError(f"{source}: different numbers of state-encoder and decoder layers do not convert")
    linear = "video_encoder.to_patch_embedding.1.weight" in state
    frames = linear or "video_encoder.conv_block.0.weight" in state
    n_stim = count_layers(state, "neural_visual_transformer.neural_state_stimulus_blocks.")
    if frames and count_layers(state, "feature_encoder.frame_state_blocks.") != n_stim:
        raise CheckpointError(f"{source}: the frame self-attention and frame cross-attention layer counts differ "
                              f"(vit_encoder: false?), which biozoo does not convert")
    kwargs: dict[str, Any] = {
        "n_neurons": id_vocab - 3, "window_bins": window_bins, "prev_bins": prev_bins, "block_size": block_size,
        "prev_block_size": prev_block_size, "n_embd": n_embd, "n_head": n_head, "n_state_layers": n_state,
        "n_history_layers": count_layers(state, "neural_visual_transformer.neural_state_history_blocks."),
        "n_stimulus_layers": n_stim if frames else 0, "n_behaviour_layers": 0, "frame_pos_emb": False,
        "clip": "clip.proj.weight" in state, "mask_past_pad": False, "pool_pad": True,
        "temporal_embedding": "learned" if "temp_emb.temp_emb.0.weight" in state else "sincos",
        "dropout": float(mconf.get("dropout", {}).get("resid", 0.2)),
    }
    if frames:
        enc = mconf.get("frame_encoder", {})
        kwargs["frame_shape"] = [None, None, None]
        if linear:
            p = math.isqrt(state["video_encoder.to_patch_embedding.1.weight"].shape[1])
            kwargs.update(frame_encoder="linear", patch_size=[1, p, p])
        else:
            kernel = list(state["video_encoder.conv_block.0.weight"].shape[2:])
            kwargs.update(patch_size=kernel, patch_stride=list(enc.get("stride_size") or kernel))
        if not linear and any(enc.get("padding_size") or [0]):
            raise CheckpointError(f"{source}: a padded frame conv (padding_size) does not convert")
    if kwargs["clip"]:
        kwargs["clip_dim"] = state["clip.proj.weight"].shape[0]
        kwargs["clip_temp"] = float(mconf.get("contrastive", {}).get("clip_temp", 0.5))
        kwargs["clip_symmetric"] = bool(mconf.get("contrastive", {}).get("clip_loss", False))
    return kwargs


def official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official parameter names in biozoo's, without the buffers and parameters the official forward ignores."""
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.startswith(OFFICIAL_UNUSED):
            continue
        for old, new in OFFICIAL_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def load_official_neuroformer(path: str | Path) -> Neuroformer:
    """An official Neuroformer checkpoint (folder with mconf.yaml + model.pt, or a .pt beside mconf.yaml) as a
    biozoo model with the same weights and outputs, in eval mode. Read without unpickling anything but tensors."""
    import yaml

    path = Path(path)
    found = official_folder(path)
    if found is None:
        raise CheckpointError(f"{path} is not an official Neuroformer checkpoint: expected mconf.yaml beside model.pt")
    mconf_file, weights = found
    try:
        mconf = yaml.safe_load(mconf_file.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{mconf_file} is not valid YAML: {first_line(e)}") from None
    state = safe_torch_load(weights)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{weights} is not a state dict (the official Trainer saves model.state_dict())")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = Neuroformer(**neuroformer_official_kwargs(mconf, state, weights))
    ours = official_state_dict(state)
    check_state_dict(model, {k: tuple(v.shape) for k, v in ours.items()}, weights)
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the official Neuroformer: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
    return model.eval()


def is_official_neuroformer(path: Path) -> bool:
    """A .pt beside (or a folder with) the official config file name, mconf.yaml."""
    return official_folder(path) is not None


register_checkpoint_format("neuroformer-official", is_official_neuroformer, load_official_neuroformer,
                           "official a-antoniades/Neuroformer: a folder with mconf.yaml + model.pt")
