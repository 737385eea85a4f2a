"""Cortico-cerebellar RNN (ccRNN): a cortical RNN whose missing future gradients are predicted by a cerebellum.

Pemberton, Boven, Apps, Costa, "Cortico-cerebellar networks as decoupling neural interfaces", NeurIPS 2021, and
Boven, Pemberton, Chadderton, Apps, Costa, "Cerebro-cerebellar networks facilitate learning through feedback
decoupling", Nat. Commun. 14:51 (2023). The cerebellum is a decoupled neural interface (synthetic gradients,
Jaderberg et al., ICML 2017, arXiv 1608.05343) attached to a recurrent cortex.

Cortex (one layer, `cell` = lstm | gru | rnn): state s_t = [h_t, c_t] for the LSTM, s_t = h_t otherwise, and a
linear readout y_t = W_o h_t + b_o at every step (`readout="last"` makes `forward` return the last step only).

Cerebellum: a feed-forward ReLU network C(s) with `cerebellum_depth` hidden layers of `cerebellum_width` units
that reads the cortical state and predicts the gradient of the future loss with respect to it, dL_future/ds.
Its last layer starts at zero, so C = 0 at initialisation. It only feeds back gradients, never activity.

Training (`biozoo.train.ccrnn`) splits each sequence into windows of K = `truncation` steps; the state is detached at
each window start s_a and, at the window end s_b,

    injected feedback:     dL/ds_b  +=  lambda * C(s_b)                               (lambda = sg_scale = 0.1)
    cerebellar target:     g(s_a)    =  dL_window/ds_a + lambda * (ds_b/ds_a)^T C(s_b)   (bootstrapped, TD-like)
    cerebellar loss:       L_C       =  mean_batch || C(s_a) - stopgrad(g(s_a)) ||^2

so lambda both scales the feedback into the cortex and discounts the bootstrap. `truncation=0` means no
truncation (full BPTT); `cerebellum=False` builds the plain cortex (the cRNN baselines).

Differences from the official code (github.com/neuralml/ccDNI, used for facts only):
- No synthetic gradient is injected at the end of the sequence (the official RNN wrapper also injects one there,
  from states the cerebellum is never trained on); there is no future after the last step, so we inject zero.
- The task loss is normalised over the whole sequence (each window contributes its share of the sequence mean),
  so that the window gradients sum exactly to the full-BPTT gradient; the official code averages per window.
- The optional sparse "mossy fibre" mask and label context (cDNI) are left out (not used in the NeurIPS paper).
- lambda = 0.1 is the default, as in the paper. With the loss only at the last step (recognition) the discount
  lambda^(windows) starves the early windows, so configs/ccrnn/seqdigits.yaml uses lambda = 0.3; our configs also
  let the cerebellum learn 10x slower than the cortex (`cerebellum_lr_scale` of the task). benchmarks/ccrnn.py
  gives the numbers with and without these changes.
"""

from __future__ import annotations

import torch
from torch import nn

from biozoo._core import DataSpec, ModelOutput, SpecError

from ._hub import PretrainedMixin
from ._registry import register_model, suggest
from .errors import BiozooError, UnknownNameError, check_shape

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


class Cerebellum(nn.Module):
    """ReLU MLP from the cortical state to a predicted gradient of the same size; last layer zero-initialised."""

    def __init__(self, state_size: int, width: int = 400, depth: int = 2):
        super().__init__()
        layers: list[nn.Module] = []
        d = state_size
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.ReLU()]
            d = width
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(d, state_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(state))


