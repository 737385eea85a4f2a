"""Neuroformer generation throughput: KV cache vs re-running the model for every token, same outputs.

    python benchmarks/neuroformer_speed.py [--threads 2] [--windows 2] [--batch 1 16]
        [--official <official checkout>/neuroformer]
    python benchmarks/neuroformer_speed.py --smoke    # seconds (CI): sim100 size, one window, batch 1

At the official model's size (n_embd 256, 8 heads, 4 layers per stage, a 300-token past, 100-token windows:
`neuroformer_official`, about 9.7M parameters) and at the shipped sim100 size, one batch row generates
--windows windows of exactly 99 tokens after SOS (EOS masked, top-p 0.95) with `use_cache=True` and with
`use_cache=False` (a full forward of the whole prefix per token), from the same generator seed. Prints tokens/s
(per wall second and per CPU second of the process, which a busy shared machine distorts less) of each, their
ratio (target >= 10x), and whether the tokens are identical. --batch N [N ...] measures each batch size: N rows
(independent trials) generated together, the throughput a user gets when generating many trials.
It also times the per-token matrix products alone (every weight a cached token multiplies, nothing else), a
floor under a cached token as PyTorch's CPU kernels run them, so recompute time / that floor bounds the speed-up
of a cache built on them. At batch 1 they are matrix-vector products bound by reading the weights from memory (on
the 2-core EPYC dev machine they move 7-15 GB/s of weights, where a plain streaming sum reaches 23-28 GB/s).

With --official (a folder holding the official repository's neuroformer/ modules; einops, pandas, tqdm and
matplotlib must be importable, timm is stubbed since its ViT is unused by default), the official model of the same
size is built and its own simulation.generate_spikes is timed on 3 windows (a forward over the full padded
100-token block per token, with its losses and scores, until EOS).
Otherwise the anchor measured on this kind of machine is used: 7.4 s per window = 13 tokens/s with 2 threads.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import sys
import time
import types
from types import SimpleNamespace

import torch

from biozoo.models import create_model
from biozoo.models.neuroformer import Neuroformer

ANCHOR_TOKENS_PER_S = 13.0


def context(model: Neuroformer, rows: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full past windows of random spikes (and random frames / behaviour if the model reads them)."""
    g = torch.Generator().manual_seed(seed)
    tp = model.prev_block_size
    ids = torch.randint(0, model.n_neurons, (rows, tp), generator=g)
    dts = torch.sort(torch.randint(0, model.prev_bins, (rows, tp), generator=g)).values
    ids[:, 0], dts[:, 0], ids[:, -1], dts[:, -1] = model.sos, 0, model.eos, model.dt_eos
    batch = {"id_prev": ids, "dt_prev": dts}
    if model.video_encoder is not None:
        batch["frames"] = torch.randn(rows, *model.frame_shape, generator=g)
    if model.behaviour_mlp is not None:
        batch["behaviour"] = torch.randn(rows, model.behaviour_len, model.n_behaviour, generator=g)
        batch["behaviour_dt"] = torch.zeros(rows, model.behaviour_len, dtype=torch.long)
    return batch


def time_generation(model: Neuroformer, windows: int, use_cache: bool, rows: int = 1) -> tuple[float, float, list]:
    """(tokens per wall second, tokens per CPU second of this process, the tokens)."""
    batch = context(model, rows)
    start, cpu = time.perf_counter(), time.process_time()
    out = model.generate(batch, n_windows=windows, context_fn=lambda w: batch, use_cache=use_cache,
                         generator=torch.Generator().manual_seed(0), ignore_eos=True)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    n_tokens = sum(ids.numel() for ids in out["ids"])
    return n_tokens / elapsed, n_tokens / cpu, out["ids"] + out["dts"]


