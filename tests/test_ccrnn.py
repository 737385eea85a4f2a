"""Cortico-cerebellar RNN: synthetic-gradient mechanics, the tasks, the Lightning task and the CLI."""

import json

import numpy as np
import pytest
import torch

import biozoo
from biozoo._core import DataSpec
from biozoo.models import kwargs_for_spec
from biozoo.envs import DigitDrawingDataModule, LineDrawingDataModule, SequentialDigitsDataModule
from biozoo.envs.ccrnn_tasks import DIGIT_STROKES, digit_template
from biozoo.models.errors import BiozooError, DataNotFoundError, ShapeError, UnknownNameError
from biozoo.train.ccrnn import (CCRNNTask, cerebellum_loss, feedback_steps, sequence_loss, trajectory_deviation,
                                trajectory_jerk, windowed_backward)
from conftest import run_biozoo
from test_foundation import _write_idx


def small_ccrnn(cell="lstm", **kw):
    kw = {"input_size": 3, "output_size": 4, "hidden_size": 6, "cell": cell, "cerebellum_width": 16,
          "cerebellum_depth": 1, **kw}
    return biozoo.create_model("ccrnn", **kw).double()


def problem(objective, seq_len=7, batch=5, feedback_every=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq_len, 3, generator=g, dtype=torch.double)
    if objective == "regression":
        y = torch.randn(batch, seq_len, 4, generator=g, dtype=torch.double)
    else:
        y = torch.randint(0, 4, (batch,), generator=g)
    mask = feedback_steps(seq_len, objective, feedback_every)
    return x, lambda out, start: sequence_loss(out, y, objective, mask, start)


def cortex_grads(model):
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters() if not n.startswith("cerebellum")]
    model.zero_grad()
    return grads


def boundary_gradients(model, x, window_loss, window, discount=1.0):
    """dL/d(state entering each window) through the untruncated graph, the gradient crossing each boundary
    scaled by `discount` (1: the true full-BPTT gradients; lambda: the bootstrapped fixed point)."""
    state, total, entering = model.initial_state(x.shape[0], x).requires_grad_(), 0.0, {}
    for start in range(0, x.shape[1], window):
        if start:
            state = discount * state + (1 - discount) * state.detach()
            state.retain_grad()
            entering[start] = state
        out, state = model.run_window(x[:, start:start + window], state)
        total = total + window_loss(out, start)
    total.backward()
    model.zero_grad()
    return {t: s.grad.clone() for t, s in entering.items()}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("objective", ["regression", "classification"])
def test_oracle_cerebellum_turns_truncated_bptt_into_full_bptt(cell, objective):
    torch.manual_seed(0)
    model, (x, window_loss) = small_ccrnn(cell), problem(objective)
    full = windowed_backward(model, x, window_loss, window=0)
    g_full = cortex_grads(model)
    truncated = windowed_backward(model, x, window_loss, window=2)
    g_trunc = cortex_grads(model)
    assert torch.allclose(full.loss, truncated.loss)
    assert max(float((a - b).abs().max()) for a, b in zip(g_full, g_trunc)) > 1e-3  # truncation loses gradient

    true = boundary_gradients(model, x, window_loss, 2)
    scale = 0.1
    oracle = lambda states, steps: torch.stack([true[t] for t in steps]) / scale  # noqa: E731
    with_oracle = windowed_backward(model, x, window_loss, 2, sg_scale=scale, synthetic=oracle)
    for a, b in zip(g_full, cortex_grads(model)):
        assert torch.allclose(a, b, atol=1e-12)
    # the cerebellar targets at the window starts are then the true gradients there
    for start, target in zip(range(0, 7, 2), with_oracle.targets):
        if start:
            assert torch.allclose(target, true[start], atol=1e-12)


def test_zero_initialised_cerebellum_equals_plain_truncated_bptt():
    torch.manual_seed(0)
    model, (x, window_loss) = small_ccrnn(), problem("regression")
    assert model.predict_gradient(torch.randn(3, model.state_size, dtype=torch.double)).abs().max() == 0
    windowed_backward(model, x, window_loss, window=2)
    g_trunc = cortex_grads(model)
    cc = windowed_backward(model, x, window_loss, 2, 0.1, lambda s, t: model.predict_gradient(s))
    for a, b in zip(g_trunc, cortex_grads(model)):
        assert torch.equal(a, b)
    # its first targets are the truncated gradients at the window starts: the window's own loss only
    assert cc.targets.shape == (4, 5, model.state_size) and cc.targets[1:].abs().sum() > 0
    assert cerebellum_loss(model, cc) > 0


