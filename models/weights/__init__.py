"""Pretrained checkpoints shipped with biozoo: one folder each (config.json + model.safetensors).

Each was trained by our own CLI with a config in configs/; the entries below record its metric, the command,
and the sha256 of its weights (checked on load).
"""

import json
from pathlib import Path

from .._registry import PretrainedCfg, register_pretrained

HERE = Path(__file__).parent

for card in sorted(HERE.glob("*/card.json")):
    entry = json.loads(card.read_text())
    register_pretrained(entry.pop("model"), PretrainedCfg(file=card.parent.name, **entry))
