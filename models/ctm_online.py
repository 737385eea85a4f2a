"""The CTM as an online agent over a sequence (`ctm_online`): the recurrent core of `ctm_rl` (Darlow et al. 2025,
section 8) run step by step, a few ticks per input step, its state carried to the next step, as `ctm_rl_agent`
carries it between env steps. The answer at step t is a linear readout of the output synchronisation after step
t's ticks, so it reads steps <= t only: the CTM for online tasks (NeuroGym), where `ctm` (attention over the whole
sequence) would see the future.

Not in the official code: the official RL agent is trained by PPO; here the same core is trained by supervision at
every step (the readout replaces the actor and critic heads).
"""

from __future__ import annotations

import torch
from torch import nn

from biozoo._core import ModelOutput

from ._hub import PretrainedMixin
from ._registry import register_model
from .ctm_variants import ContinuousThoughtMachineRL, synch_step
from .errors import check_shape
from .peers import StepModel


@register_model(name="ctm_online")
class OnlineCTM(PretrainedMixin, nn.Module):
    """`forward(x, state=None)`: x (B, T, F) -> `.logits` (B, C, T), one answer per step (the last only, (B, C),
    with `per_step=False`); or one step (B, F) -> (B, C). `.state` = (pre-activation trace, post-activation window), each (B, D, M); `initial_state(B)` the
    learned start. `ticks_per_step` internal ticks think about each step (the core's `iterations`)."""

    reads = ("sequence", "observation")
    predicts = ("classes", "regression", "discrete_actions", "continuous_actions")
    online = True

    spec_kwargs = classmethod(StepModel.spec_kwargs.__func__)  # one answer per step, or the last

    def __init__(self, input_size: int = 3, num_classes: int = 3, ticks_per_step: int = 2, d_model: int = 128,
                 d_input: int = 64, n_synch_out: int = 32, synapse_depth: int = 1, memory_length: int = 8,
                 deep_nlms: bool = True, memory_hidden_dims: int = 8, dropout: float = 0.0, per_step: bool = True):
        super().__init__()
        self.input_size, self.num_classes, self.ticks_per_step = input_size, num_classes, ticks_per_step
        self.per_step = per_step
        self.core = ContinuousThoughtMachineRL(
            iterations=ticks_per_step, d_model=d_model, d_input=d_input, n_synch_out=n_synch_out,
            synapse_depth=synapse_depth, memory_length=memory_length, deep_nlms=deep_nlms,
            memory_hidden_dims=memory_hidden_dims, dropout=dropout, obs_dim=input_size)
        self.head = nn.Linear(self.core.synch_representation_size_out, num_classes)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        return self.core.initial_state(batch_size, device)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None) -> ModelOutput:
        one_step = x.dim() == 2 and x.size(1) == self.input_size  # a policy's observation (B, F)
        steps = x.unsqueeze(1) if one_step else (x.unsqueeze(-1) if x.dim() == 2 else x)
        check_shape("ctm_online", x, f"(B, T, {self.input_size}) or one step (B, {self.input_size})",
                    steps.dim() == 3 and steps.size(-1) == self.input_size)
        if one_step:
            out = self.core(steps[:, 0], state)
            return ModelOutput(self.head(out.logits), state=out.state)
        return self.forward_sequence(steps, state)

    def forward_sequence(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None) -> ModelOutput:
        """The same numbers as `core` called step by step, faster: the backbone reads every step at once, and
        every step's synchronisation is computed after the loop from the windows of the recorded
        post-activations (the window after step t ends at its last tick)."""
        core, (B, T, _), k = self.core, x.shape, self.ticks_per_step
        trace, window = state if state is not None else core.initial_state(B, x.device)
        M = window.size(-1)
        features = core.backbone(x.flatten(0, 1)).view(B, T, -1)
        trace, z = trace.transpose(0, 1), window[:, :, -1]
        zs = []
        for t in range(T):
            for _ in range(k):
                _, trace, z = synch_step(core, features[:, t], z, trace)
                zs.append(z)
        history = torch.cat((window, torch.stack(zs, -1)), -1)  # (B, D, M + T k)
        windows = history.unfold(-1, M, k)[:, :, 1:]  # (B, D, T, M): the window after each step
        synch = core.synchronisation(windows.permute(0, 2, 1, 3).flatten(0, 1))  # (B T, S)
        logits = self.head(synch).view(B, T, -1)
        out = logits.transpose(1, 2) if self.per_step else logits[:, -1]
        return ModelOutput(out, state=(trace.transpose(0, 1), history[:, :, -M:]))