def test_cerebellum_learns_the_bootstrapped_discounted_gradient():
    """With a fixed cortex, C(s_a) -> dL_w/ds_a + lambda (ds_b/ds_a)^T C(s_b) has one fixed point: the gradient
    with each window boundary crossing discounted by lambda. The loss is scaled so that the targets are O(0.1):
    Adam's steps are absolute, so tiny targets would need a tiny learning rate."""
    torch.manual_seed(0)
    model, (x, unscaled) = small_ccrnn(cerebellum_width=64), problem("regression", seq_len=6, batch=16)
    window_loss = lambda out, start: 100 * unscaled(out, start)  # noqa: E731
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("cerebellum"))
    opt = torch.optim.Adam(model.cerebellum.parameters(), lr=1e-2)
    lam = 0.5
    for _ in range(150):
        wp = windowed_backward(model, x, window_loss, 2, lam, lambda s, t: model.predict_gradient(s))
        opt.zero_grad()
        cerebellum_loss(model, wp).backward()
        opt.step()
    fixed_point = boundary_gradients(model, x, window_loss, 2, discount=lam)
    plain = boundary_gradients(model, x, window_loss, 2)  # undiscounted: a different target
    for start, state in zip((2, 4), wp.starts[1:]):
        prediction = model.predict_gradient(state).detach().flatten()
        cos = torch.nn.functional.cosine_similarity(prediction, fixed_point[start].flatten(), dim=0)
        assert cos > 0.9, (start, float(cos))
    error = lambda g: (model.predict_gradient(wp.starts[1]).detach() - g).norm()  # noqa: E731
    assert error(fixed_point[2]) < error(plain[2])  # the first boundary's gradient has one crossing to discount


def test_measures_and_losses():
    t = torch.linspace(0, 1, 10)
    line = torch.stack([3 * t, -t], -1)[None]
    assert trajectory_jerk(line).abs().max() < 1e-5  # constant speed: no jerk
    zigzag = line + torch.tensor([[0.0, 0.3]]) * (torch.arange(10) % 2)[:, None]
    assert trajectory_jerk(zigzag[None] if zigzag.dim() == 2 else zigzag) > 0.5
    assert torch.allclose(trajectory_deviation(line + torch.tensor([0.3, 0.4]), line), torch.tensor([0.5]))
    assert feedback_steps(10, "regression", 2).nonzero().flatten().tolist() == [0, 2, 4, 6, 8]
    assert feedback_steps(8, "classification").nonzero().flatten().tolist() == [7]
    # window shares sum to the loss of the whole sequence
    out, y = torch.randn(4, 10, 2), torch.randn(4, 10, 2)
    mask = feedback_steps(10, "regression", 2)
    shares = sum(sequence_loss(out[:, a:a + 3], y, "regression", mask, a) for a in range(0, 10, 3))
    assert torch.allclose(shares, ((out - y)[:, ::2] ** 2).mean())


def test_model_registry_shapes_errors_and_roundtrip(tmp_path):
    assert {"ccrnn", "ccrnn_linedraw", "ccrnn_seqmnist"} <= set(biozoo.list_models("ccrnn*"))
    model = biozoo.create_model("ccrnn_seqmnist", input_size=8)
    assert model.cerebellum.out.weight.abs().sum() == 0 and len(model.cerebellum.hidden) == 2
    assert model(torch.rand(2, 1, 8, 8)).logits.shape == (2, 10)  # image rows, last-step readout
    assert biozoo.create_model("ccrnn_linedraw")(torch.zeros(2, 10, 1)).logits.shape == (2, 2, 10)  # (B, O, T)
    assert biozoo.create_model("ccrnn_linedraw")(torch.zeros(2, 10)).logits.shape == (2, 2, 10)  # (B, T) as (B, T, 1)
    assert sum(p.numel() for p in biozoo.create_model("ccrnn_linedraw").cerebellum.parameters()) == 240_900
    with pytest.raises(ShapeError, match="ccrnn expects"):
        model(torch.zeros(2, 8, 5))
    with pytest.raises(UnknownNameError, match="Did you mean: gru"):
        biozoo.create_model("ccrnn", cell="gruu")
    with pytest.raises(BiozooError, match="cerebellum=False"):
        biozoo.create_model("ccrnn", cerebellum=False).predict_gradient(torch.zeros(1, 100))
    model.cerebellum.out.weight.data.normal_()
    model.save_pretrained(tmp_path)
    again = biozoo.load_pretrained(tmp_path)
    s = torch.randn(3, model.state_size)
    assert torch.equal(again.predict_gradient(s), model.predict_gradient(s))


