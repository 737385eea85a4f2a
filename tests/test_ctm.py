"""Continuous Thought Machine: official-checkpoint conformance, synchronisation, adaptive compute, losses,
data, plots, the shipped parity checkpoint and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import biozoo
from biozoo.envs.parity import ParityDataModule, parity_batch
from biozoo.envs.sorting import SortingDataModule
from biozoo.models import CheckpointError, convert_checkpoint
from biozoo.models.ctm import ContinuousThoughtMachine, CTMOutput, synch_pairs
from biozoo.train.ctm import adaptive_compute_table, ctc_greedy_decode, ctm_ctc_loss, ctm_loss, evaluate

from conftest import REPO, SHARED, run_biozoo

FIXTURES = sorted(p for p in (SHARED / "fixtures" / "ctm_official").glob("*") if p.is_dir())
TINY = dict(iterations=6, d_model=32, d_input=16, heads=2, n_synch_out=8, n_synch_action=6, synapse_depth=1,
            memory_length=4, deep_nlms=True, memory_hidden_dims=4, do_layernorm_nlm=False,
            backbone_type="parity_backbone", positional_embedding_type="custom-rotational-1d", out_dims=16,
            prediction_reshaper=[8, 2], neuron_select_type="random-pairing", n_random_pairing_self=2)


def tiny(**overrides) -> ContinuousThoughtMachine:
    torch.manual_seed(0)
    np.random.seed(0)
    model = biozoo.create_model("ctm", **{**TINY, **overrides})
    with torch.no_grad():  # move the decays off zero so that the recurrence's decay matters
        model.decay_params_out.uniform_(0, 1)
        model.decay_params_action.uniform_(0, 1)
    return model.eval()


def fixture_source(folder):
    return folder / "checkpoint.pt" if (folder / "checkpoint.pt").exists() else folder


# --- official checkpoints ------------------------------------------------------------------------------------

@pytest.mark.parametrize("folder", FIXTURES, ids=[f.name for f in FIXTURES])
def test_official_fixture_conformance(folder):
    model = biozoo.load_pretrained(fixture_source(folder))
    io = load_file(str(folder / "io.safetensors"))
    assert isinstance(model, ContinuousThoughtMachine) and not model.training
    with torch.no_grad():
        out = model(io["inputs"])
    for ours, name in ((out.predictions, "predictions"), (out.certainties, "certainties"),
                       (out.synchronisation, "synchronisation_out")):
        assert ours.shape == io[name].shape
        assert (ours - io[name]).abs().max().item() < 1e-5, name
    meta = folder / "meta.json"
    if meta.exists():
        meta = json.loads(meta.read_text())
        assert model.num_parameters() == meta["num_parameters"]
        built = biozoo.create_model("ctm", in_channels=io["inputs"].shape[1] if io["inputs"].dim() == 4 else None,
                                    **meta["constructor"])
        assert built.num_parameters() == meta["num_parameters"]  # no lazy layers: counted at construction
        assert not any(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in built.parameters())


def test_convert_writes_portable_checkpoint(tmp_path):
    """What `biozoo convert sakana-ctm SRC OUT` runs."""
    folder = SHARED / "fixtures" / "ctm_official" / "parity_random_pairing"
    convert_checkpoint("sakana-ctm", folder / "checkpoint.pt", tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model"] == "ctm" and config["kwargs"]["deep_nlms"] is True and config["kwargs"]["d_model"] == 64
    model = biozoo.load_pretrained(tmp_path / "out")
    io = load_file(str(folder / "io.safetensors"))
    with torch.no_grad():
        assert (model(io["inputs"]).predictions - io["predictions"]).abs().max() < 1e-5


def test_bad_official_checkpoints_raise_one_line_errors(tmp_path):
    bad = tmp_path / "checkpoint.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError):
        biozoo.load_pretrained(bad)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**TINY, "d_model": 48}))
    torch.manual_seed(0)
    tiny().save_pretrained(tmp_path / "ours")  # weights of a d_model-32 model under a d_model-48 config
    (folder / "model.safetensors").write_bytes((tmp_path / "ours" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="shape mismatch"):
        biozoo.load_pretrained(folder)


# --- the model -----------------------------------------------------------------------------------------------

def test_shapes_tracking_and_unpacking():
    model = tiny()
    x, _ = parity_batch(3, 8)
    out = model(x, track=True)
    assert out.predictions.shape == (3, 16, 6) and out.certainties.shape == (3, 2, 6)
    assert out.synchronisation.shape == (3, 8)
    assert out.pre_activations.shape == out.post_activations.shape == (6, 3, 32)
    assert out.attention.shape == (6, 3, 2, 1, 8) and out.synch_action.shape == (6, 3, 6)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(6, 3, 2, 1))
    predictions, certainties, synch = model(x)
    torch.testing.assert_close(predictions, out.predictions)
    torch.testing.assert_close(out.certainties.sum(1), torch.ones(3, 6))
    with pytest.raises(biozoo.models.ShapeError):
        model(torch.zeros(3, 1, 8, 8))


@pytest.mark.parametrize("select", ["random-pairing", "random", "first-last"])
def test_synchronisation_equals_the_decayed_sum(select):
    """S_out^t = sum_s r^(t-s) z_i^s z_j^s / sqrt(sum_s r^(t-s)) over z^0 (start state) .. z^(t+1)."""
    model = tiny(neuron_select_type=select, d_model=40)
    x, _ = parity_batch(2, 8)
    out = model(x, track=True)
    z = torch.cat([model.start_activated_state.expand(1, 2, -1), out.post_activations])  # (T+1, B, D)
    left, right = synch_pairs(select, model.out_neuron_indices_left, model.out_neuron_indices_right)
    r = torch.exp(-model.decay_params_out)
    T = z.size(0)
    weights = r ** torch.arange(T - 1, -1, -1, dtype=torch.float32).unsqueeze(-1)  # (T, S)
    products = z[:, :, left] * z[:, :, right]
    expected = (weights.unsqueeze(1) * products).sum(0) / weights.sum(0).sqrt()
    torch.testing.assert_close(out.synchronisation, expected, atol=1e-5, rtol=1e-4)
    assert out.synchronisation.shape[1] == (8 if select == "random-pairing" else 36)


def test_random_pairing_self_pairs_and_decay_clamp():
    model = tiny(n_random_pairing_self=3)
    assert torch.equal(model.out_neuron_indices_left[:3], model.out_neuron_indices_right[:3])
    with torch.no_grad():
        model.decay_params_out[0] = 20.0
        model.decay_params_out[1] = -1.0
    model(parity_batch(2, 8)[0])
    assert model.decay_params_out[0].item() == 15.0 and model.decay_params_out[1].item() == 0.0


def test_decay_gradients_flow_from_zero_init():
    model = tiny()
    with torch.no_grad():
        model.decay_params_out.zero_()
    x, y = parity_batch(4, 8)
    ctm_loss(model.train()(x), y).loss.backward()
    assert model.decay_params_out.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs", [dict(synapse_depth=3, deep_nlms=False, do_layernorm_nlm=True),
                                    dict(backbone_type="resnet18-2", positional_embedding_type="learnable-fourier",
                                         in_channels=1, prediction_reshaper=[-1], out_dims=5)])
def test_variants_build_and_run(kwargs):
    model = tiny(**kwargs)
    x = torch.randn(2, 1, 12, 12) if "in_channels" in kwargs else parity_batch(2, 8)[0]
    out = model(x, track=True)
    assert torch.isfinite(out.predictions).all()
    if "in_channels" in kwargs:
        assert out.token_shape == (3, 3) and out.attention.shape[-1] == 9  # 12 -> max-pool 6 -> stage 2: 3


@pytest.mark.parametrize("halt_on", ["mean", "min"])
def test_adaptive_compute_freezes_and_matches_the_full_run(halt_on):
    model = tiny(iterations=10)
    x, _ = parity_batch(16, 8)
    with torch.no_grad():
        full = model(x)
        per_tick = full.predictions.permute(0, 2, 1).reshape(16 * 10, -1)
        halting_certainty = model.halting_certainty(per_tick, model.certainty(per_tick), halt_on).view(16, 10)
        if halt_on == "min":  # the least certain of the 8 positions
            assert (halting_certainty <= full.certainties[:, 1] + 1e-6).all()
        threshold = halting_certainty.median().item()
        halted = model(x, halt_threshold=threshold, min_ticks=2, halt_on=halt_on)
    ticks = halted.ticks
    assert ticks.min() >= 2 and ticks.max() <= 10 and 0 < (ticks < 10).sum()
    early = ticks < 10  # answers are read at the halting tick; the others at their most certain tick
    assert torch.equal(halted.most_certain_tick()[early], ticks[early] - 1)
    assert torch.equal(halted.most_certain_tick()[~early], full.certainties[~early, 1].argmax(-1))
    for b in range(16):
        t = ticks[b].item()
        torch.testing.assert_close(halted.predictions[b, :, :t], full.predictions[b, :, :t])  # same until it halts
        frozen = halted.predictions[b, :, t - 1 : t].expand(-1, 10 - t)
        torch.testing.assert_close(halted.predictions[b, :, t:], frozen)
        cert = halting_certainty[b, :t]
        assert cert[-1] >= threshold or t == 10
        assert (cert[1:-1] < threshold).all()  # it halted at the first confident tick after min_ticks
    with torch.no_grad():
        never = model(x, halt_threshold=2.0)
    torch.testing.assert_close(never.predictions, full.predictions)
    assert (never.ticks == 10).all()


def test_adaptive_compute_table_and_plots(tmp_path):
    model = tiny()
    x, y = parity_batch(32, 8)
    rows = adaptive_compute_table(model, [(x, y)], thresholds=(0.0, 0.9))
    assert [r["threshold"] for r in rows] == [0.0, 0.9, None]
    assert rows[0]["mean_ticks"] == 1.0 and rows[-1]["mean_ticks"] == 6.0
    report = evaluate(model, [(x, y)], tmp_path, thresholds=(0.5,))
    names = {p.name for p in report["files"]}
    assert names == {"neural_dynamics.png", "tick_curves.png", "attention.png", "attention.gif"}
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)
    assert "all ticks" in (tmp_path / "adaptive_compute.md").read_text()


def test_lstm_baseline_and_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    lstm = biozoo.create_model("ctm_lstm", iterations=5, d_model=16, d_input=8, heads=2, out_dims=16,
                               prediction_reshaper=[8, 2], backbone_type="parity_backbone",
                               positional_embedding_type="custom-rotational-1d")
    x, y = parity_batch(4, 8)
    out = lstm(x)
    assert out.predictions.shape == (4, 16, 5)
    loss = ctm_loss(out, y, use_most_certain=False)
    assert loss.logits.shape == (4, 2, 8)
    torch.testing.assert_close(loss.logits, out.predictions[:, :, -1].view(4, 8, 2).transpose(1, 2))
    for model in (lstm, biozoo.create_model("ctm_parity", seq_len=8, iterations=3, d_model=16, d_input=8)):
        model.eval().save_pretrained(tmp_path / type(model).__name__)
        again = biozoo.load_pretrained(tmp_path / type(model).__name__)
        with torch.no_grad():
            torch.testing.assert_close(again(x).predictions, model(x).predictions)


# --- losses --------------------------------------------------------------------------------------------------

def test_ctm_loss_min_and_most_certain_ticks():
    predictions = torch.randn(3, 4, 5)
    certainties = torch.rand(3, 2, 5)
    target = torch.tensor([0, 3, 1])
    out = CTMOutput(predictions, certainties, torch.zeros(3, 1), prediction_reshaper=[-1])
    result = ctm_loss(out, target)
    ce = torch.stack([F.cross_entropy(predictions[..., t], target, reduction="none") for t in range(5)], 1)
    certain = certainties[:, 1].argmax(1)
    expected = (ce.min(1).values.mean() + ce[torch.arange(3), certain].mean()) / 2
    torch.testing.assert_close(result.loss, expected)
    torch.testing.assert_close(result.logits, predictions[torch.arange(3), :, certain])
    # per position: CE averaged over positions before choosing ticks; logits (B, C, L)
    pos = CTMOutput(torch.randn(2, 6, 4), torch.rand(2, 2, 4), torch.zeros(2, 1), prediction_reshaper=[3, 2])
    y = torch.tensor([[0, 1, 1], [1, 0, 0]])
    ce = torch.stack([F.cross_entropy(pos.predictions[..., t].view(2, 3, 2).transpose(1, 2), y, reduction="none")
                      .mean(1) for t in range(4)], 1)
    c = pos.certainties[:, 1].argmax(1)
    torch.testing.assert_close(ctm_loss(pos, y).loss, (ce.min(1).values.mean() + ce[torch.arange(2), c].mean()) / 2)
    assert ctm_loss(pos, None).logits.shape == (2, 2, 3)


def test_ctc_decode_and_loss():
    blank = 3
    path = torch.tensor([[blank, 0, 0, blank, 2, 2, 1, blank]])  # -> 0, 2, 1
    predictions = F.one_hot(path, 4).float().transpose(1, 2) * 10
    assert ctc_greedy_decode(predictions, blank) == [[0, 2, 1]]
    out = CTMOutput(predictions, torch.rand(1, 2, 8), torch.zeros(1, 1))
    result = ctm_ctc_loss(out, torch.tensor([[0, 2, 1]]))
    assert result.logits.argmax(1).tolist() == [[0, 2, 1]] and result.extras["sequence_acc"].item() == 1.0
    expected = F.ctc_loss(F.log_softmax(predictions, 1).permute(2, 0, 1), torch.tensor([[0, 2, 1]]),
                          torch.tensor([8]), torch.tensor([3]), blank=blank)
    torch.testing.assert_close(result.loss, expected)
    assert ctm_ctc_loss(out, torch.tensor([[2, 0, 1]])).extras["sequence_acc"].item() == 0.0


# --- data ----------------------------------------------------------------------------------------------------

def test_parity_and_sorting_data():
    dm = ParityDataModule(seq_len=5, batch_size=4, train_size=8, val_size=4, test_size=4)
    dm.setup()
    x, y = next(iter(dm.val_dataloader()))
    assert set(x.unique().tolist()) <= {-1.0, 1.0}
    expected = torch.tensor([[int((x[b, : i + 1] == -1).sum()) % 2 for i in range(5)] for b in range(4)])
    assert torch.equal(y, expected)
    x2, _ = next(iter(dm.val_dataloader()))
    assert torch.equal(x, x2)  # the held-out sets are fixed
    assert dm.dims["out_dims"] == 10 and dm.dims["prediction_reshaper"] == [5, 2]
    sorting = SortingDataModule(length=6, batch_size=3, train_size=3, val_size=3, test_size=3)
    sorting.setup()
    xs, ys = next(iter(sorting.test_dataloader()))
    assert torch.equal(xs.gather(1, ys), xs.sort(1).values)
    model = biozoo.create_model("ctm_sort", **{k: v for k, v in sorting.dims.items() if k in ("d_input", "out_dims")},
                                iterations=4, d_model=16, memory_length=3, synapse_depth=2)
    assert model(xs).predictions.shape == (3, 7, 4) and model.attention is None


# --- the shipped checkpoint and the CLI ------------------------------------------------------------------------

@pytest.mark.skipif(not (REPO / "models" / "weights" / "ctm.parity16" / "card.json").exists(),
                    reason="ctm.parity16 not shipped")
def test_pretrained_parity16_scores_on_fresh_data():
    model = biozoo.create_model("ctm", pretrained="parity16")
    x, y = parity_batch(256, 16, torch.Generator().manual_seed(2024))
    with torch.no_grad():
        out = model(x)
    accuracy = (ctm_loss(out, y).logits.argmax(1) == y).float().mean().item()
    recorded = model.pretrained_cfg.metrics  # on 10,000 fresh sequences
    assert accuracy >= max(0.85, recorded["test_acc"] - 0.03)  # chance is 0.5
    (row,) = adaptive_compute_table(model, [(x, y)], thresholds=(0.9,))[:1]  # early exit keeps its recorded promise
    assert row["mean_ticks"] <= 1.15 * recorded["mean_ticks_exit_0.9"] and row["accuracy"] >= accuracy - 0.01


def test_fit_cli_parity_smoke(tmp_path):
    root = tmp_path / "run"
    run_biozoo("fit", "-c", "configs/ctm/parity16.yaml", "--trainer.max_steps", "3", "--trainer.default_root_dir",
               str(root), "--data.train_size", "64", "--data.val_size", "32", "--data.batch_size", "16",
               "--model.init_args.model_kwargs.iterations", "4", "--model.init_args.model_kwargs.d_model", "32")
    ckpt = root / "version_0" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    model = biozoo.load_pretrained(ckpt)  # what `biozoo export` reads
    assert model.iterations == 4 and model.out_dims == 32 and model.prediction_reshaper == [16, 2]
    assert math.isfinite(model(parity_batch(2, 16)[0]).predictions.sum().item())


@pytest.mark.parametrize("kwargs, x", [
    (dict(heads=2, n_synch_action=6, backbone_type="resnet18-1", in_channels=1, num_classes=10,
          neuron_select_type="random-pairing"), lambda: torch.randn(3, 1, 8, 8)),
    (dict(heads=2, n_synch_action=4, backbone_type="parity_backbone", positional_embedding_type="custom-rotational-1d",
          out_dims=16, prediction_reshaper=[8, 2], neuron_select_type="random"), lambda: torch.randn(3, 8).sign()),
    (dict(heads=0, n_synch_action=0, backbone_type="none", d_input=6, num_classes=7, neuron_select_type="first-last"),
     lambda: torch.randn(3, 6)),
], ids=["image", "parity", "features"])
def test_forward_equals_the_reference_equations(kwargs, x):
    torch.manual_seed(0)
    model = biozoo.create_model("ctm", **{"iterations": 4, "d_model": 16, "d_input": 8, "n_synch_out": 6,
                                          "memory_length": 3, **kwargs}).eval()
    x = x()
    with torch.no_grad():
        fast, reference = model(x), model.forward_reference(x)
    assert torch.allclose(fast.predictions, reference.predictions, atol=1e-6)
    assert torch.allclose(fast.certainties, reference.certainties, atol=1e-6)
    assert torch.allclose(fast.synchronisation, reference.synchronisation, atol=1e-6)


def test_a_carried_state_continues_the_thought():
    from biozoo._core import is_recurrent, reset_state

    torch.manual_seed(0)
    model = biozoo.create_model("ctm", iterations=3, d_model=16, d_input=6, heads=0, n_synch_out=4, n_synch_action=0,
                                backbone_type="none", num_classes=3, memory_length=4).eval()
    x = torch.randn(2, 6)
    start = model.initial_state(2)
    assert is_recurrent(model)
    with torch.no_grad():
        assert torch.equal(model(x).predictions, model(x, state=start).predictions)  # the start is the default
        first = model(x, state=start)
        second = model(x, state=first.state)
        assert not torch.allclose(second.predictions, first.predictions)  # it thinks on from where it stopped
        reset = reset_state(second.state, start, torch.tensor([True, False]))
        assert torch.equal(reset[0][0], start[0][0]) and torch.equal(reset[1][1], second.state[1][1])
        again = model(x, state=reset)
    assert torch.allclose(again.predictions[0], first.predictions[0])


@pytest.mark.parametrize("synapse_depth", [1, 4])
def test_gradients_equal_the_reference_equations(synapse_depth):
    """FusedNLM's hand-written backward and the tick loop's once-per-backward weight gradients (_TickLinear) give
    every parameter the gradient autograd gives the reference equations."""
    torch.manual_seed(0)
    model = biozoo.create_model("ctm", iterations=5, d_model=16, d_input=8, n_synch_out=6, n_synch_action=6,
                                memory_length=3, memory_hidden_dims=3, synapse_depth=synapse_depth, out_dims=4,
                                backbone_type="parity_backbone", positional_embedding_type="custom-rotational-1d")
    with torch.no_grad():  # off zero, where the reference's clamp passes no gradient (the official one does)
        for decay in (model.decay_params_out, model.decay_params_action):
            decay.uniform_(0.1, 1.0)
    x = torch.randint(0, 2, (3, 10)) * 2 - 1
    grads = []
    for forward in (model.forward, model.forward_reference):
        model.zero_grad()
        out = forward(x)
        (out.predictions.pow(2).sum() + out.certainties[:, 1].sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[1].items():
        assert torch.allclose(grads[0][name], grad, atol=1e-5, rtol=1e-4), name
