"""`profile` counts what torch's FLOP counter counts (MACs = FLOPs / 2 per sample), adds the fused recurrent
kernels the counter cannot see, and reports ticks, sparsity, footprint and time; `biozoo profile` prints it."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import biozoo
from biozoo.train.profile import profile


def counted_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def test_mlp_matches_the_counter_and_the_arithmetic():
    model = biozoo.create_model("mlp", in_features=64, num_classes=10, hidden=[32, 16])
    x = torch.randn(4, 1, 8, 8)
    p = profile(model, x)
    assert p["macs"] == counted_macs(model, x) == 64 * 32 + 32 * 16 + 16 * 10
    assert p["parameters"] == sum(q.numel() for q in model.parameters()) and p["footprint"] == 4 * p["parameters"]
    assert p["ticks"] is None and p["activation_sparsity"] is not None and p["seconds_per_sample"] > 0


def test_ctm_counts_einsums_and_attention_and_reports_ticks():
    torch.manual_seed(0)
    model = biozoo.create_model("ctm", iterations=4, d_model=32, d_input=16, heads=2, n_synch_out=8,
                                n_synch_action=8, memory_length=4, memory_hidden_dims=4, backbone_type="none",
                                in_channels=8, out_dims=3)
    x = torch.randn(2, 8, 5, 5)
    p = profile(model, x)
    assert p["macs"] == pytest.approx(counted_macs(model, x)) and p["macs"] > 0
    assert p["ticks"] == 4.0


def test_the_transformer_is_counted_off_its_fused_path():
    model = biozoo.create_model("transformer", input_size=3, seq_len=10, num_classes=2, per_step=True, causal=True)
    x = torch.randn(2, 10, 3)
    p = profile(model, x)
    model.train()  # the training path is the unfused one the counter sees
    assert p["macs"] == pytest.approx(counted_macs(model, x)) and p["macs"] > 10 * 2 * 4 * 64 * 64


def test_fused_lstm_gates_are_added():
    model = biozoo.create_model("lstm", input_size=3, num_classes=2, hidden_size=16, per_step=True)
    x = torch.randn(2, 10, 3)
    p = profile(model, x)
    gates = 10 * 4 * (3 + 16) * 16
    assert p["rnn_macs"] == gates and p["macs"] == pytest.approx(gates + counted_macs(model, x))


def test_spiking_activation_sparsity():
    pytest.importorskip("snntorch")
    model = biozoo.create_model("lif_snn", input_size=3, num_classes=2, hidden_size=16)
    x = torch.randn(2, 10, 3)
    p = profile(model, x)
    with torch.no_grad():
        spikes = model(x)["spikes"]
    assert p["activation_sparsity"] == pytest.approx(float((spikes == 0).float().mean()))


def test_cli(biozoo_cli):
    out = biozoo_cli("profile", "-c", "configs/tasks/digits.yaml", "-c", "configs/models/mlp.yaml").stdout
    assert "parameters: 85002" in out and "macs: 8.448e+04" in out  # 64*256 + 256*256 + 256*10
    bad = biozoo_cli("profile", "-c", "configs/tasks/digits.yaml", check=False)
    assert bad.returncode != 0 and "two configs" in bad.stderr