def test_line_drawing_data():
    dm = LineDrawingDataModule(num_train=100, num_test=20)
    dm.setup()
    assert dm.spec == DataSpec("sequence", (10, 1), "regression", target_dim=2, positions=(10,),
                               extras={"objective": "regression", "feedback_every": 2})
    assert {k: dm.dims[k] for k in ("input_size", "seq_len", "objective", "feedback_every")} == \
        {"input_size": 1, "seq_len": 10, "objective": "regression", "feedback_every": 2}
    x, y = dm.train_set.tensors
    assert x.shape == (80, 10, 1) and y.shape == (80, 10, 2) and len(dm.val_set) == 20
    assert x[:, 1:].abs().max() == 0 and torch.allclose(y[:, 0], torch.zeros(2))
    cues, targets = dm.examples()
    assert cues[:, 0, 0].tolist() == pytest.approx([-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3])
    ends = targets[:, -1].norm(dim=-1)
    assert ends[3] == 0 and torch.allclose(ends[[0, 1, 2, 4, 5, 6]], torch.full((6,), 10.0))
    assert len({tuple(e.tolist()) for e in targets[:, -1].round(decimals=3)}) == 7  # seven distinct lines
    for cue, target in zip(*dm.examples()):  # every training pair follows the same cue -> line map
        same = (x[:, 0, 0] - cue[0, 0]).abs() < 1e-6
        assert torch.equal(y[same], target.expand(int(same.sum()), -1, -1))


def test_digit_templates_and_drawing_data():
    for digit in DIGIT_STROKES:
        path, stroke = digit_template(digit, 12), np.asarray(DIGIT_STROKES[digit])
        arc_step = np.linalg.norm(np.diff(stroke, axis=0), axis=1).sum() / 11  # equal steps along the stroke:
        chords = np.linalg.norm(np.diff(path, axis=0), axis=1)  # a chord is shorter only where it cuts a corner
        assert np.allclose(path[0], stroke[0]) and np.allclose(path[-1], stroke[-1])
        assert chords.max() == pytest.approx(arc_step, rel=1e-4) and (chords <= arc_step + 1e-5).all()
        assert path.min() >= 0 and path.max() <= 1
    dm = DigitDrawingDataModule(cue="class", seq_len=12, batch_size=16)
    dm.setup()
    x, y = dm.train_set.tensors
    assert dm.dims["input_size"] == 10 and x.shape[1:] == (12, 10) and y.shape[1:] == (12, 2)
    labels = x[:, 0].argmax(-1)
    assert torch.equal(y, torch.as_tensor(dm.templates)[labels]) and x[:, 1:].abs().max() == 0
    rows = DigitDrawingDataModule(cue="image", target="line")
    rows.setup()
    assert rows.dims["input_size"] == 8 and rows.train_set.tensors[1][:, -1].norm(dim=-1).allclose(torch.tensor(10.0))
    with pytest.raises(BiozooError, match="leave seq_len unset"):
        DigitDrawingDataModule(cue="image", seq_len=5)


def test_sequential_digits_data_and_mnist_files(tmp_path):
    rows = SequentialDigitsDataModule()
    rows.setup()
    assert rows.spec == DataSpec("sequence", (8, 8), "classes", num_classes=10,
                                 extras={"objective": "classification", "feedback_every": 1})
    assert kwargs_for_spec("ccrnn", rows.spec) == {"input_size": 8, "output_size": 10, "readout": "last"}
    pairs = SequentialDigitsDataModule(step_pixels=2)
    pairs.setup()
    assert torch.equal(pairs.train_set.tensors[0].reshape(-1, 8, 8), rows.train_set.tensors[0])
    with pytest.raises(BiozooError, match="does not divide"):
        SequentialDigitsDataModule(step_pixels=3)
    with pytest.raises(DataNotFoundError, match="MNIST not found"):
        SequentialDigitsDataModule(source="mnist", data_dir=str(tmp_path)).setup()
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28))
    for split, n in (("train", 20), ("t10k", 6)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[:n])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    mnist = SequentialDigitsDataModule(source="mnist", data_dir=str(tmp_path), val_fraction=0.25)
    mnist.setup()
    x, y = mnist.test_set.tensors
    assert (len(mnist.train_set), len(mnist.val_set)) == (15, 5) and mnist.dims["seq_len"] == 28
    assert torch.allclose(x, torch.as_tensor(images[:6] / 255.0, dtype=torch.float32)) and y.tolist() == [0, 1, 2, 3, 4, 5]


