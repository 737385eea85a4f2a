"""Perforated dendrites: the model transform (exact maths, zero cost at 0 dendrites, both training modes,
portable save/load) and the Lightning callback (cycles, optimizer rebuild, best restore, plot, CLI, resume)."""

import copy
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import biozoo
from biozoo.envs import DigitsDataModule
from biozoo.models import BiozooError, CheckpointError, PretrainedMixin, register_model
from biozoo.models.dendrites import (CorrelationMeter, add_dendrite_set, add_dendrites, dendrite_counts,
                                     dendrite_layers, freeze_candidates, select_layers, set_dendrite_counts,
                                     train_candidates)
from biozoo.train import Dendrites, SupervisedTask

from conftest import REPO, run_biozoo


@register_model(name="_dendrite_test_recurrent", hidden=True)
class TinyRecurrent(PretrainedMixin, nn.Module):
    """An LSTM-like cell built from nn.Linear projections (called once per step), a Conv1d front end, a Linear
    reachable under two names, and an output layer whose weight is tied to the head's: cases the transform must
    get right."""

    def __init__(self, input_size: int = 3, hidden: int = 6, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(input_size, hidden, 3, padding=1)
        self.x_proj = nn.Linear(hidden, 4 * hidden)
        self.h_proj = nn.Linear(hidden, 4 * hidden, bias=False)
        self.shared = nn.Linear(hidden, hidden)
        self.alias = self.shared  # the same module under two names
        self.head = nn.Linear(hidden, num_classes)
        self.out = nn.Linear(hidden, num_classes)
        self.out.weight = self.head.weight  # tied weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, input_size)
        seq = self.conv(x.transpose(1, 2)).transpose(1, 2)
        xs = self.x_proj(seq)  # (B, T, 4H): a Linear over a sequence
        h = c = seq.new_zeros(seq.shape[0], seq.shape[2])
        for t in range(seq.shape[1]):
            i, f, g, o = (xs[:, t] + self.h_proj(h)).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(self.shared(h)) + self.out(self.alias(h))


def set_random(model: nn.Module, seed: int = 0) -> None:
    """Give every v and cascade weight a value, so the dendrites act."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dendrite_layers(model).values():
            for s in layer.dendrites.sets:
                s.to_neuron.copy_(torch.randn(s.to_neuron.shape, generator=gen))
                if s.cascade is not None:
                    s.cascade.copy_(torch.randn(s.cascade.shape, generator=gen))


def manual_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """out = L(x) + sum_k v_k * sigmoid(D_k(x) + sum_{j<k} c_kj * d_j), written out for one layer."""
    main = F.linear(x, layer.weight, layer.bias) if isinstance(layer, nn.Linear) else layer._conv_forward(
        x, layer.weight, layer.bias)
    spatial = x.dim() - (2 if x.dim() == layer.weight.dim() else 1)
    shape = (-1,) if isinstance(layer, nn.Linear) else (-1,) + (1,) * spatial
    ds, out = [], main
    for s in layer.dendrites.sets:
        z = s.node(x)
        for j, d in enumerate(ds):
            z = z + s.cascade[j].view(shape) * d
        ds.append(torch.sigmoid(z))
        out = out + s.to_neuron.view(shape) * ds[-1]
    return out


def test_wrapping_is_free_and_a_new_dendrite_changes_nothing():
    torch.manual_seed(0)
    model = biozoo.create_model("mlp", in_features=64, num_classes=10, hidden=[8])
    x = torch.randn(5, 64)
    before, params, keys = model(x).logits, list(model.parameters()), list(model.state_dict())
    modules = [id(m) for m in model.modules()]
    add_dendrites(model)
    # no copy, no hook, no new module or tensor: the wrapped model with 0 dendrites is the model
    assert [id(m) for m in model.modules()] == modules
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert list(model.state_dict()) == keys
    assert all(not m._forward_hooks for m in model.modules())
    assert torch.equal(model(x).logits, before)
    assert add_dendrite_set(model) == (64 * 8 + 8 + 8) + (8 * 10 + 10 + 10)  # node + v per layer
    assert add_dendrite_set(model) == (64 * 8 + 8 + 8 + 8) + (8 * 10 + 10 + 10 + 10)  # + cascade from set 0
    assert dendrite_counts(model) == {"features.0": 2, "head": 2}
    assert torch.allclose(model(x).logits, before, atol=1e-6)  # v = 0 and c = 0: still the same function
    assert "features.0.weight" in model.state_dict() and "head.dendrites.sets.1.cascade" in model.state_dict()
    set_random(model)
    assert not torch.allclose(model(x).logits, before, atol=1e-3)


@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(5, 4), (3, 7, 5)),  # (B, T, C): the neuron axis is the last one
    (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    (lambda: nn.Conv2d(3, 4, 3, stride=2), (2, 3, 8, 8)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (2, 4, 5, 5)),
    (lambda: nn.Conv2d(4, 6, 3, padding=1), (4, 5, 5)),  # unbatched
])
@pytest.mark.parametrize("mode", ["gd", "perforated"])
def test_cascade_matches_the_equations(make, shape, mode):
    torch.manual_seed(1)
    x = torch.randn(shape)
    model = nn.Sequential(make())
    add_dendrites(model, mode)
    for _ in range(3):
        add_dendrite_set(model)
        freeze_candidates(model)
    set_random(model)
    assert model[0].dendrites.sets[2].cascade.shape == (2, model[0].dendrites.neurons)
    assert torch.allclose(model(x), manual_layer(model[0], x), atol=1e-5)


def test_include_exclude_and_clear_errors():
    model = biozoo.create_model("resnet8", width=8)
    assert select_layers(model, include="blocks.0") == ["blocks.0.conv1", "blocks.0.conv2"]
    names = select_layers(model, exclude=["head", "blocks.*.shortcut"])
    assert "head" not in names and "stem.0" in names and not any("shortcut" in n for n in names)
    with pytest.raises(BiozooError, match="'blocks.9' matches no layer"):
        add_dendrites(model, include="blocks.9")
    with pytest.raises(BiozooError, match="exclude 'nope' matches no module"):
        add_dendrites(model, exclude="nope")
    with pytest.raises(BiozooError, match="'stem.1' is a BatchNorm2d; dendrites wrap nn.Linear"):
        add_dendrites(model, include="stem.1")
    with pytest.raises(BiozooError, match="unknown mode .*Known: gd, perforated"):
        add_dendrites(model, mode="pb")
    lstm = biozoo.create_model("lstm", input_size=8, hidden_size=8)
    with pytest.raises(BiozooError, match="'lstm' is a LSTM"):
        add_dendrites(lstm, include="lstm")
    add_dendrites(model, include="head")
    with pytest.raises(BiozooError, match="already has dendrite layers"):
        add_dendrites(model)
    attention = nn.Sequential(nn.MultiheadAttention(8, 2))  # out_proj is used through its weight: refused
    with pytest.raises(BiozooError, match="NonDynamicallyQuantizableLinear"):
        add_dendrites(attention, include="0.out_proj")


def test_gd_dendrites_learn_with_the_neurons():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    add_dendrites(model, "gd")
    add_dendrite_set(model)
    set_random(model)
    x = torch.randn(8, 4, requires_grad=True)
    model(x).square().sum().backward()
    node = model[0].dendrites.sets[0].node
    assert node.weight.grad is not None and node.weight.grad.abs().sum() > 0
    main_only = torch.autograd.grad(F.linear(x, model[0].weight, model[0].bias).square().sum(), x)[0]
    assert not torch.allclose(x.grad, 2 * main_only, atol=1e-4)  # error also flows back through the dendrite


def test_perforated_candidates_fit_the_residual_then_freeze():
    """A linear neuron cannot fit y = x0 + 2 tanh(4 x1); a candidate dendrite finds the residual by correlation,
    is frozen, and only v then learns; the error reaching x skips the dendrite."""
    torch.manual_seed(0)
    x = torch.randn(512, 3)
    y = x[:, :1] + 2 * torch.tanh(4 * x[:, 1:2])
    model = nn.Sequential(nn.Linear(3, 1))

    def fit(epochs: int) -> float:
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
        for _ in range(epochs):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        return float(F.mse_loss(model(x), y).detach())

    linear_mse = fit(200)
    add_dendrites(model, "perforated")
    add_dendrite_set(model)
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if "dendrites" not in k}
    scores = train_candidates(model, lambda: [(x[i:i + 128], y[i:i + 128]) for i in range(0, 512, 128)],
                              lambda b: F.mse_loss(model(b[0]), b[1]), epochs=60, lr=0.05, patience=60)
    # a fitted linear neuron's error is uncorrelated with any linear function of x: the candidate starts near 0
    # and must become nonlinear; the best single sigmoid of x1 reaches about 0.56 here
    assert scores[0] < 0.1 and scores[-1] > 0.45, scores
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen_before.items())  # neurons untouched
    assert torch.allclose(model(x), F.linear(x, model[0].weight, model[0].bias))  # a candidate is not added
    freeze_candidates(model)
    dendrite_mse = fit(300)
    assert dendrite_mse < 0.5 * linear_mse, (linear_mse, dendrite_mse)
    s = model[0].dendrites.sets[0]
    assert s.node.weight.grad is None and s.to_neuron.grad is not None
    xg = x[:16].clone().requires_grad_()
    model(xg).sum().backward()
    assert torch.allclose(xg.grad, model[0].weight.expand(16, 3))  # no task gradient through the dendrite


def test_correlation_meter_is_the_pearson_correlation_over_batches():
    d = torch.randn(100, 3)
    e = torch.stack([d[:, 0], -2 * d[:, 1] + 1, torch.randn(100)], 1)
    meter = CorrelationMeter()
    meter.update(d[:30], e[:30])
    meter.update(d[30:], e[30:])
    expected = torch.tensor([1.0, -1.0, torch.corrcoef(torch.stack([d[:, 2], e[:, 2]]))[0, 1].item()])
    assert torch.allclose(meter.correlation().float(), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["gd", "perforated"])
def test_save_and_load_rebuild_the_structure(tmp_path, mode):
    torch.manual_seed(0)
    model = biozoo.create_model("_dendrite_test_recurrent")
    x = torch.randn(2, 5, 3)
    plain = model(x)
    add_dendrites(model, mode)
    assert "alias" not in dendrite_layers(model) and "shared" in dendrite_layers(model)
    for _ in range(2):
        add_dendrite_set(model)
        freeze_candidates(model)
    add_dendrite_set(model)  # perforated: a third set still in candidate training
    assert torch.allclose(model(x), plain, atol=1e-6)
    if mode == "perforated":  # h_proj runs once per step: every call is correlated with its own error
        y = torch.tensor([0, 3])
        scores = train_candidates(model, lambda: [(x, y)], lambda b: F.cross_entropy(model(b[0]), b[1]), epochs=2)
        assert len(scores) == 2 and all(0 < v <= 1 for v in scores)
        freeze_candidates(model)
    set_random(model)
    expected = model(x)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == "dendrites" and config["kwargs"]["base"]["model"] == "_dendrite_test_recurrent"
    assert config["kwargs"]["mode"] == mode and set(config["kwargs"]["layers"].values()) == {3}
    loaded = biozoo.load_pretrained(tmp_path)
    assert dendrite_counts(loaded) == dendrite_counts(model)
    assert loaded.out.weight is loaded.head.weight and loaded.alias is loaded.shared
    assert torch.allclose(loaded(x), expected, atol=1e-6)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert ("head.dendrites.sets.0.node.weight" in trainable) == (mode == "gd")
    unregistered = add_dendrites(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(CheckpointError, match="not a registered zoo model"):
        biozoo.save_pretrained(unregistered, tmp_path / "no")


def test_the_ctm_synapses_grow_dendrites(tmp_path):
    torch.manual_seed(0)
    small = dict(iterations=3, d_model=16, d_input=8, heads=0, n_synch_out=4, n_synch_action=4, memory_length=3,
                 backbone_type="none", in_channels=8, out_dims=5)
    x = torch.randn(2, 8)
    # at depth 1 the fused synapse GLU calls its Linear once that carries dendrites, so candidates train
    glu = biozoo.create_model("ctm", synapse_depth=1, **small)
    add_dendrites(glu, "perforated", include="synapses")
    add_dendrite_set(glu)
    train_candidates(glu, lambda: [x], lambda b: glu(b).predictions.square().mean(), epochs=1)
    ctm = biozoo.create_model("ctm", synapse_depth=2, **small)  # the U-Net synapses call their layers
    x = torch.randn(2, 8)
    outputs = lambda m: list(m(x))  # noqa: E731  (predictions, certainties, synchronisation)
    before = outputs(ctm)
    add_dendrites(ctm, "gd", include="synapses")
    add_dendrite_set(ctm)
    assert list(dendrite_counts(ctm)) == select_layers(ctm, "synapses") and len(dendrite_counts(ctm)) >= 3
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(outputs(ctm), before))
    set_random(ctm)
    after = outputs(ctm)
    assert (after[0] - before[0]).abs().max() > 1e-5
    ctm.save_pretrained(tmp_path)
    again = outputs(biozoo.load_pretrained(tmp_path))
    assert len(after) == 3 and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(after, again))


def test_set_counts_removes_and_restores():
    model = biozoo.create_model("mlp", in_features=4, num_classes=3, hidden=[5])
    add_dendrites(model, "perforated")
    set_dendrite_counts(model, {"features.0": 2, "head": 2})
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".node." in n or "cascade" in n)
    set_dendrite_counts(model, {"features.0": 0, "head": 1})
    assert dendrite_counts(model) == {"features.0": 0, "head": 1}
    layer = model.features[0]  # back to the plain layer: no child module, no hook
    assert not hasattr(layer, "dendrites") and not layer._forward_hooks and model.head._forward_hooks
    with pytest.raises(CheckpointError, match="dendrite layers differ"):
        set_dendrite_counts(model, {"head": 1})


# The callback -------------------------------------------------------------------------------------------------

class OptimizerSpy(L.Callback):
    """Checks at every epoch start that every trainable parameter is in the optimizer."""

    def __init__(self):
        self.checked = 0

    def on_train_epoch_start(self, trainer, pl_module):
        in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        trainable = {id(p) for p in pl_module.parameters() if p.requires_grad}
        assert trainable <= in_optimizer
        self.checked += 1


def fit(tmp_path, callback, max_epochs=8):
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=128)
    task = SupervisedTask("mlp", {"hidden": [6]}, dm.dims, lr=0.01, scheduler="constant")
    spy = OptimizerSpy()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", default_root_dir=tmp_path, callbacks=[callback, spy],
                        enable_progress_bar=False, enable_model_summary=False,
                        logger=L.pytorch.loggers.CSVLogger(tmp_path, name="logs"), limit_val_batches=1.0)
    trainer.fit(task, dm)
    return trainer, task, spy


@pytest.mark.parametrize("mode", ["gd", "perforated"])
def test_callback_runs_cycles_and_keeps_the_best(tmp_path, mode):
    # a 15% relative threshold makes the cycles short
    callback = Dendrites(mode=mode, monitor="val/loss", monitor_mode="min", patience=1, max_cycles=2,
                         threshold_rel=0.15, candidate_epochs=2, verbose=False)
    trainer, task, spy = fit(tmp_path, callback)
    history = callback.history
    assert [h["dendrites"] for h in history][:2] == [0, 1] and spy.checked == trainer.current_epoch
    assert history[1]["params"] > history[0]["params"]
    # the kept model is the best one by validation, with its own dendrite count
    assert dendrite_counts(task.model) == callback.best_counts
    val = trainer.validate(task, DigitsDataModule(batch_size=128), verbose=False)[0]["val/loss"]
    assert val == pytest.approx(callback.best, abs=1e-5)
    rows = (tmp_path / "logs" / "version_0" / "dendrites.csv").read_text().splitlines()
    assert rows[0] == "cycle,dendrites,params,best,epochs,kept" and len(rows) == len(history) + 1
    assert (tmp_path / "logs" / "version_0" / "dendrites.png").stat().st_size > 5000
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "dendrites/params" in metrics and "dendrites/cycle_best" in metrics
    best = biozoo.load_pretrained(callback.outputs["checkpoint"])
    assert dendrite_counts(best) == callback.best_counts


class ResumeSpy(L.Callback):
    def __init__(self, ckpt: dict):
        self.ckpt, self.checked = ckpt, False

    def on_train_start(self, trainer, pl_module):
        state = pl_module.state_dict()
        assert set(state) == set(self.ckpt["state_dict"])
        assert all(torch.equal(state[k], v) for k, v in self.ckpt["state_dict"].items())
        self.checked = True


def test_callback_resumes_with_its_dendrites(tmp_path):
    def run(max_epochs, ckpt_path=None, extra=()):
        # nothing counts as an improvement after the first validation: a new dendrite set every epoch from epoch 2
        callback = Dendrites(mode="perforated", monitor="val/loss", monitor_mode="min", patience=1, max_cycles=3,
                             max_tries=5, threshold_rel=1.0, candidate_epochs=1, verbose=False, plot=False)
        trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", default_root_dir=tmp_path, logger=False,
                            callbacks=[callback, *extra], enable_progress_bar=False, enable_model_summary=False)
        L.seed_everything(0, verbose=False)
        dm = DigitsDataModule(batch_size=128)
        task = SupervisedTask("mlp", {"hidden": [6]}, dm.dims, lr=0.01, scheduler="constant")
        trainer.fit(task, dm, ckpt_path=ckpt_path)
        return trainer, task, callback

    trainer, _, _ = run(3)
    path = trainer.checkpoint_callback.best_model_path  # written at the last epoch's end, before the best restore
    ckpt = torch.load(path, weights_only=True)
    assert max(ckpt["biozoo_model_config"]["kwargs"]["layers"].values()) >= 1
    spy = ResumeSpy(ckpt)
    _, task, callback = run(4, path, [spy])
    assert spy.checked and task.strict_loading
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("Dendrites"))
    assert callback.history[:len(saved["history"])] == saved["history"]


def test_callback_settings_are_checked():
    with pytest.raises(BiozooError, match="unknown Dendrites mode 'cascor'"):
        Dendrites(mode="cascor")
    with pytest.raises(BiozooError, match="patience must be an integer >= 1"):
        Dendrites(patience=0)
    task = SupervisedTask("mlp", {"hidden": [6]}, {"in_features": 64, "num_classes": 10})
    add_dendrites(task.model, "gd")
    with pytest.raises(BiozooError, match="already has dendrites"):
        Dendrites(mode="perforated").setup(L.Trainer(logger=False), task, "fit")
    copied = copy.deepcopy(task.model)  # the live config follows the copy, not the original
    add_dendrite_set(copied)
    assert copied.biozoo_config()["kwargs"]["layers"] == {"features.0": 1, "head": 1}
    assert task.model.biozoo_config()["kwargs"]["layers"] == {"features.0": 0, "head": 0}


def test_cli_flag_and_configs(tmp_path):
    root = tmp_path / "run"
    proc = run_biozoo("fit", "-c", str(REPO / "configs" / "quickstart.yaml"), "--trainer.default_root_dir", str(root),
                      "--trainer.max_epochs", "3", "--model.init_args.model_kwargs", "{hidden: [16]}",
                      "--trainer.callbacks+=biozoo.train.Dendrites",
                      "--trainer.callbacks.patience=1", "--trainer.callbacks.max_cycles=1",
                      "--trainer.callbacks.threshold_rel=0.9", "--trainer.callbacks.monitor=val/loss",
                      "--trainer.callbacks.monitor_mode=min")
    assert "dendrites: cycle 1 (1 dendrite(s)" in proc.stdout, proc.stdout[-2000:]
    assert (root / "version_0" / "checkpoints" / "dendrites-best.ckpt").exists()
    from biozoo.cli import BiozooCLI

    for name, mode, patience in (("digits_mlp_gd", "gd", 25), ("digits_mlp_perforated", "perforated", 25),
                                 ("cifar10_resnet8_gd", "gd", 10)):
        cli = BiozooCLI(args=["-c", str(REPO / "configs" / "dendrites" / f"{name}.yaml"), "--trainer.logger=false",
                              "--trainer.default_root_dir", str(tmp_path / name)],
                        run=False)
        callback = next(c for c in cli.trainer.callbacks if isinstance(c, Dendrites))
        assert callback.mode == mode and callback.patience == patience


# --- dendrites through every zoo model, with no exclude list -----------------------------------------------------

def _zoo_cases():
    from biozoo.envs.parity import parity_batch
    from biozoo.envs.spikes import SpikesDataModule

    def ctm_parity():
        return biozoo.create_model("ctm", pretrained="parity16"), parity_batch(8, 16)[0]

    def ctm_image():
        torch.manual_seed(0)
        return (biozoo.create_model("ctm", iterations=4, d_model=32, d_input=16, heads=2, n_synch_out=8,
                                    n_synch_action=8, memory_length=3, backbone_type="resnet18-1", in_channels=1,
                                    num_classes=10, positional_embedding_type="learnable-fourier"),
                torch.randn(4, 1, 8, 8))

    def neuroformer():
        data = SpikesDataModule(n_neurons=20, duration_s=60, batch_size=4, num_workers=0)
        data.setup("fit")
        model = biozoo.create_model("neuroformer", **biozoo.models.kwargs_for_spec("neuroformer", data.spec, {}))
        return model, next(iter(data.train_dataloader()))

    def ccrnn():
        torch.manual_seed(0)
        return biozoo.create_model("ccrnn", input_size=3, output_size=2), torch.randn(4, 7, 3)

    def resnet8():
        torch.manual_seed(0)
        return biozoo.create_model("resnet8", in_channels=1, num_classes=10), torch.randn(4, 1, 8, 8)

    return {"ctm_parity": ctm_parity, "ctm_image": ctm_image, "neuroformer": neuroformer, "ccrnn": ccrnn,
            "resnet8": resnet8}


@pytest.mark.parametrize("case", list(_zoo_cases()))
def test_dendrites_grow_and_train_on_zoo_models_without_excludes(case, tmp_path):
    from biozoo.models.dendrites import check_dendrites_used

    model, x = _zoo_cases()[case]()
    model.eval()
    with torch.no_grad():
        ref = model(x).logits
    add_dendrites(model)
    add_dendrite_set(model)
    with torch.no_grad():
        out = model(x).logits
    # outputs kept at add: exactly, except the CTM, whose hooked q_proj leaves the folded query path (float
    # rounding, carried over its ticks)
    assert (out - ref).abs().max() <= (1e-4 if case.startswith("ctm") else 0.0)
    model.train()
    out = model(x)
    logits = out.logits if case != "ccrnn" else out.logits
    logits.float().square().mean().backward()
    if case != "ccrnn":  # the ccRNN's cerebellum runs only inside CCRNNTask's training step
        check_dendrites_used(model)
    grads = [p.grad for n, p in model.named_parameters() if ".dendrites." in n and p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(tmp_path / "m")
        again = biozoo.load_pretrained(tmp_path / "m")
        assert dendrite_counts(again) == dendrite_counts(model)


def test_ctm_parity_config_grows_dendrites_through_the_callback(tmp_path):
    """The failure of issue 16: "dendrites of q_proj, synapses.1 never ran" at the first growth."""
    run_biozoo("fit", "-c", "configs/ctm/parity16.yaml", "--trainer.max_epochs", "3", "--trainer.default_root_dir",
               str(tmp_path), "--data.train_size", "64", "--data.val_size", "32", "--data.batch_size", "16",
               "--model.init_args.model_kwargs.iterations", "4", "--model.init_args.model_kwargs.d_model", "32",
               "--trainer.callbacks+=biozoo.train.Dendrites", "--trainer.callbacks.patience", "1",
               "--trainer.callbacks.max_cycles", "1", "--trainer.callbacks.plot", "false")
    model = biozoo.load_pretrained(tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    counts = dendrite_counts(model)
    assert counts["q_proj"] == 1 and counts["synapses.1"] == 1
