"""Trust II (issue 31): nothing read from a checkpoint imports code, nothing is lost on resume or export, bad input
fails in one line before anything runs, SIGTERM stops a run at once, fast dev runs are fast."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import biozoo
from biozoo.models import _hub, _registry

from conftest import REPO, run_biozoo

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
EVIL_MODULE = "open({marker!r}, 'w').write('imported')\nclass X:\n    def __init__(self, *a, **k): pass\n"


def last_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("biozoo: error:"), proc.stderr[-2000:]
    return last


def fake_lightning_checkpoint(path: Path, hyper_parameters: dict) -> None:
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.0", "state_dict": {},
                "hyper_parameters": hyper_parameters}, path)


# 1 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hparams", [{"_class_path": "evilmod.X", "model": "mlp"},
                                     {"_class_path": "biozoo.train.SupervisedTask",
                                      "model_kwargs": {"class_path": "evilmod.X"}}], ids=["task", "nested"])
def test_checkpoint_hyper_parameters_import_nothing(tmp_path, hparams):
    marker = tmp_path / "imported"
    (tmp_path / "evilmod.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    fake_lightning_checkpoint(tmp_path / "evil.ckpt", hparams)
    proc = run_biozoo("validate", "-c", QUICKSTART, "--ckpt_path", "evil.ckpt", "--trainer.default_root_dir",
                      str(tmp_path / "runs"), cwd=tmp_path, check=False)
    line = last_line_error(proc)
    assert "evil.ckpt" in line and ("written by evilmod.X" in line or "names a class to import" in line), line
    assert not marker.exists()


# 2 ------------------------------------------------------------------------------------------------------------
def test_the_best_checkpoint_is_kept_across_a_resume_chain(tmp_path):
    """val/acc with mode "min": the first epoch is the worst, so "best" is version_0's first checkpoint; the
    resumed run (version_1) must not take its own first epoch as best, and RestoreBest restores version_0's."""
    from biozoo.train.cli import BiozooCLI

    args = ["fit", "-c", QUICKSTART, f"--trainer.default_root_dir={tmp_path}", "--checkpoint.monitor=val/acc",
            "--checkpoint.mode=min", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    first = BiozooCLI(args=[*args, "--trainer.max_epochs=2"])
    best = first.trainer.checkpoint_callback.best_model_path
    score = float(first.trainer.checkpoint_callback.best_model_score)
    assert "version_0" in best
    orphan = tmp_path / "version_0" / "checkpoints" / ".last.ckpt.nohost-1.abc.tmp"
    orphan.write_bytes(b"half a checkpoint")
    os.utime(orphan, (time.time() - 7200, time.time() - 7200))  # untouched for 2 h: orphaned
    resumed = BiozooCLI(args=[*args, "--trainer.max_epochs=4", "--ckpt_path=last"])
    assert not orphan.exists()  # item 6: cleaned at the next run start
    callback = resumed.trainer.checkpoint_callback
    assert "version_1" in callback.last_model_path
    assert callback.best_model_path == best and float(callback.best_model_score) == score
    restore = next(cb for cb in resumed.trainer.callbacks if type(cb).__name__ == "RestoreBest")
    assert restore.restored == best
    state = torch.load(best, weights_only=True)["state_dict"]
    assert all(torch.equal(v, resumed.model.state_dict()[k]) for k, v in state.items())


# 3 ------------------------------------------------------------------------------------------------------------
def test_export_refuses_a_folder_holding_a_model_and_replaces_it_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # a stale file of an earlier save
    (out / "notes.txt").write_text("mine")
    lightning = {"state_dict": {f"model.{k}": v for k, v in biozoo.create_model("mlp").state_dict().items()},
                 "biozoo_model_config": {"model": "mlp", "kwargs": {}}}
    torch.save(lightning, tmp_path / "a.ckpt")
    line = last_line_error(run_biozoo("export", str(tmp_path / "a.ckpt"), str(out), check=False))
    assert "already holds a model (adapter_config.json)" in line and "--overwrite" in line
    run_biozoo("export", str(tmp_path / "a.ckpt"), str(out), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert not list(tmp_path.glob(".*partial"))


def test_save_pretrained_changes_nothing_when_the_write_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    biozoo.create_model("mlp", hidden=[8]).save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_hub, "save_model", full_disk)
    with pytest.raises(biozoo.CheckpointError, match="nothing there was changed"):
        biozoo.create_model("mlp", hidden=[16]).save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


# 4 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_weights_of_another_dtype_are_refused(tmp_path, dtype):
    model = biozoo.create_model("mlp", hidden=[8])
    model.save_pretrained(tmp_path)
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(biozoo.CheckpointError, match=r"is stored as (F64|I32), but the model's is F32"):
        biozoo.load_pretrained(tmp_path)
    save_file({k: v.half() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    biozoo.load_pretrained(tmp_path)  # half precision is a float type the model takes


def test_a_config_asking_for_a_huge_model_fails_on_the_header_before_any_allocation(tmp_path):
    biozoo.create_model("mlp", hidden=[8]).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["kwargs"]["hidden"] = [200_000, 200_000]  # 160 GB of float32 if built
    (tmp_path / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(biozoo.CheckpointError, match="shape mismatch"):
        biozoo.load_pretrained(tmp_path)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize("change", [{"kwargs": {"hidden": "wide"}}, {"kwargs": [1, 2]}, {"model": 7}])
def test_wrong_typed_config_fields_give_a_checkpoint_error(tmp_path, change):
    biozoo.create_model("mlp", hidden=[8]).save_pretrained(tmp_path)
    config = {**json.loads((tmp_path / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(biozoo.CheckpointError) as error:
        biozoo.load_pretrained(tmp_path)
    assert "config.json" in str(error.value) and "\n" not in str(error.value)


# 5 ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def served_tag(tmp_path, monkeypatch):
    """An `mlp.served` tag published as a biozoo folder (file:// URLs), converted by a test format."""
    published = tmp_path / "published"
    biozoo.create_model("mlp", hidden=[8]).save_pretrained(published)
    monkeypatch.setenv("BIOZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(_hub._formats, "test-folder", _hub.CheckpointFormat("test-folder", lambda p: False,
                                                                            lambda p: biozoo.load_pretrained(p)))
    cfg = _registry.PretrainedCfg(tag="served", task="t", metrics={}, convert="test-folder",
                                  files={n: (published / n).as_uri() for n in ("config.json", "model.safetensors")})
    cfg.model = "mlp"
    monkeypatch.setitem(_registry._pretrained, "mlp", {"served": cfg})
    return tmp_path / "cache" / "mlp.served"


def test_the_cache_follows_no_symlink(served_tag, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "diary.txt").write_text("private")
    served_tag.parent.mkdir(parents=True)
    (served_tag.parent / "mlp.served.partial").symlink_to(elsewhere)  # the old staging name
    model = biozoo.create_model("mlp", pretrained="served")
    assert type(model).__name__ == "MLP"
    assert (elsewhere / "diary.txt").read_text() == "private" and sorted(os.listdir(elsewhere)) == ["diary.txt"]
    assert not (served_tag / "diary.txt").exists()
    assert json.loads((served_tag / "sha256.json").read_text())["model"] == "mlp"
    (served_tag / "download").rename(tmp_path / "moved")
    (served_tag / "download").symlink_to(elsewhere)
    with pytest.raises(biozoo.CheckpointError, match="symbolic link"):
        biozoo.create_model("mlp", pretrained="served")


def test_the_cache_is_checked_for_the_model_name_and_sha256(served_tag, tmp_path):
    biozoo.create_model("mlp", pretrained="served")  # converted and recorded
    biozoo.create_model("mlp", pretrained="served")  # the cached folder passes its check
    other = tmp_path / "other"
    biozoo.create_model("mlp", hidden=[8]).save_pretrained(other)  # other weights, same model and shapes
    (served_tag / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(biozoo.CheckpointError, match="does not match the sha256 of mlp.served"):
        biozoo.create_model("mlp", pretrained="served")
    biozoo.create_model("lstm").save_pretrained(other)  # another model altogether
    for name in ("config.json", "model.safetensors"):
        (served_tag / name).write_bytes((other / name).read_bytes())
    with pytest.raises(biozoo.CheckpointError, match="holds a 'lstm' model, not 'mlp'"):
        biozoo.create_model("mlp", pretrained="served")


# 6 ------------------------------------------------------------------------------------------------------------
def test_orphaned_checkpoint_temporaries_are_removed_and_live_ones_kept(tmp_path):
    from biozoo.train.runs import AtomicCheckpointIO, _host, remove_orphan_temporaries

    folder = tmp_path / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = folder / f".last.ckpt.{_host()}-{int(gone.stdout)}.x1y2.tmp"
    live = folder / f".last.ckpt.{_host()}-{os.getpid()}.x1y2.tmp"
    other_host = folder / ".last.ckpt.otherhost-1.x1y2.tmp"
    for path in (dead, live, other_host):
        path.write_bytes(b"partial")
    assert remove_orphan_temporaries(tmp_path) == [dead]
    assert live.exists() and other_host.exists()
    AtomicCheckpointIO().save_checkpoint({"a": 1}, folder / "last.ckpt")  # its temporaries carry host and pid
    assert sorted(p.name for p in folder.iterdir()) == sorted(["last.ckpt", live.name, other_host.name])


# 9 ------------------------------------------------------------------------------------------------------------
def test_evaluating_last_with_nothing_to_load_is_an_error(tmp_path):
    proc = run_biozoo("test", "-c", str(REPO / "configs/ctm/sorting_cpu.yaml"), "--ckpt_path", "last",
                      "--trainer.default_root_dir", str(tmp_path / "none"), cwd=tmp_path, check=False)
    assert "nothing to test" in last_line_error(proc) and "test/" not in proc.stdout
    assert not (tmp_path / "none").exists()


# 10 -----------------------------------------------------------------------------------------------------------
def test_every_model_with_tags_names_its_default_and_list_shows_it():
    pretrained = biozoo.list_pretrained()
    for name in {key.split(".")[0] for key in pretrained}:
        tag = _registry.default_tag(name)
        assert tag is not None, name
        assert biozoo.list_models(f"{name}.*", pretrained=True)  # the tag exists
    assert _registry.default_tag("ctm") == "parity16"
    assert biozoo.create_model("ctm", pretrained=True).pretrained_cfg.tag == "parity16"
    assert "ctm.parity16 (default)" in run_biozoo("list", "ctm").stdout


# 11 -----------------------------------------------------------------------------------------------------------
def test_a_full_disk_while_checkpointing_is_one_clear_line(tmp_path, monkeypatch):
    from biozoo.train.runs import AtomicCheckpointIO

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1536 vs 1430")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(biozoo.CheckpointError, match=r"could not write checkpoint .*last.ckpt \(\d+ MiB free"):
        AtomicCheckpointIO().save_checkpoint({"a": 1}, tmp_path / "last.ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content,needle", [("", "is empty"), ("# only a comment\n", "is empty"),
                                            ("- a\n- b\n", "not a YAML mapping")])
def test_an_empty_or_odd_yaml_names_the_file(tmp_path, content, needle):
    config = tmp_path / "mine.yaml"
    config.write_text(content)
    line = last_line_error(run_biozoo("fit", "-c", str(config), cwd=tmp_path, check=False))
    assert str(config) in line and needle in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.yaml"]


@pytest.mark.parametrize("override,needle", [(["--data.init_args.batch_size", "0"], "data.init_args.batch_size"),
                                             (["--model.init_args.lr", "-0.1"], "model.init_args.lr")])
def test_bad_values_fail_before_anything_runs(tmp_path, override, needle):
    proc = run_biozoo("fit", "-c", QUICKSTART, *override, cwd=tmp_path, check=False)
    line = last_line_error(proc)
    assert needle in line, line
    assert "GPU available" not in proc.stdout + proc.stderr  # the trainer never started
    assert list(tmp_path.iterdir()) == []


# 13 -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method", ["bitfit", "head", "lora"])
def test_the_taugate_config_runs_the_baselines_it_suggests(tmp_path, method):
    foundation = tmp_path / "foundation"
    biozoo.create_model("mlp", hidden=[256, 256]).save_pretrained(foundation)
    run_biozoo("fit", "-c", str(REPO / "configs/taugate/taugate.yaml"), "--model.init_args.method", method,
               "--model.init_args.checkpoint_path", str(foundation), "--trainer.fast_dev_run", "1",
               "--trainer.default_root_dir", str(tmp_path / "runs"), cwd=tmp_path)


# 7 ------------------------------------------------------------------------------------------------------------
def test_sigterm_stops_a_long_evaluation_within_seconds_and_leaves_a_resumable_checkpoint(tmp_path):
    """One short PPO step (a last.ckpt), then an evaluation of 100,000 episodes: SIGTERM must not wait for it."""
    root = tmp_path / "run"
    args = ["fit", "-c", str(REPO / "configs/tasks/cartpole.yaml"), "-c", str(REPO / "configs/models/mlp.yaml"),
            "--trainer.default_root_dir", str(root), "--model.init_args.eval_episodes", "100000",
            "--data.init_args.num_envs", "2", "--data.init_args.rollouts_per_epoch", "1",
            "--model.init_args.ppo.steps_per_env", "8", "--checkpoint.every_n_train_steps", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "biozoo", *args], cwd=tmp_path, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert last.exists(), proc.communicate()[1][-2000:] if proc.poll() is not None else "no checkpoint in 120 s"
    time.sleep(1.0)  # inside the evaluation
    proc.send_signal(signal.SIGTERM)
    sent = time.time()
    try:
        _, stderr = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("still running 20 s after SIGTERM")
    assert time.time() - sent < 20 and proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    saved = torch.load(root / "version_0" / "checkpoints" / "on_exception.ckpt", weights_only=True)
    assert saved["global_step"] > 0 and "control" in saved
    assert "SIGTERM" in stderr


# 8 ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task,model", [("swimmer_ppo", "ctm"), ("swimmer_es", "mlp_policy")])
def test_a_fast_dev_run_of_a_control_task_is_one_short_rollout_update_and_episode(tmp_path, task, model):
    from biozoo.train.cli import BiozooCLI

    cli = BiozooCLI(args=["fit", "-c", str(REPO / f"configs/tasks/{task}.yaml"),
                          "-c", str(REPO / f"configs/models/{model}.yaml"), "--trainer.fast_dev_run=true",
                          f"--trainer.default_root_dir={tmp_path}"])
    task = cli.model
    assert task.hparams.eval_episodes == 1 and cli.datamodule.env_kwargs["max_episode_steps"] == 32
    if task.hparams.algorithm == "ppo":
        assert task.env_steps == 16 * 2 and task.ppo_cfg.epochs == 1
    else:  # one generation: two members, one episode of at most 32 steps each
        assert 0 < task.env_steps <= 2 * 32
    assert "val/return" in cli.trainer.callback_metrics


# 18 -----------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_installed_wheel_runs_the_readme_commands_from_an_empty_folder(tmp_path):
    """Build the wheel, install it (no dependencies: they come from this environment) into its own folder, and
    run the README's commands from an empty folder: the configs are found among the packaged ones."""
    import re

    import shutil

    pytest.importorskip("wheel")
    source = tmp_path / "source"  # a copy, so the build leaves no build/ folder in the repo
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "biozoo", "models", "train", "envs", "configs"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip[:3], "wheel", "-q", "--no-deps", "--no-build-isolation", ".", "-w", str(tmp_path / "dist")],
                   cwd=source, check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("biozoo-*.whl"))
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}

    def biozoo_cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "biozoo", *args], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=300)

    where = subprocess.run([sys.executable, "-c", "import biozoo.cli as c; print(c.__file__, c.configs_dir())"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(site)) and where[1].startswith(str(site))
    listed = biozoo_cmd("configs")
    shipped = sorted((REPO / "configs").rglob("*.yaml"))
    assert listed.returncode == 0 and "configs/quickstart.yaml" in listed.stdout
    assert len([line for line in listed.stdout.splitlines() if line.startswith("configs/")]) == len(shipped)
    assert biozoo_cmd("--version").stdout.strip() == "biozoo 0.1.0"
    fit = biozoo_cmd("fit", "-c", "configs/quickstart.yaml", "--trainer.max_epochs", "1")
    assert fit.returncode == 0, fit.stderr[-2000:]
    assert (empty / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    matrix = biozoo_cmd("matrix", "--tasks", "digits", "cartpole")
    fits = re.search(r"(\d+) of (\d+) pairs fit", matrix.stdout)
    assert matrix.returncode == 0 and fits and int(fits.group(1)) > 0 and int(fits.group(2)) > 0, matrix.stdout[-500:]
    missing = biozoo_cmd("fit", "-c", "configs/nope.yaml")
    assert missing.returncode != 0 and "configs/nope.yaml not found" in missing.stderr


# 20 -----------------------------------------------------------------------------------------------------------
def test_version_licence_changelog_ignores_and_the_cpu_install_line():
    from importlib.metadata import version

    assert run_biozoo("--version").stdout.strip() == f"biozoo {version('biozoo')}"
    licence = (REPO / "LICENSE").read_text()
    assert "Apache License" in licence and "Version 2.0, January 2004" in licence and "END OF TERMS" in licence
    assert "0.1.0" in (REPO / "CHANGELOG.md").read_text()
    ignored = (REPO / ".gitignore").read_text().split()
    assert "build/" in ignored and "dist/" in ignored
    readme = (REPO / "README.md").read_text()
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