def test_lightning_task_trains_all_three_ways(tmp_path):
    import lightning as L

    dm = SequentialDigitsDataModule(batch_size=50)
    val_loss = {}
    for training in ("ccrnn", "tbptt", "bptt"):
        torch.manual_seed(0)
        task = CCRNNTask(model="ccrnn_seqmnist", data_dims=dm.dims, training=training, truncation=1, sg_scale=0.3,
                         cerebellum_lr_scale=0.1, lr=1e-2)
        before = {k: v.clone() for k, v in task.model.state_dict().items()}
        trainer = L.Trainer(max_steps=30, val_check_interval=15, check_val_every_n_epoch=None, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(task, dm)
        assert trainer.global_step == 30  # one optimiser step per batch, whatever the number of windows
        val_loss[training] = float(trainer.callback_metrics["val/loss"])
        changed = {k for k, v in task.model.state_dict().items() if not torch.equal(v, before[k])}
        assert {"cortex.weight_hh_l0", "cortex.weight_ih_l0", "head.weight"} <= changed
        assert task.model.truncation == {"ccrnn": 1, "tbptt": 1, "bptt": 0}[training]
        if training == "ccrnn":
            assert "cerebellum.out.weight" in changed and trainer.callback_metrics["train/cerebellum_loss"] > 0
            lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]
            assert len(lrs) == 2 and lrs[1] == pytest.approx(0.1 * lrs[0])
        else:
            assert task.model.cerebellum is None
    # chance is ln 10 = 2.30; the early cerebellum is still noisy, so ccRNN only has to stay finite and below it
    assert val_loss["bptt"] < 2.2 and val_loss["tbptt"] < 2.2 and val_loss["ccrnn"] < 2.3, val_loss


def test_cli_fit_export_and_reload(tmp_path):
    root = tmp_path / "run"
    run_biozoo("fit", "-c", "configs/ccrnn/linedraw.yaml", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
               "--trainer.limit_train_batches", "4", "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false", "--data.init_args.num_train", "250")
    metrics = (next(root.glob("version_0/metrics.csv"))).read_text().splitlines()
    header = metrics[0].split(",")
    for key in ("train/loss_epoch", "train/cerebellum_loss_epoch", "val/loss", "val/deviation", "val/jerk"):
        assert key in header
    ckpt = root / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["training"] == "ccrnn"
    run_biozoo("export", str(ckpt), str(tmp_path / "export"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["model"] == "ccrnn_linedraw" and config["kwargs"]["truncation"] == 1
    model = biozoo.load_pretrained(tmp_path / "export")
    assert model(torch.zeros(1, 10, 1)).logits.shape == (1, 2, 10) and model.cerebellum is not None


def test_seqmnist_config_runs_on_mnist_files(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = np.random.default_rng(1).integers(0, 256, (120, 28, 28))
    for split, n in (("train", 120), ("t10k", 50)):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[:n])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    root = tmp_path / "run"
    run_biozoo("fit", "-c", "configs/ccrnn/seqmnist.yaml", "--data.init_args.data_dir", str(tmp_path / "data"),
               "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
               "--trainer.enable_progress_bar", "false")
    header = next(root.glob("version_0/metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"val/loss", "val/acc", "train/cerebellum_loss_epoch"} <= set(header)
    hparams = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["truncation"] == 3 and hparams["data_dims"]["seq_len"] == 28


def test_shipped_weights_reproduce_their_cards():
    model = biozoo.create_model("ccrnn_seqmnist.digits8")
    dm = SequentialDigitsDataModule()
    dm.setup()
    x, y = dm.test_set.tensors
    with torch.no_grad():
        acc = float((model(x).logits.argmax(-1) == y).float().mean())
    assert acc == pytest.approx(model.pretrained_cfg.metrics["test_acc"], abs=2e-3)
    model = biozoo.create_model("ccrnn_linedraw.lines7")
    lines = LineDrawingDataModule()
    lines.setup()
    x, y = lines.test_set.tensors
    with torch.no_grad():
        deviation = float(trajectory_deviation(model(x).logits.transpose(1, 2), y).mean())
    assert deviation == pytest.approx(model.pretrained_cfg.metrics["test_deviation"], abs=2e-3)
