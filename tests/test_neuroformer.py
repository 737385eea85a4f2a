"""Neuroformer: simulator, loaders, tokeniser, model (KV cache = recompute), losses, harness, CLI."""

from __future__ import annotations

import datetime

import numpy as np
import pytest
import torch

from biozoo.envs.spikes import (SpikeData, SpikesDataModule, SpikeTokenizer, SpikeWindows, collate_windows,
                                events_from_counts, load_nwb, load_official, load_spikes, save_spikes, simulate,
                                window_ends)
from biozoo.models import create_model, kwargs_for_spec, load_pretrained
from biozoo.models.errors import BiozooError, CheckpointError, ShapeError
from biozoo.models.neuroformer import Neuroformer, contrastive_loss, init_from_pretrained
from biozoo.train.neuroformer import (READOUTS, NeuroformerTask, _stack, attention_connectivity, connectivity_auroc,
                                      direction_auroc, lagged_lift, rollout, window_attention,
                                      neuroformer_loss, psth, rate_correlation, set_scores)

from conftest import run_biozoo


@pytest.fixture(scope="module")
def small_data() -> SpikeData:
    return simulate(20, 40.0, seed=3, frame_shape=(8, 8), movie_s=5.0)


@pytest.fixture(scope="module")
def small_dm(tmp_path_factory, small_data) -> SpikesDataModule:
    path = save_spikes(small_data, tmp_path_factory.mktemp("spk") / "sim.npz")
    dm = SpikesDataModule(source="npz", path=str(path), block_size=40, prev_block_size=60, batch_size=8)
    dm.setup()
    return dm


def tiny_model(dm: SpikesDataModule, **kwargs) -> Neuroformer:
    torch.manual_seed(0)
    dims = kwargs_for_spec("neuroformer", dm.spec)  # what the CLI derives from the data
    return Neuroformer(**{**dims, "n_embd": 32, "n_head": 2, "patch_size": [3, 4, 4], **kwargs}).eval()


# simulator -----------------------------------------------------------------------------------------------------

def test_simulate_is_seeded_and_has_the_promised_structure(small_data):
    again = simulate(20, 40.0, seed=3, frame_shape=(8, 8), movie_s=5.0)
    assert np.array_equal(again.spike_times, small_data.spike_times) and np.array_equal(again.spike_ids, small_data.spike_ids)
    other = simulate(20, 40.0, seed=4, frame_shape=(8, 8), movie_s=5.0)
    assert len(other.spike_times) != len(small_data.spike_times)
    a = small_data.adjacency
    assert a.shape == (20, 20) and np.all(np.diag(a) == 0) and np.all(a >= 0)
    assert np.abs(np.linalg.eigvals(a)).max() <= 0.6 + 1e-6  # stationary
    hubs = small_data.meta["hubs"]
    out_degree = (a > 0).sum(1)
    assert out_degree[hubs].mean() > 2 * np.delete(out_degree, hubs).mean()
    assert np.all(np.diff(small_data.spike_times) >= 0) and small_data.spike_times.max() < 40.0
    assert 2.0 < small_data.meta["mean_rate_hz"] < 15.0
    assert small_data.frames.shape == (100, 8, 8) and small_data.frame_loop
    assert small_data.behaviour.shape == (800, 1) and small_data.behaviour_names == ["speed"]


def test_simulated_connectivity_shows_in_the_spikes():
    """Spikes of j raise i's rate in the next 20 ms exactly when j -> i: the ground truth is recoverable."""
    data = simulate(30, 120.0, seed=0, stimulus=False, behaviour=False)
    lift = lagged_lift(data, 0.0, 120.0)  # j spikes, then i spikes in the next 10 ms bin
    assert lift.shape == (30, 30) and connectivity_auroc(lift, data.adjacency) > 0.8
    assert connectivity_auroc(lift.T, data.adjacency) < 0.7  # the direction is recovered too


def test_stimulus_drives_repeatable_rates():
    data = simulate(20, 60.0, seed=1, frame_shape=(8, 8), movie_s=5.0, behaviour=False, spectral_radius=0.3)
    trials = [(data.spike_ids[(data.spike_times >= s) & (data.spike_times < s + 5)],
               data.spike_times[(data.spike_times >= s) & (data.spike_times < s + 5)] - s) for s in range(0, 60, 5)]
    r = rate_correlation(psth(trials[::2], 20, 5.0, 0.25), psth(trials[1::2], 20, 5.0, 0.25))
    assert np.nanmean(r) > 0.5  # PSTHs of disjoint trials agree: the movie drives the neurons


