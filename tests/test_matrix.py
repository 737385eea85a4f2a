"""Every task config x every model config: a fitting pair trains for 2 steps through `biozoo fit -c T -c M` (in this
process) with a finite loss and the output shape its task's DataSpec says; a pair that does not fit refuses in one
line, at link time, before any forward."""

from __future__ import annotations

import math

import pytest
import torch

from biozoo.train.matrix import check_pair, model_configs, run_pair, task_configs, task_spec

TASKS, MODELS = task_configs(), model_configs()
PAIRS = [(t, m) for t in TASKS for m in MODELS]
ON_DISK = {"mnist", "cifar10"}  # torchvision's real files: not generated, so not in the 2-step runs
# optional libraries (CI installs them: the test extra and .ci/run's neurogym line)
NEEDS = {"neurogym": "neurogym", "cfc": "ncps", "ltc": "ncps", "lif_snn": "snntorch"}


def missing(*names: str) -> str | None:
    import importlib.util

    for name in names:
        module = NEEDS.get(name)
        if module and importlib.util.find_spec(module) is None:
            return module
    return None


def expected_logits_shape(spec, loss: str) -> tuple[int, ...]:
    if spec.target == "next_token":
        return (spec.num_classes,)  # the neuroformer's id vocabulary is larger; checked loosely below
    return (spec.classes, *spec.positions)


def test_every_task_and_model_has_a_config():
    import biozoo

    assert set(biozoo.list_models()) <= set(MODELS), "every registered model needs configs/models/<name>.yaml"
    required = {"digits", "rotated_digits", "mnist", "cifar10", "parity16", "parity64", "sorting", "mazes", "qamnist",
                "linedraw", "seqdigits", "spikes", "swimmer_ppo", "swimmer_es", "cartpole", "acrobot",
                "fourrooms", "neurogym"}
    assert required <= set(TASKS)


@pytest.mark.parametrize("task, model", PAIRS, ids=[f"{t}-{m}" for t, m in PAIRS])
def test_pair(task, model, tmp_path):
    if missing(task, model):
        pytest.skip(f"{missing(task, model)} is not installed (README: NeuroGym tasks, peer libraries)")
    reason = check_pair(TASKS[task], MODELS[model])
    if reason is not None:  # refuses in one line, naming the model and what it reads
        assert "\n" not in reason and reason.startswith(model) and "cannot" in reason
        from biozoo.train.cli import BiozooCLI
        from biozoo._core import SpecError

        with pytest.raises(SpecError, match="cannot"):  # and the CLI refuses the same way, before training
            BiozooCLI(args=["-c", str(TASKS[task]), "-c", str(MODELS[model]),
                            f"--trainer.default_root_dir={tmp_path}"], run=False)
        return
    if task in ON_DISK:
        pytest.skip(f"{task} reads torchvision's files; its pairs run where the data are (biozoo matrix --run)")
    torch.manual_seed(0)
    result = run_pair(TASKS[task], MODELS[model], steps=2, root=tmp_path)
    assert result.status == "pass", result.reason
    assert math.isfinite(result.loss) or math.isfinite(result.value)
    spec = task_spec(TASKS[task])
    if spec.target in ("classes", "regression"):
        assert result.shape[1:] == expected_logits_shape(spec, ""), result.shape
    assert not any(tmp_path.parent.glob("*.ckpt"))
    assert result.parameters > 0  # the cost columns
