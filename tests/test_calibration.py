"""Calibration: the official tick-averaged readout, ECE, the reliability diagram, and `biozoo test` writing them."""

from __future__ import annotations

import json

import numpy as np
import torch

import biozoo
from biozoo.envs import DigitsDataModule
from biozoo.train.calibration import calibration_report, ece, reliability, tick_confidences

from conftest import run_biozoo


def test_tick_confidence_is_the_official_readout():
    """run_imagenet_analysis.py: softmax(predictions[:, :, :t+1], axis=1)[arange(N), pred_t].mean(-1)."""
    torch.manual_seed(0)
    logits, targets = torch.randn(40, 10, 6), torch.randint(0, 10, (40,))
    confidence, correct = tick_confidences(logits, targets)
    probs = logits.softmax(1).numpy()
    for t in range(6):
        pred = logits[:, :, t].argmax(1).numpy()
        official = probs[:, :, :t + 1][np.arange(40), pred].mean(-1)
        assert np.allclose(confidence[:, t].numpy(), official, atol=1e-6)
        assert (correct[:, t].numpy() == (pred == targets.numpy())).all()


def test_ece_by_hand():
    confidence = torch.tensor([0.95, 0.95, 0.95, 0.95, 0.55, 0.55])
    correct = torch.tensor([True, True, True, False, True, False])
    # two occupied bins of 15: |0.75 - 0.95| * 4/6 + |0.5 - 0.55| * 2/6
    assert abs(ece(confidence, correct) - (0.2 * 4 / 6 + 0.05 * 2 / 6)) < 1e-6
    centres, accuracies, counts = reliability(confidence, correct)
    assert counts == [2, 4] and accuracies == [0.5, 0.75]


def test_report_compares_models_on_one_diagram(tmp_path):
    data = DigitsDataModule(batch_size=128)
    data.setup("test")
    torch.manual_seed(0)
    ctm = biozoo.create_model("ctm", iterations=3, d_model=16, d_input=8, heads=1, n_synch_out=4, n_synch_action=4,
                              memory_length=3, backbone_type="resnet18-1", in_channels=1, num_classes=10)
    mlp = biozoo.create_model("mlp", in_features=64, num_classes=10)
    report = calibration_report({"ctm": ctm, "mlp": mlp}, data.test_dataloader(), tmp_path)
    assert report["ctm"]["ticks"] == 3 and len(report["ctm"]["ece_per_tick"]) == 3 and report["mlp"]["ticks"] == 1
    assert 0 <= report["mlp"]["ece"] <= 1 and report["mlp"]["n"] == report["ctm"]["n"]
    assert (tmp_path / "calibration.png").stat().st_size > 0
    assert json.loads((tmp_path / "calibration.json").read_text())["ctm"]["n"] == report["ctm"]["n"]


def test_biozoo_test_writes_the_calibration(tmp_path):
    root = tmp_path / "run"
    common = ["-c", "configs/tasks/digits.yaml", "-c", "configs/models/mlp.yaml",
              "--trainer.default_root_dir", str(root)]
    run_biozoo("fit", *common, "--trainer.max_steps", "20")
    proc = run_biozoo("test", *common, "--ckpt_path", "last")
    report = json.loads(next(root.glob("version_*/calibration/calibration.json")).read_text())
    (name,) = report
    assert 0 <= report[name]["ece"] <= 1 and "ECE" in proc.stdout
    assert next(root.glob("version_*/calibration/calibration.png")).stat().st_size > 0
