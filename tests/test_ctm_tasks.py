"""CTM tasks: the maze generator, loader, augmentation, loss and re-application evaluation; QA-MNIST; the RL core."""

import json
from collections import deque

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import biozoo
from biozoo._core import ModelOutput
from biozoo.envs import mazes
from biozoo.envs.qamnist import MINUS, PLUS, QAMNISTBatches, QAMNISTDataModule, make_question
from biozoo.models.errors import DataNotFoundError, ShapeError
from biozoo.train import ctm_tasks
from conftest import REPO, run_biozoo


def free_graph(image):
    free = ~(image == mazes.WALL).all(-1)
    nodes = {tuple(p) for p in np.argwhere(free)}
    edges = sum(((r + 1, c) in nodes) + ((r, c + 1) in nodes) for r, c in nodes)
    seen, queue = {next(iter(nodes))}, deque([next(iter(nodes))])
    while queue:
        r, c = queue.popleft()
        for n in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if n in nodes and n not in seen:
                seen.add(n)
                queue.append(n)
    return len(nodes), edges, len(seen)


@pytest.mark.parametrize("size", [5, 11, 21])
def test_generated_mazes_are_perfect_deterministic_and_solved(size):
    for seed in range(5):
        image, route = mazes.generate_maze(size, seed)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        assert colours == {mazes.WALL, mazes.FREE, mazes.START, mazes.GOAL}
        nodes, edges, reached = free_graph(image)
        assert edges == nodes - 1 and reached == nodes  # a tree: exactly one path between any two cells
        assert route == mazes.solve_maze(image)
        assert mazes.follow_route(image, route)[0]
        again, route_again = mazes.generate_maze(size, seed)
        assert np.array_equal(image, again) and route == route_again
    assert not np.array_equal(mazes.generate_maze(size, 0)[0], mazes.generate_maze(size, 1)[0])


def test_route_length_padding_and_bad_sizes():
    for seed in range(10):
        image, route = mazes.generate_maze(15, seed, route_length=12)
        assert len(route) == 12
        moves = [a for a in route if a != mazes.WAIT]
        assert route == moves + [mazes.WAIT] * (12 - len(moves)) and moves == mazes.solve_maze(image)
    for bad in (4, 3, 16):
        with pytest.raises(ShapeError):
            mazes.generate_maze(bad, 0)


def test_augmentation_relabels_actions_consistently():
    # the official table for np.rot90(k=+1): up->left, down->right, left->down, right->up
    assert mazes.ROT_CCW.tolist() == [2, 3, 1, 0, 4] and mazes.ROT_CW.tolist() == [3, 2, 0, 1, 4]
    image, route = mazes.generate_maze(11, 7, route_length=40)
    route = np.asarray(route)
    variants = set()
    for rotate in (-1, 0, 1):
        for lr in (False, True):
            for ud in (False, True):
                im2, r2 = mazes.transform_maze(image, route, rotate, lr, ud)
                moves = [a for a in r2.tolist() if a != mazes.WAIT]
                assert moves == mazes.solve_maze(im2)
                variants.add(im2.tobytes())
    assert len(variants) == 8  # the dihedral group of the square
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        im2, r2 = mazes.augment_maze(image, route, 0.5, gen)
        assert mazes.follow_route(im2, r2)[0]


def test_official_folder_loader_reads_pngs_with_blue_path(tmp_path):
    routes = {}
    for split in ("train", "test"):
        folder = tmp_path / "small" / split / "0"  # ImageFolder layout: a class folder inside
        folder.mkdir(parents=True)
        for i in range(6):
            image, route = mazes.generate_maze(11, 100 * (split == "test") + i)
            drawn = mazes.draw_route(image, route, mazes.PATH)
            Image.fromarray(drawn).save(folder / f"maze_{i}.png")
            routes[(split, i)] = (image, route)
    images, got = mazes.load_maze_folder(tmp_path / "small" / "train", route_length=16)
    assert images.shape == (6, 11, 11, 3)
    assert not (images == mazes.PATH).all(-1).any()  # the path is hidden
    for i in range(6):
        image, route = routes[("train", i)]
        assert np.array_equal(images[i], image)
        expected = (route + [mazes.WAIT] * 16)[:16]  # padded, or truncated as the official reader does
        assert got[i].tolist() == expected
    dm = mazes.MazeDataModule(dataset="small", data_dir=str(tmp_path), route_length=16, batch_size=4,
                              val_fraction=0.34)
    assert dm.dims["input_shape"] == [3, 11, 11] and dm.dims["out_dims"] == 80
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 6)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 11, 11) and y.shape == (4, 16) and x.min() == -1 and x.max() == 1
    with pytest.raises(DataNotFoundError):
        mazes.load_maze_folder(tmp_path / "nothing", 10)