# tokeniser and windows -----------------------------------------------------------------------------------------

def test_tokeniser_layout_matches_the_official_one():
    tok = SpikeTokenizer(5, resolution=0.01, window=0.05, window_prev=0.1, block_size=6, prev_block_size=6)
    assert (tok.sos, tok.eos, tok.pad, tok.n_dt_values, tok.dt_eos, tok.dt_pad) == (5, 6, 7, 11, 12, 13)
    ids, dts = tok.encode(np.array([3, 1]), np.array([101, 103]), 100, 6)
    assert ids.tolist() == [5, 3, 1, 6, 7, 7, 7] and dts.tolist() == [0, 1, 3, 12, 13, 13, 13]
    ids, dts = tok.encode(np.arange(5), np.arange(100, 105), 100, 6)  # overflow keeps the last block - 2 events
    assert ids.tolist() == [5, 1, 2, 3, 4, 6, 7]
    back_ids, back_t = tok.decode(ids, dts, 1.0)
    assert back_ids.tolist() == [1, 2, 3, 4] and np.allclose(back_t, [1.01, 1.02, 1.03, 1.04])
    with pytest.raises(BiozooError, match="multiple of the resolution"):
        SpikeTokenizer(5, window=0.055)


def test_windows_hold_current_past_frames_and_behaviour():
    data = SpikeData(np.array([0.101, 0.112, 0.118, 0.151, 0.162, 0.19]), np.array([2, 0, 1, 1, 0, 2]), 3, 1.0,
                     frames=np.arange(20 * 2 * 2, dtype=np.float32).reshape(20, 2, 2), frame_rate=20.0,
                     behaviour=np.arange(20, dtype=np.float32)[:, None], behaviour_rate=20.0, behaviour_names=["speed"])
    tok = SpikeTokenizer(3, window=0.05, window_prev=0.05, block_size=8, prev_block_size=8)
    ds = SpikeWindows(data, tok, np.array([20]), frame_window=0.15)  # current [0.15, 0.2), past [0.1, 0.15)
    item = ds[0]
    assert item["id"].tolist() == [3, 1, 0, 2, 4, 5, 5, 5] and item["dt"].tolist()[:4] == [0, 0, 1, 4]
    assert torch.equal(item["id_target"][:-1], item["id"][1:])
    assert item["id_prev"].tolist()[:5] == [3, 2, 0, 1, 4] and item["dt_prev"].tolist()[1:4] == [0, 1, 1]
    raw = (data.frames[[1, 2, 3]] - data.frames.mean()) / data.frames.std()  # frames before t = 0.2 s
    assert torch.allclose(item["frames"], torch.from_numpy(raw), atol=1e-5)
    assert item["behaviour"].tolist() == [[3.0]]
    target = SpikeWindows(data, tok, np.array([20]), behaviour="target")[0]["behaviour_target"]
    assert target.tolist() == [3.0]
    batch = collate_windows([ds[0], ds[0]], tok.pad)
    assert batch["id"].shape == (2, 4) and batch["id_prev"].shape == (2, 5)  # trailing PAD columns cut
    assert window_ends(tok, 0.0, 0.3).tolist() == [10, 15, 20, 25, 30]


def test_datamodule_splits_by_trial_and_links_dims(small_dm):
    s = small_dm.splits
    assert s["train"] == (0.0, 25.0) and s["val"] == (25.0, 30.0) and s["test"] == (30.0, 40.0)
    dims = small_dm.dims
    assert dims["n_neurons"] == 20 and dims["frame_shape"] == [3, 8, 8] and dims["n_behaviour"] == 1
    batch = next(iter(small_dm.train_dataloader()))
    assert batch["frames"].shape[1:] == (3, 8, 8) and batch["id"].shape[1] <= 40
    assert float(torch.stack([small_dm.test_set[i]["t_end"] for i in range(len(small_dm.test_set))]).min()) > 30.0


