"""Continuous Thought Machine (CTM): Darlow, Regan, Risi, Seely, Jones, arXiv 2505.05522 (NeurIPS 2025).

An internal recurrence over "ticks" t = 1..T, decoupled from the data. Per tick (paper section 3, official
`ContinuousThoughtMachine.forward` at commit aecfb63):

    S_action^t = synch(z^1..z^t)                      attention query q^t = W_q S_action^t
    o^t        = Attention(q^t, KV(backbone(x)))      one query token per tick, over the data's tokens
    a^t        = f_synapse([o^t, z^t])                Eq. 1 (GLU + LayerNorm at depth 1, a U-Net at depth > 1)
    A^t        = [a^{t-M+1}, ..., a^t]                 FIFO of the last M pre-activations (the "trace")
    z^{t+1}_d  = g_d(A^t_d)                           Eq. 3: a private MLP per neuron d (neuron-level models)
    S_out^t    = synch(z^1..z^{t+1})                  prediction y^t = W_out S_out^t
    certainty  = 1 - H(softmax(y^t)) / log(C)         (averaged over positions when the output is reshaped)

Synchronisation of a neuron pair (i, j) is kept by the decayed recurrence of the official code,
alpha_t = r alpha_{t-1} + z_i z_j, beta_t = r beta_{t-1} + 1, S = alpha_t / sqrt(beta_t), r = exp(-clamp(decay, 0, 15)),
starting from the learned start state z^0. Pairs come from `neuron_select_type`: `first-last` (dense upper
triangle over the first / last n neurons), `random` (dense upper triangle between two random n-sets) and
`random-pairing` (n random pairs, the first `n_random_pairing_self` of them i-i).

Faithful to the official code (not the paper where they differ): the parameter and buffer names are the
official ones, so an official state dict loads strictly (`load_official_checkpoint`, the "sakana-ctm" format for
`biozoo.load_pretrained` / `biozoo convert`); the decay parameters are clamped in place at every forward (the fix
for issue #5); the random pairs are drawn with numpy's global RNG as the official code does; the backbones are
the official truncated ResNets (3x3 stem, trained from scratch). Differences, none of which change the outputs
beyond float rounding:

- No lazy layers: every input width is computed from the arguments (`in_channels` gives the image channels).
- Speed (same outputs to float rounding): the attention's K/V projections are computed once per forward and
  the query's two linear maps are folded into one; the neuron-level models run neuron-major (a batched matmul
  with contiguous operands and gradients, a multiply-and-sum for the 2-wide last layer) with their weights
  prepared once per forward; every GLU is computed as value * sigmoid(gate) on contiguous halves; both
  synchronisations share one gather and one recurrence; the output projection and certainty run once over
  all ticks.
- Adaptive compute (`halt_threshold`): a sample stops once its certainty reaches the threshold (after
  `min_ticks`), its prediction is frozen for the remaining ticks, it leaves the batch, and the forward ends
  when every sample has halted. `CTMOutput.ticks` says how many ticks each sample used. For outputs with
  several positions (parity, mazes) `halt_on="min"` (the default) halts when the least certain position is
  sure; `halt_on="mean"` uses the official certainty, the mean over positions, which halts while a few
  positions are still unresolved.
- `track=True` returns tensors (not numpy arrays) of pre-/post-activations, attention and synchronisations.

The blocks (`SuperLinear`, `NeuronLevelModels`, `SynapseUNET`, `make_synapses`, `synch_pairs`, backbones,
positional embeddings, `attention_memory` / `attend`) are importable on their own for other CTM variants.

The family is one small package, timm-style: `blocks` (synapses, neuron-level models, synchronisation,
backbones, positional embeddings, the shared input stack), `model` (the CTM, its LSTM baseline, `CTMOutput`,
`forward_reference`), `variants` (the registered task variants) and `official` (the official checkpoints).
"""

from .blocks import *  # noqa: F401,F403
from .blocks import __all__ as _blocks
from .model import *  # noqa: F401,F403
from .model import __all__ as _model
from .official import *  # noqa: F401,F403
from .official import __all__ as _official
from .variants import *  # noqa: F401,F403
from .variants import __all__ as _variants

__all__ = [*_blocks, *_model, *_variants, *_official]
