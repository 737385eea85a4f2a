"""Fused fast paths (the CTM's folded query and GLU, the zoo transformer's PyTorch inference path, the Neuroformer's
cached step) read a layer's weights instead of calling it. They may only while the layer is still the plain module
they expect: nothing attached to it (dendrites, a user's probe) and not replaced (a peft LoRA layer in its place).
"""

from __future__ import annotations

from torch import nn


def is_plain(module: nn.Module, *types: type) -> bool:
    """True while `module` is exactly one of `types` (default nn.Linear) with no forward hooks."""
    return type(module) in (types or (nn.Linear,)) and not (module._forward_hooks or module._forward_pre_hooks)
