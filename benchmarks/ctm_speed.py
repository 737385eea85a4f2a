"""CTM speed and memory against the official implementation, in one process (same config, seed and threads).

Configurations (`--config`):
- parity (default): d_model 256, d_input 64, heads 4, n_synch 32/32 random-pairing, synapse depth 1, memory 10,
  NLM hidden 16, 25 ticks, batch 32, parity length 64 (parity backbone + custom-rotational-1d).
- image: the official image_classification argparse defaults with a resnet18-2 backbone and 50 ticks (d_model
  512, d_input 128, heads 4, n_synch 512/512 random-pairing, synapse U-Net depth 4, memory 25, NLM hidden 4, no
  positional embedding), batch 16 of 3x32x32, cross-entropy at the most-certain and min-loss ticks.

    python benchmarks/ctm_speed.py                                   # ours only
    python benchmarks/ctm_speed.py --official-path /tmp/ctm_official # + the official code (a checkout of
                                                                     #   SakanaAI/continuous-thought-machines)
    python benchmarks/ctm_speed.py --config image --official-path /tmp/ctm_official --runs 7 --skip-adaptive
    python benchmarks/ctm_speed.py --smoke [--config image]          # seconds: 4 ticks, 1 run (CI; no figures)
    python benchmarks/ctm_speed.py --official-path /tmp/ctm_official --profile --runs 1 --warmup 0 --skip-adaptive

Prints forward (no_grad) and forward+backward medians of the thread's CPU time (a shared machine's other
processes count as little as possible; the two implementations alternate), the per-round ratios as median
[quartiles], the bytes saved for backward per tick (autograd's saved-tensor hooks, T minus T/2 ticks, divided by
T/2), the largest output and gradient differences after loading the official weights into ours, and the ratios.
`--profile` first prints torch.profiler's operator table per tick for each implementation (the before/after
tables are in the README's "CTM performance notes"). Memory per tick is the difference between T and T/2 ticks. Then
the adaptive-compute table of the shipped parity checkpoint.
The official code is imported from --official-path only; nothing of it is stored in this repository.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import biozoo
from biozoo.envs.parity import parity_batch
from biozoo.train.ctm import adaptive_compute_table, ctm_loss, format_table

PARITY = dict(iterations=25, d_model=256, d_input=64, heads=4, n_synch_out=32, n_synch_action=32, synapse_depth=1,
              memory_length=10, deep_nlms=True, memory_hidden_dims=16, do_layernorm_nlm=False,
              backbone_type="parity_backbone", positional_embedding_type="custom-rotational-1d", out_dims=128,
              prediction_reshaper=[64, 2], dropout=0.0, neuron_select_type="random-pairing", n_random_pairing_self=0)
IMAGE = dict(iterations=50, d_model=512, d_input=128, heads=4, n_synch_out=512, n_synch_action=512, synapse_depth=4,
             memory_length=25, deep_nlms=True, memory_hidden_dims=4, do_layernorm_nlm=False,
             backbone_type="resnet18-2", positional_embedding_type="none", out_dims=10, prediction_reshaper=[-1],
             dropout=0.0, neuron_select_type="random-pairing", n_random_pairing_self=0)
CONFIGS = {"parity": PARITY, "image": IMAGE}


def batch(config: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if config["backbone_type"] == "parity_backbone":
        return parity_batch(32, 64, generator)
    return torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator)


def import_official(path: str):
    """(ContinuousThoughtMachine, image_classification_loss, parity_loss) of the official checkout at `path`, or
    a one-line SystemExit when `path` does not hold one."""
    if not (Path(path) / "models" / "ctm.py").is_file() or not (Path(path) / "utils" / "losses.py").is_file():
        raise SystemExit(f"--official-path {path}: not a checkout of SakanaAI/continuous-thought-machines "
                         "(models/ctm.py and utils/losses.py are missing)")
    sys.path.insert(0, path)
    try:
        from models.ctm import ContinuousThoughtMachine  # the official package, imported from `path`
        from utils.losses import image_classification_loss, parity_loss
    except ImportError as e:
        raise SystemExit(f"--official-path {path}: the official code does not import ({type(e).__name__}: {e})")
    return ContinuousThoughtMachine, image_classification_loss, parity_loss


def official_model(path: str, config: dict, seed: int):
    ContinuousThoughtMachine, image_classification_loss, parity_loss = import_official(path)

    torch.manual_seed(seed)
    np.random.seed(seed)
    model = ContinuousThoughtMachine(**config)
    with torch.no_grad():
        model(batch(config, seed)[0][:2])  # materialise the lazy layers
    if config["backbone_type"] == "parity_backbone":
        return model, lambda out, y: parity_loss(out[0].reshape(out[0].size(0), 64, 2, -1), out[1], y)[0]
    return model, lambda out, y: image_classification_loss(out[0], out[1], y)[0]


def our_model(config: dict, seed: int):
    torch.manual_seed(seed)
    np.random.seed(seed)
    return biozoo.create_model("ctm", **config), lambda out, y: ctm_loss(out, y).loss


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step(model, loss_fn, x, y, backward: bool) -> float:
    """Seconds of this thread's CPU time for one step: with one thread the whole step, backward included, runs in
    it, so the time other processes hold the (shared) core is not counted."""
    start = time.thread_time()
    if backward:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    else:
        with torch.no_grad():
            model(x)
    return time.thread_time() - start


def spread(values: list[float]) -> str:
    """median [lower quartile, upper quartile] (the values themselves when fewer than 4)."""
    if len(values) < 4:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"
    q = statistics.quantiles(values, n=4)
    return f"{q[1]:.2f} [{q[0]:.2f}-{q[2]:.2f}]"


def profile(models: dict, x: torch.Tensor, y: torch.Tensor, ticks: int, rows: int = 14, repeats: int = 3) -> None:
    """torch.profiler over `repeats` forward+backward steps of each model: the operators by self CPU time, per
    tick (total / repeats / ticks), with their share of the step; backward operators are autograd's nodes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    for name, (model, loss_fn) in models.items():
        step(model, loss_fn, x, y, True)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                step(model, loss_fn, x, y, True)
        events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        total = sum(e.self_cpu_time_total for e in events)
        events.sort(key=lambda e: -e.self_cpu_time_total)
        print(f"\n{name}: {total / repeats / 1e3:.1f} ms self CPU per forward+backward, "
              f"{total / repeats / ticks:.0f} us "
              f"per tick; {sum(e.count for e in events) / repeats / ticks:.0f} operator calls per tick")
        print(f"  {'operator':<44}{'us/tick':>9}{'share':>7}{'calls/tick':>11}")
        for e in events[:rows]:
            print(f"  {e.key[:44]:<44}{e.self_cpu_time_total / repeats / ticks:9.1f}"
                  f"{100 * e.self_cpu_time_total / total:6.1f}%{e.count / repeats / ticks:11.1f}")