def test_spikes_npz_roundtrip(tmp_path, small_data):
    back = load_spikes(save_spikes(small_data, tmp_path / "d.npz"))
    assert np.array_equal(back.spike_ids, small_data.spike_ids) and np.allclose(back.adjacency, small_data.adjacency)
    assert back.frame_loop and back.trial_s == 5.0 and np.array_equal(back.meta["hubs"], small_data.meta["hubs"])


# loaders -------------------------------------------------------------------------------------------------------

def test_official_layout_loader(tmp_path):
    counts = np.array([[0, 2, 0, 1], [1, 0, 0, 1.4]])  # neurons x bins of 0.01 s (floats are rounded)
    np.save(tmp_path / "spikerates_dt_0.01.npy", counts)
    np.save(tmp_path / "behavior_speed_dt_0.05.npy", np.array([5.0, 6.0]))
    np.save(tmp_path / "phi_dt_0.05.npy", np.array([0.1, 0.2]))
    np.save(tmp_path / "stimulus.npy", np.zeros((3, 4, 5), np.float32))
    data = load_official(tmp_path)
    assert data.n_neurons == 2 and data.duration_s == pytest.approx(0.04)
    assert data.spike_ids.tolist() == [1, 0, 0, 0, 1] and np.allclose(data.spike_times, [0, 0.01, 0.01, 0.03, 0.03])
    assert sorted(data.behaviour_names) == ["phi", "speed"] and data.frames.shape == (3, 4, 5)
    t, i = events_from_counts(np.array([[0, 3]]), 0.5)
    assert t.tolist() == [0.5, 0.5, 0.5] and i.tolist() == [0, 0, 0]
    with pytest.raises(Exception, match="spikerates_dt"):
        load_official(tmp_path / "nothing")


def test_nwb_loader_reads_units_behaviour_and_stimulus(tmp_path):
    from pynwb import NWBHDF5IO, NWBFile, TimeSeries
    from pynwb.image import ImageSeries

    nwb = NWBFile("test", "nf-test", datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc))
    nwb.add_unit(spike_times=[10.2, 10.5, 11.0])
    nwb.add_unit(spike_times=[10.25])
    module = nwb.create_processing_module("behavior", "behaviour")
    module.add(TimeSeries(name="speed", data=np.linspace(0, 1, 41), unit="m/s", starting_time=10.0, rate=20.0))
    nwb.add_stimulus(ImageSeries(name="movie", data=np.random.rand(25, 4, 4), unit="n.a.", starting_time=10.0, rate=20.0))
    path = tmp_path / "tiny.nwb"
    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    data = load_nwb(path)
    assert data.n_neurons == 2 and data.meta["t0"] == 10
    assert np.allclose(data.spike_times, [0.2, 0.25, 0.5, 1.0]) and data.spike_ids.tolist() == [0, 1, 0, 0]
    assert data.behaviour_names == ["speed"] and data.behaviour[10, 0] == pytest.approx(0.25)
    assert data.frames.shape[1:] == (4, 4) and data.frame_rate == 20.0
    with pytest.raises(BiozooError, match="no behaviour TimeSeries named"):
        load_nwb(path, behaviour_names=["running"])


# model ---------------------------------------------------------------------------------------------------------

def test_forward_shapes_and_clip(small_dm):
    model = tiny_model(small_dm)
    batch = next(iter(small_dm.train_dataloader()))
    out = model(batch)
    b, t = batch["id"].shape
    assert out["id_logits"].shape == (b, t, 23) and out["dt_logits"].shape == (b, t, model.dt_vocab)
    assert set(out["clip"]) == {"id", "frames", "behaviour"} and torch.isfinite(out["clip_loss"])
    with pytest.raises(ShapeError):
        model({**batch, "frames": batch["frames"][:, :2]})


def test_cached_step_logits_equal_the_full_forward(small_dm):
    """Token by token with the KV cache gives the logits of one full causal forward."""
    model = tiny_model(small_dm)
    batch = collate_windows([small_dm.train_set[i] for i in range(4)], model.pad)
    full = model(batch)["hidden"]
    ctx = model.context_kv(model.encode_context(batch), for_step=True)
    caches = model.new_caches(4, batch["id"].shape[1])
    steps = [model.decode_step(batch["id"][:, t:t + 1], batch["dt"][:, t:t + 1], t, ctx, caches)
             for t in range(batch["id"].shape[1])]
    assert (batch["id_prev"] == model.pad).any()  # the past's PAD mask is exercised
    torch.testing.assert_close(model.head_id(torch.stack(steps, 1)), model.head_id(full), atol=1e-5, rtol=1e-5)