@register_model(name="ccrnn")
class CorticoCerebellarRNN(PretrainedMixin, nn.Module):
    reads = ("sequence", "observation")
    online = True  # the cortex steps through time; readout "all" answers each step from the steps so far

    """Cortex (LSTM/GRU/RNN + linear readout) with an optional cerebellum predicting future gradients.

    The state travels as one flat (B, S) tensor ([h, c] for the LSTM) so that gradients can be injected into it
    and read from it at window boundaries: `initial_state`, `run_window` and `predict_gradient` are the pieces
    the windowed trainer uses; `forward` runs a whole sequence.
    """

    def __init__(self, input_size: int = 1, output_size: int = 2, hidden_size: int = 50, cell: str = "lstm",
                 readout: str = "all", cerebellum: bool = True, cerebellum_width: int = 400,
                 cerebellum_depth: int = 2, truncation: int = 1, sg_scale: float = 0.1):
        super().__init__()
        if cell not in CELLS:
            raise UnknownNameError(f"unknown ccrnn cell {cell!r}.{suggest(cell, list(CELLS))} Known: {', '.join(CELLS)}")
        if readout not in ("all", "last"):
            raise BiozooError(f"ccrnn readout must be 'all' or 'last', got {readout!r}")
        if truncation < 0:
            raise BiozooError(f"ccrnn truncation must be >= 0 (0 = full BPTT), got {truncation}")
        self.input_size, self.output_size, self.hidden_size = input_size, output_size, hidden_size
        self.cell, self.readout, self.truncation, self.sg_scale = cell, readout, truncation, sg_scale
        self.cortex = CELLS[cell](input_size, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, output_size)
        self.cerebellum = Cerebellum(self.state_size, cerebellum_width, cerebellum_depth) if cerebellum else None

    @property
    def state_size(self) -> int:
        return 2 * self.hidden_size if self.cell == "lstm" else self.hidden_size

    def initial_state(self, batch_size: int, like: torch.Tensor | torch.device | str = "cpu") -> torch.Tensor:
        if isinstance(like, torch.Tensor):
            return like.new_zeros(batch_size, self.state_size)
        return torch.zeros(batch_size, self.state_size, device=like)

    def _unpack(self, state: torch.Tensor):
        if self.cell == "lstm":
            h, c = state.chunk(2, dim=1)
            return h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()
        return state.unsqueeze(0).contiguous()

    def _pack(self, state) -> torch.Tensor:
        return torch.cat([state[0][0], state[1][0]], dim=1) if self.cell == "lstm" else state[0]

    def run_window(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the cortex over x (B, k, F) from the flat state (B, S): per-step outputs (B, k, O), end state (B, S)."""
        hidden, last = self.cortex(x, self._unpack(state))
        return self.head(hidden), self._pack(last)

    def predict_gradient(self, state: torch.Tensor) -> torch.Tensor:
        """The cerebellum's estimate of dL_future/d state (unscaled), (B, S)."""
        if self.cerebellum is None:
            raise BiozooError("this ccrnn was built with cerebellum=False; it cannot predict gradients")
        return self.cerebellum(state)

    def as_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, F) as given, (B, T) as (B, T, 1), or an image (B, C, H, W) read one row per step, (B, H, C*W)."""
        if x.dim() == 4:
            x = x.permute(0, 2, 1, 3).flatten(2)
        elif x.dim() == 2:  # (B, T) scalars, or one observation step (B, F) of a recurrent policy
            x = x.unsqueeze(-1) if self.input_size == 1 else x.unsqueeze(1)
        check_shape("ccrnn", x, f"(B, T, {self.input_size}) or an image (B, C, H, W) with C*W = {self.input_size}",
                    x.dim() == 3 and x.shape[-1] == self.input_size)
        return x

    @classmethod
    def spec_kwargs(cls, spec: DataSpec, kwargs: dict) -> dict:
        if spec.input == "observation":
            return {"input_size": spec.in_features, "output_size": spec.classes, "readout": "last", **kwargs}
        length, features = spec.sequence_shape
        if spec.positions not in ((), (length,)):
            raise SpecError(f"ccrnn reads out every step or the last one; targets at {spec.positions} positions "
                            f"do not match its {length} input steps")
        return {"input_size": features, "output_size": spec.classes, "readout": "all" if spec.positions else "last",
                **kwargs}

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None) -> ModelOutput:
        """`.logits` (B, O, T) per step (readout "all") or (B, O) at the last step; `.state` the end state (B, S)."""
        x = self.as_sequence(x)
        if state is None:
            state = self.initial_state(x.shape[0], x)
        out, last = self.run_window(x, state)
        return ModelOutput(out.transpose(1, 2) if self.readout == "all" else out[:, -1], state=last)


# Paper configurations --------------------------------------------------------------------------------------------

@register_model
def ccrnn_linedraw(input_size: int = 1, output_size: int = 2, cell: str = "lstm", cerebellum: bool = True,
                   truncation: int = 1, sg_scale: float = 0.1) -> CorticoCerebellarRNN:
    """Simple line drawing (NeurIPS 2021 Fig. 2): LSTM 50, cerebellum 2 x 400, K = 1."""
    return CorticoCerebellarRNN(input_size, output_size, 50, cell, "all", cerebellum, 400, 2, truncation, sg_scale)


@register_model
def ccrnn_seqmnist(input_size: int = 28, output_size: int = 10, readout: str = "last", cell: str = "lstm",
                   cerebellum: bool = True, truncation: int = 3, sg_scale: float = 0.1) -> CorticoCerebellarRNN:
    """Sequential MNIST tasks (recognition, line and digit drawing): LSTM 30, cerebellum 1 x 300, K = 3 of 28."""
    return CorticoCerebellarRNN(input_size, output_size, 30, cell, readout, cerebellum, 300, 1, truncation, sg_scale)


def _every_step_spec(spec: DataSpec, kwargs: dict) -> dict:
    kwargs = CorticoCerebellarRNN.spec_kwargs(spec, kwargs)
    if kwargs.get("readout") != "all":
        raise SpecError(f"ccrnn_linedraw cannot predict {spec.describe_target()}: it reads out every step")
    return kwargs


ccrnn_linedraw.spec_kwargs = _every_step_spec
