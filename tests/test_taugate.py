"""TauGate (dopamine-gated PEFT): exact start, gate formulas, adapters as modes, attribution, rotated digits, and
the PEFT task with its baselines."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from biozoo.envs.rotated import RotatedDigitsDataModule, RotatedMNISTDataModule, rotate_images
from biozoo.models import BiozooError, CheckpointError, ShapeError, UnknownNameError, create_model, load_pretrained
from biozoo.models.taugate import TauGate, find_gate_sites, fingerprint, plot_class_activity, record_outputs
from conftest import REPO

torch.manual_seed(0)


def mlp(activation="relu", seed=0):
    torch.manual_seed(seed)
    return create_model("mlp", in_features=64, activation=activation)


def copy_of(model):
    clone = create_model("mlp", **model.biozoo_config()["kwargs"])
    clone.load_state_dict(model.state_dict())
    return clone


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_wrapped_model_starts_equal_to_base_in_both_modes(activation):
    base = mlp(activation)
    x = torch.randn(256, 64) * 4
    with torch.no_grad():
        ref = base(x).logits
    model = TauGate.wrap(base)
    for mode in ("soft", "hard"):
        for training in (True, False):
            model.train(training).set_mode(mode)
            with torch.no_grad():
                out = model(x).logits
            assert (out - ref).abs().max() < 1e-5, (mode, training)
            if mode == "hard":
                assert torch.equal(out, ref)  # the hard gate passes every value: exactly the base
    # the soft gate is really active (not bypassed): moving tau up changes the output
    model.set_mode("soft")
    with torch.no_grad():
        model.gates[0].tau.fill_(0.5)
        assert (model(x).logits - ref).abs().max() > 1e-2


def test_gate_formulas_soft_and_hard():
    base = mlp()
    model = TauGate.wrap(base, temperature=0.3)
    gate = model.gates[0]
    with torch.no_grad():
        gate.tau.copy_(torch.linspace(-0.5, 1.5, 256))
        gate.gamma.copy_(torch.linspace(0.5, 2.0, 256))
    x = torch.randn(32, 64)
    a = torch.relu(base.features[0](x))
    expect_soft = gate.gamma * torch.sigmoid((a - gate.tau) / 0.3) * a
    expect_hard = gate.gamma * (a > gate.tau).float() * a
    model.train()  # auto mode: soft while training
    (seen,) = record_outputs(model, [base.features[1]], x)  # the gated output of the first ReLU
    assert torch.allclose(seen, expect_soft.detach(), atol=1e-6)
    model.eval()  # ... hard in eval
    (seen,) = record_outputs(model, [base.features[1]], x)
    assert torch.allclose(seen, expect_hard.detach(), atol=1e-6)
    model.set_mode("soft")
    (seen,) = record_outputs(model, [base.features[1]], x)
    assert torch.allclose(seen, expect_soft.detach(), atol=1e-6)
    model.set_temperature(0.01)
    assert model.temperature == pytest.approx(0.01)
    with pytest.raises(UnknownNameError, match="gate mode"):
        model.set_mode("medium")
    with pytest.raises(BiozooError, match="temperature"):
        model.set_temperature(0.0)
    with pytest.raises(ShapeError, match="256 neurons"):
        gate(torch.zeros(2, 5))


def test_surrogate_gradient_moves_tau_from_the_saturated_start():
    model = TauGate.wrap(mlp())
    x = torch.randn(64, 64)
    model.train()
    model(x).logits.pow(2).sum().backward()
    assert model.gates[0].tau.grad.abs().max() > 1e-3  # exact sigmoid slope here is ~e^-16: tau would be stuck
    assert model.gates[0].gamma.grad.abs().max() > 1e-3
    exact = TauGate.wrap(mlp(), surrogate_width=0.0)
    exact(x).logits.pow(2).sum().backward()
    assert exact.gates[0].tau.grad.abs().max() < 1e-4


def test_parameter_counts_and_frozen_base():
    base = mlp()
    model = TauGate.wrap(base)
    assert model.parameter_counts() == {"trainable": 2 * (256 + 256), "total": 85_002 + 1_024}
    assert not any(p.requires_grad for p in base.parameters())
    assert model.gate_names == ["features.1", "features.3"]
    with pytest.raises(BiozooError, match="already wrapped"):
        TauGate.wrap(base)
    with pytest.raises(BiozooError, match="no ReLU"):
        TauGate.wrap(nn.Sequential(nn.Linear(3, 3)))


def test_conv_channels_are_gated_per_channel():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.SiLU(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4),
                         nn.GELU(), nn.Linear(4, 2)).eval()
    x = torch.randn(5, 1, 8, 8)
    with pytest.raises(BiozooError, match="pass example_input="):  # the guessed 32x32 input does not fit
        TauGate.wrap(base)
    sites = find_gate_sites(base, x)
    assert [(name, n, dim) for name, _, n, dim in sites] == [("2", 6, 1), ("5", 4, -1)]
    ref = base(x)
    model = TauGate.wrap(base, example_input=x).eval()
    assert torch.equal(model(x), ref)  # a user's own nn.Module keeps its own output type
    assert model.parameter_counts()["trainable"] == 2 * (6 + 4)
    with torch.no_grad():
        model.gates[0].gamma[2] = 0.0  # silence channel 2: its whole feature map goes to zero
    (fmap,) = record_outputs(model, [base[2]], x)
    assert fmap[:, 2].abs().max() == 0 and fmap[:, 1].abs().max() > 0
    rates = model.class_activity(x, torch.tensor([0, 1, 0, 1, 1]))
    assert rates["2"].shape == (2, 6) and rates["5"].shape == (2, 4)


def test_training_changes_only_the_gates():
    """Teacher-student: the targets come from the same base under other gains, so the gates alone can fit them."""
    base = mlp()
    before = fingerprint(base)
    model = TauGate.wrap(base).train()
    x = torch.rand(128, 64)
    with torch.no_grad():
        model.gates[1].gamma.copy_(torch.rand(256) * 2)
        target = model(x).logits
        model.gates[1].gamma.fill_(1.0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    losses = []
    for _ in range(150):
        loss = nn.functional.mse_loss(model(x).logits, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert fingerprint(base) == before
    assert np.mean(losses[-10:]) < 0.1 * losses[0]


def test_adapters_switch_modes_and_return_exactly_to_base(tmp_path):
    base = mlp()
    x = torch.randn(64, 64)
    ref = base(x).logits.detach()
    model = TauGate.wrap(base).eval()
    with torch.no_grad():
        for gate in model.gates:
            gate.tau.uniform_(0.0, 0.5)
            gate.gamma.uniform_(0.5, 1.5)
    mode_a = model(x).logits.detach()
    model.save_adapter(tmp_path / "a")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter.safetensors", "adapter_config.json"]
    assert (tmp_path / "a" / "adapter.safetensors").stat().st_size < 10_000  # gates only, never the base
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base"]["model"] == "mlp" and config["base_fingerprint"] == fingerprint(base)

    # a second base with the same weights takes the adapter; modes switch without copying the base
    other = TauGate.wrap(copy_of(base)).eval()
    weight_ptr = other.base.features[0].weight.data_ptr()
    other.load_adapter(tmp_path / "a", "rotated")
    with torch.no_grad():
        other.gates[0].gamma.fill_(2.0)
    other.store_mode("loud")
    other.use_mode("rotated")
    assert torch.equal(other(x).logits, mode_a)
    other.use_mode("loud")
    assert not torch.allclose(other(x).logits, mode_a)
    other.use_mode(None)
    assert torch.equal(other(x).logits, ref) and other.current_mode is None
    other.use_mode("rotated")
    assert torch.equal(other(x).logits, mode_a)
    assert other.base.features[0].weight.data_ptr() == weight_ptr
    with pytest.raises(UnknownNameError, match="unknown TauGate mode 'rotatd'.*Did you mean: rotated"):
        other.use_mode("rotatd")

    # a base with different weights is refused, as is a missing adapter
    stranger = TauGate.wrap(mlp(seed=1))
    with pytest.raises(CheckpointError, match="another base"):
        stranger.load_adapter(tmp_path / "a", "rotated")
    with pytest.raises(CheckpointError, match="no TauGate adapter"):
        stranger.load_adapter(tmp_path / "missing", "x")
    # a stored mode saves as an adapter too
    other.save_adapter(tmp_path / "loud", mode="loud")
    assert other.load_adapter(tmp_path / "loud", "loud2").modes["loud2"]["features.1.gamma"][0] == 2.0


def test_portable_save_of_the_whole_wrapped_model(tmp_path):
    model = TauGate.wrap(mlp()).eval()
    with torch.no_grad():
        model.gates[1].tau.fill_(0.3)
    model.save_pretrained(tmp_path / "tg")
    loaded = load_pretrained(tmp_path / "tg")
    x = torch.randn(8, 64)
    assert isinstance(loaded, TauGate) and torch.equal(loaded(x).logits, model(x).logits)


def test_active_neurons_class_summary_and_plot(tmp_path):
    model = TauGate.wrap(mlp()).eval()
    x, y = torch.rand(100, 64), torch.arange(100) % 10
    base_active = model.active_neurons(x)
    relu_out = torch.relu(model.base.features[0](x))
    assert torch.equal(base_active["features.1"], relu_out > 0)
    with torch.no_grad():
        model.gates[0].tau.fill_(float(relu_out.median()))
    cut = model.active_neurons(x)["features.1"]
    assert cut.float().mean() < base_active["features.1"].float().mean()
    assert torch.equal(cut, relu_out > relu_out.median())
    rates = model.class_activity(x, y)
    assert rates["features.1"].shape == (10, 256)
    assert torch.allclose(rates["features.1"][3], cut[y == 3].float().mean(0))
    model.use_mode(None)
    assert torch.equal(model.active_neurons(x)["features.1"], relu_out > 0)
    out = plot_class_activity({"base": model.class_activity(x, y), "cut": rates}, tmp_path / "neurons.png")
    assert out.stat().st_size > 5_000


def test_rotated_digits_datamodule():
    dm = RotatedDigitsDataModule(rotated_fraction=0.5)
    train, val, test = dm.build_datasets()
    assert (len(train), len(val), len(test)) == (1258, 180, 359)
    upright, rotated = dm.split("test", 0.0), dm.split("test", 1.0)
    assert torch.equal(upright.tensors[1], rotated.tensors[1])
    assert torch.allclose(rotated.tensors[0], rotate_images(upright.tensors[0], 45.0))
    # half of the mixed test images are the rotated ones, the rest the upright ones
    same_rot = (test.tensors[0] == rotated.tensors[0]).flatten(1).all(1)
    same_up = (test.tensors[0] == upright.tensors[0]).flatten(1).all(1)
    assert abs(int(same_rot.sum()) - 180) <= 1 and bool((same_rot | same_up).all())
    # two 45 degree turns of a centred square make the 90 degree turn (bilinear blur aside)
    img = torch.zeros(1, 1, 9, 9)
    img[..., 2:5, 3:7] = 1.0
    twice = rotate_images(rotate_images(img, 45.0), 45.0)
    assert (twice - torch.rot90(img, 1, (2, 3))).abs().mean() < 0.1
    both = RotatedDigitsDataModule(mixture="both").split("train", 0.5, "both")
    assert len(both) == 2 * 1258
    with pytest.raises(BiozooError, match="mixture"):
        RotatedDigitsDataModule(mixture="most")
    with pytest.raises(BiozooError, match="rotated_fraction"):
        RotatedDigitsDataModule(rotated_fraction=2.0)


def test_rotated_mnist_reads_real_idx_files(tmp_path):
    from test_foundation import _write_idx  # the IDX writer of the MNIST loader test

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (26, 28, 28))
    for prefix, part in (("train", slice(0, 20)), ("t10k", slice(20, 26))):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[part])
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(26)[part] % 10)
    dm = RotatedMNISTDataModule(data_dir=str(tmp_path), rotated_fraction=1.0, test_rotated_fraction=0.0)
    train, val, test = dm.build_datasets()
    assert (len(train), len(val), len(test)) == (18, 2, 6)
    assert dm.dims["in_features"] == 784
    x, y = test[3]
    assert x.shape == (1, 28, 28) and y == 3
    assert torch.allclose(x * 0.3081 + 0.1307, torch.from_numpy(images[23] / 255.0).float()[None], atol=1e-5)
    rotated = dm.split("test", 1.0)[3][0]
    expected = (rotate_images(x * 0.3081 + 0.1307, 45.0) - 0.1307) / 0.3081
    assert torch.allclose(rotated, expected, atol=1e-5)


@pytest.fixture(scope="module")
def peft_lib():
    return pytest.importorskip("peft")


@pytest.mark.parametrize("method,count", [("frozen", 0), ("bitfit", 522), ("head", 2_570), ("full", 85_002),
                                          ("taugate", 1_024), ("lora1", 1_098), ("lora8", 8_784)])
def test_peft_methods_train_what_they_should(method, count, peft_lib):
    from biozoo.train.taugate import apply_peft, trainable_count

    base = mlp()
    x = torch.randn(4, 64)
    ref = base(x).logits.detach()
    rank = int(method[4:]) if method.startswith("lora") else 4
    model = apply_peft(base, "lora" if method.startswith("lora") else method, lora_rank=rank)
    assert trainable_count(model) == count
    assert torch.allclose(model(x).logits, ref, atol=1e-5)  # every method starts from the foundation's function


def test_unknown_method():
    from biozoo.train.taugate import apply_peft

    with pytest.raises(UnknownNameError, match="unknown PEFT method"):
        apply_peft(mlp(), "prefix")


def test_peft_task_fits_with_annealed_temperature(tmp_path):
    import lightning as L

    from biozoo.train.taugate import PEFTTask, TemperatureAnneal

    foundation = mlp()
    foundation.save_pretrained(tmp_path / "foundation")
    dm = RotatedDigitsDataModule(rotated_fraction=1.0, batch_size=128)
    task = PEFTTask(method="taugate", checkpoint_path=str(tmp_path / "foundation"), data_dims=dm.dims, lr=0.03)
    anneal = TemperatureAnneal(0.05, 0.01)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[anneal])
    trainer.fit(task, datamodule=dm)
    assert task.model.temperature == pytest.approx(0.01)
    assert anneal.temperature_at(1, 3) == pytest.approx(math.sqrt(0.05 * 0.01))
    assert fingerprint(task.model.base) == fingerprint(foundation)
    assert not torch.equal(task.model.gates[1].gamma.detach(), torch.ones(256))
    frozen = PEFTTask(method="frozen", checkpoint_path=str(tmp_path / "foundation"), data_dims=dm.dims)
    with pytest.raises(BiozooError, match="trains no parameter"):
        frozen.configure_optimizers()


def test_cli_runs_the_taugate_config(tmp_path, capsys):
    """The real CLI, in process: fit the TauGate config for one epoch, then export the checkpoint portably."""
    from biozoo.cli import BiozooCLI, main

    foundation = mlp()
    foundation.save_pretrained(tmp_path / "foundation")
    BiozooCLI(args=["fit", "-c", str(REPO / "configs/taugate/taugate.yaml"), "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.enable_progress_bar", "false",
                    "--model.init_args.checkpoint_path", str(tmp_path / "foundation")])
    ckpt = tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(SystemExit) as done:
        main(["export", str(ckpt), str(tmp_path / "export")])
    assert done.value.code == 0 and "model.safetensors" in capsys.readouterr().out
    loaded = load_pretrained(tmp_path / "export")
    assert isinstance(loaded, TauGate) and fingerprint(loaded.base) == fingerprint(foundation)
    assert loaded.temperature == pytest.approx(0.05)  # one epoch of the 0.05 -> 0.01 anneal: still the start


# --- gates wherever an activation is computed -------------------------------------------------------------------

def starts_equal_and_trains(model: TauGate, x, training_modes=(True, False)):
    """Identical to the base at init in train and eval (hard gate exactly), the gates really act, and a step on
    the gates alone changes the output."""
    base = model.base
    for training in training_modes:
        base.train(training)
        model.train(training)
        with torch.no_grad():
            ref, out = as_tensor(base(x)), as_tensor(model(x))
        assert (out - ref).abs().max() < 1e-5, training
    model.eval()
    with torch.no_grad():
        for gate in model.gates:
            gate.gamma.fill_(0.5)
        assert (as_tensor(model(x)) - as_tensor(base(x))).abs().max() > 1e-4  # not bypassed (no fast path)
        for gate in model.gates:
            gate.gamma.fill_(1.0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is q for g in model.gates for q in g.parameters()) for p in trainable)
    as_tensor(model(x)).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)


def as_tensor(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("activation", ["gelu", "module"])
def test_transformer_encoder_gates_its_feed_forward(activation):
    torch.manual_seed(0)
    act = "gelu" if activation == "gelu" else nn.GELU()
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation=act, batch_first=True)
    base = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(3, 5, 16)
    model = TauGate.wrap(base, example_input=x)
    assert [g.num_neurons for g in model.gates] == [32, 32] and model.activations == ["gelu", "gelu"]
    starts_equal_and_trains(model, x)


def test_hugging_face_style_activation_classes_by_behaviour():
    class GELUActivation(nn.Module):  # transformers.activations.GELUActivation: a module calling F.gelu
        def forward(self, x):
            return nn.functional.gelu(x)

    class BertIntermediate(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.intermediate_act_fn = nn.Linear(8, 24), GELUActivation()

        def forward(self, x):
            return self.intermediate_act_fn(self.dense(x))

    torch.manual_seed(0)
    base = nn.Sequential(BertIntermediate(), nn.Linear(24, 8))
    model = TauGate.wrap(base)
    assert model.gate_names == ["0.intermediate_act_fn"] and model.gates[0].num_neurons == 24
    starts_equal_and_trains(model, torch.randn(4, 6, 8))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_resnets_one_gate_per_call(name):
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, name)(weights=None, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    model = TauGate.wrap(base, example_input=x)
    block = base.layer1[0]
    widths = [g.num_neurons for n, g in zip(model.gate_names, model.gates) if n.startswith("layer1.0.relu")]
    expected = [64, 64] if name == "resnet18" else [64, 64, 256]  # a Bottleneck's one ReLU, three widths
    assert widths == expected and len(model.gates) == (17 if name == "resnet18" else 49)
    assert block.relu is not None and "layer1.0.relu#0" in model.gate_names
    starts_equal_and_trains(model, x, training_modes=(False,))


def test_zoo_resnet8_gates_every_block():
    torch.manual_seed(0)
    base = create_model("resnet8", in_channels=1, num_classes=10)
    x = torch.randn(2, 1, 8, 8)
    model = TauGate.wrap(base, example_input=x)
    assert len(model.gates) > 1 and any(":" in n for n in model.gate_names)  # F.relu inside the blocks
    starts_equal_and_trains(model, x, training_modes=(False,))
    assert "trainable parameters" in model.describe() and str(len(model.gates)) in model.describe()


def test_pretrained_ctm_gates_its_neurons(tmp_path):
    """A mode of a pretrained CTM: a threshold and a gain per neuron on its post-activations z, 2 x d_model."""
    from biozoo.envs.parity import parity_batch

    ctm = create_model("ctm", pretrained="parity16")
    torch.manual_seed(0)
    probe, _ = parity_batch(256, 16)
    model = TauGate.wrap(ctm, example_input=probe)
    assert model.gate_names == ["neurons"] and model.parameter_counts()["trainable"] == 2 * ctm.d_model
    x, y = parity_batch(128, 16)
    with torch.no_grad():
        ref = ctm(x).predictions
        for mode in ("soft", "hard"):
            model.set_mode(mode).eval()
            assert torch.equal(model(x).predictions, ref), mode  # unseen inputs too
    model.set_mode("auto").train()
    out = model(x)
    torch.nn.functional.cross_entropy(out.logits, y).backward()
    assert model.gates[0].gamma.grad.abs().max() > 0 and model.gates[0].tau.grad is not None
    with torch.no_grad():
        model.gates[0].gamma[:64] = 0.0  # silence half the neurons: the CTM thinks differently
        model.eval()
        assert (model(x).predictions - ref).abs().max() > 1e-2
    model.save_adapter(tmp_path / "half")
    model.load_adapter(tmp_path / "half", "half").use_mode(None)
    with torch.no_grad():
        assert torch.equal(model(x).predictions, ref)  # gates off: the base exactly
        model.use_mode("half")
        assert (model.gates[0].gamma[:64] == 0).all()


SMALL_IMAGE_CTM = dict(iterations=3, d_model=16, d_input=8, heads=2, n_synch_out=8, n_synch_action=8,
                       memory_length=4, memory_hidden_dims=4, backbone_type="resnet18-1",
                       positional_embedding_type="none", in_channels=1, out_dims=10)


def test_ctm_gate_sites_chosen_by_name_and_the_optional_synapse_output(tmp_path):
    """A CTM with a backbone: by default its neurons alone (a mode of 2 x d_model numbers); the backbone's ReLUs
    and the synapse output only when asked. Each starts equal to the base, and a portable save keeps the choice."""
    torch.manual_seed(0)
    kwargs = SMALL_IMAGE_CTM
    x = torch.rand(4, 1, 8, 8)
    default = TauGate.wrap(create_model("ctm", **kwargs), example_input=x)
    assert default.gate_names == ["neurons"] and default.parameter_counts()["trainable"] == 2 * 16
    every = TauGate.wrap(create_model("ctm", **kwargs), example_input=x, include=["*"])
    assert {"neurons", "synapse_output", "backbone:0"} <= set(every.gate_names) and len(every.gates) > 3
    for include, names in ((None, ["neurons"]), (["neurons", "synapse_output"], ["synapse_output", "neurons"])):
        base = create_model("ctm", **kwargs).eval()
        model = TauGate.wrap(base, example_input=x, include=include).eval()
        assert sorted(model.gate_names) == sorted(names)
        assert model.parameter_counts()["trainable"] == 2 * 16 * len(names) and model.include == include
        with torch.no_grad():
            for mode in ("soft", "hard"):
                assert torch.allclose(model.set_mode(mode)(x).logits, base(x).logits, atol=1e-6), (include, mode)
    model.save_pretrained(tmp_path / "gated")
    again = load_pretrained(tmp_path / "gated")
    assert again.gate_names == model.gate_names and again.include == include
    with pytest.raises(BiozooError, match="matching"):
        TauGate.wrap(create_model("ctm", **kwargs), example_input=x, include=["nothing*"])


def test_adapter_of_a_model_with_batch_norm(tmp_path):
    """The base fingerprint reads 0-dim buffers (BatchNorm's num_batches_tracked)."""
    model = TauGate.wrap(create_model("resnet8", in_channels=1, num_classes=10), example_input=torch.randn(2, 1, 8, 8))
    model.save_adapter(tmp_path / "a")
    model.load_adapter(tmp_path / "a", "a").use_mode("a")


def test_zoo_transformer_gates_its_feed_forward_and_lora_reaches_attention(peft_lib):
    """The zoo's transformer (F.gelu by string inside nn.TransformerEncoderLayer): one gate per layer, equal to
    the base at init in train and eval; peft LoRA on its attention blocks changes the output."""
    from biozoo.train.taugate import apply_peft

    torch.manual_seed(0)
    base = create_model("transformer", input_size=8, seq_len=8, num_classes=10)
    x = torch.randn(4, 1, 8, 8)
    model = TauGate.wrap(base, example_input=x)
    assert len(model.gates) == 2 and model.parameter_counts()["trainable"] == 2 * 2 * 128
    starts_equal_and_trains(model, x, training_modes=(False, True))
    lora = apply_peft(create_model("transformer"), "lora", lora_rank=2, lora_targets=["encoder.layers.0.self_attn"])
    with torch.no_grad():
        before = lora(x).logits
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
        assert (lora(x).logits - before).abs().max() > 1e-3


def test_lora_on_a_ctm_reaches_its_fused_paths(peft_lib):
    """The CTM's fused query and synapse paths read plain Linear weights; a LoRA layer in their place is called
    (forward equals the unfused reference), and LoRA on the attention itself is refused in one line."""
    from biozoo.train.taugate import apply_peft

    torch.manual_seed(0)
    kwargs = SMALL_IMAGE_CTM
    x = torch.rand(4, 1, 8, 8)
    plain = create_model("ctm", **kwargs).eval()
    with torch.no_grad():
        before = plain(x).logits
    model = apply_peft(plain, "lora", lora_rank=2, lora_targets=["q_proj", "synapses.1"]).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and "synapses" in name:
                p.normal_()
        out = model(x).logits
        assert (out - before).abs().max() > 1e-4
        assert torch.allclose(out, model.base_model.model.forward_reference(x).logits, atol=1e-5)
    wrapped = apply_peft(create_model("ctm", **kwargs), "lora", lora_rank=2, lora_targets=["attention"])
    with pytest.raises(BiozooError, match="LoRA on 'attention'"):
        wrapped(x)


def test_training_never_touches_the_base_batch_norm_statistics():
    """A fit of the gates in train mode leaves every base buffer (BatchNorm's running statistics) as it was, so
    the base is exactly restored by use_mode(None)."""
    torch.manual_seed(0)
    base = create_model("resnet8", in_channels=1, num_classes=10)
    before = fingerprint(base)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    model = TauGate.wrap(base, example_input=x)
    assert model.training  # as Lightning leaves it: no train() call in between
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).logits, y).backward()
        opt.step()
    assert fingerprint(base) == before and model.training and not base.stem[1].training
    reference = create_model("resnet8", in_channels=1, num_classes=10)
    reference.load_state_dict(base.state_dict())
    with torch.no_grad():
        assert torch.equal(model.use_mode(None).eval()(x).logits, reference.eval()(x).logits)