def test_generate_with_and_without_cache_gives_identical_tokens(small_dm):
    model = tiny_model(small_dm)
    batch = collate_windows([small_dm.test_set[i] for i in range(2)], model.pad)
    ctx = {k: v for k, v in batch.items() if k not in ("id", "dt")}
    runs = [model.generate(ctx, n_windows=2, context_fn=lambda w: ctx, use_cache=c, max_tokens=12,
                           generator=torch.Generator().manual_seed(7)) for c in (True, False)]
    for a, b in zip(runs[0]["ids"] + runs[0]["dts"], runs[1]["ids"] + runs[1]["dts"]):
        assert torch.equal(a, b)
    other = model.generate(ctx, n_windows=2, context_fn=lambda w: ctx, max_tokens=12,
                           generator=torch.Generator().manual_seed(8))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0]["ids"], other["ids"]))
    for ids, bins in runs[0]["spikes"]:
        assert np.all(ids < 20) and np.all((bins >= 0) & (bins < 10)) and np.all(np.diff(bins) >= 0)


def test_generated_past_is_fed_back(small_dm):
    """Window 2's past is rebuilt from generated spikes: editing window 1's output changes window 2."""
    model = tiny_model(small_dm)
    spikes = [(np.array([4, 9]), np.array([-3, 2]))]
    ids, dts = model._past_tokens(spikes, 5, torch.device("cpu"))
    assert ids[0, :4].tolist() == [model.sos, 4, 9, model.eos] and dts[0, 1:3].tolist() == [2, 7]


def test_contrastive_loss_is_infonce():
    a, b = torch.randn(6, 4), torch.randn(6, 4)
    za, zb = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
    logits = za @ zb.t() / 0.5
    expected = (-logits.diag() + logits.logsumexp(1)).mean()
    assert torch.allclose(contrastive_loss({"x": a, "y": b}, 0.5), expected)
    assert contrastive_loss({"x": a, "y": a}, 0.1) < contrastive_loss({"x": a, "y": b}, 0.1)


def test_loss_weights_and_pad(small_dm):
    model = tiny_model(small_dm)
    batch = next(iter(small_dm.train_dataloader()))
    out = model(batch)
    full = neuroformer_loss(out, batch, id_pad=model.pad, dt_pad=model.dt_pad)
    only_id = neuroformer_loss(out, batch, id_weight=1.0, dt_weight=0.0, clip_weight=0.0, id_pad=model.pad)
    e = full.extras
    assert torch.allclose(full.loss, 0.45 * e["id_loss"] + 0.30 * e["dt_loss"] + 0.25 * e["clip_loss"])
    assert torch.allclose(only_id.loss, e["id_loss"]) and full.logits.shape[1] == model.id_vocab


def test_few_shot_init_keeps_pretrained_weights(tmp_path, small_dm):
    model = tiny_model(small_dm)
    model.save_pretrained(tmp_path / "pre")
    kwargs = {**model.biozoo_config()["kwargs"], "behaviour_head": "regression"}
    ft = init_from_pretrained(create_model("neuroformer", **kwargs), tmp_path / "pre")
    assert torch.equal(ft.head_id.weight, model.head_id.weight) and ft.behaviour_head.out_features == 1
    with pytest.raises(CheckpointError, match="does not fit"):
        init_from_pretrained(create_model("neuroformer", **{**kwargs, "n_embd": 16}), tmp_path / "pre")


# harness -------------------------------------------------------------------------------------------------------

def test_set_scores_and_rate_correlation():
    s = set_scores([{1, 2}, {3}, set()], [{1}, {4}, set()])
    assert s["precision"] == pytest.approx(0.5) and s["recall"] == pytest.approx(0.25)
    assert s["f1"] == pytest.approx((2 / 3 + 0) / 2)
    a = np.array([[1, 2, 3.0], [1, 1, 1]])
    r = rate_correlation(a, np.array([[2, 4, 6.0], [0, 1, 2]]))
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])


