"""The control harness: trains, evaluates and reports any zoo model as a policy on gymnasium environments.

`ControlTask` turns the model into a `Policy` (`biozoo.train.policy.as_policy`: discrete or continuous actions,
the model's own value or a critic beside it, recurrent state carried across env steps) and trains it with one of
two algorithms, both on that interface (manual optimisation):
- "ppo": `biozoo.train.ppo`, one PPO for every policy (CleanRL's; recurrent or not, discrete or continuous);
- "es": `biozoo.train.es`, evolution strategies (the NCAP repo's estorch script).
The env comes from an `EnvDataModule` (`biozoo.envs.control`: one env factory, one time-feature rule, the env's
`DataSpec`, which the CLI links into `data_dims`). A policy that wants normalised inputs carries its own
`RunningNorm` (saved with its weights); the harness updates every RunningNorm it finds after each rollout.

    biozoo fit -c configs/tasks/swimmer_ppo.yaml -c configs/models/ncap.yaml
    biozoo fit -c configs/tasks/cartpole.yaml -c configs/models/ctm_rl_agent.yaml
    returns = evaluate(model, "biozoo/Swimmer-v0", episodes=10, n_links=6)    # list of episode returns
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import biozoo.envs  # noqa: F401  (registers the biozoo/ env ids)
from biozoo._core import BiozooError, SpecError, check_choice, first_line
from biozoo.envs.control import EnvDataModule, env_spec, make_env
from biozoo.models.ncap import transfer_to

from .es import ESConfig, es_generation
from .policy import Policy, as_policy, evaluate, one_thread, to_env, to_tensor
from .ppo import PPO, PPOConfig, make_config
from .tasks import BiozooTask, build_model, data_spec, lr_schedule


def transfer_returns(policy: nn.Module, env_id: str, n_links: list[int], episodes: int = 3, seed: int = 0,
                     **env_kwargs: Any) -> dict[int, list[float]]:
    """Episode returns of the same weights moved to other body lengths, without retraining."""
    return {n: evaluate(transfer_to(policy, n), env_id, episodes, seed, **{**env_kwargs, "n_links": n})
            for n in n_links}


# Rollout plots and video --------------------------------------------------------------------------------------

@torch.no_grad()
@one_thread()
def rollout(policy: nn.Module, env_id: str, seed: int = 0, render: bool = False, time_feature: bool | None = None,
            **env_kwargs: Any) -> dict[str, Any]:
    """One deterministic episode of any model or policy: rewards (T,), with `render` RGB frames, and for MuJoCo
    swimmers the joint angles (T, J) and head position (T, 2) (qpos[3:] and qpos[:2])."""
    env = make_env(env_id, time_feature, render_mode="rgb_array" if render else None, **env_kwargs)
    actor = as_policy(policy, env_spec(env, env_id, env_kwargs), critic=False)
    actor.eval()
    device = next(iter(actor.parameters()), torch.empty(0)).device
    obs, _ = env.reset(seed=seed)
    state = actor.initial_state(1, device)
    joints, head, rewards, frames = [], [], [], []
    done = False
    try:
        while not done:
            out = actor(to_tensor(obs, device)[None], state)
            state = out.state
            obs, reward, terminated, truncated, _ = env.step(to_env(actor.greedy(out.logits), env.action_space)[0])
            qpos = getattr(getattr(env.unwrapped, "data", None), "qpos", None)
            if qpos is not None:
                joints.append(qpos[3:].copy())
                head.append(qpos[:2].copy())
            rewards.append(reward)
            if render:
                frames.append(env.render())
            done = terminated or truncated
    finally:
        env.close()
    dt = getattr(env.unwrapped, "dt", 0.02)
    return {"joints": np.array(joints), "head": np.array(head), "rewards": np.array(rewards), "frames": frames,
            "dt": dt, "return": float(np.sum(rewards))}


def render_error(env_id: str, time_feature: bool | None = None, **env_kwargs: Any) -> str | None:
    """None when the env renders a frame, otherwise why not in one line (MuJoCo without OpenGL raises
    mujoco.FatalError from gymnasium's envs, a BiozooError from biozoo's)."""
    try:
        env = make_env(env_id, time_feature, render_mode="rgb_array", **env_kwargs)
        try:
            env.reset(seed=0)
            env.render()
        finally:
            env.close()
    except Exception as e:  # noqa: BLE001  (any GL failure means: no video)
        return first_line(e, with_type=True)
    return None


def plot_rollout(traj: dict[str, Any], out: str | Path, title: str = "", seconds: float = 9.0) -> Path:
    """Joint angles against time (the first `seconds`) and the head's path, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = min(len(traj["joints"]), int(seconds / traj["dt"]))
    t = np.arange(steps) * traj["dt"]
    for j in range(traj["joints"].shape[1]):
        ax1.plot(t, traj["joints"][:steps, j], lw=1.2, label=f"joint {j}")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("angle (rad)")
    ax1.set_title("joint angles (head first)")
    ax1.legend(fontsize=7, ncol=2)
    ax2.plot(traj["head"][:, 0], traj["head"][:, 1], lw=1.2)
    ax2.plot(*traj["head"][0], "go", label="start")
    ax2.plot(*traj["head"][-1], "rs", label="end")
    ax2.set_aspect("equal", adjustable="datalim")
    ax2.set_xlabel("x (m)")
    ax2.set_ylabel("y (m)")
    ax2.set_title(f"head trajectory (return {traj['return']:.0f})")
    ax2.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def write_video(frames: list[np.ndarray], out: str | Path, fps: int) -> Path:
    """MP4 when imageio has ffmpeg, otherwise an animated GIF next to it."""
    import imageio.v2 as imageio

    out = Path(out)
    try:
        imageio.mimsave(out, frames, fps=fps)
    except (ValueError, RuntimeError, ImportError):
        out = out.with_suffix(".gif")
        imageio.mimsave(out, frames[::2], duration=2000 / fps, loop=0)
    return out


