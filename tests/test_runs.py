"""Trustworthy runs, fault by fault: fresh starts, explicit resume, atomic checkpoints, nothing written outside the
run folder, code-running pickles refused, configs that run from any folder, DDP metrics over the whole val set."""

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO, run_biozoo

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def last_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("biozoo: error:"), proc.stderr[-2000:]
    return last


def rows(metrics_csv: Path, key: str) -> list[dict]:
    with open(metrics_csv) as f:
        return [row for row in csv.DictReader(f) if row.get(key)]


def evil_pickle(path: Path, marker: Path) -> None:
    code = (f"import os, torch\nclass E:\n    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'state_dict': {{}}, 'epoch': 0, 'global_step': 5, 'x': E()}}, {str(path)!r})\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], check=True)


# In the child: the checkpoint save at step 15 writes half its bytes, says so, and hangs until killed.
HANG_AT_STEP_15 = """
import sys, time, torch
from pathlib import Path
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if not isinstance(obj, dict) or obj.get("global_step") != 15:
        return real_save(obj, f, *args, **kwargs)
    import io
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    Path(sys.argv[1]).write_text(str(obj.get("global_step")))
    time.sleep(600)
torch.save = save
from biozoo.cli import main
main(sys.argv[2:])
"""


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    root, marker = tmp_path / "run", tmp_path / "hanging"
    args = ["fit", "-c", QUICKSTART, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2",
            "--checkpoint.every_n_train_steps", "5", "--checkpoint.monitor", "null", "--checkpoint.save_top_k", "0",
            "--trainer.log_every_n_steps", "1"]
    proc = subprocess.Popen([sys.executable, "-c", HANG_AT_STEP_15, str(marker), *args], cwd=tmp_path,
                            env={**os.environ, "WANDB_MODE": "offline"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "the save at step 15 never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert int(marker.read_text()) == 15
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 10  # the previous save, whole
    resumed = run_biozoo(*args, "--ckpt_path", "last", cwd=tmp_path)
    assert f"resuming from {last}" in resumed.stdout
    final = torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 40
    steps = [int(r["step"]) for r in rows(root / "version_1" / "metrics.csv", "train/loss_step")]
    assert steps and min(steps) == 10  # it went on from step 10 (logged 0-based): nothing redone, nothing lost
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hanging", "run"]  # nothing else in the cwd


def test_a_corrupt_checkpoint_names_the_previous_good_one(tmp_path):
    args = ["fit", "-c", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1"]
    run_biozoo(*args)
    good = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    bad = tmp_path / "version_1" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:5000])  # newer, truncated
    line = last_line_error(run_biozoo(*args, "--ckpt_path", "last", check=False))
    assert str(bad) in line and "truncated" in line and f"previous good one is {good}" in line
    line = last_line_error(run_biozoo(*args, "--ckpt_path", str(bad), check=False))
    assert str(bad) in line and str(good) in line


def test_a_planted_on_exception_checkpoint_in_the_cwd_is_ignored(tmp_path):
    planted = tmp_path / "on_exception.ckpt"
    planted.write_bytes(b"not a checkpoint at all")
    (tmp_path / "runs" / "quickstart" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "quickstart" / "checkpoints" / "on_exception.ckpt").write_bytes(b"junk")  # old layout
    proc = run_biozoo("fit", "-c", QUICKSTART, "--trainer.max_epochs", "1", cwd=tmp_path)
    assert "Restor" not in proc.stdout + proc.stderr
    assert torch.load(tmp_path / "runs/quickstart/version_0/checkpoints/last.ckpt", weights_only=True)["global_step"] == 20
    assert planted.read_bytes() == b"not a checkpoint at all"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["on_exception.ckpt", "runs"]


def test_a_crash_before_training_writes_nothing(tmp_path):
    line = last_line_error(run_biozoo("fit", "-c", str(REPO / "configs/ccrnn/seqmnist.yaml"),
                                      "--trainer.fast_dev_run", "1", cwd=tmp_path, check=False))
    assert "MNIST" in line and str(Path("data")) in line
    assert list(tmp_path.iterdir()) == []  # no on_exception.ckpt, no empty run folders


def test_an_interrupted_fit_saves_inside_its_own_run_and_resumes_only_when_asked(tmp_path):
    root = tmp_path / "run"
    args = ["fit", "-c", QUICKSTART, "--trainer.default_root_dir", str(root), "--checkpoint.monitor", "null"]
    slow = ["--trainer.max_epochs", "10", "--data.init_args.batch_size", "8"]  # 1580 steps
    proc = subprocess.Popen([sys.executable, "-m", "biozoo", *args, *slow], cwd=tmp_path,
                            env={**os.environ, "WANDB_MODE": "offline"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    # metrics.csv is first flushed after 100 training steps: the loop is running (a signal during setup saves nothing)
    while time.time() < deadline and not (root / "version_0" / "metrics.csv").exists():
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Lightning stops gracefully and the callback saves the state
    proc.communicate(timeout=60)
    crash = root / "version_0" / "checkpoints" / "on_exception.ckpt"
    step = torch.load(crash, weights_only=True)["global_step"]
    assert 0 < step < 1580
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    fresh = run_biozoo(*args, "--trainer.max_epochs", "1", cwd=tmp_path)  # no --ckpt_path: a fresh start
    assert "Restor" not in fresh.stdout + fresh.stderr
    assert "already holds a run (version_0: on_exception.ckpt)" in fresh.stdout
    assert torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20

    resumed = run_biozoo(*args, *slow, "--ckpt_path", str(crash), cwd=tmp_path)
    assert f"resuming from {crash}" in resumed.stdout
    assert torch.load(root / "version_2" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1580


def test_a_code_running_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    root = tmp_path / "run"
    evil = root / "version_0" / "checkpoints" / "last.ckpt"
    evil_pickle(evil, marker)
    evil_pickle(tmp_path / "on_exception.ckpt", marker)
    base = ["-c", QUICKSTART, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1"]
    refusals = {"refused to load": (["fit", *base, "--ckpt_path", "last"], ["fit", *base, "--ckpt_path", str(evil)],
                                    ["validate", *base, "--ckpt_path", str(evil)], ["export", str(evil), str(tmp_path / "x")]),
                "is not a .safetensors file": (["fit", *base, "--model.init_args.checkpoint_path", str(evil)],)}
    for reason, commands in refusals.items():
        for args in commands:
            line = last_line_error(run_biozoo(*args, cwd=tmp_path, check=False))
            assert reason in line, (args, line)
            assert not marker.exists(), args
    run_biozoo("fit", *base, cwd=tmp_path)  # a plain fit trains beside them without touching them
    assert not marker.exists()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_parses_from_any_folder(config, tmp_path, monkeypatch, capsys):
    from biozoo.cli import main

    text = yaml.safe_load(config.read_text())

    def strings(node):
        if isinstance(node, dict):
            for value in node.values():
                yield from strings(value)
        elif isinstance(node, list):
            for value in node:
                yield from strings(value)
        elif isinstance(node, str):
            yield node

    repo_paths = [s for s in strings(text) if s.split("/")[0] in ("models", "configs", "benchmarks", "tests")]
    assert not repo_paths, f"{config.name} names files by repo-relative paths (use a registered tag): {repo_paths}"
    monkeypatch.chdir(tmp_path)
    # a model config composes with a task config (configs/tasks/ holds the task, data and trainer)
    task = ["-c", str(REPO / "configs/tasks/digits.yaml")] if config.parent.name == "models" else []
    if "data" not in text and config.parent.name not in ("models", "tasks"):
        # an override file (the settings a paper changes) parses with the task and model configs its usage names
        usage = " ".join(line.lstrip("# ").rstrip("\\") for line in config.read_text().splitlines()
                         if line.startswith("#"))
        named = re.findall(r"-c\s+(configs/\S+\.yaml)", usage)
        task = [arg for path in named if REPO / path != config for arg in ("-c", str(REPO / path))]
        assert task, f"{config.name} declares no data and its usage names no task config to compose with"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *task, "-c", str(config), "--print_config"])
    assert exit_.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_a_bad_checkpoint_path_in_a_union_gives_its_real_cause(tmp_path):
    args = ["fit", "-c", str(REPO / "configs/neuroformer/finetune_speed.yaml"), "--trainer.fast_dev_run", "1",
            "--model.init_args.finetune_from", "models/weights/neuroformer.sim100"]
    line = last_line_error(run_biozoo(*args, cwd=tmp_path, check=False))
    assert line == ("biozoo: error: no checkpoint at models/weights/neuroformer.sim100 (give a folder with "
                    "config.json + model.safetensors, or a tag: neuroformer.sim100, neuroformer.sim100_pretrain, neuroformer.sim100_spikes)")
    debug = run_biozoo(*args, "--debug", cwd=tmp_path, check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert not (tmp_path / "runs").exists()  # only the data cache (data_dir) was written


def test_two_process_ddp_validates_the_whole_set_and_resumes(tmp_path):
    data = ["--data.init_args.val_fraction", "0.1007"]  # 181 validation images: odd, so the ranks' halves differ
    ddp = ["fit", "-c", QUICKSTART, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator",
           "cpu", "--trainer.default_root_dir", str(tmp_path), "--trainer.deterministic", "false", *data]
    proc = run_biozoo(*ddp, "--trainer.max_epochs", "1")
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0"]  # both ranks wrote into one run folder
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 10  # 1258 images / 2 ranks / batch 64
    logged = rows(tmp_path / "version_0" / "metrics.csv", "val/acc")[-1]

    single = run_biozoo("validate", "-c", QUICKSTART, "--trainer.default_root_dir", str(tmp_path), *data,
                        "--ckpt_path", str(last))
    reference = rows(tmp_path / "version_1" / "metrics.csv", "val/acc")[-1]
    assert single.returncode == 0
    for key in ("val/acc", "val/loss"):
        assert float(logged[key]) == pytest.approx(float(reference[key]), abs=1e-6), key

    resumed = run_biozoo(*ddp, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert f"resuming from {last}" in resumed.stdout and "Restored all states" in resumed.stdout + resumed.stderr
    assert torch.load(tmp_path / "version_2" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0", "version_1", "version_2"]


def test_the_model_a_fit_leaves_is_its_best(tmp_path):
    """RestoreBest: after fit the task holds the best checkpoint's weights. Monitoring val/acc with mode "min" makes
    the "best" the first epoch's, so it is not simply the last state."""
    from biozoo.train.cli import BiozooCLI

    cli = BiozooCLI(args=["fit", "-c", QUICKSTART, f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=4",
                          "--checkpoint.monitor=val/acc", "--checkpoint.mode=min", "--trainer.enable_progress_bar=false",
                          "--trainer.enable_model_summary=false"])
    best = cli.trainer.checkpoint_callback.best_model_path
    restored = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RestoreBest")
    assert restored.restored == best
    state = torch.load(best, weights_only=True)["state_dict"]
    last = torch.load(cli.trainer.checkpoint_callback.last_model_path, weights_only=True)["state_dict"]
    assert best != cli.trainer.checkpoint_callback.last_model_path
    assert not all(torch.equal(v, last[k]) for k, v in state.items())
    assert all(torch.equal(v, cli.model.state_dict()[k]) for k, v in state.items())