def test_attention_connectivity_scores(small_dm):
    model = tiny_model(small_dm)
    score = attention_connectivity(model, small_dm.test_set, max_windows=16)
    assert score.shape == (20, 20) and np.isfinite(score).all()
    assert connectivity_auroc(small_dm.data.adjacency, small_dm.data.adjacency) == 1.0
    # zero queries make every attention row uniform over its allowed keys: the model-free readout
    with torch.no_grad():
        for blk in [*model.history_blocks, *model.decoder]:
            blk.attn.query.weight.zero_()
            blk.attn.query.bias.zero_()
    for layers in ("history", "decoder"):
        flat = attention_connectivity(model, small_dm.test_set, max_windows=16, layers=layers)
        uniform = attention_connectivity(model, small_dm.test_set, max_windows=16, layers=layers, uniform=True)
        assert np.allclose(flat, uniform, atol=1e-6) and not np.allclose(uniform, score)


def test_official_readouts_rollout_and_gradient(small_dm):
    model = tiny_model(small_dm)
    a1, a2 = torch.rand(2, 3, 5, 5).softmax(-1).unbind(0)
    half = lambda a: (a + torch.eye(5)) / 2  # noqa: E731  (rows of a sum to one, so (A + I) / 2 stays normalised)
    torch.testing.assert_close(rollout([a1, a2]), half(a2) @ half(a1))
    batch = _stack([small_dm.test_set[i] for i in range(8)], model.pad)
    for layers in ("history", "decoder"):
        for readout in READOUTS:
            att = window_attention(model, batch, layers, readout)
            keys = batch["id_prev"] if layers == "history" else batch["id"]
            assert att.shape == (8, batch["id"].shape[1], keys.shape[1]) and torch.isfinite(att).all()
            if layers == "decoder":  # causal: nothing from later positions, in every readout
                assert att.triu(1).abs().max() == 0
            if readout == "grad":  # (dlogit/dA).clamp(0) * A: non-negative, zero on PAD keys (never attended)
                assert att.min() >= 0
                if layers == "history":
                    assert att[(keys == model.pad)[:, None, :].expand_as(att)].max() == 0
    assert all(p.grad is None for p in model.parameters())  # the gradient readout leaves no gradients behind
    raw = attention_connectivity(model, small_dm.test_set, max_windows=16, layers="decoder")
    grad = attention_connectivity(model, small_dm.test_set, max_windows=16, layers="decoder", readout="grad")
    assert grad.shape == raw.shape and not np.allclose(grad, raw)
    with pytest.raises(BiozooError, match="unknown attention readout"):
        attention_connectivity(model, small_dm.test_set, readout="saliency")


def test_direction_auroc_scores_the_true_direction_of_one_way_edges():
    adjacency = np.zeros((4, 4))
    adjacency[0, 1] = adjacency[0, 2] = adjacency[3, 1] = 1.0  # one-way edges; 1 <-> 2 reciprocal below
    adjacency[1, 2] = adjacency[2, 1] = 1.0
    assert direction_auroc(adjacency, adjacency) == {"auroc": 1.0, "paired": 1.0, "edges": 3}
    assert direction_auroc(adjacency.T, adjacency)["auroc"] == 0.0
    assert direction_auroc(adjacency, adjacency, sources=np.array([0]))["edges"] == 2  # hub edges only


# CLI -----------------------------------------------------------------------------------------------------------

