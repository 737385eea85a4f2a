"""Pretrained checkpoints shipped with biozoo: one folder each, `<model>.<tag>/` holding config.json,
model.safetensors and card.json (task, metrics, the exact training command, sha256 of the weights).

Every one was trained by our own CLI with a config in configs/. `write_card` records a new one; the cards are
registered at import and the sha256 is checked when the weights load.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._registry import PretrainedCfg, register_pretrained, sha256_of

HERE = Path(__file__).parent


def write_card(folder: str | Path, model: str, tag: str, task: str, metrics: dict[str, float], config: str,
               command: str, notes: str = "", license: str = "Apache-2.0", **extra: Any) -> Path:
    """Write card.json for a portable checkpoint folder (after `biozoo export` or `save_pretrained`)."""
    folder = Path(folder)
    card = {"model": model, "tag": tag, "task": task, "metrics": metrics, "config": config, "command": command,
            "sha256": sha256_of(folder / "model.safetensors"), "license": license, "notes": notes, "extra": extra}
    path = folder / "card.json"
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


for card in sorted(HERE.glob("*/card.json")):
    entry = json.loads(card.read_text())
    register_pretrained(entry.pop("model"), PretrainedCfg(file=card.parent.name, **entry))
