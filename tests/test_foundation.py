"""The foundation: registry, portable checkpoints, baselines, losses, DataModules (in-process, fast)."""

import gzip
import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import biozoo
from biozoo._core import DataSpec, ModelOutput
from biozoo.envs import DigitsDataModule, MNISTDataModule, CIFAR10DataModule
from biozoo.models import (BiozooError, CheckpointError, DataNotFoundError, ShapeError, UnknownNameError,
                           register_model, safe_torch_load)
from biozoo.train import SupervisedTask, get_loss


def test_registry_lists_baselines_and_rejects_duplicates():
    names = biozoo.list_models()
    assert {"mlp", "lstm", "resnet", "resnet8", "resnet20"} <= set(names)
    assert biozoo.list_models("resnet*") == ["resnet", "resnet20", "resnet8"]
    with pytest.raises(BiozooError, match="already registered"):
        register_model(lambda: None, name="mlp")


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UnknownNameError, match="Did you mean: mlp"):
        biozoo.create_model("mpl")
    with pytest.raises(UnknownNameError, match="no pretrained tag"):
        biozoo.create_model("mlp", pretrained="nope")
    with pytest.raises(BiozooError, match="unknown argument.*hiden.*Did you mean: hidden"):
        biozoo.create_model("mlp", hiden=[3])
    with pytest.raises(UnknownNameError, match="unknown loss"):
        get_loss("cross_entropi")


def test_save_and_load_pretrained_roundtrip(tmp_path):
    model = biozoo.create_model("mlp", pretrained=False, in_features=64, num_classes=10, hidden=[32])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "mlp" and config["kwargs"]["hidden"] == [32]
    again = biozoo.load_pretrained(tmp_path)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model.eval()(x).logits, again(x).logits)
    assert not again.training
    # a model built by its class directly saves too (constructor kwargs are recorded)
    from biozoo.models.baselines import ResNet

    resnet = ResNet(depth=8, num_classes=3, in_channels=1, width=4)
    resnet.save_pretrained(tmp_path / "r")
    assert biozoo.load_pretrained(tmp_path / "r").head.out_features == 3


from biozoo.models.baselines import MLP


@register_model(name="_test_tied_mlp", hidden=True)
class TiedMLP(MLP):
    def __init__(self, width: int = 8):
        super().__init__(width, width, [width])
        self.head.weight = self.features[0].weight  # tied, as in weight-sharing models


def test_shared_tensors_save_once_and_reload(tmp_path):
    model = biozoo.create_model("_test_tied_mlp")
    with torch.no_grad():
        model.head.weight.mul_(3)
    model.save_pretrained(tmp_path)
    assert len(load_file(tmp_path / "model.safetensors")) == 3  # the tied tensor is stored once
    again = biozoo.load_pretrained(tmp_path)
    assert again.head.weight is again.features[0].weight
    assert torch.equal(again.head.weight, model.head.weight)
    assert "_test_tied_mlp" not in biozoo.list_models()


def test_strict_loading_names_the_keys(tmp_path):
    biozoo.create_model("mlp", in_features=64, num_classes=10, hidden=[32]).save_pretrained(tmp_path)
    wrong = biozoo.create_model("mlp", in_features=64, num_classes=10, hidden=[16])
    with pytest.raises(CheckpointError, match=r"shape mismatch for .*features\.0\.weight \(32, 64\) vs model \(16, 64\)"):
        biozoo.models.load_weights(wrong, tmp_path)
    deeper = biozoo.create_model("mlp", in_features=64, num_classes=10, hidden=[32, 32])
    with pytest.raises(CheckpointError, match=r"missing keys features\.2\.bias"):
        biozoo.models.load_weights(deeper, tmp_path)
    shallow = biozoo.create_model("mlp", in_features=64, num_classes=10, hidden=[])
    with pytest.raises(CheckpointError, match="shape mismatch|unexpected keys"):
        biozoo.models.load_weights(shallow, tmp_path)


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    biozoo.create_model("mlp").save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        biozoo.load_pretrained(tmp_path)
    assert "\n" not in str(info.value)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling would create the marker file