# The task ----------------------------------------------------------------------------------------------------

class ControlTask(BiozooTask):
    """Trains any zoo model whose spec fits the env as a policy, with PPO or ES (module docstring).

    Args:
        model / model_kwargs / pretrained / checkpoint_path: the policy's model, as in SupervisedTask.
        data_dims: filled in by the CLI from the EnvDataModule (its spec: observation and action sizes, n_links).
        algorithm: "ppo" or "es"; `ppo` / `es` hold that algorithm's options (PPOConfig / ESConfig fields).
        total_env_steps: training stops after this many environment steps.
        action_std / learn_std: the Gaussian exploration noise of continuous actions (fixed 0.1 for NCAP, as in
            its code); action_std_final anneals a fixed std geometrically to this over total_env_steps.
        lr: the policy's (PPO) or the weights' (ES) Adam learning rate; a separate critic has `ppo.critic_lr`.
        weight_decay: PPO's decoupled (AdamW) decay of the model's weights; ES uses `es.weight_decay` (L2).
        scheduler / warmup_steps / min_lr_ratio: the learning-rate schedule over the rollouts ("linear" anneals
            to lr * min_lr_ratio, as CleanRL's anneal_lr with 0).
        eval_episodes: deterministic episodes behind val/return and test/return.
        transfer_links: body lengths the test stage also evaluates the policy on (shared-weight NCAP).
        report: at the end of fit, write rollout.png (and rollout.mp4 where OpenGL works) for MuJoCo swimmers.
    """

    def __init__(self, model: str = "ncap", model_kwargs: dict[str, Any] | None = None,
                 data_dims: dict[str, Any] | None = None, algorithm: str = "ppo", total_env_steps: int = 200_000,
                 action_std: float = 0.1, learn_std: bool = False, ppo: dict[str, Any] | None = None,
                 es: dict[str, Any] | None = None, eval_episodes: int = 5, transfer_links: list[int] | None = None,
                 report: bool = True, video: bool = True, pretrained: bool | str = False,
                 checkpoint_path: str | None = None, lr: float = 3e-4, weight_decay: float = 0.0,
                 warmup_steps: int = 0, scheduler: str = "constant", min_lr_ratio: float = 0.0,
                 action_std_final: float | None = None):
        super().__init__(lr, weight_decay, warmup_steps, scheduler, min_lr_ratio)
        check_choice("algorithm", algorithm, ("ppo", "es"))
        if action_std_final is not None and (learn_std or action_std_final <= 0):
            raise BiozooError(f"action_std_final anneals a fixed std: needs learn_std=False and a value > 0, "
                              f"got {action_std_final!r} with learn_std={learn_std}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        spec = data_spec(data_dims)
        if spec is None:
            raise SpecError("ControlTask needs data_dims with the env's spec (data: an EnvDataModule)")
        self.ppo_cfg, self.es_cfg = make_config(PPOConfig, ppo), make_config(ESConfig, es)
        if algorithm == "es" and self.es_cfg.population % 2:
            raise BiozooError(f"es.population must be even (antithetic pairs), got {self.es_cfg.population}")
        self.model = build_model(model, model_kwargs, data_dims, pretrained, checkpoint_path)
        self.policy = Policy(self.model, spec, action_std, learn_std, list(self.ppo_cfg.critic_hidden),
                             critic=algorithm == "ppo")
        self.env_steps = 0
        self.history: list[tuple[int, float]] = []  # (env steps, val/return) after each validation
        self.runner: PPO | None = None
        self.envs = None
        self.video_error: str | None = None  # why the report will have no video, found before training
        self.started = time.perf_counter()

    # setup ------------------------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """The model's weights (decayed), the noise's log std (not), and a separate critic at ppo.critic_lr."""
        noise = [p for p in (self.policy.noise.parameters() if self.policy.noise is not None else []) if p.requires_grad]
        weights = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": weights, "weight_decay": self.hparams.weight_decay}]
        if noise:
            groups.append({"params": noise, "weight_decay": 0.0})
        if self.policy.critic is not None:
            groups.append({"params": list(self.policy.critic.parameters()), "lr": self.ppo_cfg.critic_lr,
                           "weight_decay": 0.0})
        return groups

    def configure_optimizers(self):
        hp = self.hparams
        if hp.algorithm == "es":  # L2 added to the ES gradient, as estorch does
            weights = [p for p in self.model.parameters() if p.requires_grad]
            return torch.optim.Adam(weights, lr=hp.lr, weight_decay=self.es_cfg.weight_decay)
        # decoupled weight decay on the policy (not on log std): it pulls weights out of saturated, zero-gradient
        # ranges -- for NCAP, an oscillator weight above 1 -- back to where the gradient can act on them
        optimizer = torch.optim.AdamW(self.param_groups(), lr=hp.lr, eps=1e-5)
        if hp.scheduler == "constant" and not hp.warmup_steps:
            return optimizer
        total = math.ceil(hp.total_env_steps / (self.ppo_cfg.steps_per_env * self.datamodule.num_envs))
        return [optimizer], [lr_schedule(optimizer, hp.scheduler, hp.warmup_steps, total, hp.min_lr_ratio)]

    @property
    def datamodule(self) -> EnvDataModule:
        dm = getattr(self.trainer, "datamodule", None)
        if not isinstance(dm, EnvDataModule):
            raise BiozooError("ControlTask trains on an EnvDataModule (data.class_path: biozoo.envs.control.EnvDataModule)")
        return dm

    # a fast dev run: one short rollout, one update epoch, one short evaluation episode, no report
    DEV_RUN_ENVS, DEV_RUN_STEPS, DEV_RUN_EPISODE = 2, 16, 32

    def limit_for_dev_run(self) -> None:
        """Under `--trainer.fast_dev_run`, shrink the run to one rollout of DEV_RUN_STEPS steps in DEV_RUN_ENVS
        envs (ES: a population of 2), one update epoch and one evaluation episode of at most DEV_RUN_EPISODE
        steps: seconds for any model, where the configured sizes take minutes per step."""
        if not getattr(self._trainer, "fast_dev_run", False) or getattr(self, "_dev_run", False):
            return
        self._dev_run = True
        dm = self.datamodule
        dm.num_envs = min(dm.num_envs, self.DEV_RUN_ENVS)
        dm.env_kwargs["max_episode_steps"] = min(dm.env_kwargs.get("max_episode_steps") or self.DEV_RUN_EPISODE,
                                                 self.DEV_RUN_EPISODE)
        self.ppo_cfg = dataclasses.replace(self.ppo_cfg, steps_per_env=min(self.ppo_cfg.steps_per_env,
                                                                           self.DEV_RUN_STEPS), epochs=1, minibatches=1)
        self.es_cfg = dataclasses.replace(self.es_cfg, population=2)
        self.hparams.eval_episodes = 1
        print(f"biozoo: fast_dev_run: one rollout of {self.ppo_cfg.steps_per_env} steps x {dm.num_envs} envs, one "
              f"update, one evaluation episode of at most {dm.env_kwargs['max_episode_steps']} steps", flush=True)

    def on_validation_start(self) -> None:
        self.limit_for_dev_run()

    def on_test_start(self) -> None:
        self.limit_for_dev_run()

    def on_fit_start(self) -> None:
        self.limit_for_dev_run()
        dm, cfg = self.datamodule, self.ppo_cfg
        if self.hparams.algorithm == "es":
            self.envs = dm.make_vec(self.es_cfg.population)
        else:
            self.envs = dm.make_vec(normalize_reward=cfg.normalize_reward, gamma=cfg.gamma)
            self.runner = PPO(self.policy, self.envs, cfg, seed=dm.seed)
        if self.hparams.report and self.hparams.video and "n_links" in self.policy.spec.extras:
            self.video_error = render_error(dm.env_id, dm.time_feature, **dm.env_kwargs)
            if self.video_error:
                print(f"biozoo: the report will have no video ({self.video_error})")
        self.started = time.perf_counter()

    def on_fit_end(self) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs, self.runner = None, None
        if self.hparams.report and self.trainer.is_global_zero and not self.trainer.fast_dev_run:
            self.write_report(Path(self.trainer.log_dir or self.trainer.default_root_dir))

    # training ----------------------------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        if hp.algorithm == "ppo":
            if hp.action_std_final is not None:
                frac = min(1.0, self.env_steps / hp.total_env_steps)
                log_std = (1 - frac) * math.log(hp.action_std) + frac * math.log(hp.action_std_final)
                self.policy.noise.log_std.data.fill_(log_std)
            self.policy.train()
            before = self.runner.env_steps
            data = self.runner.collect()
            stats = self.runner.update(data, self.optimizers(), self.manual_backward)
            self.env_steps += self.runner.env_steps - before
            sched = self.lr_schedulers()
            if sched is not None:
                sched.step()
            if self.policy.noise is not None:
                stats["action_std"] = float(self.policy.noise.log_std.detach().exp().mean())
        else:
            stats, steps = es_generation(self.policy, self.envs, self.es_cfg, self.optimizers())
            self.env_steps += steps
        if hasattr(self.model, "effective_weights"):  # NCAP: the 4 (or 6J) weights are the whole policy
            stats.update({f"w_{k}": v.mean() for k, v in self.model.effective_weights().items()})
        stats["wall_s"] = time.perf_counter() - self.started
        self.log_dict({f"train/{k}": float(v) for k, v in stats.items()}, on_step=True, on_epoch=False)
        self.log("env_steps", float(self.env_steps), on_step=True, on_epoch=False, prog_bar=True)
        if self.env_steps >= hp.total_env_steps:
            self.trainer.should_stop = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["control"] = {"env_steps": self.env_steps, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("control", {})
        self.env_steps = state.get("env_steps", 0)
        self.history = [tuple(h) for h in state.get("history", [])]

    # evaluation --------------------------------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, **override: Any) -> list[float]:
        dm = self.datamodule
        return evaluate(model, dm.env_id, self.hparams.eval_episodes, seed=dm.seed + 10_000,
                        time_feature=dm.time_feature, **{**dm.env_kwargs, **override})

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        returns = self._evaluate(self.policy)
        self.log("val/return", float(np.mean(returns)), prog_bar=True, batch_size=1)
        self.log("val/return_std", float(np.std(returns)), batch_size=1)
        self.log("val/env_steps", float(self.env_steps), batch_size=1)
        if not self.trainer.sanity_checking:
            self.history.append((self.env_steps, float(np.mean(returns))))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        returns = self._evaluate(self.policy)
        self.log("test/return", float(np.mean(returns)), batch_size=1)
        self.log("test/return_std", float(np.std(returns)), batch_size=1)
        for n in self.hparams.transfer_links or []:
            returns = self._evaluate(transfer_to(self.model, n), n_links=n)
            self.log(f"test/return_n{n}", float(np.mean(returns)), batch_size=1)

    def write_report(self, folder: Path) -> dict[str, Any]:
        """rollout.png (joint angles, head path) and, where OpenGL works, a video of one deterministic episode
        (MuJoCo swimmers; other envs get rollout.json with the return only)."""
        dm = self.datamodule
        folder.mkdir(parents=True, exist_ok=True)
        out: dict[str, Any] = {}
        kwargs = dict(seed=dm.seed + 10_000, time_feature=dm.time_feature, **dm.env_kwargs)
        swimmer = "n_links" in self.policy.spec.extras
        try:
            traj = rollout(self.policy, dm.env_id, render=self.hparams.video and swimmer and not self.video_error,
                           **kwargs)
        except BiozooError as e:  # no OpenGL: plots only
            print(f"biozoo: no video ({e})")
            traj = rollout(self.policy, dm.env_id, **kwargs)
        if len(traj["joints"]):
            out["plot"] = str(plot_rollout(traj, folder / "rollout.png", title=f"{self.hparams.model} on {dm.env_id}"))
        if traj["frames"]:
            out["video"] = str(write_video(traj["frames"], folder / "rollout.mp4", fps=round(1 / traj["dt"])))
        out["return"] = traj["return"]
        (folder / "rollout.json").write_text(json.dumps(out, indent=2) + "\n")
        print("\n".join(f"  {k}: {v}" for k, v in out.items()))
        return out


def fit_policy(model: str = "ncap", env_id: str = "biozoo/Swimmer-v0", seed: int = 0,
               env_kwargs: dict[str, Any] | None = None, num_envs: int = 8, rollouts_per_epoch: int = 5,
               vectorization_mode: str = "sync", root_dir: str | None = None, initial_eval: bool = True,
               callbacks: list | None = None, time_feature: bool | None = None, **task_kwargs: Any) -> ControlTask:
    """Train in-process without logger or checkpoints (benchmarks, notebooks); the returned task holds
    `history`, the (env steps, val/return) pairs, starting with the untrained policy's return when
    `initial_eval`. The CLI (`biozoo fit`) is the route for shipped runs."""
    import lightning as L

    L.seed_everything(seed, verbose=False)
    data = EnvDataModule(env_id, env_kwargs, num_envs, vectorization_mode, time_feature=time_feature, seed=seed,
                         rollouts_per_epoch=rollouts_per_epoch)
    task = ControlTask(model, data_dims=data.dims, report=False, **task_kwargs)
    trainer = L.Trainer(max_epochs=10**6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=root_dir, callbacks=callbacks)
    if initial_eval:
        trainer.validate(task, datamodule=data, verbose=False)
    trainer.fit(task, datamodule=data)
    return task
