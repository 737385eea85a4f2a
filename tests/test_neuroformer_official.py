"""Official Neuroformer checkpoints: folders written by the official Trainer (make_fixtures.py runs the official
code on its V1AL and visnav configs) load, convert and reproduce the official logits."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from biozoo.models import CheckpointError, ShapeError, convert_checkpoint, load_pretrained
from biozoo.models.neuroformer import Neuroformer, neuroformer_official_kwargs

from conftest import REPO

FIXTURES = REPO / "tests" / "fixtures" / "neuroformer_official"
CASES = ["v1al", "visnav_pretrain", "v1al_linear_patches"]
INPUTS = ("id", "dt", "id_prev", "dt_prev", "frames")


def logits(model: Neuroformer, io: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model({k: io[k] for k in INPUTS})
    return out["id_logits"], out["dt_logits"]


@pytest.mark.parametrize("case", CASES)
def test_official_folder_reproduces_official_logits(case: str, tmp_path: Path) -> None:
    io = load_file(str(FIXTURES / case / "io.safetensors"))
    model = load_pretrained(FIXTURES / case)
    assert isinstance(model, Neuroformer) and not model.training
    id_logits, dt_logits = logits(model, io)
    torch.testing.assert_close(id_logits, io["id_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(dt_logits, io["dt_logits"], atol=1e-5, rtol=0)
    # the weights file itself (mconf.yaml beside it), and the portable copy `biozoo convert` writes
    assert torch.equal(logits(load_pretrained(FIXTURES / case / "model.pt"), io)[0], id_logits)
    out = convert_checkpoint("neuroformer-official", FIXTURES / case, tmp_path / "converted")
    assert torch.equal(logits(load_pretrained(out), io)[0], id_logits)


def test_official_structure_is_read_from_the_files() -> None:
    v1al = load_pretrained(FIXTURES / "v1al")
    assert v1al.temp_emb is not None and not v1al.mask_past_pad  # LearntTemporalEmbedding; PAD keys attended
    assert list(v1al.video_encoder.kernel_size) == [3, 8, 8] and list(v1al.video_encoder.stride) == [3, 4, 4]
    assert v1al.clip_proj is None and v1al.frame_pos is None and v1al.pool_pad  # pools PAD positions, as x.mean(1)
    visnav = load_pretrained(FIXTURES / "visnav_pretrain")
    assert visnav.clip_proj is not None and visnav.history_blocks[0].attn.n_head == 1
    assert list(visnav.video_encoder.stride) == [3, 5, 5]  # no stride_size: kernel = stride
    linear = load_pretrained(FIXTURES / "v1al_linear_patches")  # conv_layer: false
    assert isinstance(linear.video_encoder, torch.nn.Linear) and linear.video_encoder.in_features == 16
    io = load_file(str(FIXTURES / "v1al" / "io.safetensors"))
    with torch.no_grad():
        out = v1al({k: io[k] for k in INPUTS})
    torch.testing.assert_close(out["pooled"], out["hidden"].mean(1))
    with pytest.raises(ShapeError, match="frames"):
        v1al({**{k: io[k] for k in INPUTS}, "frames": io["frames"][:, 0]})


def test_converted_official_model_generates_the_same_tokens_cached_and_recomputed() -> None:
    model = load_pretrained(FIXTURES / "v1al")
    io = load_file(str(FIXTURES / "v1al" / "io.safetensors"))
    batch = {k: io[k] for k in ("id_prev", "dt_prev", "frames")}
    runs = []
    for use_cache in (True, False):
        runs.append(model.generate(batch, n_windows=2, use_cache=use_cache, generator=torch.Generator().manual_seed(3)))
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["ids"], runs[1]["ids"]))


def copy_case(tmp_path: Path, case: str = "v1al") -> Path:
    folder = tmp_path / case
    shutil.copytree(FIXTURES / case, folder)
    return folder


class RunsCode:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_official_pickles_are_never_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    folder = copy_case(tmp_path)
    (folder / "tokenizer.pkl").write_bytes(pickle.dumps(RunsCode()))  # never opened: sizes come from the weights
    load_pretrained(folder)
    torch.save({"state": RunsCode()}, folder / "model.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_pretrained(folder)
    assert not (tmp_path / "PWNED").exists()


def test_mismatched_or_unsupported_official_files_fail_in_one_line(tmp_path: Path) -> None:
    folder = copy_case(tmp_path)
    mconf = yaml.safe_load((folder / "mconf.yaml").read_text())
    state = torch.load(folder / "model.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="head_dt has 19 outputs"):
        neuroformer_official_kwargs({**mconf, "window": {**mconf["window"], "prev": 0.3}}, state)
    with pytest.raises(CheckpointError, match="behaviour inputs"):
        neuroformer_official_kwargs(mconf, {**state, "modality_embeddings.behavior.speed.mlp.ln.weight": torch.ones(1)})
    state["head_id.weight"] = state["head_id.weight"][:5]
    torch.save(state, folder / "model.pt")
    with pytest.raises(CheckpointError, match="head_id.weight") as err:
        load_pretrained(folder)
    assert "\n" not in str(err.value)
    (folder / "mconf.yaml").write_text("n_embd: [unclosed")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_pretrained(folder)
