"""End to end through the real `biozoo` command: quickstart, export, resume, DDP, loggers, one-line errors."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

import biozoo
from biozoo.envs import DigitsDataModule

from conftest import REPO, run_biozoo

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def val_rows(metrics_csv: Path) -> list[dict]:
    with open(metrics_csv) as f:
        return [row for row in csv.DictReader(f) if row.get("val/acc")]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("biozoo: error:"), proc.stderr[-2000:]
    for needle in needles:
        assert needle in last, last


def test_quickstart_trains_a_useful_model_and_exports(tmp_path):
    root = tmp_path / "run"
    proc = run_biozoo("fit", "-c", QUICKSTART, "--trainer.default_root_dir", str(root))
    metrics = root / "version_0" / "metrics.csv"
    for path in (root / "version_0" / "checkpoints" / "last.ckpt", metrics, metrics.parent / "learning_curve.png",
                 metrics.parent / "config.yaml"):
        assert path.exists(), path
        assert str(path.parent) in proc.stdout or path.name == "config.yaml"
    assert float(val_rows(metrics)[-1]["val/acc"]) >= 0.93

    out = tmp_path / "portable"
    run_biozoo("export", str(root / "version_0" / "checkpoints" / "last.ckpt"), str(out))
    model = biozoo.load_pretrained(out)
    dm = DigitsDataModule()
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        accuracy = (model(x).logits.argmax(1) == y).float().mean().item()
    assert accuracy >= 0.93

    test = run_biozoo("test", "-c", QUICKSTART, "--trainer.default_root_dir", str(root),
                      "--ckpt_path", str(root / "version_0" / "checkpoints" / "last.ckpt"))
    assert "test/acc" in test.stdout


def test_same_command_twice_gives_two_fresh_runs_with_equal_metrics(tmp_path):
    args = ["fit", "-c", QUICKSTART, "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path)]
    first, second = run_biozoo(*args), run_biozoo(*args)
    assert "Restor" not in first.stdout + first.stderr + second.stdout + second.stderr  # never resumed
    assert "already holds a run (version_0" in second.stdout and "--ckpt_path last" in second.stdout
    assert str(tmp_path / "version_1") in second.stdout
    runs = [[(r["val/loss"], r["val/acc"]) for r in val_rows(tmp_path / v / "metrics.csv")]
            for v in ("version_0", "version_1")]
    assert runs[0] == runs[1] and len(runs[0]) == 2
    steps = [torch.load(tmp_path / v / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
             for v in ("version_0", "version_1")]
    assert steps == [40, 40]  # each trained its own 2 epochs from scratch


def test_killed_fit_resumes_from_its_last_checkpoint(tmp_path):
    root = tmp_path / "run"
    ckpt_dir = root / "version_0" / "checkpoints"
    args = ["fit", "-c", QUICKSTART, "--trainer.default_root_dir", str(root), "--data.init_args.batch_size", "8",
            "--trainer.max_epochs", "2", "--checkpoint.every_n_train_steps", "10"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([sys.executable, "-m", "biozoo", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps_per_epoch = 158  # 1258 training images / batch 8
    deadline = time.time() + 240
    saved = 0
    while time.time() < deadline and proc.poll() is None:
        if (ckpt_dir / "last.ckpt").exists():
            try:
                saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"]
            except Exception:  # being written
                saved = 0
            if saved >= 30:  # mid-epoch, in the first epoch (before any val/loss exists)
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"]
    assert saved % steps_per_epoch and saved < steps_per_epoch, "the kill must land mid-epoch 0, after a save"

    resumed = run_biozoo(*args, "--ckpt_path", "last")
    assert "Restoring states from the checkpoint path" in resumed.stdout + resumed.stderr
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == saved  # the old run is kept
    final = torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    # Lightning resumes mid-epoch and finishes the remaining batches (give or take one save interval)
    assert 2 * steps_per_epoch - 10 <= final["global_step"] <= 2 * steps_per_epoch
    assert final["epoch"] >= 1  # 1 or 2, depending on whether the last save came before or after epoch end
    resumed_rows = val_rows(root / "version_1" / "metrics.csv")
    assert len(resumed_rows) == 2 and int(resumed_rows[0]["step"]) > saved  # the rest of epoch 0, then epoch 1


def test_tensorboard_and_offline_wandb_loggers(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "WANDB_MODE": "", "WANDB_SILENT": "true"}
    run_biozoo("fit", "-c", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
               "--trainer.logger+=biozoo.train.TensorBoardLogger", "--trainer.logger+=biozoo.train.WandbLogger",
               env=env)
    run = tmp_path / "version_0"
    assert (run / "metrics.csv").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    runs = list((run / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    assert not list(home.rglob("*wandb*"))  # W&B's cache and config stay inside the run folder too


def test_list_and_print_config():
    listing = run_biozoo("list").stdout
    for name in ("mlp", "lstm", "resnet", "DigitsDataModule", "SupervisedTask"):
        assert name in listing
    config = run_biozoo("fit", "-c", QUICKSTART, "--print_config").stdout
    assert "class_path: biozoo.train.SupervisedTask" in config and "checkpoint:" in config


def test_bad_input_gives_one_line_errors(tmp_path):
    assert_one_line_error(run_biozoo("fit", "-c", QUICKSTART, "--model.init_args.lrr", "0.1", check=False),
                          "lrr", "not accepted")
    assert_one_line_error(run_biozoo("fit", "-c", QUICKSTART, "--model.init_args.model", "mpl", check=False),
                          "unknown model 'mpl'", "Did you mean: mlp")
    assert_one_line_error(run_biozoo("fit", "-c", QUICKSTART, "--trainer.max_epochs", "1", "--trainer.default_root_dir",
                                     str(tmp_path / "r"), "--model.init_args.model_kwargs", "{in_features: 100}",
                                     check=False), "mlp expects input of shape (B, 100)")
    wrong = tmp_path / "wrong"
    biozoo.create_model("mlp", hidden=[7]).save_pretrained(wrong)
    assert_one_line_error(run_biozoo("fit", "-c", QUICKSTART, "--model.init_args.checkpoint_path", str(wrong),
                                     check=False), "shape mismatch")
    data = (wrong / "model.safetensors").read_bytes()
    (wrong / "model.safetensors").write_bytes(data[:100])
    assert_one_line_error(run_biozoo("fit", "-c", QUICKSTART, "--model.init_args.model_kwargs", "{hidden: [7]}",
                                     "--model.init_args.checkpoint_path", str(wrong), check=False), "corrupt")


def test_export_refuses_a_code_running_pickle_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    code = (f"import os, torch\nclass E:\n    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'state_dict': {{}}, 'x': E()}}, {str(evil)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert_one_line_error(run_biozoo("export", str(evil), str(tmp_path / "out"), check=False), "refused to load")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
