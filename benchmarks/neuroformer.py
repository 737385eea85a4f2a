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
- connectivity AUROC from attention vs the ground-truth adjacency (target >= 0.9), for each official readout
  (--readouts: raw attention, attention rollout, gradient rollout; read from the cross-attention to the past and
  from the decoder's self-attention), next to equal attention weights (no model: the co-occurrence every model
  inherits, what an untrained one scores) and two references read from the training spikes directly: the GLM's
  coupling weights and the one-bin cross-correlogram; and the direction: AUROC of score[j, i] against score[i, j]
  over the one-way edges j -> i out of the hubs (0.5 = chance);
- behaviour (with --finetuned): Pearson r / R^2 of each fine-tuned checkpoint (one per data seed: the fine-tune
  config's few-shot subset for that seed), of a ridge probe on the pretrained model's pooled hidden state, and of
  ridge, Lasso and a Poisson-GLM decoder on the spike counts of the same few-shot windows.
Writes metrics.json and raster.png under --out.

    python benchmarks/neuroformer.py --smoke --out /tmp/nf_smoke   # seconds (CI): 60 s of simulated data, seed 0,
                                                                   # 4 windows, 1 s of 1 trial, raw attention
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
from biozoo.train.neuroformer import (READOUTS, PoissonGLM, attention_connectivity, behaviour_predictions,
                                      GLMDecoder, connectivity_auroc, counts_features, direction_auroc,
                                      pooled_features, generate_trials, generate_true_past,
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
    parser.add_argument("--readouts", nargs="+", default=list(READOUTS), choices=READOUTS,
                        help="attention readouts scored for connectivity (raw, rollout, grad: gradient rollout)")
    parser.add_argument("--connectivity-windows", type=int, default=0,
                        help="test windows read for the attention connectivity (0: all of them)")
    parser.add_argument("--trials", type=int, default=24, help="test trials generated for the rates")
    parser.add_argument("--psth-bin", type=float, default=0.25)
    parser.add_argument("--out", default="runs/neuroformer_eval")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--behaviour-only", action="store_true", help="only the fine-tuned behaviour decoding")
    parser.add_argument("--connectivity-only", action="store_true", help="only the connectivity readouts")
    parser.add_argument("--smoke", action="store_true", help="60 s of data, one seed, a few windows: checks the code")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.windows, args.trials, args.readouts, args.connectivity_windows = [0], 4, 1, ["raw"], 2
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"checkpoint": args.checkpoint}
    clock = time.time()
    save = lambda: (out_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")  # noqa: E731

    model = load_pretrained(args.checkpoint)
    results["parameters"] = model.num_parameters()
    dm = datamodule_from_config(args.config, **({"duration_s": 60} if args.smoke else {}))
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
    if args.connectivity_only:
        args.trials = 0
    if not args.behaviour_only and not args.connectivity_only:
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
        conn, direction = {}, {}
        hubs = (data.meta or {}).get("hubs")
        # references: equal attention weights (no model: what any model inherits from the co-occurrence of the
        # spikes), and two read from the training spikes directly (what the data allow)
        references = {"glm_coupling": glm.coupling(), "spike_lift_1bin": lagged_lift(data, *dm.splits["train"], tok.resolution)}
        for layers in ("history", "decoder"):
            references[f"{layers}_uniform_attention"] = attention_connectivity(
                model, test, max_windows=args.connectivity_windows or None, layers=layers, uniform=True)
            for readout in args.readouts:
                score = attention_connectivity(model, test, max_windows=args.connectivity_windows or None,
                                               layers=layers, readout=readout)
                conn[f"{layers}_{readout}"] = connectivity_auroc(score, data.adjacency)
                direction[f"{layers}_{readout}"] = direction_auroc(score, data.adjacency, hubs)
        for name, score in references.items():
            conn[name] = connectivity_auroc(score, data.adjacency)
            direction[name] = direction_auroc(score, data.adjacency, hubs)
        results["connectivity_auroc"], results["direction_auroc_hub_edges"] = conn, direction
        print(f"[{time.time() - clock:.0f}s] connectivity AUROC (direction AUROC on one-way hub edges):")
        for name, auroc in conn.items():
            print(f"  {name:32s} {auroc:.3f}  ({direction[name]['auroc']:.3f}, paired {direction[name]['paired']:.3f}, "
                  f"{direction[name]['edges']} edges)", flush=True)
        save()

    # rates
    if args.trials > 0:
        a, b = dm.splits["test"]
        trial_s = 1.0 if args.smoke else data.trial_s or 10.0  # smoke: one second of one trial
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
        from sklearn.linear_model import LassoCV, RidgeCV

        ft_cfg = yaml.safe_load(Path(args.finetune_config).read_text())["data"]["init_args"]
        scores: dict[str, list[dict[str, float]]] = {k: [] for k in ("neuroformer", "neuroformer_probe", "ridge",
                                                                     "lasso", "glm")}
        for ckpt in args.finetuned:
            ft = load_pretrained(ckpt)
            seed = 0
            if str(ckpt).endswith(".ckpt"):  # the few-shot subset depends on the DataModule's seed
                seed = torch.load(ckpt, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {}).get("seed", 0)
            fdm = SpikesDataModule(**{**ft_cfg, "seed": seed})
            fdm.setup()
            ft_test, few_shot = fdm.test_set, fdm.train_set
            pred, true = behaviour_predictions(ft, ft_test)
            scores["neuroformer"].append(regression_scores(pred, true))
            train_idx = np.asarray(few_shot.indices)
            full_train = few_shot.dataset
            y_tr = np.array([float(full_train.behaviour_target(int(full_train.end_bins[i]))[0]) for i in train_idx])
            # the pretrained model's pooled hidden state, read out by ridge (no fine-tuning)
            h_tr, h_te = pooled_features(model, few_shot), pooled_features(model, ft_test)
            probe = RidgeCV(alphas=np.logspace(-3, 4, 15)).fit(h_tr, y_tr)
            scores["neuroformer_probe"].append(regression_scores(probe.predict(h_te), true))
            # the conventional decoders, on the spike counts of the same windows
            x_tr, x_te = counts_features(full_train, train_idx), counts_features(ft_test, np.arange(len(ft_test)))
            ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(x_tr, y_tr)
            scores["ridge"].append(regression_scores(ridge.predict(x_te), true))
            lasso = LassoCV(cv=5, random_state=0, max_iter=5000).fit(x_tr, y_tr)
            scores["lasso"].append(regression_scores(lasso.predict(x_te), true))
            scores["glm"].append(regression_scores(GLMDecoder().fit(x_tr, y_tr).predict(x_te), true))
        results["behaviour"] = {"few_shot_windows": len(train_idx), "test_windows": len(ft_test),
                                "seeds": len(args.finetuned)}
        print(f"[{time.time() - clock:.0f}s] behaviour ({len(train_idx)} few-shot windows, {len(ft_test)} test windows, "
              f"{len(args.finetuned)} data seeds): Pearson r, R^2 (mean +- std)")
        for name, rows in scores.items():
            r, r2 = mean_std([x["r"] for x in rows]), mean_std([x["r2"] for x in rows])
            results["behaviour"][f"{name}_r"], results["behaviour"][f"{name}_r2"] = r, r2
            print(f"  {name:18s} r {r['mean']:.3f} +- {r['std']:.3f}   R^2 {r2['mean']:.3f} +- {r2['std']:.3f}", flush=True)

    save()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