def test_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil(str(marker))}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused to load"):
        biozoo.load_pretrained(path)
    with pytest.raises(CheckpointError, match="refused to load"):
        safe_torch_load(path)
    assert not marker.exists()


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ShapeError, match=r"mlp expects input of shape \(B, 64\).*got \(2, 3, 32, 32\)"):
        biozoo.create_model("mlp")(torch.randn(2, 3, 32, 32))
    with pytest.raises(ShapeError, match="resnet expects"):
        biozoo.create_model("resnet8", in_channels=3)(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("name, x", [("mlp", torch.randn(4, 1, 8, 8)), ("lstm", torch.randn(4, 1, 8, 8)),
                                     ("resnet8", torch.randn(4, 1, 8, 8))])
def test_baselines_forward_backward_and_dims_from_data(name, x):
    task = SupervisedTask(model=name, data_dims=DigitsDataModule().dims)
    out = task(x)
    assert isinstance(out, ModelOutput) and out.logits.shape == (4, 10)
    loss = get_loss("cross_entropy")(out, torch.randint(0, 10, (4,))).loss
    loss.backward()
    assert all(p.grad is not None for p in task.model.parameters())


def test_per_position_targets():
    model = biozoo.create_model("lstm", input_size=3, num_classes=5, per_step=True)
    logits = model(torch.randn(2, 7, 3)).logits
    assert logits.shape == (2, 5, 7)
    out = get_loss("cross_entropy")(logits, torch.randint(0, 5, (2, 7)))
    assert out.loss.ndim == 0 and out.logits.shape == (2, 5, 7)


def test_digits_datamodule_splits_are_disjoint_and_seeded():
    a, b = DigitsDataModule(seed=0), DigitsDataModule(seed=0)
    a.setup(), b.setup()
    assert len(a.train_set) + len(a.val_set) + len(a.test_set) == 1797
    assert torch.equal(a.test_set.tensors[0], b.test_set.tensors[0])
    xb, yb = next(iter(a.train_dataloader()))
    assert xb.shape == (64, 1, 8, 8) and xb.max() <= 1.0
    assert a.spec == DataSpec("image", (1, 8, 8), "classes", num_classes=10)
    assert {k: a.dims[k] for k in ("in_features", "in_channels", "input_size", "seq_len", "num_classes")} == \
        {"in_features": 64, "in_channels": 1, "input_size": 8, "seq_len": 8, "num_classes": 10}
    assert DataSpec.from_dict(a.dims["spec"]) == a.spec


def _write_idx(path, array, gz=False):
    """The MNIST IDX format: magic (0, 0, dtype 0x08, ndim), big-endian dims, then uint8 data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def test_mnist_loader_reads_real_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 6)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    dm = MNISTDataModule(data_dir=str(tmp_path), batch_size=4, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 5, 6)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 1, 2, 3]
    assert dm.dims["in_features"] == 784


def test_missing_dataset_says_where_to_put_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"MNIST not found under .*put the files at .*MNIST/raw"):
        MNISTDataModule(data_dir=str(tmp_path)).setup()
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()


def test_lightning_checkpoint_hparams_are_primitives(tmp_path):
    import lightning as L

    task = SupervisedTask(model="mlp", model_kwargs={"hidden": [16]}, data_dims=DigitsDataModule().dims)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(task, DigitsDataModule(batch_size=8))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    ckpt = torch.load(tmp_path / "x.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model_kwargs"] == {"hidden": [16]}
    assert ckpt["biozoo_model_config"]["model"] == "mlp"
    model = biozoo.load_pretrained(tmp_path / "x.ckpt")
    x = torch.randn(3, 64)
    assert torch.allclose(model(x).logits, task.model.eval()(x).logits)


def test_last_checkpoint_stays_current_when_the_monitored_metric_stops_improving(tmp_path):
    import lightning as L
    from biozoo.train.callbacks import RunCheckpoint

    class NoImprovement(SupervisedTask):  # val/loss never improves after epoch 0: no new top-k checkpoint
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", 1.0 + self.current_epoch)

    task = NoImprovement(model="mlp", model_kwargs={"hidden": [8]}, data_dims=DigitsDataModule().dims)
    checkpoint = RunCheckpoint()
    trainer = L.Trainer(max_epochs=3, limit_train_batches=4, limit_val_batches=1, logger=False,
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(task, DigitsDataModule(batch_size=8))
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and last["epoch"] == 2
    best = torch.load(checkpoint.best_model_path, weights_only=True)
    assert best["global_step"] == 4


def test_checkpoint_path_finetuning_starts_from_weights(tmp_path):
    base = biozoo.create_model("mlp", hidden=[16])
    base.save_pretrained(tmp_path)
    task = SupervisedTask(model="mlp", model_kwargs={"hidden": [16]}, data_dims=DigitsDataModule().dims,
                          checkpoint_path=str(tmp_path))
    state = load_file(tmp_path / "model.safetensors")
    assert torch.equal(task.model.head.weight, state["head.weight"])