def test_generated_cache_round_trip(tmp_path):
    a = mazes.generate_mazes(9, 20, seed=3, route_length=12, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    b = mazes.generate_mazes(9, 20, seed=3, route_length=12, cache_dir=tmp_path)
    c = mazes.generate_mazes(9, 20, seed=4, route_length=12)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and not np.array_equal(a[0], c[0])


def reference_maze_loss(predictions, certainties, targets, lookahead):
    """The official algorithm, written out per sample and tick (a loop, independent of the vectorised one)."""
    B, L, _, T = predictions.shape
    per = torch.nn.functional.cross_entropy(predictions.permute(0, 3, 2, 1).reshape(B * T, 5, L),
                                            targets.repeat_interleave(T, 0), reduction="none").view(B, T, L)
    argmax = predictions.argmax(2)
    losses = torch.zeros(B, T)
    for b in range(B):
        last_correct = 0
        for t in range(T):
            k = 0
            while k < L and argmax[b, k, t] == targets[b, k]:
                k += 1
            last_correct = max(last_correct, k - 1)
        upto = last_correct + lookahead
        losses[b] = per[b, :, :upto].mean(-1)
    certain = certainties[:, 1].argmax(-1)
    rows = torch.arange(B)
    return ((losses[rows, losses.argmin(1)] + losses[rows, certain]) / 2).mean()


def test_maze_loss_matches_the_official_curriculum():
    torch.manual_seed(0)
    B, L, T = 6, 12, 4
    targets = torch.randint(0, 5, (B, L))
    predictions = torch.randn(B, L, 5, T)
    wrong = (targets + 1) % 5
    for b in range(B):  # sample b: a correct prefix of exactly 2b steps at tick b % T, none at the other ticks
        predictions[b, :, :, :] = -5
        predictions[b, torch.arange(L), wrong[b]] = 5
        predictions[b, torch.arange(2 * b), targets[b, : 2 * b], b % T] = 10
    certainties = torch.rand(B, 2, T)
    loss, chosen, upto = ctm_tasks.maze_loss(predictions, certainties, targets, lookahead=5)
    assert torch.allclose(loss, reference_maze_loss(predictions, certainties, targets, 5))
    assert upto.tolist() == [max(2 * b - 1, 0) + 5 for b in range(B)]
    ticks_logits = predictions.transpose(1, 2)  # (B, 5, L, T), the shared layout
    out = ctm_tasks.ctm_maze_loss(ModelOutput(ticks_logits[..., -1], ticks_logits, certainties), targets)
    assert out.logits.shape == (B, 5, L) and 0 <= out.extras["prefix"] <= L
    assert torch.allclose(out.loss, loss)
    one_tick = ctm_tasks.ctm_maze_loss(ModelOutput(ticks_logits[..., 0]), targets)  # a model without ticks
    assert torch.allclose(one_tick.loss, ctm_tasks.maze_loss(predictions[..., :1], torch.ones(B, 2, 1), targets)[0])


class OracleMazeModel(nn.Module):
    """Predicts the first `length` steps of the true route from the red start: the perfect short-sighted model."""

    def __init__(self, length):
        super().__init__()
        self.length, self.out_dims = length, 5 * length
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        images = ((x.permute(0, 2, 3, 1) + 1) / 2 * 255).round().byte().numpy()
        predictions = torch.zeros(len(x), self.length, 5, 2)
        for i, image in enumerate(images):
            route = (mazes.solve_maze(image) + [mazes.WAIT] * self.length)[: self.length]
            predictions[i, torch.arange(self.length), route] = 1.0
        return predictions.flatten(1, 2), torch.tensor([[0.0, 1.0]]).repeat(len(x), 1)[..., None].repeat(1, 1, 2)


def test_reapplication_solves_long_mazes_only_when_allowed():
    model = OracleMazeModel(8)
    images = np.stack([mazes.generate_maze(15, s)[0] for s in range(12)])
    lengths = np.array([len(mazes.solve_maze(im)) for im in images])
    solved, used = ctm_tasks.solve_by_reapplication(model, images, max_reapplications=1)
    assert solved.tolist() == (lengths <= 8).tolist()
    solved, used = ctm_tasks.solve_by_reapplication(model, images, max_reapplications=30)
    assert solved.all() and used.tolist() == np.ceil(lengths / 8).astype(int).tolist()
    row = ctm_tasks.evaluate_mazes(model, 9, n=6, seed=1, max_reapplications=10)
    assert row["solve_exact"] == 1.0 and row["prefix"] == 8 and row["reapply_solve"] == 1.0


def small_maze_ctm(length=6):
    return biozoo.create_model("ctm", iterations=4, d_model=32, d_input=16, heads=2, n_synch_out=8, n_synch_action=8,
                               memory_length=3, memory_hidden_dims=4, backbone_type="resnet18-1",
                               out_dims=5 * length, prediction_reshaper=[length, 5], in_channels=3)


def test_maze_gif_has_one_frame_per_tick(tmp_path):
    torch.manual_seed(0)
    model = small_maze_ctm()
    image, _ = mazes.generate_maze(9, 0, 6)
    gif, png = ctm_tasks.save_maze_gif(model, image, tmp_path / "maze")
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (72, 72)
    assert png.exists()


def test_qamnist_questions_follow_the_official_definition():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=(200, 3))
    question, answer = make_question(labels, n_operations=2, repeats=3, rng=rng)
    assert question.shape == (200, 3 * 5)
    for q, a, lab in zip(question, answer, labels):
        tokens = q[::3]
        assert (q.reshape(5, 3) == tokens[:, None]).all()  # every part repeated
        value = lab[tokens[0]]
        for op, idx in zip(tokens[1::2], tokens[2::2]):
            assert op in (PLUS, MINUS) and 0 <= idx < 3
            value = (value + lab[idx]) % 10 if op == PLUS else (value - lab[idx]) % 10
        assert a == value
    images = torch.randn(50, 1, 8, 8)
    data = QAMNISTBatches(images, np.arange(50) % 10, n_batches=40, batch_size=4, repeats=2, fixed=True)
    counts = set()
    for i in range(40):
        (digits, q), a = data[i]
        n_digits, n_ops = digits.shape[1] // 2, (q.shape[1] // 2 - 1) // 2
        counts.add((n_digits, n_ops))
        assert torch.equal(digits[:, 0], digits[:, 1]) and a.shape == (4,)
    assert {d for d, _ in counts} == {1, 2, 3, 4} and {o for _, o in counts} == {1, 2, 3, 4}  # 3 +- 2, upper exclusive
    (d1, q1), a1 = data[5]
    (d2, q2), a2 = data[5]
    assert torch.equal(q1, q2) and torch.equal(d1, d2)  # fixed sets never change


