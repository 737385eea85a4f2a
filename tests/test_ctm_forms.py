"""Every checkpoint form the official CTM code writes or its analysis scripts read: the training-script dicts with
numpy RNG state and metric arrays, the legacy maze form, QA-MNIST, sort and RL; the official ResNet table."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import biozoo
from biozoo._core import reset_state
from biozoo.models import CheckpointError, convert_checkpoint
from biozoo.models.ctm.blocks import TruncatedResNet
from biozoo.train.ctm_tasks import predict_routes

from conftest import REPO, SHARED

FORMS = REPO / "tests" / "fixtures" / "ctm_forms"  # written by make_fixtures.py with the official code
TICKED = ["image_training_script", "maze_legacy", "sort_training_script", "qamnist_training_script"]


def outputs(model: torch.nn.Module, io: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if "observations" in io:  # the official Agent.get_states: reset where done, then step
            state, logits, values = model.initial_state(io["dones"].shape[1]), [], []
            for obs, done in zip(io["observations"], io["dones"]):
                out = model(obs, reset_state(state, model.initial_state(len(obs)), done))
                state = out.state
                logits.append(out.logits)
                values.append(out.value)
            return {"logits": torch.stack(logits), "values": torch.stack(values)}
        out = model((io["digits"], io["question"])) if "digits" in io else model(io["inputs"])
        return {"predictions": out.predictions, "certainties": out.certainties,
                "synchronisation_out": out.synchronisation}


def assert_matches(model: torch.nn.Module, folder) -> None:
    io = load_file(str(folder / "io.safetensors"))
    for name, ours in outputs(model, io).items():
        assert ours.shape == io[name].shape, name
        assert (ours - io[name]).abs().max().item() < 1e-5, name


RL = ["rl_training_script", "rl_minigrid_training_script"]


@pytest.mark.parametrize("form", TICKED + RL)
def test_official_form_loads_and_matches(form, tmp_path):
    src = FORMS / form / "checkpoint.pt"
    model = biozoo.load_pretrained(src)
    assert not model.training
    assert_matches(model, FORMS / form)
    convert_checkpoint("sakana-ctm", src, tmp_path / "out")  # `biozoo convert sakana-ctm SRC OUT`
    assert_matches(biozoo.load_pretrained(tmp_path / "out"), FORMS / form)


def test_each_form_builds_its_model():
    kinds = {form: type(biozoo.load_pretrained(FORMS / form / "checkpoint.pt")).__name__
             for form in TICKED + RL}
    assert kinds == {"image_training_script": "ContinuousThoughtMachine", "maze_legacy": "ContinuousThoughtMachine",
                     "sort_training_script": "ContinuousThoughtMachine",
                     "qamnist_training_script": "ContinuousThoughtMachineQAMNIST",
                     "rl_training_script": "CTMActorCritic", "rl_minigrid_training_script": "CTMActorCritic"}


def test_training_script_fields_are_really_there():
    """The fixture is the scripts' dict, not a minimal one: numpy RNG state, numpy metric lists, optimiser."""
    from biozoo.models.ctm.official import official_pickle_globals

    with torch.serialization.safe_globals(official_pickle_globals()):
        ckpt = torch.load(FORMS / "image_training_script" / "checkpoint.pt", weights_only=True)
    assert ckpt["numpy_rng_state"][0] == "MT19937" and ckpt["numpy_rng_state"][1].dtype == np.uint32
    assert isinstance(ckpt["train_accuracies"][0], np.ndarray)
    assert {"optimizer_state_dict", "scheduler_state_dict", "scaler_state_dict", "random_rng_state"} <= set(ckpt)
    with pytest.raises(pickle.UnpicklingError):  # which is why a bare weights_only load refuses these files
        torch.load(FORMS / "image_training_script" / "checkpoint.pt", weights_only=True)


def test_legacy_maze_form_reads_inputs_in_0_1():
    model = biozoo.load_pretrained(FORMS / "maze_legacy" / "checkpoint.pt")
    assert model.expand_range is False and model.prediction_reshaper == [6, 5]
    assert model.backbone_type == "resnet18-1" and model.neuron_select_type == "first-last"
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 15, 15, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    logits = expected.predictions.reshape(2, 6, 5, -1)
    tick = expected.certainties[:, 1].argmax(-1)
    assert (predict_routes(model, images) == logits[torch.arange(2), ..., tick].argmax(-1).numpy()).all()


