"""Neuroformer on the simulated 100-neuron hub network: the targets of issue 8.

    python benchmarks/neuroformer.py --checkpoint models/weights/neuroformer.sim100 [--seeds 0 1 2]
        [--finetuned runs/nf_ft_s0/version_0/checkpoints/last.ckpt ...] [--out runs/neuroformer_eval]

Data: the config's DataModule (default configs/neuroformer/sim100.yaml: simulate(100, 1200 s, seed 0), split by
whole 10 s trials into 70/10/20 % train/val/test). On the held-out test split it reports, mean +- std over
generation seeds:
- next-ID F1: teacher-forced top-1 (micro = the official logged metric, and macro over neurons), and the set
  F1 of each window generated from its true past vs the neurons that fired, for Neuroformer and a Poisson GLM
  (coupling + history + linear frame filter + behaviour) fit on the training split; target: NF > GLM;
- rate r: each test trial generated from its own past, per-neuron PSTH in --psth-bin bins, Pearson r vs the
  real PSTH averaged over neurons (target >= 0.8), with the GLM and a real-vs-real split-half ceiling;
- connectivity AUROC from attention vs the ground-truth adjacency (target >= 0.9), next to the same readout with
  equal attention weights (no model: the co-occurrence every model inherits, what an untrained one scores) and
  two references read from the training spikes directly: the GLM's coupling weights and the one-bin
  cross-correlogram;
- behaviour (with --finetuned): Pearson r / R^2 of each fine-tuned checkpoint vs ridge on the spike counts of
  the same few-shot windows (the fine-tune config's subset for that checkpoint's data seed).
Writes metrics.json and raster.png under --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from biozoo.envs.spikes import SpikesDataModule
from biozoo.models import load_pretrained
from biozoo.train.neuroformer import (PoissonGLM, attention_connectivity, behaviour_predictions,
                                      connectivity_auroc, counts_features, generate_trials, generate_true_past,
                                      lagged_lift, mean_std, plot_raster, psth, rate_correlation, real_trials,
                                      regression_scores, set_scores, teacher_forced_scores, true_sets)


def datamodule_from_config(path: str, **overrides) -> SpikesDataModule:
    cfg = yaml.safe_load(Path(path).read_text())["data"]["init_args"]
    return SpikesDataModule(**{**cfg, **overrides})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="models/weights/neuroformer.sim100")
    parser.add_argument("--config", default="configs/neuroformer/sim100.yaml")
    parser.add_argument("--finetune-config", default="configs/neuroformer/finetune_speed.yaml")
    parser.add_argument("--finetuned", nargs="*", default=[])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--windows", type=int, default=1000, help="test windows for the next-ID scores")
    parser.add_argument("--connectivity-windows", type=int, default=0,
                        help="test windows read for the attention connectivity (0: all of them)")
    parser.add_argument("--trials", type=int, default=24, help="test trials generated for the rates")
    parser.add_argument("--psth-bin", type=float, default=0.25)
    parser.add_argument("--out", default="runs/neuroformer_eval")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--behaviour-only", action="store_true", help="only the fine-tuned behaviour decoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": args.checkpoint}
    clock = time.time()
    save = lambda: (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731

    model = load_pretrained(args.checkpoint)
    results["parameters"] = model.num_parameters()
    dm = datamodule_from_config(args.config)
    data, tok = dm.data, dm.tokenizer
    test = dm.windows("test")
    rng = np.random.default_rng(0)
    windows = np.sort(rng.choice(len(test), min(args.windows, len(test)), replace=False))

    glm = PoissonGLM(data, tok.resolution, behaviour=model.behaviour_mlp is not None)
    if args.behaviour_only:
        args.trials, data.adjacency = 0, None
    # next-ID
    if not args.behaviour_only:
        glm.fit(*dm.splits["train"])
        results["teacher_forced"] = teacher_forced_scores(model, test,
                                                          max_windows=None if args.windows >= len(test) else args.windows)
        truth = true_sets(test, windows)
        start_bins = test.end_bins[windows] - tok.window_bins
        nf_f1, glm_f1, nf_sets, glm_sets = [], [], {}, {}
        for seed in args.seeds:
            nf = set_scores(truth, generate_true_past(model, test, windows, seed=seed))
            counts = glm.simulate(start_bins, tok.window_bins, seed=seed).sum(1)
            gl = set_scores(truth, [set(np.flatnonzero(c).tolist()) for c in counts])
            nf_f1.append(nf["f1"])
            glm_f1.append(gl["f1"])
            nf_sets[seed], glm_sets[seed] = nf, gl
        results["window_set_scores"] = {"neuroformer": nf_sets, "glm": glm_sets, "nf_f1": mean_std(nf_f1),
                                        "glm_f1": mean_std(glm_f1)}
        print(f"[{time.time() - clock:.0f}s] next-ID set F1: NF {np.mean(nf_f1):.3f}+-{np.std(nf_f1):.3f}, "
              f"GLM {np.mean(glm_f1):.3f}+-{np.std(glm_f1):.3f}; teacher-forced {results['teacher_forced']}", flush=True)
        save()

    # connectivity
    if data.adjacency is not None:
        conn = {}
        for layers in ("history", "decoder"):
            for uniform in (False, True):  # the model's attention; equal weights (what any model inherits)
                score = attention_connectivity(model, test, max_windows=args.connectivity_windows or None,
                                               layers=layers, uniform=uniform)
                conn[layers + ("_uniform_attention" if uniform else "")] = connectivity_auroc(score, data.adjacency)
        # references from the spikes themselves (not from Neuroformer): what the data allow
        conn["glm_coupling"] = connectivity_auroc(glm.coupling(), data.adjacency)
        lift = lagged_lift(data, *dm.splits["train"], tok.resolution)
        conn["spike_lift_1bin"] = connectivity_auroc(lift, data.adjacency)
        results["connectivity_auroc"] = conn
        print(f"[{time.time() - clock:.0f}s] connectivity AUROC: {conn}", flush=True)
        save()

    # rates
    if args.trials > 0:
        a, b = dm.splits["test"]
        trial_s = data.trial_s or 10.0
        starts = list(np.arange(a, b - trial_s + 1e-9, trial_s)[:args.trials])
        real = real_trials(data, starts, trial_s)
        real_psth = psth(real, data.n_neurons, trial_s, args.psth_bin)
        half = len(real) // 2
        ceiling = rate_correlation(psth(real[:half], data.n_neurons, trial_s, args.psth_bin),
                                   psth(real[half:], data.n_neurons, trial_s, args.psth_bin))
        nf_r, glm_r, generated = [], [], None
        n_bins = int(round(trial_s / tok.resolution))
        for seed in args.seeds:
            gen = generate_trials(model, data, tok, starts, trial_s, seed=seed, frame_window=dm.frame_window)
            generated = generated or gen
            nf_r.append(float(np.nanmean(rate_correlation(psth(gen, data.n_neurons, trial_s, args.psth_bin), real_psth))))
            counts = glm.simulate(np.array([tok.to_bins(s + 1e-9) for s in starts]), n_bins, seed=seed)
            glm_trials = []
            for c in counts:
                t_idx, n_idx = np.nonzero(c)
                reps = c[t_idx, n_idx].astype(np.int64)
                glm_trials.append((np.repeat(n_idx, reps), np.repeat(t_idx * tok.resolution, reps)))
            glm_r.append(float(np.nanmean(rate_correlation(psth(glm_trials, data.n_neurons, trial_s, args.psth_bin), real_psth))))
        gen_rate = np.mean([len(ids) for ids, _ in generated]) / (data.n_neurons * trial_s)
        real_rate = np.mean([len(ids) for ids, _ in real]) / (data.n_neurons * trial_s)
        results["rates"] = {"psth_bin_s": args.psth_bin, "trials": len(starts), "neuroformer_r": mean_std(nf_r),
                            "glm_r": mean_std(glm_r), "real_split_half_r": float(np.nanmean(ceiling)),
                            "generated_rate_hz": float(gen_rate), "real_rate_hz": float(real_rate)}
        plot_raster(real[0], generated[0], out_dir / "raster.png")
        print(f"[{time.time() - clock:.0f}s] rate r: NF {np.mean(nf_r):.3f}+-{np.std(nf_r):.3f}, "
              f"GLM {np.mean(glm_r):.3f}+-{np.std(glm_r):.3f}, real split-half {np.nanmean(ceiling):.3f}; "
              f"rates generated {gen_rate:.2f} Hz vs real {real_rate:.2f} Hz", flush=True)
        save()

    # behaviour
    if args.finetuned:
        ft_cfg = yaml.safe_load(Path(args.finetune_config).read_text())["data"]["init_args"]
        nf_scores, ridge_scores = [], []
        from sklearn.linear_model import RidgeCV

        for ckpt in args.finetuned:
            ft = load_pretrained(ckpt)
            seed = 0
            if str(ckpt).endswith(".ckpt"):  # the few-shot subset depends on the DataModule's seed
                seed = torch.load(ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {}).get("seed", 0)
            fdm = SpikesDataModule(**{**ft_cfg, "seed": seed})
            fdm.setup()
            ft_test = fdm.test_set
            pred, true = behaviour_predictions(ft, ft_test)
            nf_scores.append(regression_scores(pred, true))
            train_idx = np.asarray(fdm.train_set.indices)
            full_train = fdm.train_set.dataset
            x_tr, x_te = counts_features(full_train, train_idx), counts_features(ft_test, np.arange(len(ft_test)))
            y_tr = np.array([float(full_train.behaviour_target(int(full_train.end_bins[i]))[0]) for i in train_idx])
            ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_tr, y_tr)
            ridge_scores.append(regression_scores(ridge.predict(x_te), true))
        results["behaviour"] = {
            "few_shot_windows": len(train_idx),
            "neuroformer_r": mean_std([s["r"] for s in nf_scores]), "neuroformer_r2": mean_std([s["r2"] for s in nf_scores]),
            "ridge_r": mean_std([s["r"] for s in ridge_scores]), "ridge_r2": mean_std([s["r2"] for s in ridge_scores])}
        print(f"[{time.time() - clock:.0f}s] behaviour: {results['behaviour']}", flush=True)

    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
