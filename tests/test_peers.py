"""The peer libraries' models (ncps CfC / LTC on AutoNCP wirings, an snnTorch LIF network): built by their own
libraries, listed, stepping through time (a whole sequence equals the same steps one at a time with the state
carried), the LIF network's spikes trained through a surrogate gradient, and a one-line error without the extra."""

from __future__ import annotations

import sys

import pytest
import torch

import biozoo
from biozoo._core import BiozooError

pytest.importorskip("ncps", reason="the peers extra: pip install -e '.[peers]'")
pytest.importorskip("snntorch", reason="the peers extra: pip install -e '.[peers]'")

PEERS = ("cfc", "ltc", "lif_snn")


def test_listed():
    assert set(PEERS) <= set(biozoo.list_models())


def test_built_by_their_libraries():
    import ncps.torch
    import snntorch

    assert isinstance(biozoo.create_model("cfc").rnn, ncps.torch.CfC)
    assert isinstance(biozoo.create_model("ltc").rnn, ncps.torch.LTC)
    assert type(biozoo.create_model("cfc").rnn.wiring).__name__ == "AutoNCP"
    assert isinstance(biozoo.create_model("lif_snn").lif, snntorch.Leaky)


@pytest.mark.parametrize("name", PEERS + ("ctm_online",))
def test_a_sequence_is_its_steps_with_the_state_carried(name):
    torch.manual_seed(0)
    model = biozoo.create_model(name, input_size=3, num_classes=4).eval()
    x = torch.randn(2, 6, 3)
    with torch.no_grad():
        whole = model(x).logits  # (B, C, T)
        state, steps = model.initial_state(2), []
        for t in range(6):
            out = model(x[:, t], state=state)
            state = out.state
            steps.append(out.logits)
    assert whole.shape == (2, 4, 6)
    assert torch.allclose(whole, torch.stack(steps, -1), atol=1e-5)


def test_lif_spikes_and_learns_through_the_surrogate():
    torch.manual_seed(0)
    model = biozoo.create_model("lif_snn", input_size=3, num_classes=2, hidden_size=16)
    out = model(torch.randn(4, 20, 3) * 3)
    spikes = out["spikes"]
    assert set(spikes.unique().tolist()) == {0.0, 1.0}
    out.logits.sum().backward()
    assert model.fc_in.weight.grad.abs().sum() > 0  # only through the spikes' surrogate gradient


def test_missing_library_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ncps.torch", None)
    with pytest.raises(BiozooError, match=r'pip install -e "\.\[peers\]"'):
        biozoo.create_model("cfc")