class RunsCode:
    def __reduce__(self):
        return os.system, ("echo pwned > /dev/null",)


def test_code_in_an_official_looking_checkpoint_is_refused(tmp_path):
    """The numpy allow-list admits arrays and dtypes, nothing that runs code."""
    fixture = torch.load(FORMS / "sort_training_script" / "checkpoint.pt", weights_only=False)
    fixture["iters"] = RunsCode()
    path = tmp_path / "checkpoint.pt"
    torch.save(fixture, path)
    with pytest.raises(CheckpointError, match="refused"):
        biozoo.load_pretrained(path)


def test_minigrid_agent_reads_the_registered_env():
    """The official MiniGrid agent converts to the navigation-backbone and acts on biozoo/MiniGrid-FourRooms-v0,
    whose flat view the backbone reads as the official (7, 7, 3) one."""
    pytest.importorskip("minigrid")
    import gymnasium as gym

    from biozoo.envs.control import env_spec

    model = biozoo.load_pretrained(FORMS / "rl_minigrid_training_script" / "checkpoint.pt")
    core = model.recurrent_model
    assert core.backbone_type == "navigation-backbone" and core.grid_size == 7
    env = gym.make("biozoo/MiniGrid-FourRooms-v0")
    assert env_spec(env).extras["minigrid_view"] == [7, 7, 3]
    obs, _ = env.reset(seed=0)
    view = torch.from_numpy(obs).reshape(1, 7, 7, 3)
    with torch.no_grad():
        flat, grid = model(torch.from_numpy(obs)[None]), model(view)
    assert torch.equal(flat.logits, grid.logits) and flat.logits.shape == (1, 7)
    env.close()


def test_rl_refusals_are_one_line(tmp_path):
    ckpt = torch.load(FORMS / "rl_training_script" / "checkpoint.pt", weights_only=False)
    ckpt["args"].neuron_select_type = "random-pairing"
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="first-last") as e:
        biozoo.load_pretrained(tmp_path / "checkpoint.pt")
    assert "\n" not in str(e.value)


def test_hf_layout_of_a_converted_training_file(tmp_path):
    """The HF layout (config.json of constructor arguments + model.safetensors) of the same weights loads too."""
    from safetensors.torch import save_file

    from biozoo.models.ctm.official import kwargs_from_official_args

    ckpt = torch.load(FORMS / "image_training_script" / "checkpoint.pt", weights_only=False)
    kwargs = kwargs_from_official_args(vars(ckpt["args"]), ckpt["model_state_dict"])
    kwargs.pop("in_channels", None)
    (tmp_path / "config.json").write_text(json.dumps(kwargs))
    save_file({k: v.contiguous() for k, v in ckpt["model_state_dict"].items()}, str(tmp_path / "model.safetensors"))
    assert_matches(biozoo.load_pretrained(tmp_path), FORMS / "image_training_script")


# The official models/resnet.py, measured with its prepare_resnet_backbone("resnet{depth}-{stages}"): state-dict
# entries and parameters of every backbone. Blocks per stage: 18 [2,2,2,2], 34 [3,4,6,3], 50 [3,4,6,3],
# 101 [3,4,23,3], 152 [3,4,36,3] (not torchvision's [3,8,36,3]).
OFFICIAL_RESNETS = {
    (18, 1): (30, 149824), (18, 2): (60, 675392), (18, 3): (90, 2775104), (18, 4): (120, 11168832),
    (34, 1): (42, 223808), (34, 2): (96, 1340224), (34, 3): (174, 8162624), (34, 4): (216, 21276992),
    (50, 1): (66, 217664), (50, 2): (144, 1437248), (50, 3): (258, 8535616), (50, 4): (318, 23500352),
    (101, 1): (66, 217664), (101, 2): (144, 1437248), (101, 3): (564, 27527744), (101, 4): (624, 42492480),
    (152, 1): (66, 217664), (152, 2): (144, 1437248), (152, 3): (798, 42051136), (152, 4): (858, 57015872),
}


@pytest.mark.parametrize("depth_stages", list(OFFICIAL_RESNETS), ids=[f"resnet{d}-{s}" for d, s in OFFICIAL_RESNETS])
def test_backbone_layout_matches_the_official_table(depth_stages):
    net = TruncatedResNet(*depth_stages)
    entries, params = OFFICIAL_RESNETS[depth_stages]
    assert (len(net.state_dict()), sum(p.numel() for p in net.parameters())) == (entries, params)