def test_qamnist_model_switches_inputs_per_tick():
    torch.manual_seed(0)
    dm = QAMNISTDataModule(repeats=2, answer_ticks=3, batch_size=5)
    assert dm.dims["iterations_for_answering"] == 3 and dm.dims["input_shape"] == [1, 8, 8]
    dm.setup()
    (digits, question), answer = dm.val_set[0]
    model = biozoo.create_model("ctm_qamnist", d_model=48, d_input=16, heads=2, n_synch_out=8, n_synch_action=8,
                                memory_length=3, memory_hidden_dims=4, iterations_per_question_part=2,
                                iterations_for_answering=3, neuron_select_type="random").eval()
    out = model((digits, question), track=True)
    Td, Tq = digits.shape[1], question.shape[1]
    assert out.predictions.shape == (5, 10, Td + Tq + 3) and out.answer_ticks == 3
    assert torch.isnan(out.attention[Td:]).all() and not torch.isnan(out.attention[:Td]).any()  # attends on digits only
    flipped = torch.where(question < 0, -3 - question, question)  # swap every + and -
    other = model((digits, flipped))
    assert torch.allclose(other.predictions[..., :Td], out.predictions[..., :Td])  # the question comes later
    assert not torch.allclose(other.predictions[..., Td + 2:], out.predictions[..., Td + 2:])
    loss = biozoo.train.get_loss("ctm_qamnist")(out, answer)
    assert loss.logits.shape == (5, 10) and loss.loss > 0


def test_rl_core_carries_the_post_activation_window():
    torch.manual_seed(0)
    model = biozoo.create_model("ctm_rl", obs_dim=4, iterations=2, d_model=24, d_input=8, n_synch_out=6,
                                memory_length=5, memory_hidden_dims=4)
    obs = torch.randn(3, 4)
    out = model(obs)
    synch, (trace, window) = out.logits, out.state
    assert synch.shape == (3, 21) and trace.shape == window.shape == (3, 24, 5)
    start = model.initial_state(3)[1]
    assert torch.equal(window[..., :3], start[..., 2:])  # 2 ticks slid the window by 2
    out2 = model(obs, (trace, window))
    synch2, (_, window2) = out2.logits, out2.state
    assert torch.equal(window2[..., :3], window[..., 2:]) and not torch.allclose(synch2, synch)


MAZE_CARDS = sorted((REPO / "models" / "weights").glob("ctm.maze*/card.json"))