def saved_bytes(model, loss_fn, x, y) -> tuple[int, int]:
    """(bytes of every tensor autograd saves, bytes of the distinct storages among them) for one forward."""
    total, storages = 0, {}

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y)
    return total, sum(storages.values())


def memory_per_tick(make, config: dict, x, y) -> tuple[float, float]:
    sizes, ticks = [], (config["iterations"], config["iterations"] // 2)
    for t in ticks:
        model, loss_fn = make({**config, "iterations": t})
        sizes.append(saved_bytes(model, loss_fn, x, y))
    return tuple((a - b) / (ticks[0] - ticks[1]) / 2**20 for a, b in zip(*sizes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official-path", default=None, help="a checkout of SakanaAI/continuous-thought-machines")
    parser.add_argument("--config", choices=list(CONFIGS), default="parity")
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-adaptive", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="4 ticks, one run, no adaptive table: checks the code")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables (per tick)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = CONFIGS[args.config]
    if args.official_path:
        import_official(args.official_path)  # a wrong path fails here, in one line
    if args.smoke:
        config = {**config, "iterations": 4}
        args.runs, args.warmup, args.skip_adaptive = 1, 0, True
        if not args.official_path:
            print("smoke: the official comparison is skipped (no --official-path)")
    x, y = batch(config, args.seed)
    models = {"ours": our_model(config, args.seed)}
    if args.official_path:
        models["official"] = official_model(args.official_path, config, args.seed)
        ours, official = models["ours"][0], models["official"][0]
        ours.load_state_dict(official.state_dict())
        for m in (ours, official):
            m.zero_grad()
            loss_fn = models["ours" if m is ours else "official"][1]
            loss_fn(m(x), y).backward()
        with torch.no_grad():
            a, b = ours(x), official(x)
        diffs = [(a.predictions - b[0]).abs().max().item(), (a.certainties - b[1]).abs().max().item(),
                 (a.synchronisation - b[2]).abs().max().item()]
        grads = dict(official.named_parameters())
        grad_diff = max((p.grad - grads[n].grad).abs().max().item() for n, p in ours.named_parameters())
        print(f"outputs with the official weights: max |diff| predictions {diffs[0]:.2e}, certainties "
              f"{diffs[1]:.2e}, synchronisation {diffs[2]:.2e}; gradients {grad_diff:.2e}")
    print(f"parameters: {sum(p.numel() for p in models['ours'][0].parameters()):,}; threads {args.threads}; "
          f"{args.config}: batch {len(x)}, {config['iterations']} ticks, input {tuple(x.shape[1:])}")

    if args.profile:
        profile(models, x, y, config["iterations"], repeats=1 if args.smoke or args.config == "image" else 3)
    times = {(name, mode): [] for name in models for mode in ("fwd", "fwd+bwd")}
    for i in range(args.warmup + args.runs):  # interleaved, so a busy machine slows both alike
        for name, (model, loss_fn) in models.items():
            for mode in ("fwd", "fwd+bwd"):
                t = step(model, loss_fn, x, y, mode == "fwd+bwd")
                if i >= args.warmup:
                    times[name, mode].append(t)
    medians = {k: statistics.median(v) for k, v in times.items()}
    memory = {"ours": memory_per_tick(lambda c: our_model(c, args.seed), config, x, y)}
    if args.official_path:
        memory["official"] = memory_per_tick(lambda c: official_model(args.official_path, c, args.seed), config, x, y)
    print(f"{'':10s} {'forward':>10s} {'fwd+bwd':>10s} {'saved/tick':>12s} {'distinct/tick':>14s}")
    for name in models:
        print(f"{name:10s} {medians[name, 'fwd']:9.3f}s {medians[name, 'fwd+bwd']:9.3f}s "
              f"{memory[name][0]:9.2f} MiB {memory[name][1]:10.2f} MiB")
    if args.official_path:
        ratios = {mode: [a / b for a, b in zip(times["official", mode], times["ours", mode])]
                  for mode in ("fwd", "fwd+bwd")}  # per round: the two ran back to back
        print(f"speed-up (official / ours, per round: median [quartiles] of {args.runs}): forward "
              f"{spread(ratios['fwd'])}x, forward+backward {spread(ratios['fwd+bwd'])}x")
        print(f"speed-up of the medians: forward {medians['official', 'fwd'] / medians['ours', 'fwd']:.2f}x, "
              f"forward+backward "
              f"{medians['official', 'fwd+bwd'] / medians['ours', 'fwd+bwd']:.2f}x; memory saved for backward per tick "
              f"{memory['ours'][1] / memory['official'][1]:.2f}x of the official (distinct storages; "
              f"{memory['ours'][0] / memory['official'][0]:.2f}x counting every saved tensor)")

    if not args.skip_adaptive:
        model = biozoo.create_model("ctm", pretrained="parity16")
        seq_len = model.prediction_reshaper[0]
        xs, ys = parity_batch(4096, seq_len, torch.Generator().manual_seed(1234))
        batches = [(xs[i:i + 512], ys[i:i + 512]) for i in range(0, 4096, 512)]
        for halt_on in ("min", "mean"):
            rows = adaptive_compute_table(model, batches, halt_on=halt_on)
            print(f"\nadaptive compute (halt_on={halt_on!r}), shipped ctm.parity16 ({model.iterations} ticks) on 4,096 "
                  f"fresh sequences:\n{format_table(rows)}")
            full = rows[-1]
            at = next(r for r in rows if r["threshold"] == 0.9)
            print(f"certainty 0.9: {full['mean_ticks'] / at['mean_ticks']:.2f}x fewer mean ticks, accuracy "
                  f"{100 * (at['accuracy'] - full['accuracy']):+.2f} pt")
        model.eval()
        with torch.no_grad():
            wall = {threshold: statistics.median(timed(lambda: model(xs[:512], halt_threshold=threshold))
                                                 for _ in range(5)) for threshold in (None, 0.9)}
        print(f"wall clock, batch 512: all ticks {wall[None]:.3f} s, halting at 0.9 {wall[0.9]:.3f} s "
              f"({wall[None] / wall[0.9]:.2f}x faster)")


if __name__ == "__main__":
    main()