def test_cli_pretrain_export_then_few_shot_finetune(tmp_path, small_dm):
    """biozoo fit (pretraining) and export; then a behaviour head fine-tuned from the export on a few windows."""
    import lightning as L

    run_biozoo("fit", "--data.class_path", "biozoo.envs.SpikesDataModule", "--data.init_args.source", "npz",
               "--data.init_args.path", small_dm.path, "--data.init_args.block_size", "40",
               "--data.init_args.prev_block_size", "60", "--data.init_args.batch_size", "16",
               "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
               "--trainer.enable_progress_bar", "false", "--model.class_path", "biozoo.train.NeuroformerTask",
               "--model.init_args.model_kwargs", '{"n_embd": 32, "n_head": 2, "patch_size": [3, 4, 4]}',
               "--trainer.default_root_dir", str(tmp_path / "pre"))
    run_biozoo("export", str(tmp_path / "pre" / "version_0" / "checkpoints" / "last.ckpt"), str(tmp_path / "exported"))
    pre = load_pretrained(tmp_path / "exported")
    assert isinstance(pre, Neuroformer) and pre.n_neurons == 20 and pre.behaviour_mlp is not None

    dm = SpikesDataModule(source="npz", path=small_dm.path, block_size=40, prev_block_size=60, batch_size=8,
                          behaviour="target", finetune_fraction=0.05)
    task = NeuroformerTask(finetune_from=str(tmp_path / "exported"), data_dims=dm.dims, lr=1e-3, warmup_steps=0)
    assert task.model.behaviour_head_kind == "regression"
    assert torch.equal(task.model.head_id.weight, pre.head_id.weight)  # pretrained weights kept
    before = task.model.behaviour_head.weight.clone()
    L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              limit_val_batches=1, enable_model_summary=False).fit(task, dm)
    assert len(dm.train_set) == round(0.05 * len(dm.windows("train")))
    assert not torch.equal(task.model.behaviour_head.weight, before)
    assert task.model.biozoo_config()["kwargs"]["behaviour_head"] == "regression"


def test_shipped_pretraining_checkpoint_fine_tunes_a_behaviour_head():
    """neuroformer.sim100_pretrain (spikes + frames, behaviour withheld) is what finetune_speed_pretrain.yaml reads."""
    pre = create_model("neuroformer", pretrained="sim100_pretrain")
    assert pre.behaviour_mlp is None and pre.video_encoder is not None and pre.history_blocks[0].attn.n_head == 1
    task = NeuroformerTask(finetune_from="neuroformer.sim100_pretrain",
                           data_dims={"behaviour_head": "regression", "n_behaviour_out": 1})
    assert task.model.behaviour_head.out_features == 1
    assert torch.equal(task.model.head_id.weight, pre.head_id.weight)


def test_shipped_spikes_only_checkpoint_reads_connectivity_from_its_attention(tmp_path):
    """neuroformer.sim100_spikes on fresh spikes of its own network (seed 0 fixes the adjacency): the gradient
    rollout of its decoder attention ranks the true couplings well above the model-free co-occurrence."""
    model = create_model("neuroformer", pretrained="sim100_spikes")
    dm = SpikesDataModule(source="simulate", n_neurons=100, duration_s=100.0, sim_seed=0, window_prev=0.1,
                          prev_block_size=150, behaviour="none", use_frames=False, data_dir=str(tmp_path),
                          sim_kwargs={"stimulus": False, "behaviour": False, "base_rate": [2.0, 6.0]})
    dm.setup()
    test, adjacency = dm.windows("test"), dm.data.adjacency
    grad = attention_connectivity(model, test, max_windows=256, layers="decoder", readout="grad")
    uniform = attention_connectivity(model, test, max_windows=256, layers="decoder", uniform=True)
    assert connectivity_auroc(grad, adjacency) > connectivity_auroc(uniform, adjacency) + 0.1
    assert direction_auroc(grad, adjacency, dm.data.meta["hubs"])["auroc"] > 0.8


def test_generation_honours_dendrites(small_dm):
    """The cached step reads plain weights; with dendrites (hooks) on the projections, generation takes the
    uncached path, so the dendrites shape the tokens and both settings agree."""
    from biozoo.models.dendrites import add_dendrite_set, add_dendrites

    model = tiny_model(small_dm)
    batch = collate_windows([small_dm.test_set[i] for i in range(2)], model.pad)
    ctx = {k: v for k, v in batch.items() if k not in ("id", "dt")}
    plain = model.generate(ctx, max_tokens=12, generator=torch.Generator().manual_seed(7))
    add_dendrites(model)
    add_dendrite_set(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".dendrites." in name:
                p.normal_(0, 0.5)
    assert not all(blk.step_is_exact() for blk in model.modules() if hasattr(blk, "step_is_exact"))
    runs = [model.generate(ctx, max_tokens=12, use_cache=c, generator=torch.Generator().manual_seed(7))
            for c in (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0]["ids"], runs[1]["ids"]))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0]["ids"], plain["ids"]))