@pytest.mark.parametrize("card_path", MAZE_CARDS, ids=[p.parent.name for p in MAZE_CARDS])
def test_pretrained_maze_model_loads_and_still_solves(card_path):
    card = json.loads(card_path.read_text())
    model = biozoo.create_model(f"ctm.{card['tag']}")
    size, length = card["extra"]["size"], card["extra"]["route_length"]
    images, routes = mazes.generate_mazes(size, 64, seed=777, route_length=length)
    predicted = ctm_tasks.predict_routes(model, images)
    solve = (predicted == routes).all(1).mean()
    assert solve >= card["metrics"]["solve"] - 0.15
    prefix = ctm_tasks.correct_prefix(torch.from_numpy(predicted), torch.from_numpy(routes)).float().mean()
    assert prefix >= 0.8 * card["metrics"]["prefix"]


@pytest.mark.skipif(not (REPO / "models" / "weights" / "ctm_sort.sort10" / "card.json").exists(),
                    reason="ctm_sort.sort10 not shipped")
def test_pretrained_sorter_still_sorts():
    """ctm_sort.sort10 (configs/ctm/sorting_cpu.yaml) on fresh sequences: greedy CTC decoding, per position and
    whole sequences, near its card."""
    from biozoo.envs.sorting import sorting_batch
    from biozoo.train.ctm import ctc_greedy_decode

    card = json.loads((REPO / "models" / "weights" / "ctm_sort.sort10" / "card.json").read_text())
    model = biozoo.create_model("ctm_sort.sort10").eval()
    x, y = sorting_batch(512, 10, torch.Generator().manual_seed(4321))
    with torch.no_grad():
        decoded = ctc_greedy_decode(model(x).predictions, 10)
    per_position = np.mean([s[i] == t[i] if i < len(s) else False for s, t in zip(decoded, y.tolist())
                            for i in range(10)])
    whole = np.mean([s == t for s, t in zip(decoded, y.tolist())])
    assert per_position >= card["metrics"]["acc"] - 0.05 and whole >= card["metrics"]["sequence_acc"] - 0.08


def test_pretrained_masked_cartpole_agent_balances():
    from biozoo.train.policy import evaluate

    agent = biozoo.create_model("ctm_rl_agent.cartpole_masked")
    returns = evaluate(agent, "biozoo/CartPoleMasked-v1", episodes=5, seed=10_000)
    assert np.mean(returns) >= 195


def test_masked_control_envs_and_one_recurrent_ppo_update():
    import gymnasium as gym
    import lightning as L

    from biozoo.envs.control import EnvDataModule
    from biozoo.train.control import ControlTask
    from biozoo.train.policy import evaluate

    env = gym.make("biozoo/CartPoleMasked-v1")
    obs, _ = env.reset(seed=0)
    for _ in range(3):
        obs, *_ = env.step(1)
    assert obs[1] == 0 and obs[3] == 0 and obs[0] != 0 and env.spec.max_episode_steps == 200
    torch.manual_seed(0)
    dm = EnvDataModule("biozoo/CartPoleMasked-v1", num_envs=4, rollouts_per_epoch=1)
    assert dm.spec.target == "discrete_actions" and dm.spec.shape == (4,) and not dm.time_feature
    task = ControlTask("ctm_rl_agent", data_dims=dm.dims, total_env_steps=40, eval_episodes=2, report=False,
                       ppo={"steps_per_env": 10, "epochs": 1, "minibatches": 2, "clip": 0.1, "ent_coef": 0.1},
                       model_kwargs=dict(d_model=16, d_input=8, n_synch_out=4, memory_length=3))
    assert task.policy.recurrent and task.policy.critic is None  # the agent's own critic head
    before = [p.detach().clone() for p in task.model.parameters()]
    trainer = L.Trainer(max_epochs=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert task.env_steps == 40 and "val/return" in trainer.callback_metrics
    assert any(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))
    returns = evaluate(task.model, "biozoo/CartPoleMasked-v1", episodes=3)
    assert len(returns) == 3 and all(1 <= r <= 200 for r in returns)


def test_maze_config_trains_through_the_cli(tmp_path):
    run_biozoo("fit", "-c", "configs/ctm/maze_cpu.yaml", "--trainer.max_steps", "2",
               f"--trainer.default_root_dir={tmp_path}", "--data.n_train", "64", "--data.n_val", "16",
               "--data.n_test", "16", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "2",
               "--trainer.enable_progress_bar", "false", "--model.init_args.model_kwargs.iterations", "3")
    ckpt = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    from biozoo.train.ctm_eval import main

    assert main(["maze-eval", str(ckpt), "--sizes", "11", "--n", "4", "--reapply", "2",
                 "--json", str(tmp_path / "eval.json")]) == 0
    row = json.loads((tmp_path / "eval.json").read_text())[0]
    assert row["size"] == 11 and row["route_length"] == 20 and 0 <= row["solve_exact"] <= 1