def per_token_weights(model: Neuroformer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(bias, weight) of every projection that one cached token multiplies, in the layout `Block.step` uses
    (`step_weights`: (in, out), contiguous): every block's query, output and MLP projections, and the fused
    key/value projections of the self-attention layers (cross-attention keys/values are per window)."""
    weights = []
    for blk in [*model.state_encoder, *model.decoder]:
        weights.append(blk.step_weights()["kv"])
    for blk in [*model.state_encoder, *model.history_blocks, *model.stimulus_blocks, *model.behaviour_blocks,
                *model.decoder]:
        w = blk.step_weights()
        weights += [w["q"], w["proj"], w["fc1"], w["fc2"]]
    return weights


def matvec_floor_s(model: Neuroformer, rows: int = 1, reps: int = 20) -> float:
    """Seconds per token of the per-token matrix products alone, as `Block.step` runs them (`addmm` on the
    step weights; no attention, norms or sampling): a lower bound on a cached token's cost. At batch 1 these are
    matrix-vector products, limited by reading the weights from memory."""
    weights = per_token_weights(model)
    inputs = {w.shape[0]: torch.randn(rows, w.shape[0]) for _, w in weights}
    with torch.no_grad():
        for b, w in weights:
            torch.addmm(b, inputs[w.shape[0]], w)
        start = time.perf_counter()
        for _ in range(reps):
            for b, w in weights:
                torch.addmm(b, inputs[w.shape[0]], w)
    return (time.perf_counter() - start) / reps


class _OfficialWindows(torch.utils.data.Dataset):
    """Windows in the (x, y) form the official generate_spikes reads: a random 300-token past, SOS then PAD."""

    def __init__(self, n_windows: int, n_neurons: int):
        self.n_windows, self.n_neurons = n_windows, n_neurons

    def __len__(self) -> int:
        return self.n_windows

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        g, n = torch.Generator().manual_seed(i), self.n_neurons
        ids = torch.full((100,), n + 2)
        ids[0] = n
        x = {"id_prev": torch.randint(0, n, (300,), generator=g), "dt_prev": torch.randint(0, 6, (300,), generator=g),
             "pad_prev": torch.tensor(0), "id": ids, "dt": torch.zeros(100, dtype=torch.long), "pad": torch.tensor(0),
             "trial": torch.tensor(0.0), "interval": torch.tensor(0.05 * (i + 1))}
        return x, {"id": torch.randint(0, n, (100,), generator=g), "dt": torch.randint(0, 6, (100,), generator=g)}


def official_tokens_per_s(folder: str, n_neurons: int = 100, windows: int = 3) -> tuple[float, float, int]:
    """Build the official Neuroformer (uni-modal, n_embd 256, 4 layers per stage, past 300) and time its own
    `simulation.generate_spikes` (top-p 0.95, true past) on `windows` windows: a forward over the full padded
    100-token block per token, with its losses and scores, until EOS. Tokens = forward calls."""
    sys.path.insert(0, folder)
    if "timm" not in sys.modules:  # imported at the top of the official model file, unused by default
        stub = types.ModuleType("timm")
        stub.__spec__ = importlib.machinery.ModuleSpec("timm", None)
        sys.modules["timm"] = stub
    from model_neuroformer import Neuroformer as Official  # noqa: E402
    from simulation import generate_spikes  # noqa: E402

    ns = lambda **kw: SimpleNamespace(**kw)  # noqa: E731
    config = ns(n_embd=256, n_head=8, pos_emb=True, temp_emb=True, wave_emb=True, class_weights=None,
                block_size=ns(id=100, prev_id=300, frame=0), layers=ns(state=4, state_history=4, stimulus=0),
                dropout=ns(attn=0.2, resid=0.2, embd=0.2, id=0.2, im=0.2, pos=0.2, temp=0.2),
                sparse=ns(topk=None, topk_id=None, topk_frame=None, mask=False),
                contrastive=ns(contrastive=False, clip_temp=0.5), frame_encoder=ns(), vit_encoder=False,
                mlp_only=False, gru_only=False, gru2_only=False)
    stoi_id = {**{i: i for i in range(n_neurons)}, "SOS": n_neurons, "EOS": n_neurons + 1, "PAD": n_neurons + 2}
    dt_values = [round(0.01 * i, 2) for i in range(6)]
    stoi_dt = {**{v: i for i, v in enumerate(dt_values)}, "SOS": 6, "EOS": 7, "PAD": 8}
    itos = {"ID": {v: k for k, v in stoi_id.items()}, "dt": {v: k for k, v in stoi_dt.items()}}
    tokenizer = SimpleNamespace(ID_vocab_size=len(stoi_id), dt_vocab_size=len(stoi_dt),
                                stoi={"ID": stoi_id, "dt": stoi_dt}, itos=itos)
    model = Official(config, tokenizer).eval()
    calls, forward = [0], model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    model.forward = counted
    torch.manual_seed(0)
    start, cpu = time.perf_counter(), time.process_time()
    generate_spikes(model, _OfficialWindows(windows, n_neurons), 0.05, 0.05, tokenizer, sample=True, top_p=0.95,
                    top_p_t=0.95, true_past=True, p_bar=True)
    n, n_params = calls[0], sum(p.numel() for p in model.parameters())
    return n / (time.perf_counter() - start), n / (time.process_time() - cpu), n_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16],
                        help="rows generated together, one measurement per value (the official code: 1)")
    parser.add_argument("--official", default=None, help="folder with the official neuroformer/*.py modules")
    parser.add_argument("--smoke", action="store_true", help="sim100 size, one window, batch 1: checks the code")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = {
        "official size (neuroformer_official)": lambda: create_model("neuroformer_official"),
        "sim100 size": lambda: create_model("neuroformer", n_embd=64, n_head=1, dropout=0.1, frame_shape=[3, 16, 16],
                                            n_behaviour=1),
    }
    if args.smoke:
        args.windows, args.batch = 1, [1]
        sizes.pop("official size (neuroformer_official)")
        if not args.official:
            print("smoke: the official code is skipped (no --official)")
    sizes = {name: make() for name, make in sizes.items()}
    if args.official:
        baseline, baseline_cpu, n_params = official_tokens_per_s(args.official)
        print(f"official code (same size, {n_params / 1e6:.2f}M params), its generate_spikes (batch 1) measured now: "
              f"{baseline:.1f} tokens/s ({baseline_cpu:.1f} per CPU-s, {99 / baseline:.1f} s per 99-token window)")
    else:
        baseline = baseline_cpu = ANCHOR_TOKENS_PER_S
        print(f"official code not given (--official): anchor {ANCHOR_TOKENS_PER_S} tokens/s (official, 2 threads, "
              f"measured earlier on this kind of machine)")
    for rows in args.batch:
        for name, model in sizes.items():
            model.eval()
            cached, cached_cpu, tokens_c = time_generation(model, args.windows, True, rows)
            recompute, recompute_cpu, tokens_r = time_generation(model, args.windows, False, rows)
            same = all(torch.equal(a, b) for a, b in zip(tokens_c, tokens_r))
            floor = matvec_floor_s(model, rows) / rows  # per token
            line = (f"{name}: {model.num_parameters() / 1e6:.2f}M params, {args.threads} threads, batch {rows}, "
                    f"windows of 100 tokens: KV cache {cached:.1f} tokens/s ({cached_cpu:.1f} per CPU-s), recompute "
                    f"{recompute:.1f} tokens/s ({recompute_cpu:.1f} per CPU-s), ratio {cached / recompute:.1f}x wall, "
                    f"{cached_cpu / recompute_cpu:.1f}x CPU time; identical tokens: {same}; per-token matrix products "
                    f"alone {floor * 1e3:.2f} ms, so the cache can be at most {1 / (floor * recompute):.1f}x "
                    f"recompute here")
            if name.startswith("official"):
                line += (f"; KV cache / official code = {cached / baseline:.1f}x wall, "
                         f"{cached_cpu / baseline_cpu:.1f}x CPU time; / anchor {ANCHOR_TOKENS_PER_S} tokens/s = "
                         f"{cached / ANCHOR_TOKENS_PER_S:.1f}x")
            print(line, flush=True)


if __name__ == "__main__":
    main()
