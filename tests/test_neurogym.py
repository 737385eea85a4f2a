"""NeuroGym tasks as biozoo tasks: seeded, disjoint splits, an online spec, the decision metric, and the masked
(-100) and weighted steps of the losses."""

from __future__ import annotations

import pytest
import torch

from biozoo._core import BiozooError, DataSpec, ModelOutput

pytest.importorskip("neurogym", reason="NeuroGym is installed with --no-deps (README, NeuroGym); CI installs it")

from biozoo.envs import NeuroGymDataModule  # noqa: E402


def small(task: str = "PerceptualDecisionMaking-v0", seed: int = 0) -> NeuroGymDataModule:
    dm = NeuroGymDataModule(task, seq_len=50, train_size=8, val_size=4, test_size=4, seed=seed)
    dm.setup()
    return dm


def test_splits_are_seeded_and_disjoint():
    a, b, c = small(seed=0), small(seed=0), small(seed=1)
    xa, ya = a.train_set.tensors
    assert torch.equal(xa, b.train_set.tensors[0]) and torch.equal(ya, b.train_set.tensors[1])
    assert not torch.equal(xa, c.train_set.tensors[0])
    val = a.val_set.tensors[0]
    assert not any(torch.equal(v, t) for v in val for t in xa)  # no validation window is a training window
    assert xa.shape == (8, 50, 3) and ya.dtype == torch.int64 and set(ya.unique().tolist()) <= {0, 1, 2}


def test_spec_is_online_with_a_label_per_step():
    spec = small("GoNogo-v0").spec
    assert spec.online and spec.positions == (50,) and spec.classes == 2 and spec.extras["fixation_label"] == 0
    assert DataSpec.from_dict(spec.to_dict()) == spec


def test_unknown_task_is_one_line_with_suggestions():
    with pytest.raises(BiozooError, match="Did you mean: PerceptualDecisionMaking-v0"):
        NeuroGymDataModule("PerceptualDecisionMakin").spec


def test_gymnasium_env_for_the_ppo_path():
    import gymnasium as gym

    env = gym.make("biozoo/NeuroGym-v0", task="GoNogo-v0")
    obs, _ = env.reset(seed=3)
    assert obs.dtype == "float32" and obs.shape == env.observation_space.shape
    first = [env.step(0)[0] for _ in range(5)]
    env.reset(seed=3)
    assert all((o == env.step(0)[0]).all() for o in first)


def test_ctm_loss_leaves_masked_steps_out_and_weighs_labels():
    from biozoo.train import get_loss

    torch.manual_seed(0)
    logits, target = torch.randn(4, 3, 10), torch.randint(0, 3, (4, 10))
    masked = target.clone()
    masked[:, 5:] = -100
    for name in ("ctm", "cross_entropy"):
        loss = get_loss(name)
        full_on_kept = loss(ModelOutput(logits[..., :5]), target[:, :5]).loss
        assert torch.allclose(loss(ModelOutput(logits), masked).loss, full_on_kept, atol=1e-6), name
        weighted = loss(ModelOutput(logits), target, class_weights=[0.0, 1.0, 1.0]).loss
        kept = target != 0
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        expected = (ce * kept).sum() / kept.sum() if name == "cross_entropy" else \
            ((ce * kept).sum(1) / kept.sum(1)).mean()
        assert torch.allclose(weighted, expected, atol=1e-6), name


def test_fit_logs_decision_accuracy(tmp_path):
    from biozoo.train.cli import BiozooCLI

    cli = BiozooCLI(args=["fit", "-c", "configs/tasks/neurogym.yaml", "-c", "configs/models/lstm.yaml",
                          "--data.init_args.task=DelayMatchCategory-v0", "--data.init_args.train_size=32",
                          "--data.init_args.val_size=16", "--data.init_args.seq_len=40",
                          "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
                          f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false",
                          "--trainer.accelerator=cpu", "--trainer.callbacks=[]", "--curve.verbose=false"])
    metrics = cli.trainer.callback_metrics
    assert "val/acc_decision" in metrics and "val/acc" in metrics
    assert float(metrics["val/acc_decision"]) != float(metrics["val/acc"])


def spec_only_module(has_spec: bool):
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    class UserData(L.LightningDataModule):
        if has_spec:
            spec = DataSpec("sequence", (6, 3), "classes", num_classes=2, positions=(6,), online=True)

        def train_dataloader(self):
            return DataLoader(TensorDataset(torch.randn(8, 6, 3), torch.randint(0, 2, (8, 6))), batch_size=4)

    return UserData()


def test_the_cli_links_a_datamodule_through_its_spec_only():
    from biozoo.envs.datamodules import linked_dims

    dims = linked_dims(spec_only_module(True))
    assert dims["spec"]["online"] is True and dims["input_size"] == 3
    with pytest.raises(BiozooError, match="has no `.spec`"):
        linked_dims(spec_only_module(False))