def test_resnet152_blocks():
    net = TruncatedResNet(152, 4)
    assert [len(getattr(net, f"layer{i}")) for i in range(1, 5)] == [3, 4, 36, 3]


# --- the official weights by name, through the real download path (file:// stands in for the hubs) ---------------

def serve(monkeypatch, tag: str, files: dict[str, Path], **changes) -> None:
    """Point a registered official tag at local files; everything else (download, checks, conversion) is real."""
    from dataclasses import replace

    from biozoo.models._registry import _pretrained

    cfg = _pretrained["ctm"][tag]
    monkeypatch.setitem(_pretrained["ctm"], tag,
                        replace(cfg, files={name: path.resolve().as_uri() for name, path in files.items()}, **changes))


def test_hf_weights_download_convert_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOZOO_CACHE", str(tmp_path / "cache"))
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(SHARED / "fixtures" / "ctm_official" / "image_unet_random_hf" / name, hub / name)
    serve(monkeypatch, "sakana.imagenet", {"config.json": hub / "config.json", "model.safetensors": hub / "model.safetensors"})
    model = biozoo.create_model("ctm", pretrained="sakana.imagenet")
    assert_matches(model, SHARED / "fixtures" / "ctm_official" / "image_unet_random_hf")
    cached = tmp_path / "cache" / "ctm.sakana.imagenet"
    assert json.loads((cached / "config.json").read_text())["format"] == "biozoo"
    shutil.rmtree(hub)  # the second time reads the cache: nothing is downloaded
    assert_matches(biozoo.create_model("ctm.sakana.imagenet"), SHARED / "fixtures" / "ctm_official" / "image_unet_random_hf")


def test_drive_archive_with_a_legacy_maze_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOZOO_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "mazes.zip"
    with zipfile.ZipFile(archive, "w") as z:  # as the Drive link serves it: a folder to extract
        z.write(FORMS / "maze_legacy" / "checkpoint.pt", "checkpoints/mazes/ctm_mazeslarge/checkpoint.pt")
    serve(monkeypatch, "sakana.mazes_drive", {"mazes.zip": archive})
    model = biozoo.create_model("ctm", pretrained="sakana.mazes_drive")
    assert model.expand_range is False
    assert_matches(model, FORMS / "maze_legacy")


def test_hf_maze_weights_record_the_legacy_range(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOZOO_CACHE", str(tmp_path / "cache"))
    hf = SHARED / "fixtures" / "ctm_official" / "image_unet_random_hf"
    serve(monkeypatch, "sakana.maze_large", {n: hf / n for n in ("config.json", "model.safetensors")})
    assert biozoo.create_model("ctm", pretrained="sakana.maze_large").expand_range is False


def test_offline_and_tampered_downloads_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOZOO_CACHE", str(tmp_path / "cache"))
    serve(monkeypatch, "sakana.imagenet_drive", {"checkpoint.pt": tmp_path / "nowhere" / "checkpoint.pt"})
    with pytest.raises(CheckpointError, match="put the file at .*ctm.sakana.imagenet_drive/download/checkpoint.pt") as e:
        biozoo.create_model("ctm", pretrained="sakana.imagenet_drive")
    assert "\n" not in str(e.value)
    serve(monkeypatch, "sakana.imagenet_drive", {"checkpoint.pt": FORMS / "image_training_script" / "checkpoint.pt"},
          files_sha256={"checkpoint.pt": "0" * 64})
    with pytest.raises(CheckpointError, match="sha256"):
        biozoo.create_model("ctm", pretrained="sakana.imagenet_drive")
    assert not (tmp_path / "cache" / "ctm.sakana.imagenet_drive" / "download" / "checkpoint.pt").exists()
    serve(monkeypatch, "sakana.imagenet_drive", {"checkpoint.pt": FORMS / "image_training_script" / "checkpoint.pt"},
          files_sha256={})
    assert_matches(biozoo.create_model("ctm", pretrained="sakana.imagenet_drive"), FORMS / "image_training_script")


def test_pretrained_true_prefers_shipped_weights():
    assert biozoo.create_model("ctm", pretrained=True).pretrained_cfg.file is not None
